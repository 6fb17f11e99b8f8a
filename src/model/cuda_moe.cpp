// The MoE block on CUDA (see cuda_moe.h for the math). Every product is one grouped GEMM over all
// experts with the device-side offsets of moe_sort; the LoRA products run on bf16 copies of the
// fp32 masters (as ops/cuda lora_forward does for dense layers), refreshed at each call, and the
// LoRA up-projection (forward) and input gradient (backward, without dropout) are fused into the
// base product (grouped_gemm.h SecondProduct) with the LoRA scale carried by xa and t.
// Expert chunks (CudaMoeWeights::chunked): each group of products runs once per chunk [e0, e1) of
// experts, as the same calls over E' = e1 - e0 experts with the offsets, weights and LoRA pointers
// advanced by e0 experts (the rows stay where the sort put them: offsets are absolute row indices).
#ifdef QT_HAVE_CUDA
#include "model/cuda_moe.h"

#include <algorithm>

#include "core/error.h"
#include "ops/cuda/grouped_gemm.h"
#include "ops/cuda/ops.h"

namespace qt {

using cuda::bf16;
using cuda::Buffer;

namespace {

template <typename T>
void zero_async(cuda::Context& ctx, Buffer<T>& b, int64_t n) {
  QT_CUDA_CHECK(cudaMemsetAsync(b.get(), 0, size_t(n) * sizeof(T), ctx.stream()));
}

// Projection i (0 gate, 1 up, 2 down): (in, out) widths and the base weight.
struct ProjShape {
  int64_t in, out;
  const bf16* W;
};
ProjShape proj_shape(const CudaMoeWeights& w, const CudaMoeDims& d, int i) {
  if (i == 2) return {d.I, d.H, w.down};
  return {d.H, d.I, i == 0 ? w.gate : w.up};
}

// bf16 copies of the masters A (E,r,in) and B (E,out,r) of projection i into the work buffers.
void lora_bf16(cuda::Context& ctx, const CudaMoeLora& lora, const CudaMoeDims& d, int i, int64_t in, int64_t out,
               bf16* a16, bf16* b16) {
  cuda::f32_to_bf16(ctx, a16, lora.A[size_t(i)], d.E * lora.r * in);
  cuda::f32_to_bf16(ctx, b16, lora.B[size_t(i)], d.E * out * lora.r);
}

struct Ctx {
  cuda::Context& ctx;
  const CudaMoeWeights& w;
  const CudaMoeLora& lora;
  const CudaMoeDims& d;
  const CudaMoeDropout& drop;
  CudaMoeWork& work;
  const int64_t* off;  // the offsets of these experts (E+1, device): work.offsets, or from a chunk's first

  int64_t T() const { return d.T(); }
  // The LoRA input of projection i: x, or dropout(x) (rows = assignment ids) in work.xd.
  const bf16* lora_input(int i, const bf16* x, int64_t in) {
    if (drop.p <= 0) return x;
    if (work.xd.size() < size_t(T() * std::max(d.H, d.I))) {
      work.xd = Buffer<bf16>(size_t(T() * std::max(d.H, d.I)));
      work.dxd = Buffer<bf16>(size_t(T() * std::max(d.H, d.I)));
    }
    cuda::dropout_forward(ctx, work.xd.get(), x, T(), in, drop.p, drop.key[size_t(i)], work.perm.get());
    return work.xd.get();
  }
  // xa_i (T,r) = scale drop_i(x) A_e^T (A16: projection i's bf16 A), kept for the backward.
  bf16* lora_xa(int i, const bf16* x, const bf16* A16) {
    const ProjShape p = proj_shape(w, d, i);
    bf16* xa = work.xa[size_t(i)].get();
    cuda::grouped_gemm_nt(ctx, xa, lora_input(i, x, p.in), A16, off, T(), d.E, lora.r, p.in, lora.scale, false);
    return xa;
  }
  // y (T,out) = x W_e^T (+ xa B_e^T, xa = scale drop(x) A_e^T saved): the LoRA term rides in the base
  // product as its second k range (SecondProduct), so y is written once; the scale is folded into xa.
  void proj_forward(int i, bf16* y, const bf16* x) {
    const ProjShape p = proj_shape(w, d, i);
    if (!lora.present(i)) {
      cuda::grouped_gemm_nt(ctx, y, x, p.W, off, T(), d.E, p.out, p.in, 1.f, false);
      return;
    }
    lora_bf16(ctx, lora, d, i, p.in, p.out, work.a16.get(), work.b16.get());
    bf16* xa = lora_xa(i, x, work.a16.get());
    cuda::grouped_gemm_nt(ctx, y, x, p.W, off, T(), d.E, p.out, p.in, 1.f, false,
                          cuda::SecondProduct{xa, work.b16.get(), lora.r});
  }
  // g = x W_gate,e^T (+ LoRA), u = x W_up,e^T (+ LoRA): the two products of one input in one launch
  // each (grouped_gemm_nt_pair: xa of both, then both base products with their LoRA terms), the
  // masters of both in the bf16 work copies side by side. With dropout (a mask per projection in the
  // one xd buffer) the two xa products run one after the other; with LoRA on one of the two only,
  // proj_forward runs each.
  void gate_up_forward(bf16* g, bf16* u, const bf16* x) {
    const ProjShape pg = proj_shape(w, d, 0), pu = proj_shape(w, d, 1);
    if (lora.present(0) != lora.present(1)) {
      proj_forward(0, g, x);
      proj_forward(1, u, x);
      return;
    }
    if (!lora.present(0)) {
      cuda::grouped_gemm_nt_pair(ctx, g, x, pg.W, {}, {u, pu.W, {}}, off, T(), d.E, d.I, d.H, 1.f);
      return;
    }
    const int64_t r = lora.r;
    bf16 *ag = work.a16.get(), *au = ag + d.E * r * d.H, *bg = work.b16.get(), *bu = bg + d.E * d.I * r;
    lora_bf16(ctx, lora, d, 0, d.H, d.I, ag, bg);
    lora_bf16(ctx, lora, d, 1, d.H, d.I, au, bu);
    bf16 *xag = work.xa[0].get(), *xau = work.xa[1].get();
    if (drop.p > 0) {
      lora_xa(0, x, ag);
      lora_xa(1, x, au);
    } else {
      cuda::grouped_gemm_nt_pair(ctx, xag, x, ag, {}, {xau, au, {}}, off, T(), d.E, r, d.H, lora.scale);
    }
    cuda::grouped_gemm_nt_pair(ctx, g, x, pg.W, {xag, bg, r}, {u, pu.W, {xau, bu, r}}, off, T(), d.E, d.I, d.H, 1.f);
  }
  // dx (T,H) = the input gradient of gate and up together, dg W_g,e + du W_u,e + t_g A_g,e + t_u A_u,e
  // in one product (grouped_gemm_nn_sum: dx written once), with t = scale dy B_e of each (both in
  // work.t) and dA, dB of both accumulated as proj_backward does; with dropout, or LoRA on one of the
  // two only, proj_backward for each (the second accumulating into dx).
  void gate_up_backward(bf16* dx, const bf16* dg, const bf16* du, const bf16* x) {
    if (drop.p > 0 || lora.present(0) != lora.present(1)) {
      proj_backward(0, dx, dg, x, false);
      proj_backward(1, dx, du, x, true);
      return;
    }
    const ProjShape pg = proj_shape(w, d, 0), pu = proj_shape(w, d, 1);
    if (!lora.present(0)) {
      cuda::grouped_gemm_nn_sum(ctx, dx, {dg, pg.W, {}}, {du, pu.W, {}}, off, T(), d.E, d.I, d.H, 1.f);
      return;
    }
    const int64_t r = lora.r;
    bf16 *ag = work.a16.get(), *au = ag + d.E * r * d.H, *bg = work.b16.get(), *bu = bg + d.E * d.I * r;
    lora_bf16(ctx, lora, d, 0, d.H, d.I, ag, bg);
    lora_bf16(ctx, lora, d, 1, d.H, d.I, au, bu);
    bf16 *tg = work.t.get(), *tu = tg + T() * r;
    const bf16* dys[2] = {dg, du};
    const bf16* bs[2] = {bg, bu};
    bf16* ts[2] = {tg, tu};
    for (int i = 0; i < 2; ++i) {
      cuda::grouped_gemm_nn(ctx, ts[i], dys[i], bs[i], off, T(), d.E, d.I, r, lora.scale, false);  // t = s dy B_e
      cuda::grouped_gemm_tn_kgrouped(ctx, lora.dA[size_t(i)], ts[i], x, off, T(), d.E, r, d.H, 1.f);
      cuda::grouped_gemm_tn_kgrouped(ctx, lora.dB[size_t(i)], dys[i], work.xa[size_t(i)].get(), off, T(), d.E, d.I, r,
                                     1.f);
    }
    cuda::grouped_gemm_nn_sum(ctx, dx, {dg, pg.W, {tg, ag, r}}, {du, pu.W, {tu, au, r}}, off, T(), d.E, d.I, d.H, 1.f);
  }
  // dx (T,in) (+)= dy W_e (+ the LoRA path through the dropout mask); dA_e, dB_e accumulate. t = scale
  // dy B_e carries the scale (as xa does), so without dropout t A_e joins the base product. x is
  // read only before dx is written: dx may be x's buffer.
  void proj_backward(int i, bf16* dx, const bf16* dy, const bf16* x, bool accumulate) {
    const ProjShape p = proj_shape(w, d, i);
    if (!lora.present(i)) {
      cuda::grouped_gemm_nn(ctx, dx, dy, p.W, off, T(), d.E, p.out, p.in, 1.f, accumulate);
      return;
    }
    const int64_t r = lora.r;
    lora_bf16(ctx, lora, d, i, p.in, p.out, work.a16.get(), work.b16.get());
    const bf16* xl = lora_input(i, x, p.in);
    bf16* t = work.t.get();
    cuda::grouped_gemm_nn(ctx, t, dy, work.b16.get(), off, T(), d.E, p.out, r, lora.scale, false);  // t = s dy B_e
    cuda::grouped_gemm_tn_kgrouped(ctx, lora.dA[size_t(i)], t, xl, off, T(), d.E, r, p.in, 1.f);
    cuda::grouped_gemm_tn_kgrouped(ctx, lora.dB[size_t(i)], dy, work.xa[size_t(i)].get(), off, T(), d.E, p.out, r, 1.f);
    if (drop.p > 0) {
      cuda::grouped_gemm_nn(ctx, dx, dy, p.W, off, T(), d.E, p.out, p.in, 1.f, accumulate);
      cuda::grouped_gemm_nn(ctx, work.dxd.get(), t, work.a16.get(), off, T(), d.E, r, p.in, 1.f, false);
      // only the rows of these experts: the others' dxd rows belong to other chunks' calls
      cuda::dropout_backward(ctx, dx, work.dxd.get(), T(), p.in, drop.p, drop.key[size_t(i)], work.perm.get(), off,
                             off + d.E);
    } else {
      cuda::grouped_gemm_nn(ctx, dx, dy, p.W, off, T(), d.E, p.out, p.in, 1.f, accumulate,
                            cuda::SecondProduct{t, work.a16.get(), r});
    }
  }
};

// The LoRA of experts [e0, ...) of a layer: every pointer advanced by e0 experts.
CudaMoeLora lora_from(const CudaMoeLora& l, const CudaMoeDims& d, int64_t e0) {
  CudaMoeLora s = l;
  for (int i = 0; i < 3; ++i) {
    if (!l.present(i)) continue;
    const int64_t in = i == 2 ? d.I : d.H, out = i == 2 ? d.H : d.I;
    const size_t k = size_t(i);
    s.A[k] += e0 * l.r * in, s.B[k] += e0 * out * l.r;
    if (s.dA[k]) s.dA[k] += e0 * l.r * in;
    if (s.dB[k]) s.dB[k] += e0 * out * l.r;
  }
  return s;
}

// f(Ctx&) over all experts at once, or, chunked, once per chunk of experts after loading the chunk's
// weights of `projections` (CudaMoeWeights::kGate | kUp | kDown).
template <typename F>
void for_each_chunk(cuda::Context& ctx, const CudaMoeWeights& w, const CudaMoeLora& lora, const CudaMoeDims& d,
                    const CudaMoeDropout& drop, CudaMoeWork& work, unsigned projections, F&& f) {
  if (!w.chunked(d.E)) {
    Ctx c{ctx, w, lora, d, drop, work, work.offsets.get()};
    f(c);
    return;
  }
  QT_ASSERT(w.load, "chunked MoE weights without a loader");
  for (int64_t e0 = 0; e0 < d.E; e0 += w.chunk) {
    const int64_t e1 = std::min(d.E, e0 + w.chunk);
    const CudaMoeWeights wc = w.load(projections, e0, e1);
    const CudaMoeLora lc = lora_from(lora, d, e0);
    CudaMoeDims dc = d;
    dc.E = e1 - e0;
    Ctx c{ctx, wc, lc, dc, drop, work, work.offsets.get() + e0};
    f(c);
  }
}

}  // namespace

void CudaMoeWork::alloc(int64_t cap, int64_t H, int64_t I, int64_t E, int64_t k, int64_t r) {
  const size_t T = size_t(cap * k);
  logits = Buffer<bf16>(size_t(cap * E)), dlogits = Buffer<bf16>(size_t(cap * E));
  probs = Buffer<float>(size_t(cap * E));
  topk_w = Buffer<float>(T), dtopk_w = Buffer<float>(T);
  topk_idx = Buffer<int32_t>(T), perm = Buffer<int32_t>(T);
  offsets = Buffer<int64_t>(size_t(E + 1));
  xs = Buffer<bf16>(T * size_t(H)), ys = Buffer<bf16>(T * size_t(H));
  g = Buffer<bf16>(T * size_t(I)), u = Buffer<bf16>(T * size_t(I)), h = Buffer<bf16>(T * size_t(I));
  for (auto& b : xa) b = Buffer<bf16>(T * size_t(r));
  t = Buffer<bf16>(2 * T * size_t(r));  // gate's and up's side by side (gate_up_backward)
  a16 = Buffer<bf16>(size_t(2 * E * r * std::max(H, I)));  // gate and up side by side (gate_up_forward)
  b16 = Buffer<bf16>(size_t(2 * E * r * std::max(H, I)));
  xd = Buffer<bf16>(), dxd = Buffer<bf16>();  // allocated on the first use of dropout
}

size_t CudaMoeWork::bytes() const {
  size_t n = probs.bytes() + topk_w.bytes() + dtopk_w.bytes() + topk_idx.bytes() + perm.bytes() + offsets.bytes();
  for (const auto* b : {&logits, &dlogits, &xs, &ys, &g, &u, &h, &t, &a16, &b16, &xd, &dxd})
    n += b->bytes();
  for (const auto& b : xa) n += b.bytes();
  return n;
}

void cuda_moe_forward(cuda::Context& ctx, const CudaMoeWeights& w, const CudaMoeLora& lora, const CudaMoeDims& d,
                      const CudaMoeDropout& drop, CudaMoeWork& work, const bf16* m, bf16* out) {
  QT_ASSERT(work.xs.size() >= size_t(d.T() * d.H), "MoE work buffers hold fewer than {} rows", d.T());
  const int64_t N = d.N, T = d.T();
  cuda::linear_forward(ctx, work.logits.get(), m, w.router, nullptr, N, d.H, d.E);
  cuda::moe_router_forward(ctx, work.topk_idx.get(), work.topk_w.get(), work.probs.get(), work.logits.get(), N, d.E,
                           d.k, d.norm_topk_prob);
  cuda::moe_sort(ctx, work.perm.get(), work.offsets.get(), work.topk_idx.get(), N, d.k, d.E);
  cuda::moe_gather(ctx, work.xs.get(), m, work.perm.get(), T, d.k, d.H);
  for_each_chunk(ctx, w, lora, d, drop, work, CudaMoeWeights::kGate | CudaMoeWeights::kUp,
                 [&](Ctx& c) { c.gate_up_forward(work.g.get(), work.u.get(), work.xs.get()); });
  cuda::swiglu_forward(ctx, work.h.get(), work.g.get(), work.u.get(), T * d.I);
  for_each_chunk(ctx, w, lora, d, drop, work, CudaMoeWeights::kDown,
                 [&](Ctx& c) { c.proj_forward(2, work.ys.get(), work.h.get()); });
  cuda::moe_combine(ctx, out, work.ys.get(), work.topk_w.get(), work.perm.get(), T, d.k, d.H);
}

void cuda_moe_backward(cuda::Context& ctx, const CudaMoeWeights& w, const CudaMoeLora& lora, const CudaMoeDims& d,
                       const CudaMoeDropout& drop, CudaMoeWork& work, const bf16* m, const bf16* dout, bf16* dm,
                       const CudaMoeAux& aux) {
  const int64_t N = d.N, T = d.T();
  // Dead buffers take the gradients: dys over ys (each row's routing-weight gradient is taken from
  // ys first), dh over h, dg / du over g / u, and dxs over dys once the down projection's backward
  // has read it.
  bf16 *dys = work.ys.get(), *dh = work.h.get(), *dg = work.g.get(), *du = work.u.get(), *dxs = work.ys.get();
  zero_async(ctx, work.dtopk_w, T);
  cuda::moe_combine_backward(ctx, dys, work.dtopk_w.get(), dout, work.ys.get(), work.topk_w.get(), work.perm.get(), T,
                             d.k, d.H, /*accumulate=*/false);
  // (chunked: each chunk reads and writes only its experts' rows, so dh over h stays sound)
  for_each_chunk(ctx, w, lora, d, drop, work, CudaMoeWeights::kDown,
                 [&](Ctx& c) { c.proj_backward(2, dh, dys, work.h.get(), false); });
  cuda::swiglu_backward_inplace(ctx, dg, du, dh, T * d.I);
  for_each_chunk(ctx, w, lora, d, drop, work, CudaMoeWeights::kGate | CudaMoeWeights::kUp,
                 [&](Ctx& c) { c.gate_up_backward(dxs, dg, du, work.xs.get()); });
  cuda::moe_gather_backward(ctx, dm, dxs, work.perm.get(), T, d.k, d.H);
  // Through the routing weights: top-k / renorm / softmax -> logits -> m W_r^T.
  zero_async(ctx, work.dlogits, N * d.E);
  cuda::moe_router_backward(ctx, work.dlogits.get(), work.dtopk_w.get(), work.probs.get(), work.topk_idx.get(), N, d.E,
                            d.k, d.norm_topk_prob, aux.f, aux.scale);
  cuda::linear_backward(ctx, dm, work.dlogits.get(), w.router, N, d.H, d.E);
}

}  // namespace qt
#endif
