// Model + adapter + tokenizer for the inference commands (see model_loading.h).
#include "cli/commands/model_loading.h"

#include <filesystem>

#include "core/error.h"

namespace qt::cli {

CliModel load_cli_model(const std::string& model, const std::string& adapter_dir, uint64_t model_seed,
                        const std::string& context) {
  CliModel m;
  m.model = load_model_source(model, model_seed, context);
  if (!adapter_dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_directory(adapter_dir, ec)) fail(context, "--adapter {}: no such folder", adapter_dir);
    m.adapter = std::make_unique<LoraAdapter>(load_peft_adapter(adapter_dir, m.model.cfg, DType::F32));
  }
  m.tok = Tokenizer::load(m.model.tokenizer_path);
  if (m.tok.vocab_size() > m.model.cfg.vocab_size)
    fail(context, "the tokenizer {} has {} tokens but the model's vocab_size is {}", m.model.tokenizer_path,
         m.tok.vocab_size(), m.model.cfg.vocab_size);
  return m;
}

}  // namespace qt::cli
