// NF4 4-bit weights in bitsandbytes' format (quantize_4bit with quant_type "nf4", blocksize 64,
// compress_statistics = double quantization); CPU reference for quantize and dequantize.
//
// Storage of a tensor W with n elements (row-major flattened), block b = elements [64b, 64b+64):
//   codes[k]      = (code(2k) << 4) | code(2k+1)   (element 2k in the HIGH nibble; an odd n pads
//                                                  the last low nibble with the code of 0 * 1/absmax)
//   absmax[b]     = max |W| over the block (fp32)
//   code(j)       = NF4 decision tree on W[j] * (1.0f / absmax[b]), all in fp32 (a zero block gives
//                   0 * inf = NaN, every comparison false -> code 0, dequantized to -1 * 0 = -0)
// Double quantization of the absmax vector (8-bit "dynamic" signed map, blocksize 256):
//   offset        = mean(absmax) (fp32 rounding of the exact mean; torch's reduction order may
//                   differ by an ulp, the stored offset is what dequantization uses)
//   absmax_codes  = quantize_blockwise(absmax - offset): per 256-block amax, the binary search of
//                   bitsandbytes' dQuantize on v * (1/amax) over the sorted 256-entry map
// Dequantization (bit-exact):
//   absmax_f32[b] = fl(fl(nested_quant_map[absmax_codes[b]] * nested_absmax[b / 256]) + offset)
//   W[j]          = cast_dtype( fl(quant_map[code(j)] * absmax_f32[j / 64]) )
// Serialized per weight X (safetensors, as transformers/bitsandbytes save Linear4bit):
//   X (U8, [(n+1)/2, 1]), X.absmax (U8 [nblocks], F32 without double quant), X.quant_map (F32 [16]),
//   X.nested_absmax (F32), X.nested_quant_map (F32 [256]),
//   X.quant_state.bitsandbytes__nf4 (U8 bytes of the JSON {"quant_type": "nf4", "blocksize": 64,
//   "dtype": "bfloat16", "shape": [..], "nested_blocksize": 256, "nested_dtype": "float32",
//   "nested_offset": <python float repr>}).
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace qt {

class SafetensorsCheckpoint;

struct Nf4Tensor {
  Shape shape;                  // the original tensor's shape
  DType dtype = DType::BF16;    // the original dtype: BF16, F16 or F32 (dequantization casts to it)
  int64_t blocksize = 64;
  std::vector<uint8_t> codes;   // (numel + 1) / 2 packed 4-bit codes
  std::array<float, 16> quant_map{};
  bool double_quant = true;
  std::vector<float> absmax;            // [nblocks] fp32, only without double quantization
  std::vector<uint8_t> absmax_codes;    // [nblocks], double quantization
  std::vector<float> nested_absmax;     // [ceil(nblocks / nested_blocksize)]
  std::vector<float> nested_quant_map;  // [256]
  int64_t nested_blocksize = 256;
  float offset = 0.0f;

  int64_t numel() const { return shape_numel(shape); }
  int64_t num_blocks() const { return (numel() + blocksize - 1) / blocksize; }
};

// The 16 NF4 values (bitsandbytes' get_4bit_type("nf4"), as float32).
const std::array<float, 16>& nf4_table();
// bitsandbytes' create_dynamic_map(signed=True): 256 sorted float32 values, -0.99296875 .. 1.0.
const std::vector<float>& bnb_dynamic_map();

// The 4-bit code of a normalised value (bitsandbytes' decision tree; NaN -> 0).
uint8_t nf4_code(float x);
// The 8-bit code of a normalised value in a sorted 256-entry map (bitsandbytes' dQuantize).
uint8_t dynamic_map_code(const std::vector<float>& map, float x);

// Quantizes a CPU tensor (F32/BF16/F16/F64 values; F64 is rounded to F32 first) with blocksize 64
// and double quantization. `storage` is the dtype recorded in the quant state (what dequantization
// gives back): BF16, F16 or F32.
Nf4Tensor nf4_quantize(const Tensor& w, DType storage);

// The second half of nf4_quantize: q (shape, blocksize 64 set) gets the double quantization of its
// blocks' fp32 absmax (offset, absmax_codes, nested_absmax, nested_quant_map). The CUDA quantizer
// (ops/cuda/nf4.h nf4_quantize_blocks) computes codes and absmax on the device and finishes here.
void nf4_double_quantize(const std::vector<float>& absmax, Nf4Tensor& q);

// The fp32 absmax of every block (double quantization undone).
std::vector<float> nf4_absmax_f32(const Nf4Tensor& q);
// Dequantizes into `dtype` (F32 gives the fp32 products before the cast to q.dtype only when
// q.dtype is F32; otherwise the values are the q.dtype values widened).
Tensor nf4_dequantize(const Nf4Tensor& q, DType dtype);

// The quant-state JSON text bitsandbytes writes (keys in its order, Python's json.dumps spacing).
std::string nf4_quant_state_json(const Nf4Tensor& q);
// Python's repr() of a double (shortest round-trip digits; scientific below 1e-4 and from 1e16).
std::string python_float_repr(double v);

// The safetensors tensors of weight `name` (e.g. "model.layers.0.mlp.up_proj.weight").
std::vector<std::pair<std::string, Tensor>> nf4_to_bnb_tensors(const std::string& name, const Nf4Tensor& q);
// Whether checkpoint tensor `name` is a bitsandbytes 4-bit weight (name.quant_state.bitsandbytes__*).
bool is_bnb_4bit_weight(const SafetensorsCheckpoint& ckpt, const std::string& name);
// The companion tensor names of a 4-bit weight present in the checkpoint (absmax, quant_map, ...).
std::vector<std::string> bnb_4bit_companions(const SafetensorsCheckpoint& ckpt, const std::string& name);
// Reads and validates weight `name` of a pre-quantized checkpoint; errors "[nf4] <name>: ...".
Nf4Tensor nf4_from_bnb(const SafetensorsCheckpoint& ckpt, const std::string& name);

}  // namespace qt
