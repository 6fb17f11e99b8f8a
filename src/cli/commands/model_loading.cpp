// Model + adapter + tokenizer for the inference commands (see model_loading.h).
#include "cli/commands/model_loading.h"

#include <filesystem>

#include "core/error.h"

namespace qt::cli {

CliModel load_cli_model(const std::string& model, const std::string& adapter_dir, uint64_t model_seed,
                        const std::string& context, bool load_in_4bit, WeightsFor use) {
  std::error_code ec;
  if (!adapter_dir.empty() && !std::filesystem::is_directory(adapter_dir, ec))
    fail(context, "--adapter {}: no such folder", adapter_dir);
  CliModel m;
  m.model = load_model_source(model, model_seed, context, load_in_4bit, use);
  if (!adapter_dir.empty()) {
    m.adapter = std::make_unique<LoraAdapter>(load_peft_adapter(adapter_dir, m.model.cfg, DType::F32));
  }
  m.tok = Tokenizer::load(m.model.tokenizer_path);
  if (m.tok.vocab_size() > m.model.cfg.vocab_size)
    fail(context, "the tokenizer {} has {} tokens but the model's vocab_size is {}", m.model.tokenizer_path,
         m.tok.vocab_size(), m.model.cfg.vocab_size);
  return m;
}

void add_model_options(CLI::App* cmd, ModelOptions& o) {
  cmd->add_option("--model", o.model, "Model folder (config.json + safetensors), a Hugging Face Hub id ORG/NAME[@REV] (resolved in the HF cache, downloaded when missing), or a config.json for random weights")
      ->required();
  cmd->add_option("--adapter", o.adapter, "PEFT LoRA adapter folder, applied unmerged");
  cmd->add_option("--model-seed", o.model_seed,
                  "Seed of the random weights when --model is a config.json (default 42, train's default seed)");
  cmd->add_flag("--load-in-4bit", o.load_in_4bit,
                "Quantize the base model's projections to NF4 (bitsandbytes) while loading, as QLoRA training does");
}

}  // namespace qt::cli
