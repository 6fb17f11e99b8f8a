// GEMM through cuBLASLt: bf16 operands, fp32 accumulation (CUBLAS_COMPUTE_32F), bf16 or fp32 C.
// Row-major C (M,N) = op(A) op(B) is computed as the column-major product C^T = op(B)^T op(A)^T,
// so cuBLASLt's "A" is our B and its "B" is our A, with the same transpose flags.
// When cuBLASLt offers no algorithm for a shape or alignment (odd leading dimensions, unaligned
// sub-buffers), a plain tiled kernel with fp32 accumulation computes the same product.
#include <cstdint>

#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

template <typename TC>
constexpr cudaDataType_t c_type() {
  return sizeof(TC) == 4 ? CUDA_R_32F : CUDA_R_16BF;
}

__device__ __forceinline__ float load_c(const float* c) { return *c; }
__device__ __forceinline__ float load_c(const bf16* c) { return to_f(*c); }
__device__ __forceinline__ void store_c(float* c, float v) { *c = v; }
__device__ __forceinline__ void store_c(bf16* c, float v) { *c = to_bf(v); }

constexpr int kTile = 16;

// Fallback: 16x16 output tiles, K in steps of 16 through shared memory.
template <typename TC>
__global__ void gemm_fallback_kernel(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
                                     const bf16* B, float beta, TC* C) {
  __shared__ float As[kTile][kTile + 1], Bs[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row = int64_t(blockIdx.y) * kTile + ty, col = int64_t(blockIdx.x) * kTile + tx;
  float acc = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    // As[ty][tx] = op(A)[row, k0+tx]; Bs[ty][tx] = op(B)[k0+ty, col]
    const int64_t ka = k0 + tx, kb = k0 + ty;
    As[ty][tx] = (row < M && ka < K) ? to_f(ta ? A[ka * M + row] : A[row * K + ka]) : 0.0f;
    Bs[ty][tx] = (kb < K && col < N) ? to_f(tb ? B[col * K + kb] : B[kb * N + col]) : 0.0f;
    __syncthreads();
    for (int kk = 0; kk < kTile; ++kk) acc += As[ty][kk] * Bs[kk][tx];
    __syncthreads();
  }
  if (row < M && col < N) {
    TC* c = C + row * N + col;
    store_c(c, beta == 0.0f ? alpha * acc : alpha * acc + beta * load_c(c));
  }
}

// Largest power of two (<= 256) dividing the address: cuBLASLt's alignment preference.
uint32_t alignment_of(const void* p) {
  uint32_t a = 256;
  while (a > 1 && (reinterpret_cast<uintptr_t>(p) % a) != 0) a /= 2;
  return a;
}

template <typename TC>
bool gemm_lt(Context& ctx, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
             const bf16* B, float beta, TC* C) {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  QT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A is our B
  const cublasOperation_t op_b = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  QT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  QT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Column-major views: our B is (N,K) col-major when not transposed (ld N), else (K,N) (ld K).
  QT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, tb ? K : N, tb ? N : K, tb ? K : N));
  QT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, ta ? M : K, ta ? K : M, ta ? M : K));
  QT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, c_type<TC>(), N, M, N));
  QT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = ctx.workspace_bytes();
  QT_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const uint32_t al_a = alignment_of(B), al_b = alignment_of(A), al_c = alignment_of(C);
  QT_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  QT_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  QT_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  QT_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(ctx.lt(), op, la, lb, lc, lc, pref, 1, &heur, &found);
  bool ok = hs == CUBLAS_STATUS_SUCCESS && found > 0;
  if (ok)
    ok = cublasLtMatmul(ctx.lt(), op, &alpha, B, la, A, lb, &beta, C, lc, C, lc, &heur.algo, ctx.workspace(), ws,
                        ctx.stream()) == CUBLAS_STATUS_SUCCESS;
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatmulDescDestroy(op);
  return ok;
}

template <typename TC>
__global__ void scale_kernel(TC* C, int64_t n, float beta) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_c(C + i, beta == 0.0f ? 0.0f : beta * load_c(C + i));
}

template <typename TC>
void gemm_any(Context& ctx, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
              const bf16* B, float beta, TC* C) {
  QT_CUDA_ASSERT(M >= 0 && N >= 0 && K >= 0, "gemm: negative shape");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta * C (beta 0 clears, even NaN), as cpu::gemm
    scale_kernel<<<grid_for(M * N), kThreads, 0, ctx.stream()>>>(C, M * N, beta);
    QT_CUDA_LAUNCH_CHECK();
    return;
  }
  if (gemm_lt(ctx, ta, tb, M, N, K, alpha, A, B, beta, C)) return;
  cudaGetLastError();
  const dim3 block(kTile, kTile), grid(unsigned((N + kTile - 1) / kTile), unsigned((M + kTile - 1) / kTile));
  QT_CUDA_ASSERT(grid.y <= 65535, "gemm fallback: M too large");
  gemm_fallback_kernel<TC><<<grid, block, 0, ctx.stream()>>>(ta, tb, M, N, K, alpha, A, B, beta, C);
  QT_CUDA_LAUNCH_CHECK();
}

// C (M,N) = bf16(D + beta C + bias), D the fp32 product.
__global__ void combine_kernel(bf16* C, const float* D, float beta, const bf16* bias, int64_t M, int64_t N) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < M * N; i += int64_t(gridDim.x) * blockDim.x) {
    float v = D[i];
    if (beta != 0.0f) v += beta * to_f(C[i]);
    if (bias) v += to_f(bias[i % N]);
    C[i] = to_bf(v);
  }
}

}  // namespace

void gemm(Context& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          const bf16* B, float beta, bf16* C, const bf16* bias) {
  if (beta == 0.0f && bias == nullptr) {
    gemm_any(ctx, trans_a, trans_b, M, N, K, alpha, A, B, beta, C);
    return;
  }
  if (M == 0 || N == 0) return;
  float* D = static_cast<float*>(ctx.gemm_scratch(size_t(M * N) * sizeof(float)));
  gemm_any(ctx, trans_a, trans_b, M, N, K, alpha, A, B, 0.0f, D);
  combine_kernel<<<grid_for(M * N), kThreads, 0, ctx.stream()>>>(C, D, beta, bias, M, N);
  QT_CUDA_LAUNCH_CHECK();
}

void gemm(Context& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          const bf16* B, float beta, float* C) {
  gemm_any(ctx, trans_a, trans_b, M, N, K, alpha, A, B, beta, C);
}

}  // namespace qt::cuda
