// The one place that turns a user's model string into weights + config + tokenizer, used by train,
// generate and eval:
//   a folder with config.json and .safetensors weights -> the folder's weights;
//   a bare config.json file                            -> random weights of its shape (random_model_weights
//                                                         with `seed` and the config's initializer_range,
//                                                         as the embedded default);
//   a Hub id ORG/NAME[@REV]                            -> its snapshot folder in the Hugging Face cache
//                                                         (hub::resolve_model_dir; missing files downloaded).
// The tokenizer is the folder's (or the config file's folder's) when it holds tokenizer.json, else the
// bundled data/qwen3-tokenizer. Errors: "[<context>] base_model <s>: ..." (one line).
// 4-bit bases (model/weights_4bit.h): a folder of bitsandbytes NF4 weights (pre-quantized, e.g. the
// Hub's *-bnb-4bit) is dequantized bit-exactly; with load_in_4bit a float folder (or random weights)
// gets every decoder projection replaced by its NF4 round trip, quantized from the checkpoint's dtype
// (bf16 for random weights). Either way base_4bit is set and weights.nf4 holds the NF4 tensors
// themselves (null for a pre-quantized folder whose 4-bit weights are not all per-expert projection
// names). The weights suit their consumer (WeightsFor), decided before loading:
//   Cpu:  every tensor in f32, the projections of a 4-bit base holding the dequantized values (a
//         float folder's projections quantized one at a time while loading, model/weights_4bit.h).
//   Cuda: what CudaDecoder uploads (it rounds everything to bf16): a folder's tensors in bf16 (exact
//         for bf16 checkpoints, one rounding otherwise, as the upload did); with an NF4 base the
//         projections are left undefined (only weights.nf4 holds them), so host memory never holds
//         the float model: about the NF4 model + the other tensors + one source tensor. Random
//         weights stay f32 (their projections dropped after the NF4 round trip).
#pragma once
#include <cstdint>
#include <string>

#include "io/hf_config.h"
#include "model/weights.h"

namespace qt {

enum class WeightsFor { Cpu, Cuda };
// The consumer of a resolved device ("cpu" or "cuda", train_engine.h resolve_device).
inline WeightsFor weights_for(const std::string& device) { return device == "cuda" ? WeightsFor::Cuda : WeightsFor::Cpu; }

struct LoadedModel {
  ModelConfig cfg;
  ModelWeights weights;         // see WeightsFor above
  std::string config_path;      // the config.json read
  std::string tokenizer_path;   // folder holding tokenizer.json
  std::string description;      // for progress lines, e.g. "DIR (weights from the folder)"
  bool random_weights = false;  // true for a bare config.json
  bool base_4bit = false;       // the decoder projections hold NF4-dequantized values
};

LoadedModel load_model_source(const std::string& base_model, uint64_t seed, const std::string& context = "model",
                              bool load_in_4bit = false, WeightsFor use = WeightsFor::Cpu);

// The bundled tokenizer folder (data/qwen3-tokenizer of the source tree).
std::string bundled_tokenizer_dir();

}  // namespace qt
