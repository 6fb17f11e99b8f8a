// HF causal-LM cross entropy on bf16 logits (B,S,V), one block per row, fp32 row reductions:
//   row t of batch b predicts y = labels[b,t+1] (t < S-1, y != -100):
//   loss = m + log(sum_v exp(x_v - m)) - x_y;   dx_v += scale * (exp(x_v - m - log sum) - [v == y])
// The forward writes per-row losses to scratch, then one block sums them in fp64 in a fixed order.
// Fused with the lm_head (fused_linear_cross_entropy): rows go chunk by chunk through
//   logits_c = bf16(h_c W^T) (C,V) -> row losses, and in place G_c = bf16(scale (softmax - onehot))
//   -> dh_c += G_c W
// so only C x V logits ever exist (the bf16 rounding of the logits is HF's own in bf16 training).
#include <algorithm>

#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

constexpr int32_t kIgnoreIndex = -100;
constexpr int kRowThreads = 256;

// The label predicted by row bt, or -1 when the row predicts nothing (last position, ignored,
// or out of range: the host validates labels; the kernel only refuses to read outside the row).
__device__ __forceinline__ int32_t row_label(const int32_t* labels, int64_t bt, int64_t S, int64_t V) {
  if (bt % S == S - 1) return -1;
  const int32_t y = labels[bt + 1];
  return (y == kIgnoreIndex || y < 0 || y >= V) ? -1 : y;
}

// Max and log-sum-exp of one row, every thread gets both.
__device__ void row_stats(const bf16* row, int64_t V, float* shared, float* m_out, float* log_sum_out) {
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, to_f(row[v]));
  m = block_max(m, shared);
  float s = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += expf(to_f(row[v]) - m);
  s = block_sum(s, shared);
  *m_out = m;
  *log_sum_out = logf(s);
}

__global__ void ce_rows_kernel(float* row_loss, const bf16* logits, const int32_t* labels, int64_t S, int64_t V) {
  __shared__ float shared[32];
  const int64_t bt = blockIdx.x;
  const int32_t y = row_label(labels, bt, S, V);
  if (y < 0) {
    if (threadIdx.x == 0) row_loss[bt] = 0.0f;
    return;
  }
  const bf16* row = logits + bt * V;
  float m, log_sum;
  row_stats(row, V, shared, &m, &log_sum);
  if (threadIdx.x == 0) row_loss[bt] = m + log_sum - to_f(row[y]);
}

// One block: loss_sum = sum of row losses (fp64), count = predicting rows. Thread-strided partial
// sums then a fixed tree: deterministic.
__global__ void ce_total_kernel(double* loss_sum, int64_t* count, const float* row_loss, const int32_t* labels,
                                int64_t rows, int64_t S, int64_t V) {
  __shared__ double ssum[kRowThreads];
  __shared__ long long scount[kRowThreads];
  double s = 0;
  long long c = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    s += double(row_loss[i]);
    c += row_label(labels, i, S, V) >= 0 ? 1 : 0;
  }
  ssum[threadIdx.x] = s;
  scount[threadIdx.x] = c;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (int(threadIdx.x) < w) {
      ssum[threadIdx.x] += ssum[threadIdx.x + w];
      scount[threadIdx.x] += scount[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *loss_sum = ssum[0];
    *count = int64_t(scount[0]);
  }
}

__global__ void ce_backward_kernel(bf16* dlogits, const bf16* logits, const int32_t* labels, float scale, int64_t S,
                                   int64_t V) {
  __shared__ float shared[32];
  const int64_t bt = blockIdx.x;
  const int32_t y = row_label(labels, bt, S, V);
  if (y < 0) return;
  const bf16* row = logits + bt * V;
  bf16* drow = dlogits + bt * V;
  float m, log_sum;
  row_stats(row, V, shared, &m, &log_sum);  // ends with a barrier-protected reduction: all reads done
  const float shift = m + log_sum;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float p = expf(to_f(row[v]) - shift);
    drow[v] = to_bf(to_f(drow[v]) + scale * p - (v == y ? scale : 0.0f));
  }
}

// One row of a logits chunk: the row's loss into row_loss[bt]; with `grad` the row is overwritten
// by scale * (softmax - onehot) (zeros for a row that predicts nothing).
__global__ void ce_chunk_kernel(float* row_loss, bf16* chunk, const int32_t* labels, int64_t row0, int64_t S,
                                int64_t V, float scale, bool grad) {
  __shared__ float shared[32];
  const int64_t bt = row0 + blockIdx.x;
  bf16* row = chunk + int64_t(blockIdx.x) * V;
  const int32_t y = row_label(labels, bt, S, V);
  if (y < 0) {
    if (threadIdx.x == 0) row_loss[bt] = 0.0f;
    if (grad)
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) row[v] = to_bf(0.0f);
    return;
  }
  const float xy = to_f(row[y]);  // read before any thread overwrites the row
  float m, log_sum;
  row_stats(row, V, shared, &m, &log_sum);  // every read of the row precedes its last barrier
  if (threadIdx.x == 0) row_loss[bt] = m + log_sum - xy;
  if (!grad) return;
  const float shift = m + log_sum;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
    row[v] = to_bf(scale * expf(to_f(row[v]) - shift) - (v == y ? scale : 0.0f));
}

}  // namespace

void fused_linear_cross_entropy(Context& ctx, double* loss_sum, int64_t* count, bf16* dh, const bf16* h,
                                const bf16* W, const int32_t* labels, float scale, int64_t B, int64_t S, int64_t H,
                                int64_t V, int64_t chunk_rows, bf16* logits_buf, int64_t logits_elems) {
  QT_CUDA_ASSERT(V > 0 && H > 0 && B >= 0 && S >= 0 && B * S <= 0x7fffffff, "fused_linear_cross_entropy: bad shape");
  const int64_t N = B * S;
  const bool own_buf = logits_buf != nullptr && logits_elems >= V;
  if (chunk_rows <= 0) {
    chunk_rows = std::max<int64_t>(1, own_buf ? logits_elems / V : (int64_t(256) << 20) / (V * int64_t(sizeof(bf16))));
    if (chunk_rows >= 128) chunk_rows = chunk_rows / 128 * 128;
  }
  const int64_t C = std::min<int64_t>(chunk_rows, std::max<int64_t>(N, 1));
  QT_CUDA_ASSERT(!own_buf || C * V <= logits_elems, "fused_linear_cross_entropy: the chunk does not fit logits_buf");
  const size_t loss_bytes = (size_t(std::max<int64_t>(N, 1)) * sizeof(float) + 255) / 256 * 256;
  auto* base = static_cast<unsigned char*>(ctx.scratch(loss_bytes + (own_buf ? 0 : size_t(C * V) * sizeof(bf16))));
  float* row_loss = reinterpret_cast<float*>(base);
  bf16* logits = own_buf ? logits_buf : reinterpret_cast<bf16*>(base + loss_bytes);
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    const int64_t rows = std::min(C, N - r0);
    gemm(ctx, false, true, rows, V, H, 1.0f, h + r0 * H, W, 0.0f, logits);
    ce_chunk_kernel<<<unsigned(rows), kRowThreads, 0, ctx.stream()>>>(row_loss, logits, labels, r0, S, V, scale,
                                                                      dh != nullptr);
    QT_CUDA_LAUNCH_CHECK();
    if (dh) gemm(ctx, false, false, rows, H, V, 1.0f, logits, W, 1.0f, dh + r0 * H);
  }
  ce_total_kernel<<<1, kRowThreads, 0, ctx.stream()>>>(loss_sum, count, row_loss, labels, N, S, V);
  QT_CUDA_LAUNCH_CHECK();
}

void cross_entropy_forward(Context& ctx, double* loss_sum, int64_t* count, const bf16* logits, const int32_t* labels,
                           int64_t B, int64_t S, int64_t V) {
  QT_CUDA_ASSERT(V > 0 && B >= 0 && S >= 0 && B * S <= 0x7fffffff, "cross_entropy: bad shape");
  const int64_t rows = B * S;
  float* row_loss = static_cast<float*>(ctx.scratch(size_t(rows > 0 ? rows : 1) * sizeof(float)));
  if (rows > 0) {
    ce_rows_kernel<<<unsigned(rows), kRowThreads, 0, ctx.stream()>>>(row_loss, logits, labels, S, V);
    QT_CUDA_LAUNCH_CHECK();
  }
  ce_total_kernel<<<1, kRowThreads, 0, ctx.stream()>>>(loss_sum, count, row_loss, labels, rows, S, V);
  QT_CUDA_LAUNCH_CHECK();
}

void cross_entropy_backward(Context& ctx, bf16* dlogits, const bf16* logits, const int32_t* labels, float scale,
                            int64_t B, int64_t S, int64_t V) {
  QT_CUDA_ASSERT(V > 0 && B >= 0 && S >= 0 && B * S <= 0x7fffffff, "cross_entropy: bad shape");
  if (dlogits == nullptr || B * S == 0) return;
  ce_backward_kernel<<<unsigned(B * S), kRowThreads, 0, ctx.stream()>>>(dlogits, logits, labels, scale, S, V);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace qt::cuda
