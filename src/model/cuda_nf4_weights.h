// QLoRA base weights on the device (built only with QT_CUDA): the NF4 data of model/nf4.h kept as
// it is, dequantized into a bf16 scratch right before a layer's GEMMs (model/cuda_decoder.h).
//
// CudaNf4Group = one projection kind of one layer: `count` NF4 tensors of n elements each (count = 1
// for a dense q/k/v/o/gate/up/down; count = E for a MoE layer's experts of one kind, dequantized to
// (E,out,in) contiguous, the grouped GEMM's layout). One device allocation per group, laid out
//   codes (count*(n+1)/2 u8) | absmax_codes (count*nb u8) | pad to 4 | nested_absmax (count*nb2 f32)
//   | quant_map (count*16 f32) | nested_quant_map (count*256 f32) | offsets (count f32)
// with nb = ceil(n/blocksize), nb2 = ceil(nb/nested_blocksize): the bytes bitsandbytes stores, plus
// one map pair and offset per tensor (~1.1 KB). Device bytes per element: 1/2 + 1/64 + 4/(64*256).
#pragma once
#ifdef QT_HAVE_CUDA
#include <cstdint>
#include <string>
#include <vector>

#include "model/nf4.h"
#include "ops/cuda/nf4.h"

namespace qt {

class CudaNf4Group {
 public:
  // Uploads host tensors (all of one numel, double quantization, one blocksize; quant-state dtype
  // bf16, f16 or f32). Bad data: "[cuda] <what>: ...". Synchronises (load time only).
  void upload(const std::vector<const Nf4Tensor*>& ts, const std::string& what);
  // out (count, n) <- the dequantized bf16 values, on ctx's stream (asynchronous).
  void dequantize(const cuda::Context& ctx, cuda::bf16* out) const;
  // out (e1 - e0, n) <- tensors [e0, e1) only (a chunk of a MoE layer's experts): the same values.
  void dequantize(const cuda::Context& ctx, cuda::bf16* out, int64_t e0, int64_t e1) const;
  int64_t numel() const { return view_.count * view_.n; }
  size_t bytes() const { return mem_.bytes(); }

 private:
  cuda::Buffer<uint8_t> mem_;
  cuda::Nf4BatchView view_;
};

// The NF4 quantizer on the device: `count` bf16 tensors of `shape` at x -> host NF4 tensors equal byte
// for byte to nf4_quantize(tensor, BF16) (codes and absmax by ops/cuda nf4_quantize_blocks, the double
// quantization by model/nf4's nf4_double_quantize on the downloaded absmax). Synchronises.
std::vector<Nf4Tensor> nf4_quantize_on_device(cuda::Context& ctx, const cuda::bf16* x, int64_t count, const Shape& shape);

}  // namespace qt
#endif
