// gemm: C (M,N) = alpha * op(A) op(B) + beta * C, row-major, through CBLAS (OpenBLAS).
// op(A) is (M,K): A is stored (M,K), or (K,M) when trans_a. op(B) is (K,N): B is (K,N), or (N,K)
// when trans_b. Leading dimensions are the stored row lengths. OpenBLAS threads internally, so
// gemm must not be called from inside an OpenMP parallel region (the pthread build warns and may hang).
#include <cblas.h>

#include <algorithm>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {

constexpr int64_t kMaxBlasDim = 2147483647;

// Degenerate shapes BLAS rejects or mishandles: K == 0 means C = beta * C (beta 0 clears, even NaN).
template <typename T>
bool gemm_degenerate(int64_t M, int64_t N, int64_t K, T beta, T* C) {
  if (M == 0 || N == 0) return true;
  if (K != 0) return false;
  for (int64_t i = 0; i < M * N; ++i) C[i] = beta == T(0) ? T(0) : beta * C[i];
  return true;
}

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 const float* B, float beta, float* C) {
  QT_ASSERT(M >= 0 && N >= 0 && K >= 0 && M <= kMaxBlasDim && N <= kMaxBlasDim && K <= kMaxBlasDim,
            "gemm: shape {}x{}x{} outside the 32-bit BLAS range", M, N, K);
  if (gemm_degenerate(M, N, K, beta, C)) return;
  const blasint lda = blasint(std::max<int64_t>(1, trans_a ? M : K));
  const blasint ldb = blasint(std::max<int64_t>(1, trans_b ? K : N));
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, blasint(M),
              blasint(N), blasint(K), alpha, A, lda, B, ldb, beta, C, blasint(N));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                  const double* B, double beta, double* C) {
  QT_ASSERT(M >= 0 && N >= 0 && K >= 0 && M <= kMaxBlasDim && N <= kMaxBlasDim && K <= kMaxBlasDim,
            "gemm: shape {}x{}x{} outside the 32-bit BLAS range", M, N, K);
  if (gemm_degenerate(M, N, K, beta, C)) return;
  const blasint lda = blasint(std::max<int64_t>(1, trans_a ? M : K));
  const blasint ldb = blasint(std::max<int64_t>(1, trans_b ? K : N));
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, blasint(M),
              blasint(N), blasint(K), alpha, A, lda, B, ldb, beta, C, blasint(N));
}

}  // namespace qt::cpu
