// The LoRA training loop behind `qwentune train` (any engine: train_engine.h; one process or a data-parallel rank).
//
// Model: base_model is a local HF folder (config.json + safetensors; tokenizer files optional) or a
// bare config.json (random base weights from `seed`, as random_model_weights). The tokenizer is the
// model folder's when it holds tokenizer.json, else the bundled data/qwen3-tokenizer.
// Data: every dataset is tokenized (cached in output_dir/dataset_cache) and concatenated; with
// val_set_size the sequences are split by a seeded permutation (the first n_val go to validation;
// n_val = round(size * n) for a fraction, the count itself for size >= 1).
// Steps: per epoch ceil(batches / (gradient_accumulation_steps * W)) optimizer steps for W ranks
// (the last one of an epoch takes the left-over micro-batches); total = max_steps, else
// ceil(num_epochs * per_epoch).
// Data parallelism (RunOptions::dist with W > 1 ranks, docs/distributed.md): the ranks meet through
// the rendezvous, check that their settings fingerprints (world size and data hash included) agree,
// and each computes its share of every step's micro-batches (dist/sharding.h); the engine sums the
// gradients and losses over the ranks (train_engine.h), so W ranks with gradient_accumulation_steps
// ga take the steps of one process with ga * W. Rank 0 alone writes output_dir (config, metrics,
// checkpoints, plot, adapter) and evaluates; a stop (signal, --stop-after-steps) is agreed by all
// ranks at the same step; every rank reads the checkpoint on resume (same world size only).
// One optimizer step over micro-batches b_1..b_k with N = sum of their predicted tokens:
//   grads = sum_i d(loss_sum_i / N)    (forward_backward with grad_scale = 1/N; with lora_dropout the
//           masks of micro-batch i come from (seed, step, i), see LoraDropout; evaluation has none)
//   loss  = sum_i loss_sum_i / N       (the token mean over the whole step; + weighted MoE aux)
//   clip to max_grad_norm; non-finite loss or grads -> step skipped with a warning (5 in a row: error)
//   AdamW with lr = schedule(step) (HF: the lambda at the number of steps already taken).
// Output in output_dir: qwentune_config.yaml (resolved config, written first), metrics.jsonl (one
// JSON line per logged step {"type":"train",...} and per evaluation {"type":"eval",...}),
// adapter_config.json + adapter_model.safetensors (the final adapter), loss.svg (the loss curve, at
// each checkpoint and at the end), and checkpoint-STEP/ folders
// (train/checkpoint.h) every save_steps steps and at the end (when save_steps > 0), on Ctrl-C or
// SIGTERM, and at --stop-after-steps.
// Resume (RunOptions::resume): the newest valid checkpoint (or the one named) must have the same
// settings fingerprint; the adapter, AdamW's moments and step, the scheduler step, the data position
// (epoch, micro-batch) and the logging accumulators are restored, metrics.jsonl is cut back to the
// checkpoint's step and appended to, and the run continues with exactly the losses, learning rates
// and gradient norms of an uninterrupted run on the CPU.
// Stops: after each optimizer step the loop checks the stop flag (train/interrupt.h); on a signal
// it saves a checkpoint, prints "interrupted at step N: saved DIR; continue with --resume" and
// returns with TrainResult::stop_signal set (the CLI exits with 128 + signal, 130 for Ctrl-C).
// Progress: a live bar on a terminal, plain log lines otherwise (train/progress.h).
#pragma once
#include <cstdint>
#include <string>

#include "dist/dist_env.h"
#include "train/train_config.h"

namespace qt {

struct TrainResult {
  int64_t total_steps = 0;
  int64_t steps_done = 0;
  int64_t steps_skipped = 0;  // non-finite loss or gradients
  double first_loss = 0, last_loss = 0;
  int stop_signal = 0;          // SIGINT/SIGTERM that stopped the run early (0: none)
  bool stopped_early = false;   // by a signal or by stop_after_steps
  std::string last_checkpoint;  // path of the last checkpoint written by this run ("" if none)
};

struct RunOptions {
  bool resume = false;
  std::string resume_from;       // a checkpoint folder; "" = the newest valid one in output_dir
  int64_t stop_after_steps = 0;  // > 0: stop with a checkpoint after this many steps of this run
  dist::DistEnv dist;            // this process's place in a data-parallel job (default: alone)
};

// max_steps when set, else ceil(num_epochs * steps per epoch) (at least 1), with
// ceil(batches / (gradient_accumulation_steps * world_size)) steps per epoch.
int64_t total_training_steps(const TrainConfig& cfg, int64_t batches_per_epoch, int world_size = 1);

// Runs the whole training; progress lines go to stdout, warnings to stderr. Throws qt::Error on
// user errors (unsupported settings, bad files).
TrainResult run_training(const TrainConfig& cfg, const RunOptions& run = {});

}  // namespace qt
