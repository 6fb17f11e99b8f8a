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
