// MoE load-balancing loss (HF load_balancing_loss_func): see moe_aux_loss.h for the math.
#include "model/moe_aux_loss.h"

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt {

namespace {

struct AuxStats {
  int64_t N = 0, E = 0, k = 0, rows = 0;
  std::vector<double> f;  // (E) fraction of rows routed to each expert (summed over the k slots)
  std::vector<double> P;  // (E) mean router probability
};

template <typename T>
AuxStats aux_stats(const std::vector<const MoeMlpCache<T>*>& layers) {
  AuxStats s;
  if (layers.empty()) return s;
  for (const auto* c : layers) {
    if (c == nullptr) fail("moe_aux_loss", "null router cache");
    const auto& c0 = *layers.front();
    if (c->N != c0.N || c->E != c0.E || c->k != c0.k)
      fail("moe_aux_loss", "layers differ in shape: N={} E={} k={} vs N={} E={} k={}", c->N, c->E, c->k, c0.N, c0.E,
           c0.k);
  }
  s.N = layers.front()->N, s.E = layers.front()->E, s.k = layers.front()->k;
  s.rows = s.N * int64_t(layers.size());
  s.f.assign(size_t(s.E), 0.0);
  s.P.assign(size_t(s.E), 0.0);
  for (const auto* c : layers) cpu::moe_route_stats(s.P.data(), s.f.data(), c->probs.data(), c->topk_idx.data(), s.N, s.E, s.k);
  if (s.rows == 0) return s;
  for (int64_t e = 0; e < s.E; ++e) {
    s.f[size_t(e)] /= double(s.rows);
    s.P[size_t(e)] /= double(s.rows);
  }
  return s;
}

}  // namespace

template <typename T>
double moe_load_balancing_loss(const std::vector<const MoeMlpCache<T>*>& layers) {
  const AuxStats s = aux_stats(layers);
  if (s.rows == 0) return 0.0;
  double acc = 0;
  for (int64_t e = 0; e < s.E; ++e) acc += s.f[size_t(e)] * s.P[size_t(e)];
  return double(s.E) * acc;
}

template <typename T>
void moe_load_balancing_loss_backward(const std::vector<T*>& drouter_logits,
                                      const std::vector<const MoeMlpCache<T>*>& layers, double dloss) {
  if (drouter_logits.size() != layers.size())
    fail("moe_aux_loss", "{} gradient buffers for {} layers", drouter_logits.size(), layers.size());
  const AuxStats s = aux_stats(layers);
  if (s.rows == 0) return;
  const double scale = dloss * double(s.E) / double(s.rows);
  for (size_t l = 0; l < layers.size(); ++l) {
    T* dl = drouter_logits[l];
    if (dl == nullptr) continue;
    cpu::moe_aux_router_backward(dl, layers[l]->probs.data(), s.f.data(), scale, s.N, s.E);
  }
}

#define QT_INSTANTIATE(T)                                                                     \
  template double moe_load_balancing_loss<T>(const std::vector<const MoeMlpCache<T>*>&);    \
  template void moe_load_balancing_loss_backward<T>(const std::vector<T*>&,                 \
                                                    const std::vector<const MoeMlpCache<T>*>&, double);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt
