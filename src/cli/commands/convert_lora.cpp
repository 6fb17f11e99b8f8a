// qwentune convert-lora: rewrites a LoRA adapter's expert modules per expert (PEFT names, read by
// PEFT with v4 models, vLLM, llama.cpp) or fused (A (E,r,in), B (E,out,r), transformers-qwen3-moe-fused).
// Lossless both ways; dense modules and adapter_config.json are copied unchanged (io/merge.h).
#include "cli/commands/commands.h"
#include "core/error.h"
#include "io/merge.h"

namespace qt::cli {

namespace {

struct ConvertArgs {
  std::string adapter, model, to, out;
  bool force = false;
};

}  // namespace

void register_convert_lora_command(CLI::App& app) {
  auto args = std::make_shared<ConvertArgs>();
  auto* cmd = app.add_subcommand("convert-lora", "Convert expert LoRA between per-expert and fused layouts");
  cmd->add_option("--adapter", args->adapter, "PEFT LoRA adapter directory")->required();
  cmd->add_option("--model", args->model, "Base model directory (its config.json gives the shapes)")->required();
  cmd->add_option("--to", args->to, "Target layout: fused or per-expert")
      ->required()
      ->check(CLI::IsMember({"fused", "per-expert"}));
  cmd->add_option("--out", args->out, "Output adapter directory (must not exist or be empty, unless --force)")->required();
  cmd->add_flag("--force", args->force, "Replace an existing output directory");
  cmd->callback([args] {
    const bool fused = args->to == "fused";
    const ConvertLoraSummary s = convert_lora_layout(args->adapter, args->model, fused, args->out, args->force);
    if (s.expert_modules == 0)
      fmt::print("no expert LoRA in {}: copied {} tensors unchanged -> {}\n", args->adapter, s.tensors, args->out);
    else
      fmt::print("{} expert modules written {}, {} tensors -> {}\n", s.expert_modules, fused ? "fused" : "per expert",
                 s.tensors, args->out);
  });
}

}  // namespace qt::cli
