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
// and only its bnb tensors kept until a shard's worth (shard_bytes, like `merge --shard-size`) is
// written out, so host memory holds about one shard of NF4 output, the float tensors and one source
// tensor, never the float model. An output that fits one shard is model.safetensors, written at the
// end in the Hub's tensor order; a larger one is model-NNNNN-of-NNNNN.safetensors shards in the order
// the projections were made (the float tensors last; a weight's bnb tensors never split across
// shards) with model.safetensors.index.json.
#pragma once
#include <cstdint>
#include <string>

namespace qt {

struct QuantizeOptions {
  std::string model_dir;  // config.json + float safetensors
  std::string out_dir;    // must not exist or be empty, unless force
  bool force = false;
  uint64_t shard_bytes = 5'000'000'000ull;  // the largest shard (a larger single tensor gets its own)
};

struct QuantizeSummary {
  int64_t quantized = 0;  // matrices stored in NF4 (each expert counts)
  int64_t kept = 0;       // tensors kept in float
  uint64_t bytes = 0;     // bytes of the tensors written
  int64_t shards = 0;     // 1: a single model.safetensors
};

QuantizeSummary quantize_checkpoint(const QuantizeOptions& opt);

}  // namespace qt
