// NF4 (bitsandbytes 4-bit) dequantization on the device; the format and the math are those of
// model/nf4.h, and the results equal the CPU reference bit for bit:
//   absmax[b] = fl(fl(nested_quant_map[absmax_codes[b]] * nested_absmax[b / nested_blocksize]) + offset)
//               (or the fp32 absmax as stored, without double quantization)
//   w[j]      = fl(quant_map[code(j)] * absmax[j / blocksize]),  code(2k) = high nibble of codes[k]
// then rounded once to the output (bf16: round-to-nearest-even; fp32: as is). No fused multiply-add.
// The bf16 output equals model/nf4's nf4_dequantize(q, BF16) for quant-state dtypes bfloat16 and float32.
#pragma once
#include <cstdint>

#include "ops/cuda/runtime.h"

namespace qt::cuda {

// Device pointers of one NF4 tensor of n elements.
struct Nf4DeviceView {
  const uint8_t* codes = nullptr;         // (n + 1) / 2
  const float* quant_map = nullptr;       // 16
  const uint8_t* absmax_codes = nullptr;  // nblocks, with double quantization (else null)
  const float* nested_absmax = nullptr;   // ceil(nblocks / nested_blocksize)
  const float* nested_quant_map = nullptr;  // 256
  const float* absmax = nullptr;          // nblocks fp32, without double quantization (else null)
  float offset = 0.0f;
  int64_t n = 0;
  int64_t blocksize = 64;
  int64_t nested_blocksize = 256;
};

// out[0, n) <- the dequantized tensor, on ctx's stream. out is the caller's buffer (e.g. a per-layer
// scratch); asynchronous.
void nf4_dequantize(const Context& ctx, const Nf4DeviceView& q, bf16* out);
void nf4_dequantize(const Context& ctx, const Nf4DeviceView& q, float* out);

}  // namespace qt::cuda

namespace qt::cuda {

// `count` NF4 tensors of n elements each, stored back to back (the experts of one MoE projection, or
// count = 1 for a dense one), all with double quantization:
//   tensor e: codes + e*(n+1)/2, absmax_codes + e*nb, nested_absmax + e*nb2, quant_map + 16e,
//             nested_quant_map + 256e, offsets[e]   (nb = ceil(n / blocksize), nb2 = ceil(nb / nested_blocksize))
// Dequantized into out (count, n) with the per-tensor formula of Nf4DeviceView. f16_storage: the
// quant state's dtype is float16, so each product is rounded to fp16 first and that value to bf16
// (what the CPU engine holds for it, widened, then rounded to bf16 on upload).
struct Nf4BatchView {
  const uint8_t* codes = nullptr;
  const uint8_t* absmax_codes = nullptr;
  const float* nested_absmax = nullptr;
  const float* quant_map = nullptr;
  const float* nested_quant_map = nullptr;
  const float* offsets = nullptr;
  int64_t count = 0, n = 0;
  int64_t blocksize = 64, nested_blocksize = 256;
  bool f16_storage = false;
};
void nf4_dequantize_batched(const Context& ctx, const Nf4BatchView& q, bf16* out);

// The first pass of the NF4 quantizer (model/nf4.h, blocksize 64) on `count` tensors of n elements
// stored back to back in x (count, n): per tensor e and block b, absmax[e*nb + b] = max |x| (fp32,
// fmax from -FLT_MAX) and the packed codes of x * fl(1 / absmax) (codes + e*(n+1)/2; an odd n pads the
// last low nibble with the code of 0 * 1/absmax). One warp per block, no atomics. The double
// quantization of absmax is left to the host (nf4_double_quantize), which makes the result equal to
// nf4_quantize's bytes.
void nf4_quantize_blocks(const Context& ctx, const bf16* x, int64_t count, int64_t n, uint8_t* codes, float* absmax);

}  // namespace qt::cuda
