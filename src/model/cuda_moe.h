// The Qwen3-MoE sparse MLP block on CUDA (built only with QT_CUDA): model/moe_mlp.h's math with the
// device ops and the grouped expert GEMMs (ops/cuda/grouped_gemm.h), no per-expert loop and no host
// synchronisation. For N tokens m (N,H), E experts of width I, top-k routing, T = N*k assignments:
//   logits (N,E) = m W_r^T;  probs, topk_idx, topk_w = router(logits)       (fp32 softmax, top-k, renorm)
//   perm, offsets = stable counting sort of the assignments by expert       (device offsets)
//   xs (T,H) = m[perm / k]
//   g (T,I) = xs W_gate,e^T + s B_g,e A_g,e drop(xs);  u likewise;  h = silu(g) u
//   ys (T,H) = h W_down,e^T + s B_d,e A_d,e drop(h)
//   out (N,H) += sum_j topk_w[n,j] ys[inv(n*k+j)]
// The backward reaches m through the experts and through the routing weights (router -> softmax ->
// top-k -> renorm -> logits -> m W_r), and every present expert LoRA A (E,r,in) and B (E,out,r).
// LoRA dropout masks use the assignment id as the row (the CPU's rule), so they do not depend on
// the sort. The router is frozen (no LoRA on mlp.gate, as PEFT's target names do not reach it).
#pragma once
#ifdef QT_HAVE_CUDA
#include <array>
#include <cstdint>
#include <functional>

#include "ops/cuda/runtime.h"

namespace qt {

// One MoE layer's frozen weights on the device (bf16, owned by the caller): router (E,H), gate/up
// (E,I,H), down (E,H,I) (the decoder's own buffers, or its per-layer NF4 dequantization scratch).
// Expert chunks (an NF4 base with a small scratch): with 0 < chunk < E the experts are not all
// there; every expert product runs chunk by chunk, load(projections, e0, e1) first making the bf16
// weights of experts [e0, e1) of the projections asked for (bit 0 gate, 1 up, 2 down) available and
// returning where ((e1 - e0, out, in) each, valid until the next load). The rows of a chunk's
// experts are contiguous (the sort's offsets), so each chunk's products are grouped GEMMs over its
// offsets; the outputs are the same row by row.
struct CudaMoeWeights {
  const cuda::bf16 *router = nullptr, *gate = nullptr, *up = nullptr, *down = nullptr;
  int64_t chunk = 0;
  std::function<CudaMoeWeights(unsigned projections, int64_t e0, int64_t e1)> load = nullptr;
  static constexpr unsigned kGate = 1, kUp = 2, kDown = 4;
  bool chunked(int64_t E) const { return chunk > 0 && chunk < E; }
};

// The expert LoRA of one layer, index 0/1/2 = gate/up/down: masters A (E,r,in), B (E,out,r) and
// their gradients in the decoder's flat fp32 buffers (null when the slot has no adapter).
struct CudaMoeLora {
  std::array<const float*, 3> A{}, B{};
  std::array<float*, 3> dA{}, dB{};
  int64_t r = 0;
  float scale = 0;
  bool present(int i) const { return A[size_t(i)] != nullptr; }
};

struct CudaMoeDims {
  int64_t N = 0, H = 0, I = 0, E = 0, k = 0;
  bool norm_topk_prob = true;
  int64_t T() const { return N * k; }
};

// LoRA dropout of the expert projections: probability and the gate/up/down mask keys.
struct CudaMoeDropout {
  double p = 0;
  std::array<uint64_t, 3> key{};
};

// The router load-balancing loss's gradient for this layer (model/moe_aux_loss.h): f (E) the routed
// fractions over every MoE layer of the batch, scale = dloss * E / rows; f null: none.
struct CudaMoeAux {
  const float* f = nullptr;
  float scale = 0;
};

// Work buffers for up to `cap` tokens, shared by every MoE layer (one layer runs at a time; the
// backward recomputes the layer's forward into them first).
class CudaMoeWork {
 public:
  void alloc(int64_t cap, int64_t H, int64_t I, int64_t E, int64_t k, int64_t r);
  size_t bytes() const;

  // forward (kept for the backward)
  cuda::Buffer<cuda::bf16> logits, xs, g, u, h, ys;
  cuda::Buffer<float> probs, topk_w;
  cuda::Buffer<int32_t> topk_idx, perm;
  cuda::Buffer<int64_t> offsets;
  std::array<cuda::Buffer<cuda::bf16>, 3> xa;  // (T,r) scale * dropout(x) A^T per projection (LoRA scale folded in)
  // backward and dropout scratch. The backward reuses the forward's buffers once they are dead: dys
  // and then dxs (T,H) are written over ys, dh (T,I) over h, dg and du over g and u.
  cuda::Buffer<cuda::bf16> t, dlogits, xd, dxd;  // t (2,T,r): scale dy B_e of one projection, or of gate and up
  cuda::Buffer<cuda::bf16> a16, b16;  // bf16 copies of LoRA A (E,r,in) and B (E,out,r): one projection, or gate and up
  cuda::Buffer<float> dtopk_w;
};

// out (N,H) ADDS the block's output for input m (N,H).
void cuda_moe_forward(cuda::Context& ctx, const CudaMoeWeights& w, const CudaMoeLora& lora, const CudaMoeDims& d,
                      const CudaMoeDropout& drop, CudaMoeWork& work, const cuda::bf16* m, cuda::bf16* out);
// dm (N,H) ADDS the gradient from dout (N,H); the LoRA gradients accumulate. The work buffers must
// hold this layer's forward (cuda_moe_forward with the same inputs just before).
void cuda_moe_backward(cuda::Context& ctx, const CudaMoeWeights& w, const CudaMoeLora& lora, const CudaMoeDims& d,
                       const CudaMoeDropout& drop, CudaMoeWork& work, const cuda::bf16* m, const cuda::bf16* dout,
                       cuda::bf16* dm, const CudaMoeAux& aux = {});

}  // namespace qt
#endif
