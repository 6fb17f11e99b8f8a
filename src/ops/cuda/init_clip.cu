// Device-side initialisation and clipping for the CUDA decoder (no host round trip):
//  - fill_normal: x[i] = mean + std * N(0,1) from a counter-based hash of (seed, first + i) (splitmix64 ->
//    two uniforms -> Box-Muller), so a 7B model's random weights never exist on the host and the
//    values do not depend on the launch shape.
//  - fill_constant: x[i] = c.
//  - clip_by_sum_squares: coef = min(1, max_norm / (sqrt(*sum_sq) + 1e-6)) read on the device
//    (torch.nn.utils.clip_grad_norm_, as train/optimizer.cpp); x *= float(coef). A non-finite
//    sum leaves x untouched (the trainer skips such a step).
#include <cmath>

#include "ops/cuda/common.cuh"
#include "ops/cuda/init_clip.h"

namespace qt::cuda {

namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
__global__ void fill_normal_kernel(T* x, int64_t n, float mean, float std, uint64_t seed, uint64_t first) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t h = splitmix64(seed ^ splitmix64(first + uint64_t(i)));
    const float u1 = (float(h >> 40) + 1.0f) * (1.0f / 16777217.0f);  // (0, 1]
    const float u2 = float((h >> 16) & 0xFFFFFFull) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    x[i] = T(mean + std * z);
  }
}

template <typename T>
__global__ void fill_constant_kernel(T* x, int64_t n, float c) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = T(c);
}

__global__ void clip_kernel(float* x, int64_t n, const double* sum_sq, double max_norm) {
  const double s = *sum_sq;
  if (!isfinite(s)) return;
  const double coef = fmin(1.0, max_norm / (sqrt(s) + 1e-6));
  if (coef >= 1.0) return;
  const float c = float(coef);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] *= c;
}

}  // namespace

void fill_normal(Context& ctx, bf16* x, int64_t n, float mean, float std, uint64_t seed, uint64_t first) {
  if (n <= 0) return;
  fill_normal_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, mean, std, seed, first);
  QT_CUDA_LAUNCH_CHECK();
}
void fill_normal(Context& ctx, float* x, int64_t n, float mean, float std, uint64_t seed, uint64_t first) {
  if (n <= 0) return;
  fill_normal_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, mean, std, seed, first);
  QT_CUDA_LAUNCH_CHECK();
}
void fill_constant(Context& ctx, bf16* x, int64_t n, float c) {
  if (n <= 0) return;
  fill_constant_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, c);
  QT_CUDA_LAUNCH_CHECK();
}
void clip_by_sum_squares(Context& ctx, float* x, int64_t n, const double* sum_sq, double max_norm) {
  if (n <= 0) return;
  clip_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, sum_sq, max_norm);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace qt::cuda
