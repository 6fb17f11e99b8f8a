// `qwentune train CONFIG.yaml [--key value ...] [--resume [DIR]] [--stop-after-steps N]`: LoRA
// fine-tuning from a YAML config, with any key overridden on the command line (--key value,
// --key=value, a bare --flag for true). The keys, their defaults and meanings: `qwentune train
// --help` (train_config_help()). --resume and --stop-after-steps are run options, not config keys.
// Exit codes: 0 done (or stopped by --stop-after-steps), 1 error, 128 + signal when stopped by
// SIGINT (130) or SIGTERM (143) after saving a checkpoint.
#include <cstdio>
#include <cstdlib>

#include "cli/commands/commands.h"
#include "cli/commands/launch.h"
#include "core/error.h"
#include "dist/dist_env.h"
#include "train/train_config.h"
#include "train/trainer.h"

namespace qt::cli {

namespace {

// Takes --resume, --resume DIR and --resume=DIR out of the left-over arguments. --resume is not a
// CLI11 option because an optional value would swallow the config path in `train --resume CONFIG`;
// left to the extras, a value can only be a token after the config (which CLI11 fills first).
void take_resume(std::vector<std::string>& args, RunOptions& run) {
  std::vector<std::string> rest;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--resume") {
      run.resume = true;
      if (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) run.resume_from = args[++i];
    } else if (args[i].rfind("--resume=", 0) == 0) {
      run.resume = true;
      run.resume_from = args[i].substr(9);
      if (run.resume_from.empty()) fail("train", "--resume=: give a checkpoint folder, or --resume alone");
    } else {
      rest.push_back(args[i]);
    }
  }
  args = std::move(rest);
}

}  // namespace

void register_train_command(CLI::App& app) {
  auto config_path = std::make_shared<std::string>();
  auto run = std::make_shared<RunOptions>();
  auto* c = app.add_subcommand("train", "LoRA fine-tuning from a YAML config (keys overridable as --key value)");
  c->add_option("config", *config_path, "YAML config file")->required();
  auto* stop = c->add_option("--stop-after-steps,--stop_after_steps", run->stop_after_steps,
                             "Stop after N optimizer steps of this run with a checkpoint (the schedule keeps the "
                             "configured total; continue later with --resume)");
  auto gpus = std::make_shared<int>(1);
  c->add_option("--gpus", *gpus, "Data-parallel training on N local GPUs: runs N ranks of this command (docs/distributed.md)");
  c->allow_extras();
  c->footer("\n" + train_config_help());
  c->callback([c, config_path, run, stop, gpus] {
    std::vector<std::string> overrides = c->remaining();
    take_resume(overrides, *run);
    if (stop->count() && run->stop_after_steps < 1)
      fail("train", "--stop-after-steps {}: must be at least 1", run->stop_after_steps);
    const TrainConfig cfg = load_train_config(*config_path, overrides);
    if (*gpus != 1) std::exit(launch_train_ranks(*gpus, cfg.device, cfg.output_dir));
    run->dist = dist::read_dist_env();  // torchrun / Slurm / Open MPI / --gpus: a data-parallel rank
    const TrainResult res = run_training(cfg, *run);
    if (res.stop_signal) {
      std::fflush(stdout);
      std::exit(128 + res.stop_signal);
    }
  });
}

}  // namespace qt::cli
