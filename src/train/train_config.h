// The training configuration of `qwentune train CONFIG.yaml [--key value ...]`.
//
// Keys follow Axolotl's names where Axolotl has one; defaults are Axolotl's, else HF
// TrainingArguments' / PEFT's (each documented in train_config_help()). Reading:
//   1. the YAML file (a map; a key with an empty/null value keeps its default),
//   2. command-line overrides `--key value` or `--key=value` (same names, dashes allowed for
//      underscores; values parsed by the key's type; lists as "a,b" or YAML flow "[a, b]";
//      a bool key without a value means true),
//   3. validation. Unknown keys, wrong types and out-of-range values throw "[config] <origin>: ...",
//      naming the key and the value (unknown keys with an edit-distance suggestion).
// train_config_to_yaml() writes the resolved config back (saved in output_dir); reading that text
// gives an equal TrainConfig.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/lora.h"
#include "train/lr_schedule.h"
#include "train/optimizer.h"

namespace qt {

struct DatasetSpec {
  std::string path;
  std::string type = "auto";  // auto | text | chat | messages | alpaca | sharegpt
  bool operator==(const DatasetSpec&) const = default;
};

struct TrainConfig {
  // Model and data.
  std::string base_model;               // required
  std::vector<DatasetSpec> datasets;    // required, at least one
  std::string chat_template = "auto";   // auto | chatml | qwen2.5 | qwen3
  bool train_on_inputs = false;
  int64_t sequence_len = 512;
  bool sample_packing = false;
  double val_set_size = 0.0;            // < 1: fraction of the data; >= 1: a count of examples
  // Batching and duration (max_steps wins when both are set, as in HF).
  int64_t micro_batch_size = 1;
  int64_t gradient_accumulation_steps = 1;
  std::optional<double> num_epochs;
  std::optional<int64_t> max_steps;
  // Optimizer and schedule.
  std::string optimizer = "adamw_torch";  // adamw_torch | adamw_torch_fused (the same update)
  double learning_rate = 5e-5;
  std::string lr_scheduler = "cosine";    // cosine | linear | constant | constant_with_warmup
  std::optional<int64_t> warmup_steps;
  std::optional<double> warmup_ratio;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;             // 0 disables clipping
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  // Adapter.
  std::string adapter = "lora";           // lora | qlora
  std::optional<bool> load_in_4bit;       // unset: true for qlora, false for lora
  std::optional<bool> offload_embeddings; // CUDA: input embeddings in host memory; unset: as load_in_4bit
  bool offload_activations = false;       // CUDA: the saved layer inputs in host memory
  bool offload_lora = false;              // CUDA: LoRA masters, gradients and AdamW moments in host memory
  int64_t nf4_expert_chunk = 0;           // CUDA + 4-bit: MoE experts dequantized this many at a time (0: a layer's)
  int64_t lora_r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  std::vector<std::string> lora_target_modules = {"q_proj", "v_proj"};  // or {"all-linear"}
  bool lora_target_linear = false;        // Axolotl: true = every linear projection
  bool use_rslora = false;                // alias: peft_use_rslora
  // Run.
  int64_t seed = 42;
  std::string output_dir = "./model-out";
  int64_t save_steps = 0;                 // 0: save at the end only
  int64_t save_total_limit = 0;           // 0: keep every checkpoint
  int64_t eval_steps = 0;                 // 0: evaluate at the end only (when val_set_size > 0)
  std::optional<int64_t> logging_steps;   // unset: Axolotl's max(min(int(0.005 * total), 10), 1)
  std::string device = "auto";            // auto | cpu | cuda (train/train_engine.h resolve_device)

  bool operator==(const TrainConfig&) const = default;

  // Throws "[config] <origin>: ..." on the first invalid value.
  void validate(const std::string& origin) const;

  bool quantize_base() const { return adapter == "qlora"; }
  // LoRA settings for init_lora / save_peft_adapter: "all-linear" (or lora_target_linear) becomes
  // all seven projections q,k,v,o,gate,up,down; duplicates dropped.
  LoraConfig lora_config() const;
  AdamWConfig adamw_config() const;
  LrSchedulerKind scheduler_kind() const;
  // HF get_warmup_steps over the total number of optimizer steps.
  int64_t warmup_steps_for(int64_t total_steps) const;
  int64_t logging_steps_for(int64_t total_steps) const;
};

// YAML text -> config, then `overrides` (argv-style: {"--learning_rate", "1e-4", "--seed=3"}),
// then validation. `origin` names the text in messages (usually the file path).
TrainConfig parse_train_config(const std::string& yaml_text, const std::string& origin,
                               const std::vector<std::string>& overrides = {});
// Reads the file at `path` (throws "[config] <path>: cannot read ..." when it cannot).
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides = {});

// Help for `qwentune train --help`: usage and every key with its type, default and meaning.
std::string train_config_help();

// The config as YAML (every key, unset optional keys as null), readable by parse_train_config.
std::string train_config_to_yaml(const TrainConfig& cfg);

}  // namespace qt
