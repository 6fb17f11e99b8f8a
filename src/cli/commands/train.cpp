// `qwentune train CONFIG.yaml [--key value ...] [--resume [DIR]] [--stop-after-steps N]`: LoRA
// fine-tuning from a YAML config, with any key overridden on the command line (--key value,
// --key=value, a bare --flag for true). The keys, their defaults and meanings: `qwentune train
// --help` (train_config_help()). --resume and --stop-after-steps are run options, not config keys.
// Exit codes: 0 done (or stopped by --stop-after-steps), 1 error, 128 + signal when stopped by
// SIGINT (130) or SIGTERM (143) after saving a checkpoint.
#include <cstdio>
#include <cstdlib>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "train/train_config.h"
#include "train/trainer.h"

namespace qt::cli {

void register_train_command(CLI::App& app) {
  auto config_path = std::make_shared<std::string>();
  auto run = std::make_shared<RunOptions>();
  auto* c = app.add_subcommand("train", "LoRA fine-tuning from a YAML config (keys overridable as --key value)");
  c->add_option("config", *config_path, "YAML config file")->required();
  auto* resume = c->add_option("--resume", run->resume_from,
                               "Continue from the newest valid checkpoint-STEP in output_dir, or from the "
                               "checkpoint folder given; the settings must match the checkpoint's")
                     ->expected(0, 1);
  c->add_option("--stop-after-steps,--stop_after_steps", run->stop_after_steps,
                "Stop after N optimizer steps of this run with a checkpoint (the schedule keeps the configured "
                "total; continue later with --resume)")
      ->check(CLI::PositiveNumber);
  c->allow_extras();
  c->footer("\n" + train_config_help());
  c->callback([c, config_path, run, resume] {
    const std::vector<std::string> overrides = c->remaining();
    const TrainConfig cfg = load_train_config(*config_path, overrides);
    run->resume = resume->count() > 0;
    const TrainResult res = run_training(cfg, *run);
    if (res.stop_signal) {
      std::fflush(stdout);
      std::exit(128 + res.stop_signal);
    }
  });
}

}  // namespace qt::cli
