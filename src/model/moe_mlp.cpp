// The Qwen3-MoE sparse MLP block: see moe_mlp.h for the math.
// Per expert e with n_e rows (all matrices row-major, LoRA on a projection when its slot is present):
//   g = xs_e Wg_e^T + s (xs_e Ag_e^T) Bg_e^T      (n_e,I)
//   u = xs_e Wu_e^T + s (xs_e Au_e^T) Bu_e^T      (n_e,I)
//   h = silu(g) * u                               (n_e,I)
//   ys_e = h Wd_e^T + s (h Ad_e^T) Bd_e^T         (n_e,H)
// Backward per expert: dys_e from moe_combine_backward, then dh, (dg, du), dxs_e in reverse; the
// routing-weight gradient dtopk_w goes through moe_router_backward to the logits and to dx via W_r.
#include "model/moe_mlp.h"

#include <algorithm>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt {

namespace {

constexpr const char* kCtx = "moe_mlp";
constexpr LoraSlot kExpertSlots[3] = {kLoraGate, kLoraUp, kLoraDown};

void expect_shape(const Tensor& t, const Shape& shape, DType dtype, const char* what) {
  if (!t.defined()) fail(kCtx, "{} is missing", what);
  if (t.shape() != shape) fail(kCtx, "{} has shape {}, expected {}", what, shape_str(t.shape()), shape_str(shape));
  if (t.dtype() != dtype) fail(kCtx, "{} is {}, expected {}", what, dtype_name(t.dtype()), dtype_name(dtype));
  if (t.device() != Device::CPU) fail(kCtx, "{} is on {}, expected cpu", what, device_name(t.device()));
}

struct MoeDims {
  int64_t E, H, I;
};

// Checks the base weights of a MoE layer and returns its dimensions.
MoeDims check_weights(const MlpWeights& w, DType dtype) {
  if (!w.router.defined() || w.router.ndim() != 2) fail(kCtx, "router weight must be (E,H)");
  if (!w.gate.defined() || w.gate.ndim() != 3) fail(kCtx, "expert gate weight must be (E,I,H)");
  const MoeDims d{w.router.dim(0), w.router.dim(1), w.gate.dim(1)};
  if (d.E < 1 || d.H < 1 || d.I < 1) fail(kCtx, "empty MoE dimensions E={} H={} I={}", d.E, d.H, d.I);
  expect_shape(w.router, {d.E, d.H}, dtype, "router weight");
  expect_shape(w.gate, {d.E, d.I, d.H}, dtype, "expert gate weight");
  expect_shape(w.up, {d.E, d.I, d.H}, dtype, "expert up weight");
  expect_shape(w.down, {d.E, d.H, d.I}, dtype, "expert down weight");
  return d;
}

// (in, out) of an expert projection.
std::pair<int64_t, int64_t> slot_in_out(LoraSlot s, const MoeDims& d) {
  return s == kLoraDown ? std::pair{d.I, d.H} : std::pair{d.H, d.I};
}

// Rank of the fused expert adapter in slot s (0 when absent); checks A (E,r,in), B (E,out,r).
int64_t check_lora(const LoraPair& lp, LoraSlot s, const MoeDims& d, DType dtype, const char* which) {
  if (!lp.present()) return 0;
  const std::string name = fmt::format("{} {} lora_A", which, lora_slot_module(s));
  if (lp.A.ndim() != 3 || lp.A.dim(0) != d.E)
    fail(kCtx, "{} has shape {}, expected (E={},r,in)", name, shape_str(lp.A.shape()), d.E);
  const int64_t r = lp.A.dim(1);
  if (r < 1) fail(kCtx, "{} has rank 0", name);
  const auto [in, out] = slot_in_out(s, d);
  expect_shape(lp.A, {d.E, r, in}, dtype, name.c_str());
  expect_shape(lp.B, {d.E, out, r}, dtype, fmt::format("{} {} lora_B", which, lora_slot_module(s)).c_str());
  return r;
}

// The LoRA dropout of one expert projection over rows `rows` (assignment ids) of its input.
struct RowDropout {
  double p;
  uint64_t key;
  const int32_t* rows;
  // x itself, or dropout(x) (n,in) written to buf.
  template <typename T>
  const T* apply(std::vector<T>& buf, const T* x, int64_t n, int64_t in) const {
    if (p <= 0) return x;
    buf.resize(size_t(n * in));
    cpu::dropout_apply<T>(buf.data(), x, n, in, p, key, rows);
    return buf.data();
  }
};

// y (n,out) = x W_e^T (+ LoRA of dropout(x) into y, saving xa (n,r)) for expert e of a fused
// (E,out,in) weight.
template <typename T>
void expert_proj_forward(T* y, T* xa, const T* x, const Tensor& W, const LoraPair& lp, int64_t e, int64_t n,
                         int64_t in, int64_t out, int64_t r, T scale, const RowDropout& drop) {
  cpu::linear_forward<T>(y, x, W.data<T>() + e * out * in, nullptr, n, in, out);
  if (r == 0) return;
  std::vector<T> xd;
  cpu::lora_forward<T>(y, xa, drop.apply(xd, x, n, in), lp.A.data<T>() + e * r * in, lp.B.data<T>() + e * out * r,
                       scale, n, in, out, r);
}

// dx (n,in) += dy W_e (+ LoRA through the dropout mask), dA_e / dB_e += LoRA gradients; null
// outputs skipped.
template <typename T>
void expert_proj_backward(T* dx, LoraPair* dlp, const T* dy, const T* x, const T* xa, const Tensor& W,
                          const LoraPair& lp, int64_t e, int64_t n, int64_t in, int64_t out, int64_t r, T scale,
                          const RowDropout& drop) {
  if (dx) cpu::linear_backward<T>(dx, nullptr, nullptr, dy, x, W.data<T>() + e * out * in, n, in, out);
  if (r == 0) return;
  T* dA = dlp ? dlp->A.data<T>() + e * r * in : nullptr;
  T* dB = dlp ? dlp->B.data<T>() + e * out * r : nullptr;
  if (!(dx || dA || dB)) return;
  const bool dropped = drop.p > 0;
  std::vector<T> xd, dxd(dropped && dx ? size_t(n * in) : 0, T(0));
  cpu::lora_backward<T>(dropped && dx ? dxd.data() : dx, dA, dB, dy, drop.apply(xd, x, n, in), xa,
                        lp.A.data<T>() + e * r * in, lp.B.data<T>() + e * out * r, scale, n, in, out, r);
  if (dropped && dx) {
    cpu::dropout_apply<T>(dxd.data(), dxd.data(), n, in, drop.p, drop.key, drop.rows);  // d dropout(x) / dx
    cpu::add_inplace<T>(dx, dxd.data(), n * in);
  }
}

}  // namespace

template <typename T>
void moe_mlp_forward(T* y, MoeMlpCache<T>& c, const T* x, int64_t N, const MlpWeights& w, const LayerLora& lora,
                     T lora_scale, int64_t top_k, bool norm_topk_prob, const ExpertDropout& dropout) {
  constexpr DType dt = dtype_of<T>();
  const MoeDims d = check_weights(w, dt);
  if (N < 0) fail(kCtx, "negative token count {}", N);
  if (top_k < 1 || top_k > d.E) fail(kCtx, "num_experts_per_tok {} outside [1, {}]", top_k, d.E);
  int64_t rank[3];
  for (int i = 0; i < 3; ++i) rank[i] = check_lora(lora.slot[kExpertSlots[i]], kExpertSlots[i], d, dt, "adapter");

  const int64_t E = d.E, H = d.H, I = d.I, k = top_k, Nk = N * k;
  c.N = N, c.E = E, c.H = H, c.I = I, c.k = k;
  c.norm_topk_prob = norm_topk_prob;
  if (!(dropout.p >= 0 && dropout.p < 1)) fail(kCtx, "LoRA dropout {} outside [0, 1)", dropout.p);
  c.dropout = dropout;
  c.router_logits.resize(size_t(N * E));
  c.probs.resize(size_t(N * E));
  c.topk_idx.resize(size_t(Nk));
  c.topk_w.resize(size_t(Nk));
  c.perm.resize(size_t(Nk));
  c.offsets.resize(size_t(E + 1));
  c.xs.resize(size_t(Nk * H));
  c.g.resize(size_t(Nk * I));
  c.u.resize(size_t(Nk * I));
  c.h.resize(size_t(Nk * I));
  c.ys.resize(size_t(Nk * H));
  for (int i = 0; i < 3; ++i) c.xa[size_t(i)].assign(size_t(Nk * rank[i]), T(0));

  // routing
  cpu::linear_forward<T>(c.router_logits.data(), x, w.router.data<T>(), nullptr, N, H, E);
  cpu::moe_router_forward<T>(c.topk_idx.data(), c.topk_w.data(), c.probs.data(), c.router_logits.data(), N, E, k,
                             norm_topk_prob);
  cpu::moe_sort(c.perm.data(), c.offsets.data(), c.topk_idx.data(), N, k, E);
  cpu::moe_gather<T>(c.xs.data(), x, c.perm.data(), Nk, k, H);

  // experts, each over its contiguous rows (BLAS threads inside; this loop stays serial)
  const LoraPair &lg = lora.slot[kLoraGate], &lu = lora.slot[kLoraUp], &ld = lora.slot[kLoraDown];
  for (int64_t e = 0; e < E; ++e) {
    const int64_t p0 = c.offsets[size_t(e)], n = c.tokens_of_expert(e);
    if (n == 0) continue;
    const T* xs = c.xs.data() + p0 * H;
    T *g = c.g.data() + p0 * I, *u = c.u.data() + p0 * I, *h = c.h.data() + p0 * I;
    const int32_t* rows = c.perm.data() + p0;
    expert_proj_forward<T>(g, c.xa[0].data() + p0 * rank[0], xs, w.gate, lg, e, n, H, I, rank[0], lora_scale,
                           {dropout.p, dropout.key[0], rows});
    expert_proj_forward<T>(u, c.xa[1].data() + p0 * rank[1], xs, w.up, lu, e, n, H, I, rank[1], lora_scale,
                           {dropout.p, dropout.key[1], rows});
    cpu::swiglu_forward<T>(h, g, u, n * I);
    expert_proj_forward<T>(c.ys.data() + p0 * H, c.xa[2].data() + p0 * rank[2], h, w.down, ld, e, n, I, H, rank[2],
                           lora_scale, {dropout.p, dropout.key[2], rows});
  }

  std::fill(y, y + N * H, T(0));
  cpu::moe_combine<T>(y, c.ys.data(), c.topk_w.data(), c.perm.data(), Nk, k, H);
}

template <typename T>
void moe_mlp_backward(T* dx, LayerLora* dlora, const T* dy, const MoeMlpCache<T>& c, const MlpWeights& w,
                      const LayerLora& lora, T lora_scale, const T* drouter_logits) {
  constexpr DType dt = dtype_of<T>();
  const MoeDims d = check_weights(w, dt);
  if (d.E != c.E || d.H != c.H || d.I != c.I || c.offsets.size() != size_t(c.E + 1))
    fail(kCtx, "backward: the cache was filled with other weights (E={} H={} I={}, cache E={} H={} I={})", d.E, d.H,
         d.I, c.E, c.H, c.I);
  int64_t rank[3];
  LoraPair* dslot[3] = {nullptr, nullptr, nullptr};
  for (int i = 0; i < 3; ++i) {
    const LoraSlot s = kExpertSlots[i];
    rank[i] = check_lora(lora.slot[s], s, d, dt, "adapter");
    if (c.xa[size_t(i)].size() != size_t(c.assignments() * rank[i]))
      fail(kCtx, "backward: the cache was filled with another adapter ({} lora)", lora_slot_module(s));
    if (dlora && rank[i] > 0) {
      if (check_lora(dlora->slot[s], s, d, dt, "gradient") != rank[i])
        fail(kCtx, "gradient {} lora is missing or of another rank", lora_slot_module(s));
      dslot[i] = &dlora->slot[s];
    }
  }
  const bool any_lora_grad = dslot[0] || dslot[1] || dslot[2];
  if (dx == nullptr && !any_lora_grad) return;

  const int64_t N = c.N, E = c.E, H = c.H, I = c.I, k = c.k, Nk = c.assignments();
  // expert outputs and routing weights
  std::vector<T> dys(size_t(Nk * H), T(0)), dtopk_w(size_t(Nk), T(0));
  cpu::moe_combine_backward<T>(dys.data(), dx ? dtopk_w.data() : nullptr, dy, c.ys.data(), c.topk_w.data(),
                               c.perm.data(), Nk, k, H);

  std::vector<T> dh(size_t(Nk * I), T(0)), dg(size_t(Nk * I), T(0)), du(size_t(Nk * I), T(0));
  std::vector<T> dxs(dx ? size_t(Nk * H) : 0, T(0));
  const LoraPair &lg = lora.slot[kLoraGate], &lu = lora.slot[kLoraUp], &ld = lora.slot[kLoraDown];
  for (int64_t e = 0; e < E; ++e) {
    const int64_t p0 = c.offsets[size_t(e)], n = c.tokens_of_expert(e);
    if (n == 0) continue;
    const T *xs = c.xs.data() + p0 * H, *g = c.g.data() + p0 * I, *u = c.u.data() + p0 * I;
    const T* h = c.h.data() + p0 * I;
    T *dh_e = dh.data() + p0 * I, *dg_e = dg.data() + p0 * I, *du_e = du.data() + p0 * I;
    T* dxs_e = dx ? dxs.data() + p0 * H : nullptr;
    // down: dh is needed whenever anything upstream of it wants a gradient
    const bool need_dh = dx || dslot[0] || dslot[1];
    const int32_t* rows = c.perm.data() + p0;
    const ExpertDropout& dr = c.dropout;
    expert_proj_backward<T>(need_dh ? dh_e : nullptr, dslot[2], dys.data() + p0 * H, h, c.xa[2].data() + p0 * rank[2],
                            w.down, ld, e, n, I, H, rank[2], lora_scale, {dr.p, dr.key[2], rows});
    if (!need_dh) continue;
    cpu::swiglu_backward<T>(dg_e, du_e, dh_e, g, u, n * I);
    expert_proj_backward<T>(dxs_e, dslot[0], dg_e, xs, c.xa[0].data() + p0 * rank[0], w.gate, lg, e, n, H, I,
                            rank[0], lora_scale, {dr.p, dr.key[0], rows});
    expert_proj_backward<T>(dxs_e, dslot[1], du_e, xs, c.xa[1].data() + p0 * rank[1], w.up, lu, e, n, H, I, rank[1],
                            lora_scale, {dr.p, dr.key[1], rows});
  }
  if (dx == nullptr) return;

  cpu::moe_gather_backward<T>(dx, dxs.data(), c.perm.data(), Nk, k, H);
  // routing path: dtopk_w -> logits -> dx through the frozen router (dx += dlogits W_r)
  std::vector<T> dlogits(size_t(N * E), T(0));
  cpu::moe_router_backward<T>(dlogits.data(), dtopk_w.data(), c.probs.data(), c.topk_idx.data(), N, E, k,
                              c.norm_topk_prob);
  if (drouter_logits) cpu::add_inplace<T>(dlogits.data(), drouter_logits, N * E);
  cpu::gemm<T>(false, false, N, H, E, T(1), dlogits.data(), w.router.data<T>(), T(1), dx);
}

#define QT_INSTANTIATE(T)                                                                                     \
  template struct MoeMlpCache<T>;                                                                             \
  template void moe_mlp_forward<T>(T*, MoeMlpCache<T>&, const T*, int64_t, const MlpWeights&, const LayerLora&, \
                                   T, int64_t, bool, const ExpertDropout&);                                   \
  template void moe_mlp_backward<T>(T*, LayerLora*, const T*, const MoeMlpCache<T>&, const MlpWeights&,        \
                                    const LayerLora&, T, const T*);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt
