// The CPU LoRA training loop behind `qwentune train`.
//
// Model: base_model is a local HF folder (config.json + safetensors; tokenizer files optional) or a
// bare config.json (random base weights from `seed`, as random_model_weights). The tokenizer is the
// model folder's when it holds tokenizer.json, else the bundled data/qwen3-tokenizer.
// Data: every dataset is tokenized (cached in output_dir/dataset_cache) and concatenated; with
// val_set_size the sequences are split by a seeded permutation (the first n_val go to validation;
// n_val = round(size * n) for a fraction, the count itself for size >= 1).
// Steps: per epoch ceil(batches / gradient_accumulation_steps) optimizer steps (the last one of an
// epoch takes the left-over micro-batches); total = max_steps, else ceil(num_epochs * per_epoch).
// One optimizer step over micro-batches b_1..b_k with N = sum of their predicted tokens:
//   grads = sum_i d(loss_sum_i / N)    (forward_backward with grad_scale = 1/N; with lora_dropout the
//           masks of micro-batch i come from (seed, step, i), see LoraDropout; evaluation has none)
//   loss  = sum_i loss_sum_i / N       (the token mean over the whole step; + weighted MoE aux)
//   clip to max_grad_norm; non-finite loss or grads -> step skipped with a warning (5 in a row: error)
//   AdamW with lr = schedule(step) (HF: the lambda at the number of steps already taken).
// Output in output_dir: qwentune_config.yaml (resolved config, written first), metrics.jsonl (one
// JSON line per logged step {"type":"train",...} and per evaluation {"type":"eval",...}),
// adapter_config.json + adapter_model.safetensors (the final adapter), loss.svg (the loss curve).
// Progress: a live bar on a terminal, plain log lines otherwise (train/progress.h).
#pragma once
#include <cstdint>
#include <string>

#include "train/train_config.h"

namespace qt {

struct TrainResult {
  int64_t total_steps = 0;
  int64_t steps_done = 0;
  int64_t steps_skipped = 0;  // non-finite loss or gradients
  double first_loss = 0, last_loss = 0;
};

// Optimizer steps of one epoch: ceil(batches / grad_accum), at least 1.
int64_t steps_per_epoch(int64_t batches_per_epoch, int64_t grad_accum);
// max_steps when set, else ceil(num_epochs * steps_per_epoch) (at least 1).
int64_t total_training_steps(const TrainConfig& cfg, int64_t batches_per_epoch);

// Runs the whole training; progress lines go to stdout, warnings to stderr. Throws qt::Error on
// user errors (unsupported settings, bad files).
TrainResult run_training(const TrainConfig& cfg);

}  // namespace qt
