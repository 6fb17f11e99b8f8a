// NF4 dequantization kernels (see nf4.h). One thread per packed byte (two elements), grid-stride
// (the batched variant: 16 elements per thread when the blocks allow, below);
// the block's absmax is rebuilt from its 8-bit code per element pair (two cached loads), which is
// cheaper than a second pass over a temporary for the bandwidth-bound kernel. The batched variant
// does the same over `count` tensors stored back to back (grid y = tensor, 32-bit indices inside one,
// one absmax per byte when both elements share a block). The quantizer's first pass runs one warp
// per 64-element block: lane i owns elements 2i, 2i+1 (one packed byte), the block's absmax is a
// butterfly fmax (exact in any order), codes use model/nf4_code.h's tree on x * fl(1 / absmax).
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>

#include "model/nf4_code.h"
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

namespace {

// Tensor e's block b absmax (32-bit indices within a tensor: one matrix has < 2^31 elements).
__device__ __forceinline__ float batch_absmax(const Nf4BatchView& q, int64_t e, uint32_t nb, uint32_t nb2, uint32_t b) {
  const float scaled = __fmul_rn(__ldg(q.nested_quant_map + 256 * e + __ldg(q.absmax_codes + e * nb + b)),
                                 __ldg(q.nested_absmax + e * nb2 + b / uint32_t(q.nested_blocksize)));
  return __fadd_rn(scaled, __ldg(q.offsets + e));
}

__device__ __forceinline__ bf16 to_output(float v, bool f16) {
  return __float2bfloat16_rn(f16 ? __half2float(__float2half_rn(v)) : v);
}

// blockIdx.y = tensor; grid-stride over its packed bytes.
__global__ void nf4_dequantize_batched_kernel(Nf4BatchView q, bf16* __restrict__ out) {
  const int64_t e = blockIdx.y;
  const uint32_t n = uint32_t(q.n), cb = (n + 1) / 2, bs = uint32_t(q.blocksize);
  const uint32_t nb = (n + bs - 1) / bs, nb2 = (nb + uint32_t(q.nested_blocksize) - 1) / uint32_t(q.nested_blocksize);
  const uint8_t* codes = q.codes + e * cb;
  const float* qmap = q.quant_map + 16 * e;
  bf16* o = out + e * int64_t(n);
  for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < cb; k += gridDim.x * blockDim.x) {
    const unsigned byte = __ldg(codes + k);
    const uint32_t j = 2 * k, b0 = j / bs;
    const float a0 = batch_absmax(q, e, nb, nb2, b0);
    o[j] = to_output(__fmul_rn(__ldg(qmap + (byte >> 4)), a0), q.f16_storage);
    if (j + 1 < n) {
      const uint32_t b1 = (j + 1) / bs;
      const float a1 = b1 == b0 ? a0 : batch_absmax(q, e, nb, nb2, b1);
      o[j + 1] = to_output(__fmul_rn(__ldg(qmap + (byte & 15u)), a1), q.f16_storage);
    }
  }
}

// The same values, 16 elements per thread when a tensor's blocks are whole multiples of 16 elements
// (n % 16 == 0, blocksize % 16 == 0: one absmax per thread): 8 code bytes in one load, the bf16
// results out in two 16-byte stores (the scalar kernel's 2-byte stores and per-element absmax
// lookups left it at a fraction of the bandwidth).
__global__ void nf4_dequantize_batched16_kernel(Nf4BatchView q, bf16* __restrict__ out) {
  const int64_t e = blockIdx.y;
  const uint32_t n = uint32_t(q.n), bs = uint32_t(q.blocksize);
  const uint32_t nb = (n + bs - 1) / bs, nb2 = (nb + uint32_t(q.nested_blocksize) - 1) / uint32_t(q.nested_blocksize);
  __shared__ float qmap[16];
  if (threadIdx.x < 16) qmap[threadIdx.x] = q.quant_map[16 * e + threadIdx.x];
  __syncthreads();
  const uint2* codes = reinterpret_cast<const uint2*>(q.codes + e * (n / 2));
  uint4* o = reinterpret_cast<uint4*>(out + e * int64_t(n));
  for (uint32_t v = blockIdx.x * blockDim.x + threadIdx.x; v < n / 16; v += gridDim.x * blockDim.x) {
    const uint2 c = __ldg(codes + v);
    const float a = batch_absmax(q, e, nb, nb2, v * 16 / bs);
    uint32_t w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const unsigned byte = ((i < 4 ? c.x : c.y) >> (8 * (i & 3))) & 0xFFu;  // elements 2i (high nibble), 2i + 1
      const bf16 lo = to_output(__fmul_rn(qmap[byte >> 4], a), q.f16_storage);
      const bf16 hi = to_output(__fmul_rn(qmap[byte & 15u], a), q.f16_storage);
      w[i] = uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
    }
    o[2 * v] = make_uint4(w[0], w[1], w[2], w[3]);
    o[2 * v + 1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

constexpr int64_t kQuantBlock = 64;

// One warp per (tensor, block); lane i: elements 2i and 2i+1 of the block.
__global__ void nf4_quantize_blocks_kernel(const bf16* __restrict__ x, int64_t count, int64_t n, uint8_t* __restrict__ codes,
                                           float* __restrict__ absmax) {
  const int64_t nb = (n + kQuantBlock - 1) / kQuantBlock, cb = (n + 1) / 2;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int lane = int(threadIdx.x % 32);
  for (int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; w < count * nb; w += warps) {
    const int64_t e = w / nb, b = w - e * nb;
    const int64_t j = b * kQuantBlock + 2 * lane;  // element index within tensor e
    const bf16* xe = x + e * n;
    const bool has0 = j < n, has1 = j + 1 < n;
    const float v0 = has0 ? __bfloat162float(xe[j]) : 0.f, v1 = has1 ? __bfloat162float(xe[j + 1]) : 0.f;
    float m = -FLT_MAX;
    if (has0) m = fmaxf(m, fabsf(v0));
    if (has1) m = fmaxf(m, fabsf(v1));
    m = warp_max(m);
    const float inv = __fdiv_rn(1.0f, m);
    if (has0) codes[e * cb + j / 2] = uint8_t((nf4_code_of(__fmul_rn(v0, inv)) << 4) | nf4_code_of(__fmul_rn(v1, inv)));
    if (lane == 0) absmax[w] = m;
  }
}

}  // namespace

void nf4_dequantize_batched(const Context& ctx, const Nf4BatchView& q, bf16* out) {
  QT_CUDA_ASSERT(q.codes && q.absmax_codes && q.nested_absmax && q.quant_map && q.nested_quant_map && q.offsets,
                 "nf4_dequantize_batched: every array is required");
  QT_CUDA_ASSERT(q.blocksize > 0 && q.nested_blocksize > 0, "nf4_dequantize_batched: block sizes must be positive");
  QT_CUDA_ASSERT(q.n < (int64_t(1) << 31) && q.count <= 65535,
                 "nf4_dequantize_batched: at most 65535 tensors of fewer than 2^31 elements");
  if (q.n <= 0 || q.count <= 0) return;
  const bool wide = q.n % 16 == 0 && q.blocksize % 16 == 0 && (reinterpret_cast<uintptr_t>(q.codes) & 7) == 0 &&
                    (reinterpret_cast<uintptr_t>(out) & 15) == 0;
  if (wide) {
    const dim3 grid(std::min(grid_for(q.n / 16), 4096u), unsigned(q.count));
    nf4_dequantize_batched16_kernel<<<grid, kThreads, 0, ctx.stream()>>>(q, out);
  } else {
    const dim3 grid(std::min(grid_for((q.n + 1) / 2), 4096u), unsigned(q.count));
    nf4_dequantize_batched_kernel<<<grid, kThreads, 0, ctx.stream()>>>(q, out);
  }
  QT_CUDA_LAUNCH_CHECK();
}

void nf4_quantize_blocks(const Context& ctx, const bf16* x, int64_t count, int64_t n, uint8_t* codes, float* absmax) {
  if (n <= 0 || count <= 0) return;
  const int64_t warps = count * ((n + kQuantBlock - 1) / kQuantBlock);
  nf4_quantize_blocks_kernel<<<grid_for(warps * 32), kThreads, 0, ctx.stream()>>>(x, count, n, codes, absmax);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace qt::cuda
