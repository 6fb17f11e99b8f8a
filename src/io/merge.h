// Exporting LoRA: merging an adapter into the base checkpoint, and converting expert LoRA between
// PEFT's per-expert names and the fused layout.
//
// Merge: for every adapted projection W (out,in) (each expert's slice of a MoE tensor too)
//   W' = round_f32( W + scale * B A )     computed in float64, scale = alpha/r (alpha/sqrt(r) rslora)
// then converted to the output dtype (bf16 by default, so a bf16 merge is exactly the f32 merge
// rounded to bf16); every other float tensor is converted the same way (via f32), non-float tensors
// are copied. A bitsandbytes 4-bit base (pre-quantized, e.g. written by `qwentune quantize`) is
// dequantized bit-exactly (model/nf4.h) one tensor at a time, its quantization_config dropped, and
// merged and written like a float base. The output keeps the input checkpoint's tensor names and expert layout (Hub
// per-expert, transformers v5 gate_up_proj/down_proj, or fused mlp.{gate,up,down}_proj (E,out,in)).
// Tensors are streamed in row chunks from the memory-mapped checkpoint to the output files, so the
// host memory used is the adapter plus a few MB, whatever the model size.
//
// Output directory: model.safetensors, or model-0000N-of-0000M.safetensors + model.safetensors.index.json
// ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}) when the tensors exceed the
// shard size; config.json with dtype/torch_dtype set to the output dtype; the tokenizer and
// generation files present in the model directory. Written to a temporary sibling directory and
// renamed into place; an existing non-empty directory is replaced only with `force`.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/dtype.h"

namespace qt {

struct MergeOptions {
  std::string model_dir;    // config.json + model.safetensors (or sharded)
  std::string adapter_dir;  // PEFT adapter
  std::string out_dir;
  DType dtype = DType::BF16;  // BF16, F16 or F32
  uint64_t shard_bytes = 5'000'000'000ull;
  bool force = false;
};

struct MergeSummary {
  int64_t tensors = 0;          // tensors written
  int64_t merged_matrices = 0;  // (out,in) matrices that received a LoRA delta (each expert counts)
  int64_t shards = 0;           // 1 = a single model.safetensors
  uint64_t total_bytes = 0;     // tensor bytes written
};

// Throws "[merge] ..." on every user error (missing or mismatched adapter, unsupported checkpoint,
// output directory exists, I/O failures); nothing is left at out_dir on failure.
MergeSummary merge_lora(const MergeOptions& opt);

// Copies the tokenizer and generation files present in from_dir (tokenizer.json, tokenizer_config.json,
// vocab.json, merges.txt, special_tokens_map.json, added_tokens.json, generation_config.json,
// chat_template.jinja) to to_dir; errors "[ctx] <file>: cannot copy: ...".
void copy_model_side_files(const std::string& from_dir, const std::string& to_dir, const char* ctx);

// Shard s (0-based) of n as the Hub names it: model.safetensors when n == 1, else
// model-00001-of-0000n.safetensors; and model.safetensors.index.json's text for a sharded checkpoint
// (weight_map: tensor name -> shard file, kept in the given order).
std::string shard_file_name(size_t s, size_t n);
std::string shard_index_json(const nlohmann::ordered_json& weight_map, uint64_t total_size);

// "5GB" = 5e9 bytes; accepts B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of
// 1024), case-insensitive, an optional space and a decimal number. Throws "[ctx] ..." otherwise.
uint64_t parse_byte_size(const std::string& text, const char* ctx = "merge");

struct ConvertLoraSummary {
  int64_t expert_modules = 0;  // (layer, projection) expert adapters rewritten
  int64_t tensors = 0;         // tensors written
};

// Rewrites the adapter at adapter_dir (validated against the model's config) with expert LoRA
// per expert (fused = false) or fused A (E,r,in) / B (E,out,r) (fused = true). Lossless: every
// value is copied bit for bit, in the file's dtype; dense modules and adapter_config.json (and the
// directory's other files) are copied unchanged. Output directory rules as for merge_lora, errors
// "[convert-lora] ...".
ConvertLoraSummary convert_lora_layout(const std::string& adapter_dir, const std::string& model_dir, bool fused,
                                       const std::string& out_dir, bool force = false);

}  // namespace qt
