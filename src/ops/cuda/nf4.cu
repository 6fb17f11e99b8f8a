// NF4 dequantization kernels (see nf4.h). One thread per packed byte (two elements), grid-stride;
// the block's absmax is rebuilt from its 8-bit code per element pair (two cached loads), which is
// cheaper than a second pass over a temporary for the bandwidth-bound kernel.
#include "ops/cuda/common.cuh"
#include "ops/cuda/nf4.h"

namespace qt::cuda {

namespace {

__device__ __forceinline__ void store(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }

__device__ __forceinline__ float block_absmax(const Nf4DeviceView& q, int64_t b) {
  if (q.absmax) return __ldg(q.absmax + b);
  const float scaled = __fmul_rn(__ldg(q.nested_quant_map + __ldg(q.absmax_codes + b)),
                                 __ldg(q.nested_absmax + b / q.nested_blocksize));
  return __fadd_rn(scaled, q.offset);
}

template <typename T>
__global__ void nf4_dequantize_kernel(Nf4DeviceView q, T* __restrict__ out) {
  __shared__ float qmap[16];
  if (threadIdx.x < 16) qmap[threadIdx.x] = q.quant_map[threadIdx.x];
  __syncthreads();
  const int64_t bytes = (q.n + 1) / 2;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < bytes; k += int64_t(gridDim.x) * blockDim.x) {
    const unsigned byte = __ldg(q.codes + k);
    const int64_t j = 2 * k;
    store(out + j, __fmul_rn(qmap[byte >> 4], block_absmax(q, j / q.blocksize)));
    if (j + 1 < q.n) store(out + j + 1, __fmul_rn(qmap[byte & 15u], block_absmax(q, (j + 1) / q.blocksize)));
  }
}

template <typename T>
void launch(const Context& ctx, const Nf4DeviceView& q, T* out) {
  QT_CUDA_ASSERT(q.codes && q.quant_map, "nf4_dequantize: codes and quant_map are required");
  QT_CUDA_ASSERT(q.absmax || (q.absmax_codes && q.nested_absmax && q.nested_quant_map),
                 "nf4_dequantize: absmax, or the three double-quantization arrays, are required");
  QT_CUDA_ASSERT(q.blocksize > 0 && q.nested_blocksize > 0, "nf4_dequantize: block sizes must be positive");
  if (q.n <= 0) return;
  const int64_t bytes = (q.n + 1) / 2;
  nf4_dequantize_kernel<T><<<grid_for(bytes), kThreads, 0, ctx.stream()>>>(q, out);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void nf4_dequantize(const Context& ctx, const Nf4DeviceView& q, bf16* out) { launch(ctx, q, out); }
void nf4_dequantize(const Context& ctx, const Nf4DeviceView& q, float* out) { launch(ctx, q, out); }

}  // namespace qt::cuda
