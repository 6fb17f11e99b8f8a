// Elementwise CUDA ops: dtype conversions, embedding lookup, SwiGLU, residual add, fused AdamW,
// gradient sum of squares and scaling (clipping).
//   swiglu: h = silu(g) u, silu(g) = g sigmoid(g);
//           dg += dh u sg (1 + g (1 - sg)), du += dh g sg      (fp32 math on bf16 values)
//   AdamW:  the per-element update of train/optimizer.cpp in fp64 with explicit round-to-nearest
//           intrinsics, so no multiply-add is contracted into an FMA and the result is bitwise equal
//           to the CPU's.
#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

#define QT_GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__global__ void f32_to_bf16_kernel(bf16* dst, const float* src, int64_t n) {
  QT_GRID_STRIDE(i, n) dst[i] = to_bf(src[i]);
}
__global__ void bf16_to_f32_kernel(float* dst, const bf16* src, int64_t n) {
  QT_GRID_STRIDE(i, n) dst[i] = to_f(src[i]);
}

__global__ void embedding_kernel(bf16* out, const int32_t* ids, const bf16* table, int64_t N, int64_t V, int64_t H) {
  QT_GRID_STRIDE(i, N * H) {
    const int64_t n = i / H, h = i % H;
    const int32_t id = ids[n];
    if (id >= 0 && id < V) out[i] = table[int64_t(id) * H + h];
  }
}

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

__global__ void swiglu_fwd_kernel(bf16* h, const bf16* g, const bf16* u, int64_t n) {
  QT_GRID_STRIDE(i, n) {
    const float gi = to_f(g[i]);
    h[i] = to_bf((gi * sigmoidf_(gi)) * to_f(u[i]));
  }
}

__global__ void swiglu_bwd_kernel(bf16* dg, bf16* du, const bf16* dh, const bf16* g, const bf16* u, int64_t n) {
  QT_GRID_STRIDE(i, n) {
    const float gi = to_f(g[i]), ui = to_f(u[i]), dhi = to_f(dh[i]);
    const float sg = sigmoidf_(gi);
    if (dg) dg[i] = to_bf(to_f(dg[i]) + dhi * ui * sg * (1.0f + gi * (1.0f - sg)));
    if (du) du[i] = to_bf(to_f(du[i]) + dhi * gi * sg);
  }
}

// In place: g <- dg, u <- du (each element read before it is overwritten, by the same thread).
__global__ void swiglu_bwd_inplace_kernel(bf16* g, bf16* u, const bf16* dh, int64_t n) {
  QT_GRID_STRIDE(i, n) {
    const float gi = to_f(g[i]), ui = to_f(u[i]), dhi = to_f(dh[i]);
    const float sg = sigmoidf_(gi);
    g[i] = to_bf(dhi * ui * sg * (1.0f + gi * (1.0f - sg)));
    u[i] = to_bf(dhi * gi * sg);
  }
}

__global__ void add_kernel(bf16* y, const bf16* x, int64_t n) {
  QT_GRID_STRIDE(i, n) y[i] = to_bf(to_f(y[i]) + to_f(x[i]));
}

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, double decay_mul, double b1,
                             double b2, double step_size, double bc2_sqrt, double eps, const int* skip) {
  if (skip && *skip) return;
  QT_GRID_STRIDE(i, n) {
    const double gi = double(g[i]);
    // mi = b1*m + (1-b1)*g ; vi = b2*v + (1-b2)*g*g   (left to right, as the C++ expression)
    const double mi = __dadd_rn(__dmul_rn(b1, double(m[i])), __dmul_rn(__dsub_rn(1.0, b1), gi));
    const double vi = __dadd_rn(__dmul_rn(b2, double(v[i])), __dmul_rn(__dmul_rn(__dsub_rn(1.0, b2), gi), gi));
    const double denom = __dadd_rn(__ddiv_rn(__dsqrt_rn(vi), bc2_sqrt), eps);
    p[i] = float(__dsub_rn(__dmul_rn(double(p[i]), decay_mul), __ddiv_rn(__dmul_rn(step_size, mi), denom)));
    m[i] = float(mi);
    v[i] = float(vi);
  }
}

constexpr int kSumBlocks = 264;  // fixed (two waves on 132 SMs): the reduction order never depends on the GPU

__global__ void sum_squares_partial_kernel(double* partial, const float* x, int64_t n) {
  __shared__ double sh[kThreads];
  double s = 0;
  QT_GRID_STRIDE(i, n) s += double(x[i]) * double(x[i]);
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

__global__ void sum_partials_kernel(double* out, const double* partial, int count) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s = 0;
  for (int b = 0; b < count; ++b) s += partial[b];
  *out += s;
}

__global__ void scale_kernel(float* x, int64_t n, float c) {
  QT_GRID_STRIDE(i, n) x[i] *= c;
}

__global__ void add_f64_kernel(double* acc, const double* x) { *acc += *x; }

__global__ void step_guard_kernel(int* skip, const double* a, const double* b) {
  *skip = !(isfinite(*a) && isfinite(*b));
}

// The counter hash of cpu/dropout.cpp (splitmix64 finaliser), bit for bit.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ bool dropout_keep(uint64_t key, uint64_t row, uint64_t f, double p) {
  return double(mix64(mix64(key ^ row) ^ f) >> 11) * 0x1.0p-53 >= p;
}

// add = false: y = mask(x) * keep_scale; add = true: y += mask(x) * keep_scale (dropout's backward).
// lo / hi (device, may be null): only rows [*lo, *hi) are touched.
template <bool kAdd>
__global__ void dropout_kernel(bf16* y, const bf16* x, int64_t N, int64_t D, double p, float keep_scale, uint64_t key,
                               const int32_t* rows, const int64_t* lo = nullptr, const int64_t* hi = nullptr) {
  const int64_t r0 = lo ? *lo : 0, r1 = hi ? *hi : N;
  QT_GRID_STRIDE(i, N * D) {
    const int64_t n = i / D, f = i - n * D;
    if (n < r0 || n >= r1) continue;
    const uint64_t row = rows ? uint64_t(rows[n]) : uint64_t(n);
    const float v = dropout_keep(key, row, uint64_t(f), p) ? to_f(x[i]) * keep_scale : 0.f;
    y[i] = kAdd ? to_bf(to_f(y[i]) + v) : to_bf(v);
  }
}

}  // namespace

void sum_squares(Context& ctx, double* sum_sq, const float* x, int64_t n) {
  if (n <= 0) return;
  auto* partial = static_cast<double*>(ctx.scratch(kSumBlocks * sizeof(double)));
  sum_squares_partial_kernel<<<kSumBlocks, kThreads, 0, ctx.stream()>>>(partial, x, n);
  QT_CUDA_LAUNCH_CHECK();
  sum_partials_kernel<<<1, 32, 0, ctx.stream()>>>(sum_sq, partial, kSumBlocks);
  QT_CUDA_LAUNCH_CHECK();
}

void sum_f64(Context& ctx, double* out, const double* x, int64_t n) {
  if (n <= 0) return;
  sum_partials_kernel<<<1, 32, 0, ctx.stream()>>>(out, x, int(n));
  QT_CUDA_LAUNCH_CHECK();
}

void scale_inplace(Context& ctx, float* x, int64_t n, float c) {
  if (n <= 0) return;
  scale_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, c);
  QT_CUDA_LAUNCH_CHECK();
}

void f32_to_bf16(Context& ctx, bf16* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  f32_to_bf16_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(dst, src, n);
  QT_CUDA_LAUNCH_CHECK();
}

void bf16_to_f32(Context& ctx, float* dst, const bf16* src, int64_t n) {
  if (n <= 0) return;
  bf16_to_f32_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(dst, src, n);
  QT_CUDA_LAUNCH_CHECK();
}

void embedding_forward(Context& ctx, bf16* out, const int32_t* ids, const bf16* table, int64_t N, int64_t V,
                       int64_t H) {
  if (N * H <= 0) return;
  embedding_kernel<<<grid_for(N * H), kThreads, 0, ctx.stream()>>>(out, ids, table, N, V, H);
  QT_CUDA_LAUNCH_CHECK();
}

void swiglu_forward(Context& ctx, bf16* h, const bf16* g, const bf16* u, int64_t n) {
  if (n <= 0) return;
  swiglu_fwd_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(h, g, u, n);
  QT_CUDA_LAUNCH_CHECK();
}

void swiglu_backward(Context& ctx, bf16* dg, bf16* du, const bf16* dh, const bf16* g, const bf16* u, int64_t n) {
  if (n <= 0 || (!dg && !du)) return;
  swiglu_bwd_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(dg, du, dh, g, u, n);
  QT_CUDA_LAUNCH_CHECK();
}

void swiglu_backward_inplace(Context& ctx, bf16* g, bf16* u, const bf16* dh, int64_t n) {
  if (n <= 0) return;
  swiglu_bwd_inplace_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(g, u, dh, n);
  QT_CUDA_LAUNCH_CHECK();
}

void add_inplace(Context& ctx, bf16* y, const bf16* x, int64_t n) {
  if (n <= 0) return;
  add_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(y, x, n);
  QT_CUDA_LAUNCH_CHECK();
}

void adamw_step(Context& ctx, float* p, const float* g, float* m, float* v, int64_t n, double decay_mul,
                double beta1, double beta2, double step_size, double bc2_sqrt, double eps, const int* skip) {
  if (n <= 0) return;
  adamw_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(p, g, m, v, n, decay_mul, beta1, beta2, step_size,
                                                            bc2_sqrt, eps, skip);
  QT_CUDA_LAUNCH_CHECK();
}

void add_f64(Context& ctx, double* acc, const double* x) {
  add_f64_kernel<<<1, 1, 0, ctx.stream()>>>(acc, x);
  QT_CUDA_LAUNCH_CHECK();
}

void step_guard(Context& ctx, int* skip, const double* a, const double* b) {
  step_guard_kernel<<<1, 1, 0, ctx.stream()>>>(skip, a, b);
  QT_CUDA_LAUNCH_CHECK();
}

void dropout_forward(Context& ctx, bf16* y, const bf16* x, int64_t N, int64_t D, double p, uint64_t key,
                     const int32_t* rows) {
  if (N * D <= 0) return;
  dropout_kernel<false><<<grid_for(N * D), kThreads, 0, ctx.stream()>>>(y, x, N, D, p, float(1.0 / (1.0 - p)), key, rows);
  QT_CUDA_LAUNCH_CHECK();
}

void dropout_backward(Context& ctx, bf16* dx, const bf16* dy, int64_t N, int64_t D, double p, uint64_t key,
                      const int32_t* rows, const int64_t* row_lo, const int64_t* row_hi) {
  if (N * D <= 0) return;
  dropout_kernel<true><<<grid_for(N * D), kThreads, 0, ctx.stream()>>>(dx, dy, N, D, p, float(1.0 / (1.0 - p)), key, rows,
                                                                      row_lo, row_hi);
  QT_CUDA_LAUNCH_CHECK();
}

namespace {
// One thread that returns once the device's global timer has advanced by `ns`.
__global__ void delay_kernel(int64_t ns) {
  uint64_t t0 = 0, t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (int64_t(t - t0) < ns);
}
}  // namespace

void delay_stream(cudaStream_t stream, int64_t us) {
  if (us <= 0) return;
  delay_kernel<<<1, 1, 0, stream>>>(us * 1000);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace qt::cuda
