// `qwentune train CONFIG.yaml [--key value ...]`: LoRA fine-tuning from a YAML config, with any
// key overridden on the command line (--key value, --key=value, a bare --flag for true).
// The keys, their defaults and meanings: `qwentune train --help` (train_config_help()).
#include "cli/commands/commands.h"
#include "core/error.h"
#include "train/train_config.h"
#include "train/trainer.h"

namespace qt::cli {

void register_train_command(CLI::App& app) {
  auto config_path = std::make_shared<std::string>();
  auto* c = app.add_subcommand("train", "LoRA fine-tuning from a YAML config (keys overridable as --key value)");
  c->add_option("config", *config_path, "YAML config file")->required();
  c->allow_extras();
  c->footer("\n" + train_config_help());
  c->callback([c, config_path] {
    const std::vector<std::string> overrides = c->remaining();
    const TrainConfig cfg = load_train_config(*config_path, overrides);
    run_training(cfg);
  });
}

}  // namespace qt::cli
