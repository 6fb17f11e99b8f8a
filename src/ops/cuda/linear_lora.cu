// Linear layer (frozen bf16 base) and LoRA (fp32 masters), composed from cuBLASLt GEMMs.
//   linear:  y = x W^T (+ b);  dx (+)= dy W
//   LoRA:    A16, B16 = bf16(A), bf16(B) (scratch, per call);  xa = x A16^T;  y += scale xa B16^T
//            t = dy B16 (bf16 scratch);  dx += scale t A16;  dA += scale t^T x;  dB += scale dy^T xa
// W + BA is never formed; dA and dB accumulate into fp32 directly from the GEMM (beta = 1).
// The two rank-r updates of bf16 activations (y += scale xa B16^T, dx += scale t A16) run in
// rank_update_kernel: Y = bf16(Y + alpha P Q), the r-term dot products in fp32 and one rounding, so
// Y is read and written once (4 bytes per element). Through cuBLASLt (gemm with beta = 1, the
// reference composition, `rank_update_via_gemm`) they cost an fp32 staging pass of the whole output
// (14 bytes per element); with K = r the products themselves are memory-bound either way.
#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// bf16 copies of the LoRA masters in the context scratch, followed by `extra` bytes.
struct LoraScratch {
  bf16 *A16, *B16;
  void* extra;
};
LoraScratch lora_scratch(Context& ctx, const float* A, const float* B, int64_t in, int64_t out, int64_t r,
                         size_t extra) {
  const size_t a_bytes = round_up(size_t(r * in) * sizeof(bf16)), b_bytes = round_up(size_t(out * r) * sizeof(bf16));
  auto* base = static_cast<unsigned char*>(ctx.scratch(a_bytes + b_bytes + extra));
  LoraScratch s{reinterpret_cast<bf16*>(base), reinterpret_cast<bf16*>(base + a_bytes), base + a_bytes + b_bytes};
  f32_to_bf16(ctx, s.A16, A, r * in);
  f32_to_bf16(ctx, s.B16, B, out * r);
  return s;
}

// Y (N,M) = bf16(Y + alpha * sum_k P[n,k] Q(k,m)), P (N,r) bf16; Q(k,m) = Q[m*r + k] (q_rows_m:
// Q is (M,r), e.g. B16) or Q[k*M + m] ((r,M), e.g. A16). A block covers kRows rows and 2*blockDim.x
// columns; each thread two adjacent columns of kRows rows, P's chunk staged in shared memory (the
// Q values come through L1/L2: Q is small, r x M).
constexpr int kRankRows = 32, kRankChunk = 16, kRankThreads = 128;
template <bool q_rows_m>
__global__ void rank_update_kernel(bf16* Y, const bf16* P, const bf16* Q, int64_t N, int64_t M, int64_t r, float alpha) {
  __shared__ float ps[kRankRows][kRankChunk];
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * 2;
  const int64_t row0 = int64_t(blockIdx.x) * kRankRows;
  float acc[kRankRows][2];
#pragma unroll
  for (int i = 0; i < kRankRows; ++i) acc[i][0] = acc[i][1] = 0.f;
  for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
    const int kc = int(r - k0 < kRankChunk ? r - k0 : kRankChunk);
    __syncthreads();
    for (int i = threadIdx.x; i < kRankRows * kRankChunk; i += blockDim.x) {
      const int rr = i / kRankChunk, kk = i % kRankChunk;
      const int64_t n = row0 + rr;
      ps[rr][kk] = (n < N && kk < kc) ? to_f(P[n * r + k0 + kk]) : 0.f;
    }
    __syncthreads();
    for (int kk = 0; kk < kc; ++kk) {
      const int64_t k = k0 + kk;
      const float q0 = c0 < M ? to_f(q_rows_m ? Q[c0 * r + k] : Q[k * M + c0]) : 0.f;
      const float q1 = c0 + 1 < M ? to_f(q_rows_m ? Q[(c0 + 1) * r + k] : Q[k * M + c0 + 1]) : 0.f;
#pragma unroll
      for (int i = 0; i < kRankRows; ++i) {
        acc[i][0] = fmaf(ps[i][kk], q0, acc[i][0]);
        acc[i][1] = fmaf(ps[i][kk], q1, acc[i][1]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRankRows; ++i) {
    const int64_t n = row0 + i;
    if (n >= N) break;
    for (int j = 0; j < 2; ++j)
      if (c0 + j < M) {
        bf16& y = Y[n * M + c0 + j];
        y = to_bf(to_f(y) + alpha * acc[i][j]);
      }
  }
}

void rank_update(Context& ctx, bf16* Y, const bf16* P, const bf16* Q, bool q_rows_m, int64_t N, int64_t M, int64_t r,
                 float alpha) {
  if (N <= 0 || M <= 0 || r <= 0) return;
  const int64_t col_blocks = (M + 2 * kRankThreads - 1) / (2 * kRankThreads), row_blocks = (N + kRankRows - 1) / kRankRows;
  QT_CUDA_ASSERT(col_blocks < 65536, "rank update: too many columns");
  const dim3 grid{unsigned(row_blocks), unsigned(col_blocks)};  // rows on x: no 65535 limit
  if (q_rows_m)
    rank_update_kernel<true><<<grid, kRankThreads, 0, ctx.stream()>>>(Y, P, Q, N, M, r, alpha);
  else
    rank_update_kernel<false><<<grid, kRankThreads, 0, ctx.stream()>>>(Y, P, Q, N, M, r, alpha);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rank_update_via_gemm(Context& ctx, bf16* Y, const bf16* P, const bf16* Q, bool q_rows_m, int64_t N, int64_t M,
                          int64_t r, float alpha) {
  gemm(ctx, false, q_rows_m, N, M, r, alpha, P, Q, 1.0f, Y);
}

void rank_update_fused(Context& ctx, bf16* Y, const bf16* P, const bf16* Q, bool q_rows_m, int64_t N, int64_t M,
                       int64_t r, float alpha) {
  rank_update(ctx, Y, P, Q, q_rows_m, N, M, r, alpha);
}

void linear_forward(Context& ctx, bf16* y, const bf16* x, const bf16* W, const bf16* b, int64_t N, int64_t in,
                    int64_t out) {
  gemm(ctx, false, true, N, out, in, 1.0f, x, W, 0.0f, y, b);
}

void linear_backward(Context& ctx, bf16* dx, const bf16* dy, const bf16* W, int64_t N, int64_t in, int64_t out,
                     bool accumulate) {
  if (dx) gemm(ctx, false, false, N, in, out, 1.0f, dy, W, accumulate ? 1.0f : 0.0f, dx);
}

void lora_forward(Context& ctx, bf16* y, bf16* xa, const bf16* x, const float* A, const float* B, float scale,
                  int64_t N, int64_t in, int64_t out, int64_t r) {
  const LoraScratch s = lora_scratch(ctx, A, B, in, out, r, 0);
  gemm(ctx, false, true, N, r, in, 1.0f, x, s.A16, 0.0f, xa);
  rank_update(ctx, y, xa, s.B16, /*q_rows_m=*/true, N, out, r, scale);
}

void lora_backward(Context& ctx, bf16* dx, float* dA, float* dB, const bf16* dy, const bf16* x, const bf16* xa,
                   const float* A, const float* B, float scale, int64_t N, int64_t in, int64_t out, int64_t r) {
  const size_t t_bytes = (dx || dA) ? size_t(N * r) * sizeof(bf16) : 0;
  const LoraScratch s = lora_scratch(ctx, A, B, in, out, r, t_bytes);
  if (dx || dA) {
    bf16* t = static_cast<bf16*>(s.extra);  // (N,r) = dy B
    gemm(ctx, false, false, N, r, out, 1.0f, dy, s.B16, 0.0f, t);
    if (dx) rank_update(ctx, dx, t, s.A16, /*q_rows_m=*/false, N, in, r, scale);
    if (dA) gemm(ctx, true, false, r, in, N, scale, t, x, 1.0f, dA);
  }
  if (dB) gemm(ctx, true, false, out, r, N, scale, dy, xa, 1.0f, dB);
}

}  // namespace qt::cuda
