// Shared by `generate` and `eval`: the model (load_model_source), an optional PEFT adapter and the
// tokenizer, with one-line errors under the command's context.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "model/lora.h"
#include "model/model_source.h"
#include "tokenizer/tokenizer.h"

namespace qt::cli {

struct CliModel {
  LoadedModel model;
  std::unique_ptr<LoraAdapter> adapter;  // null without --adapter
  Tokenizer tok;
};

// adapter_dir "" = none. model_seed: the random weights of a bare config.json.
// load_in_4bit: the base's projections as NF4 round trips (model/weights_4bit.h).
// use: the engine the weights are for (model_source.h).
CliModel load_cli_model(const std::string& model, const std::string& adapter_dir, uint64_t model_seed,
                        const std::string& context, bool load_in_4bit = false, WeightsFor use = WeightsFor::Cpu);

// The model options both commands share: --model (required), --adapter, --model-seed (default 42),
// --load-in-4bit.
struct ModelOptions {
  std::string model, adapter;
  uint64_t model_seed = 42;
  bool load_in_4bit = false;
};
void add_model_options(CLI::App* cmd, ModelOptions& opts);
inline CliModel load_cli_model(const ModelOptions& o, const std::string& context, WeightsFor use = WeightsFor::Cpu) {
  return load_cli_model(o.model, o.adapter, o.model_seed, context, o.load_in_4bit, use);
}

}  // namespace qt::cli
