// Shared by `generate` and `eval`: the model (load_model_source), an optional PEFT adapter and the
// tokenizer, with one-line errors under the command's context.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

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
CliModel load_cli_model(const std::string& model, const std::string& adapter_dir, uint64_t model_seed,
                        const std::string& context);

}  // namespace qt::cli
