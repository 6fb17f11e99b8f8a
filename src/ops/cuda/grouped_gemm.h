// Grouped GEMMs over the experts of an MoE layer (bf16 operands, fp32 accumulation), with the
// group boundaries ONLY on the device: after moe_sort + moe_gather the rows (T, .) are grouped by
// expert, expert e owning rows [offsets[e], offsets[e+1]) (offsets (E+1) int64 on the device,
// non-decreasing, offsets[E] <= T: absolute row indices, so a chunk of experts [e0, e1) of a sort
// is run as offsets + e0 with E = e1 - e0, model/cuda_moe.cpp). No call reads the offsets on the
// host, so a training step needs no synchronisation and can be captured in a CUDA graph; rows
// outside [offsets[0], offsets[E]) are never written (a row tile may read past its expert's rows,
// within the T rows of X).
//
//   grouped_gemm_nt:          Y  (T,N) (+)= alpha X (T,K)  W_e^T   W (E,N,K)  (forward: gate_up, down,
//                                                                   LoRA x A_e^T, xa B_e^T)
//   grouped_gemm_nt_pair:     two NT products of one X in one launch (gate and up)
//   grouped_gemm_nn:          dX (T,K) (+)= alpha dY (T,N) W_e     W (E,N,K)  (input gradient)
//   grouped_gemm_nn_sum:      the sum of two such products (gate and up) written once
//                             both optionally + a second product (SecondProduct: the LoRA term fused)
//   grouped_gemm_tn_kgrouped: Out (E,M,N) fp32 += scale X_e^T dY_e, X (T,M), dY (T,N), summed over
//                             the rows of expert e (LoRA weight gradients dA_e = t^T x, dB_e = dy^T xa)
//
// bf16 outputs are rounded once: bf16(alpha * acc [+ Y]) with `accumulate`; without it Y is
// overwritten (and may hold NaN before). Out (fp32) is always accumulated, deterministically
// (no atomics: every element is owned by one block, or summed from per-split partials in a fixed
// order). Thin shapes (LoRA ranks 4..64 as N, or as K, or as M / N of the K-grouped product) pick
// narrow tiles automatically.
//
// Paths: tensor cores (mma.sync m16n8k16 bf16, ldmatrix, cp.async multi-stage pipeline; sm_80, sm_89,
// sm_90a) when the dimensions read in 16-byte chunks are multiples of 8 (grouped_gemm_tc_ok) and
// every pointer is 16-byte aligned; otherwise the SIMT kernels (the *_simt functions, fp32 accumulation, one
// thread per output element), which the tests also use as a second opinion.
#pragma once
#include <cstdint>

#include "ops/cuda/runtime.h"

namespace qt::cuda {

// A second product added into the same output before its one rounding, its k range appended to
// the first's in one pipeline (the LoRA term fused into the base GEMM, so Y is read and written
// once): NT adds a (T, inner) times w_e^T, w (E, N, inner) (x_lora (T, r), B (E, N, r)); NN adds
// a (T, inner) times w_e, w (E, inner, K) (t (T, r), A (E, r, K)). The same alpha scales both: fold
// the LoRA scale into `a` (e.g. produce xa with alpha = scale; then dB = dy^T xa needs no scale).
// inner = 0: none. When the second product alone cannot run on tensor cores (inner % 8 != 0, e.g.
// r = 4) it is added by the SIMT kernel after the first (the output is then rounded twice).
struct SecondProduct {
  const bf16* a = nullptr;
  const bf16* w = nullptr;
  int64_t inner = 0;
};

void grouped_gemm_nt(Context& ctx, bf16* Y, const bf16* X, const bf16* W, const int64_t* offsets, int64_t T,
                     int64_t E, int64_t N, int64_t K, float alpha, bool accumulate, const SecondProduct& second = {});
// Two NT products of one input in one launch (an MoE layer's gate and up: one product over N = 2 x N
// columns whose second half is the pair's): Y = alpha (X W_e^T + second) and pair.Y = alpha (X
// pair.W_e^T + pair.second), both (T,N), overwritten. The same bits as two grouped_gemm_nt calls (the
// fallback when the two would not take the same path).
struct NtPair {
  bf16* Y = nullptr;
  const bf16* W = nullptr;
  SecondProduct second;
};
void grouped_gemm_nt_pair(Context& ctx, bf16* Y, const bf16* X, const bf16* W, const SecondProduct& second,
                          const NtPair& pair, const int64_t* offsets, int64_t T, int64_t E, int64_t N, int64_t K,
                          float alpha);
void grouped_gemm_nn(Context& ctx, bf16* dX, const bf16* dY, const bf16* W, const int64_t* offsets, int64_t T,
                     int64_t E, int64_t N, int64_t K, float alpha, bool accumulate, const SecondProduct& second = {});
// dX (T,K) = alpha (dY1 W1_e + second1 + dY2 W2_e + second2), overwritten: the input gradients of two
// projections of one input (an MoE layer's gate and up, N = I) summed in one product, so dX is
// written once (on Hopper: one wgmma launch with four k ranges). Elsewhere, or when the two second
// products differ in rank, two grouped_gemm_nn calls (the second accumulating: dX rounded twice).
struct NnTerm {
  const bf16* dY = nullptr;
  const bf16* W = nullptr;
  SecondProduct second;
};
void grouped_gemm_nn_sum(Context& ctx, bf16* dX, const NnTerm& one, const NnTerm& two, const int64_t* offsets,
                         int64_t T, int64_t E, int64_t N, int64_t K, float alpha);
// When E x tiles would leave the GPU half idle the rows are split and the fp32 partials live in
// ctx.scratch() (growing it synchronises once: run a warm-up step before capturing a graph).
void grouped_gemm_tn_kgrouped(Context& ctx, float* Out, const bf16* X, const bf16* dY, const int64_t* offsets,
                              int64_t T, int64_t E, int64_t M, int64_t N, float scale);

// The SIMT reference kernels (any shape and alignment): same contracts.
void grouped_gemm_nt_simt(Context& ctx, bf16* Y, const bf16* X, const bf16* W, const int64_t* offsets, int64_t T,
                          int64_t E, int64_t N, int64_t K, float alpha, bool accumulate,
                          const SecondProduct& second = {});
void grouped_gemm_nn_simt(Context& ctx, bf16* dX, const bf16* dY, const bf16* W, const int64_t* offsets, int64_t T,
                          int64_t E, int64_t N, int64_t K, float alpha, bool accumulate,
                          const SecondProduct& second = {});
void grouped_gemm_tn_kgrouped_simt(Context& ctx, float* Out, const bf16* X, const bf16* dY, const int64_t* offsets,
                                   int64_t T, int64_t E, int64_t M, int64_t N, float scale);

// Whether the tensor-core path takes a product (tests report it): NT needs K % 8 == 0 and N even
// (so x A_e^T runs on tensor cores at r = 4 too), NN needs N % 8 == 0 and K % 8 == 0, TN (dims M, N)
// M % 8 == 0 and N % 8 == 0; the three pointers 16-byte aligned.
enum class GroupedOp { NT, NN, TN };
bool grouped_gemm_tc_ok(GroupedOp op, int64_t N, int64_t K, const void* a, const void* b, const void* c);

}  // namespace qt::cuda
