// `qwentune quantize`: a float checkpoint -> a bitsandbytes 4-bit (NF4, double quantization)
// checkpoint that transformers (load with BitsAndBytes), Unsloth and qwentune load directly.
//
// Output folder: model.safetensors with the Hub tensor names (per-expert for MoE, whatever the
// input's expert layout): every projection of model/weights_4bit.h as the bnb tensors of model/nf4.h
// (quant state dtype = the input's weight dtype), every other tensor in that dtype; config.json = the
// input's keys in order plus transformers' quantization_config for bnb 4-bit (quant_method
// bitsandbytes, load_in_4bit, bnb_4bit_quant_type nf4, bnb_4bit_use_double_quant, compute dtype =
// the input dtype, quant_storage uint8, llm_int8_skip_modules = lm_head and the MoE routers); the
// tokenizer and generation files. Each file is written atomically. The input is streamed from its
// memory map (model/weights.h WeightsLoadOptions): each projection matrix is quantized as it is read
// and only its bnb tensors kept, so host memory holds the output (about the NF4 model plus the float
// tensors) and one source tensor, never the float model; model.safetensors is written at the end
// (its header, first in the file, needs every tensor's size, and the quant states' JSON sizes are
// known only after quantizing).
#pragma once
#include <cstdint>
#include <string>

namespace qt {

struct QuantizeOptions {
  std::string model_dir;  // config.json + float safetensors
  std::string out_dir;    // must not exist or be empty, unless force
  bool force = false;
};

struct QuantizeSummary {
  int64_t quantized = 0;  // matrices stored in NF4 (each expert counts)
  int64_t kept = 0;       // tensors kept in float
  uint64_t bytes = 0;     // bytes of model.safetensors' tensors
};

QuantizeSummary quantize_checkpoint(const QuantizeOptions& opt);

}  // namespace qt
