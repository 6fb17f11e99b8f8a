// Training checkpoints: OUTPUT_DIR/checkpoint-STEP/, written atomically, validated on load, and the
// `--resume` support around them.
//
// A checkpoint holds
//   adapter_config.json, adapter_model.safetensors  the LoRA weights, written by save_peft_adapter
//                                                   (so a checkpoint is itself a loadable PEFT adapter)
//   optimizer.safetensors   AdamW moments, fp32, named after the adapter tensors
//                           ("layers.L.self_attn.q_proj.lora_A.exp_avg" / ".exp_avg_sq"); metadata
//                           "step" = AdamW's step count t
//   trainer_state.json      written LAST: global step (= the scheduler's step), data position
//                           (epoch, index of the next micro-batch in it), counters, the logging
//                           accumulators, the per-step loss history, the settings fingerprint, the
//                           RNG description, and {"files": {name: {size, sha256}}} for every other file.
//   (plus any file the caller's `write_extra` hook writes, hashed the same way)
// Randomness needs no saved state: the data order is a pure function of (seed, epoch), LoRA init is
// replaced by the saved weights, and lora_dropout masks are a counter-based hash of (seed, step,
// micro-batch, layer, slot, element); trainer_state.json records this under "rng".
//
// Atomicity: everything is written into OUTPUT_DIR/.checkpoint-STEP.tmp-PID (each file fsync'ed),
// trainer_state.json last, the folder fsync'ed, then renamed to checkpoint-STEP (an existing one is
// swapped out with renameat2(RENAME_EXCHANGE), or moved aside first where that is unsupported), and
// OUTPUT_DIR fsync'ed. A checkpoint is valid only when trainer_state.json parses and every file it
// lists has the recorded size and SHA-256, so a process killed at any point never leaves a
// checkpoint-STEP that validates but is incomplete. Hidden .checkpoint-* leftovers are ignored by
// the loader and removed at the next save. After a save, checkpoints beyond save_total_limit are
// removed oldest first (never the one just written): renamed to a hidden name, then deleted.
//
// Test hook (fault injection): QT_FAULT_KILL_DURING_SAVE=STEP:STAGE makes the process SIGKILL
// itself while writing checkpoint-STEP, STAGE = adapter (after the adapter files), optimizer (after
// optimizer.safetensors), state (after trainer_state.json, before the rename) or renamed (after
// the rename, before pruning). Used by tests/test_checkpoint.cpp.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/tokenized_dataset.h"
#include "io/hf_config.h"
#include "model/lora.h"
#include "train/loss_plot.h"
#include "train/optimizer.h"
#include "train/train_config.h"

namespace qt {

// Everything the training loop carries between optimizer steps besides the adapter and AdamW.
struct TrainerState {
  int64_t global_step = 0;       // optimizer steps taken, skipped ones included; the scheduler's step
  int64_t total_steps = 0;
  int64_t epoch = 0;             // data position of the next micro-batch: epoch ...
  int64_t batch_in_epoch = 0;    // ... and its index in that epoch's order (< batches per epoch)
  int64_t optimizer_step = 0;    // AdamW's t (updates applied)
  int64_t seed = 0;
  int64_t steps_done = 0, steps_skipped = 0, consecutive_bad = 0;
  double first_loss = 0, last_loss = 0;
  // Logging accumulators since the last logged step (a log line may span a resume).
  double loss_since_log = 0;
  int64_t steps_since_log = 0, tokens_since_log = 0;
  double elapsed_s = 0;          // training time before this point, over all earlier runs
  std::vector<LossPoint> train_loss;  // every applied step's loss, for plots
  std::vector<LossPoint> eval_loss;   // every evaluation
  nlohmann::json fingerprint = nlohmann::json::object();  // settings that must not change on resume
};

// The settings a resume must share with the run that wrote the checkpoint: model (path and SHA-256
// of its config.json), datasets, the data settings, seed, batch sizes, sequence_len, the LoRA
// settings, the total number of steps, and `train_data_sha256` (tokenized_dataset_sha256 of the
// training split, which catches an edited data file), and the data-parallel world size (a
// checkpoint written before it was recorded counts as world size 1).
// model_config_path: the config.json actually read (a folder's, a bare file, or a Hub snapshot's).
nlohmann::json training_fingerprint(const TrainConfig& tc, const std::string& model_config_path, int64_t total_steps,
                                    const std::string& train_data_sha256, int world_size = 1);
// SHA-256 over the token ids, labels and sequence/document boundaries.
std::string tokenized_dataset_sha256(const data::TokenizedDataset& ds);
// Throws "[checkpoint] DIR: the run's settings differ from the checkpoint's: key (checkpoint X, now
// Y), ..." naming every differing key.
void check_fingerprint(const nlohmann::json& saved, const nlohmann::json& now, const std::string& dir);

// "checkpoint-STEP" -> STEP; -1 for any other name.
int64_t checkpoint_step_from_name(const std::string& name);
// checkpoint-STEP folders of `output_dir` (by name only, valid or not), oldest step first.
std::vector<std::string> list_checkpoints(const std::string& output_dir);

// Writes OUTPUT_DIR/checkpoint-<st.global_step> atomically (see the top of this file), then prunes
// to save_total_limit (0: keep all). `write_extra(tmp_dir)`, when set, may add files (a loss plot);
// they are hashed like the others. Returns the checkpoint's path. Throws "[checkpoint] ..." on IO
// errors (the temporary folder is removed; earlier checkpoints are untouched).
std::string save_checkpoint(const std::string& output_dir, const LoraAdapter& lora, const ModelConfig& mcfg,
                            const AdamW& opt, const TrainerState& st, int64_t save_total_limit,
                            const std::function<void(const std::string&)>& write_extra = {});

// Validates DIR (trainer_state.json parses, has every field, lists the three required files, and
// every listed file has its recorded size and SHA-256) and returns its state. Throws
// "[checkpoint] DIR: ..." saying what is wrong.
TrainerState validate_checkpoint(const std::string& dir);
struct ResumePoint {
  std::string dir;
  TrainerState state;
};
// The newest valid checkpoint of `output_dir`; invalid newer ones are reported on stderr and skipped.
// Throws "[checkpoint] ..." when there is none.
ResumePoint find_resume_checkpoint(const std::string& output_dir);
// Restores the LoRA tensors (the adapter files) and AdamW's moments and step count from a validated
// checkpoint. The adapter's structure must match `lora`'s (same model, same LoRA settings).
// Nothing changes when a check fails.
void load_checkpoint_weights(const ResumePoint& from, const ModelConfig& mcfg, LoraAdapter& lora, AdamW& opt);

// Rewrites metrics.jsonl atomically keeping only the lines whose "step" is <= step (and drops a
// torn last line); a missing file stays missing.
void truncate_metrics(const std::string& path, int64_t step);

}  // namespace qt
