// The forward pieces of one decoder layer (see decoder_layer.h for the math).
#include "model/decoder_layer.h"

#include "ops/cpu/ops.h"

namespace qt {

namespace {
const Tensor kNoBias;
}  // namespace

template <typename T>
const T* Projection<T>::lora_input(std::vector<T>& buf, const T* x, int64_t N) const {
  if (drop_p <= 0) return x;
  buf.resize(static_cast<size_t>(N * in()));
  cpu::dropout_apply<T>(buf.data(), x, N, in(), drop_p, drop_key, nullptr);
  return buf.data();
}

template <typename T>
void Projection<T>::forward(T* y, std::vector<T>& xa, const T* x, int64_t N) const {
  cpu::linear_forward(y, x, W.data<T>(), data_or_null<T>(b), N, in(), out());
  if (lora) {
    const int64_t r = lora->A.dim(0);
    xa.resize(static_cast<size_t>(N * r));
    std::vector<T> xd;
    cpu::lora_forward(y, xa.data(), lora_input(xd, x, N), lora->A.data<T>(), lora->B.data<T>(), scale, N, in(), out(),
                      r);
  }
}

template <typename T>
void Projection<T>::backward(T* dx, LoraPair* dlora, const T* dy, const T* x, const std::vector<T>& xa,
                             int64_t N) const {
  cpu::linear_backward(dx, (T*)nullptr, (T*)nullptr, dy, x, W.data<T>(), N, in(), out());
  if (!lora) return;
  const int64_t r = lora->A.dim(0);
  std::vector<T> xd, dxd(drop_p > 0 ? static_cast<size_t>(N * in()) : 0, T(0));
  cpu::lora_backward(drop_p > 0 ? dxd.data() : dx, dlora->A.data<T>(), dlora->B.data<T>(), dy, lora_input(xd, x, N),
                     xa.data(), lora->A.data<T>(), lora->B.data<T>(), scale, N, in(), out(), r);
  if (drop_p > 0) {
    cpu::dropout_apply<T>(dxd.data(), dxd.data(), N, in(), drop_p, drop_key, nullptr);  // d dropout(x) / dx
    cpu::add_inplace(dx, dxd.data(), N * in());
  }
}

template <typename T>
uint64_t LayerParams<T>::drop_key(LoraSlot s) const {
  return cpu::dropout_key(dropout.seed, dropout.step, dropout.micro_batch, layer, s);
}

template <typename T>
ExpertDropout LayerParams<T>::expert_dropout() const {
  return ExpertDropout{drop_p(), {drop_key(kLoraGate), drop_key(kLoraUp), drop_key(kLoraDown)}};
}

template <typename T>
const LoraPair* LayerParams<T>::lora_of(LoraSlot s) const {
  if (!lora) return nullptr;
  const LoraPair& pair = lora->slot[s];
  return pair.present() ? &pair : nullptr;
}

template <typename T>
Projection<T> LayerParams<T>::proj(LoraSlot s) const {
  switch (s) {
    case kLoraQ: return {w.attn.q_w, w.attn.q_b, lora_of(s), scale, drop_p(), drop_key(s)};
    case kLoraK: return {w.attn.k_w, w.attn.k_b, lora_of(s), scale, drop_p(), drop_key(s)};
    case kLoraV: return {w.attn.v_w, w.attn.v_b, lora_of(s), scale, drop_p(), drop_key(s)};
    case kLoraO: return {w.attn.o_w, kNoBias, lora_of(s), scale, drop_p(), drop_key(s)};
    case kLoraGate: return {w.mlp.gate, kNoBias, lora_of(s), scale, drop_p(), drop_key(s)};
    case kLoraUp: return {w.mlp.up, kNoBias, lora_of(s), scale, drop_p(), drop_key(s)};
    default: return {w.mlp.down, kNoBias, lora_of(s), scale, drop_p(), drop_key(s)};
  }
}

template <typename T>
void layer_attention_inputs(LayerActivations<T>& c, const T* x, int64_t N, const LayerParams<T>& p, const float* cos,
                            const float* sin, bool keep_for_backward) {
  const ModelConfig& cfg = p.cfg;
  const int64_t H = cfg.hidden_size, nh = cfg.num_attention_heads, nkv = cfg.num_key_value_heads, hd = cfg.head_dim;
  c.a.resize(static_cast<size_t>(N * H));
  c.rstd1.resize(static_cast<size_t>(N));
  cpu::rmsnorm_forward(c.a.data(), c.rstd1.data(), x, p.w.input_norm.template data<T>(), N, H, cfg.rms_norm_eps);
  c.q.resize(static_cast<size_t>(N * nh * hd));
  c.k.resize(static_cast<size_t>(N * nkv * hd));
  c.v.resize(static_cast<size_t>(N * nkv * hd));
  p.proj(kLoraQ).forward(c.q.data(), c.xa[kLoraQ], c.a.data(), N);
  p.proj(kLoraK).forward(c.k.data(), c.xa[kLoraK], c.a.data(), N);
  p.proj(kLoraV).forward(c.v.data(), c.xa[kLoraV], c.a.data(), N);
  if (cfg.qk_norm) {
    // The backward needs the projections before the norm; forward-only normalises in place.
    if (keep_for_backward) {
      c.q_raw = c.q;
      c.k_raw = c.k;
    }
    const T* q_in = keep_for_backward ? c.q_raw.data() : c.q.data();
    const T* k_in = keep_for_backward ? c.k_raw.data() : c.k.data();
    c.rstd_q.resize(static_cast<size_t>(N * nh));
    c.rstd_k.resize(static_cast<size_t>(N * nkv));
    cpu::rmsnorm_forward(c.q.data(), c.rstd_q.data(), q_in, p.w.attn.q_norm.template data<T>(), N * nh, hd,
                         cfg.rms_norm_eps);
    cpu::rmsnorm_forward(c.k.data(), c.rstd_k.data(), k_in, p.w.attn.k_norm.template data<T>(), N * nkv, hd,
                         cfg.rms_norm_eps);
  }
  cpu::rope_forward(c.q.data(), cos, sin, N, nh, hd);
  cpu::rope_forward(c.k.data(), cos, sin, N, nkv, hd);
}

template <typename T>
void layer_output_and_mlp(T* x, LayerActivations<T>& c, MoeMlpCache<T>& moe, int64_t N, const LayerParams<T>& p,
                          bool keep_for_backward) {
  const ModelConfig& cfg = p.cfg;
  const int64_t H = cfg.hidden_size;
  std::vector<T> y(static_cast<size_t>(N * H));
  p.proj(kLoraO).forward(y.data(), c.xa[kLoraO], c.attn.data(), N);
  cpu::add_inplace(x, y.data(), N * H);
  if (keep_for_backward) c.h.assign(x, x + N * H);
  c.m.resize(static_cast<size_t>(N * H));
  c.rstd2.resize(static_cast<size_t>(N));
  cpu::rmsnorm_forward(c.m.data(), c.rstd2.data(), x, p.w.post_norm.template data<T>(), N, H, cfg.rms_norm_eps);
  if (p.w.is_moe) {
    static const LayerLora kNoLora{};
    moe_mlp_forward<T>(y.data(), moe, c.m.data(), N, p.w.mlp, p.lora ? *p.lora : kNoLora, p.scale,
                       cfg.num_experts_per_tok, cfg.norm_topk_prob, p.expert_dropout());
  } else {
    const int64_t I = p.w.mlp.gate.dim(0);
    c.g.resize(static_cast<size_t>(N * I));
    c.u.resize(static_cast<size_t>(N * I));
    c.act.resize(static_cast<size_t>(N * I));
    p.proj(kLoraGate).forward(c.g.data(), c.xa[kLoraGate], c.m.data(), N);
    p.proj(kLoraUp).forward(c.u.data(), c.xa[kLoraUp], c.m.data(), N);
    cpu::swiglu_forward(c.act.data(), c.g.data(), c.u.data(), N * I);
    p.proj(kLoraDown).forward(y.data(), c.xa[kLoraDown], c.act.data(), N);
  }
  cpu::add_inplace(x, y.data(), N * H);
}

#define QT_INSTANTIATE(T)                                                                                         \
  template struct Projection<T>;                                                                                  \
  template struct LayerParams<T>;                                                                                 \
  template void layer_attention_inputs<T>(LayerActivations<T>&, const T*, int64_t, const LayerParams<T>&,         \
                                          const float*, const float*, bool);                                     \
  template void layer_output_and_mlp<T>(T*, LayerActivations<T>&, MoeMlpCache<T>&, int64_t, const LayerParams<T>&, \
                                        bool);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt
