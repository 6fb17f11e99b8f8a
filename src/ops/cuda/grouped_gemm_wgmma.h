// The Hopper path of the row-grouped products (grouped_gemm.h): NT Y (T,N) (+)= alpha (X W_e^T +
// A2 W2_e^T), optionally a pair of such products over one X (gate and up) in one launch, and NN
// dX (T,K) (+)= alpha (dY W_e + A2 W2_e), on wgmma with TMA tile loads (grouped_gemm_wgmma.cu).
// Internal to ops/cuda: grouped_gemm.cu calls it.
#pragma once
#include <cstdint>

#include "ops/cuda/runtime.h"

namespace qt::cuda {

// One product's output and weights: NT Y (T,N) = alpha (X W_e^T + a2 w2_e^T), W (E,N,K), a2 (T,inner2),
// w2 (E,N,inner2); NN Y (T,K) = alpha (dY W_e + a2 w2_e), W (E,N,K), a2 (T,inner2), w2 (E,inner2,K)
// (a2, w2 null when inner2 = 0).
struct WgmmaProduct {
  bf16* Y = nullptr;
  const bf16* W = nullptr;
  const bf16* a2 = nullptr;
  const bf16* w2 = nullptr;
};

// Whether the current device runs the sm_90a kernels (compute capability 9.0 and a build with the
// sm_90a target, probed once) and QT_GROUPED_GEMM_WGMMA is not "0" (which keeps every product on the
// mma.sync kernels, to measure one against the other).
bool grouped_wgmma_enabled();

// Launches the product (and the pair's second product when `pair` is non-null, same shapes and
// inner2) and returns true, or launches nothing and returns false when this path does not take the
// shapes: output width <= 64 or odd, a contracted extent (or an operand's row) not a multiple of 8
// elements, a pointer not 16-byte aligned, sizes past the TMA coordinate range, or a disabled path
// (grouped_wgmma_enabled).
bool grouped_wgmma_nt(Context& ctx, const bf16* X, const WgmmaProduct& first, const WgmmaProduct* pair,
                      int64_t inner2, const int64_t* offsets, int64_t T, int64_t E, int64_t N, int64_t K, float alpha,
                      bool accumulate);
// The same for NN (out.Y = dX (T,K)), no pair; K is the output width.
bool grouped_wgmma_nn(Context& ctx, const bf16* dY, const WgmmaProduct& out, int64_t inner2, const int64_t* offsets,
                      int64_t T, int64_t E, int64_t N, int64_t K, float alpha, bool accumulate);
// dX (T,K) = alpha (dY1 one.W_e + one.a2 one.w2_e + dY2 two.W_e + two.a2 two.w2_e), overwritten: the
// input gradients of two projections of one input (an MoE layer's gate and up) as one product
// (one.Y and two.Y are not used).
bool grouped_wgmma_nn_sum(Context& ctx, bf16* dX, const bf16* dY1, const WgmmaProduct& one, const bf16* dY2,
                          const WgmmaProduct& two, int64_t inner2, const int64_t* offsets, int64_t T, int64_t E,
                          int64_t N, int64_t K, float alpha);

}  // namespace qt::cuda
