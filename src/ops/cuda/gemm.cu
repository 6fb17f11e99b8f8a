// GEMM through cuBLASLt: bf16 operands, fp32 accumulation (CUBLAS_COMPUTE_32F), bf16 or fp32 C.
// Row-major C (M,N) = op(A) op(B) is computed as the column-major product C^T = op(B)^T op(A)^T,
// so cuBLASLt's "A" is our B and its "B" is our A, with the same transpose flags.
// Descriptors and the heuristic's algorithm are cached per shape (host cost of a small GEMM).
// Accumulating bf16 GEMMs (beta != 0) and bias stay on the fp32 staging pass: cuBLASLt's bf16
// epilogue with beta C or a bias epilogue rounds twice (measured: test_cuda_ops fails by ~1 ulp).
// When cuBLASLt offers no algorithm for a shape or alignment (odd leading dimensions, unaligned
// sub-buffers), a plain tiled kernel with fp32 accumulation computes the same product.
#include <cstdint>
#include <mutex>
#include <unordered_map>

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

// One cached cuBLASLt plan: descriptors and the heuristic's algorithm for a shape, layout, C type,
// and alignments. Built once per key (the heuristic query costs far more than a small GEMM).
struct PlanKey {
  cublasLtHandle_t lt;
  int64_t M, N, K;
  bool ta, tb, c32;
  uint32_t al_a, al_b, al_c;
  bool operator==(const PlanKey& o) const {
    return lt == o.lt && M == o.M && N == o.N && K == o.K && ta == o.ta && tb == o.tb && c32 == o.c32 &&
           al_a == o.al_a && al_b == o.al_b && al_c == o.al_c;
  }
};
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = std::hash<const void*>()(k.lt);
    for (int64_t v : {k.M, k.N, k.K, int64_t(k.ta) | int64_t(k.tb) << 1 | int64_t(k.c32) << 2,
                      int64_t(k.al_a) << 32 | int64_t(k.al_b) << 16 | int64_t(k.al_c)})
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;  // false: cuBLASLt has no algorithm (use the fallback kernel)
};
std::mutex g_plans_mutex;
std::unordered_map<PlanKey, Plan, PlanKeyHash> g_plans;  // lives for the process (a few KiB)

Plan make_plan(const PlanKey& k, size_t ws) {
  Plan p;
  QT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = k.tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A is our B
  const cublasOperation_t op_b = k.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  QT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  QT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  const int64_t M = k.M, N = k.N, K = k.K;
  // Column-major views: our B is (N,K) col-major when not transposed (ld N), else (K,N) (ld K).
  QT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_16BF, k.tb ? K : N, k.tb ? N : K, k.tb ? K : N));
  QT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_16BF, k.ta ? M : K, k.ta ? K : M, k.ta ? M : K));
  QT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lc, k.c32 ? CUDA_R_32F : CUDA_R_16BF, N, M, N));
  cublasLtMatmulPreference_t pref = nullptr;
  QT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws64 = ws;
  QT_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws64, sizeof(ws64)));
  QT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &k.al_a,
                                                       sizeof(k.al_a)));
  QT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &k.al_b,
                                                       sizeof(k.al_b)));
  QT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &k.al_c,
                                                       sizeof(k.al_c)));
  QT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &k.al_c,
                                                       sizeof(k.al_c)));
  // A bf16 result is rounded once: split-K partial sums stay in fp32 (never in the bf16 output).
  const uint32_t schemes = k.c32 ? uint32_t(CUBLASLT_REDUCTION_SCHEME_MASK) : uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE);
  QT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                       sizeof(schemes)));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(k.lt, p.op, p.la, p.lb, p.lc, p.lc, pref, 1, &heur, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  p.ok = hs == CUBLAS_STATUS_SUCCESS && found > 0;
  if (p.ok) p.algo = heur.algo;
  return p;
}

// C = alpha op(A) op(B) + beta C through the cached plan; false when cuBLASLt has no algorithm.
template <typename TC>
bool gemm_lt(Context& ctx, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
             const bf16* B, float beta, TC* C) {
  const PlanKey key{ctx.lt(), M, N, K, ta, tb, sizeof(TC) == 4,
                    alignment_of(B), alignment_of(A), alignment_of(C)};
  std::lock_guard<std::mutex> lock(g_plans_mutex);
  auto it = g_plans.find(key);
  if (it == g_plans.end()) it = g_plans.emplace(key, make_plan(key, ctx.workspace_bytes())).first;
  Plan* plan = &it->second;
  if (!plan->ok) return false;
  return cublasLtMatmul(ctx.lt(), plan->op, &alpha, B, plan->la, A, plan->lb, &beta, C, plan->lc, C, plan->lc,
                        &plan->algo, ctx.workspace(), ctx.workspace_bytes(), ctx.stream()) == CUBLAS_STATUS_SUCCESS;
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

// The same, 4 consecutive elements of one row per step (N % 4 == 0, C and bias 8-byte aligned):
// 16-byte loads of D, 8-byte loads and stores of C, one column index per 4 elements.
__global__ void combine4_kernel(bf16* C, const float* D, float beta, const bf16* bias, int64_t M, int64_t N) {
  const int64_t n4 = M * N / 4;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 d = reinterpret_cast<const float4*>(D)[i];
    float v[4] = {d.x, d.y, d.z, d.w};
    if (beta != 0.0f) {
      const uint2 c = reinterpret_cast<const uint2*>(C)[i];
      const bf16* cb = reinterpret_cast<const bf16*>(&c);
      for (int j = 0; j < 4; ++j) v[j] += beta * to_f(cb[j]);
    }
    if (bias) {
      const uint2 b = reinterpret_cast<const uint2*>(bias)[(i * 4 % N) / 4];
      const bf16* bb = reinterpret_cast<const bf16*>(&b);
      for (int j = 0; j < 4; ++j) v[j] += to_f(bb[j]);
    }
    uint2 out;
    bf16* ob = reinterpret_cast<bf16*>(&out);
    for (int j = 0; j < 4; ++j) ob[j] = to_bf(v[j]);
    reinterpret_cast<uint2*>(C)[i] = out;
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
  if (N % 4 == 0 && alignment_of(C) >= 8 && (bias == nullptr || alignment_of(bias) >= 8))
    combine4_kernel<<<grid_for(M * N / 4), kThreads, 0, ctx.stream()>>>(C, D, beta, bias, M, N);
  else
    combine_kernel<<<grid_for(M * N), kThreads, 0, ctx.stream()>>>(C, D, beta, bias, M, N);
  QT_CUDA_LAUNCH_CHECK();
}

void gemm(Context& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          const bf16* B, float beta, float* C) {
  gemm_any(ctx, trans_a, trans_b, M, N, K, alpha, A, B, beta, C);
}

}  // namespace qt::cuda
