// Training config: a table of keys (name, field, type, default, meaning) drives parsing, command-line
// overrides, validation of choices, help text and serialisation. See train_config.h.
#include "train/train_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>
#include <variant>

namespace qt {

namespace {

using FieldPtr = std::variant<bool TrainConfig::*, int64_t TrainConfig::*, double TrainConfig::*, std::string TrainConfig::*,
                              std::optional<bool> TrainConfig::*, std::optional<int64_t> TrainConfig::*,
                              std::optional<double> TrainConfig::*, std::vector<std::string> TrainConfig::*,
                              std::vector<DatasetSpec> TrainConfig::*>;

struct KeySpec {
  const char* name;
  FieldPtr field;
  const char* type;     // for help
  const char* def;      // default, for help
  const char* help;
  std::vector<std::string> choices = {};  // allowed values of a string key (empty: any)
  const char* section = nullptr;          // help heading printed before this key
  bool alias = false;                     // another name of the previous field (not serialised)
};

const std::vector<std::string> kDatasetTypes = {"auto", "text", "chat", "messages", "alpaca", "sharegpt"};
const std::vector<std::string> kAllLinear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

const std::vector<KeySpec>& keys() {
  using C = TrainConfig;
  static const std::vector<KeySpec> k = {
      {"base_model", &C::base_model, "string", "required",
       "Model directory (config.json, *.safetensors, tokenizer files) to fine-tune.", {}, "Model and data"},
      {"datasets", &C::datasets, "list of {path, type}", "required",
       "Training data files. type: auto (detect from the records), text ({\"text\"}), chat or messages "
       "({\"messages\": [{role, content}]}), alpaca ({instruction, input, output}), sharegpt "
       "({\"conversations\": [{from, value}]}). On the command line: paths separated by commas, or YAML flow "
       "like [{path: a.jsonl, type: chat}]."},
      {"chat_template", &C::chat_template, "string", "auto",
       "Chat format for chat data: auto (from the model's tokenizer_config.json), chatml, qwen2.5, qwen3.",
       {"auto", "chatml", "qwen2.5", "qwen3"}},
      {"train_on_inputs", &C::train_on_inputs, "bool", "false",
       "Also train on prompt/user tokens; false trains on assistant responses only (Axolotl)."},
      {"sequence_len", &C::sequence_len, "int", "512", "Maximum tokens per training row (Axolotl default)."},
      {"sample_packing", &C::sample_packing, "bool", "false",
       "Pack several examples into each row of sequence_len tokens (attention never crosses examples)."},
      {"val_set_size", &C::val_set_size, "float", "0.0",
       "Held-out validation data: a fraction of the examples when < 1, a count when >= 1; 0 = none."},
      {"micro_batch_size", &C::micro_batch_size, "int", "1", "Rows per forward/backward pass.",
       {}, "Batching and duration"},
      {"gradient_accumulation_steps", &C::gradient_accumulation_steps, "int", "1",
       "Micro-batches per optimizer step (effective batch = micro_batch_size x this)."},
      {"num_epochs", &C::num_epochs, "float", "(unset)",
       "Passes over the training data. One of num_epochs and max_steps is required."},
      {"max_steps", &C::max_steps, "int", "(unset)",
       "Total optimizer steps; overrides num_epochs when both are set (HF)."},
      {"optimizer", &C::optimizer, "string", "adamw_torch",
       "adamw_torch or adamw_torch_fused (the same torch.optim.AdamW update).",
       {"adamw_torch", "adamw_torch_fused"}, "Optimizer and schedule"},
      {"learning_rate", &C::learning_rate, "float", "5e-05", "Peak learning rate (HF default)."},
      {"lr_scheduler", &C::lr_scheduler, "string", "cosine",
       "cosine (Axolotl default), linear, constant (HF: ignores warmup), constant_with_warmup; "
       "all decay/hold after a linear warmup from 0.",
       {"cosine", "linear", "constant", "constant_with_warmup"}},
      {"warmup_steps", &C::warmup_steps, "int", "(unset: 0)",
       "Linear warmup length in optimizer steps. Set at most one of warmup_steps and warmup_ratio."},
      {"warmup_ratio", &C::warmup_ratio, "float", "(unset: 0)",
       "Warmup as a fraction of the total steps: ceil(ratio x total) (HF)."},
      {"weight_decay", &C::weight_decay, "float", "0.0",
       "Decoupled AdamW weight decay applied to every LoRA matrix (HF default 0)."},
      {"max_grad_norm", &C::max_grad_norm, "float", "1.0",
       "Clip the global gradient L2 norm to this (HF default); 0 disables clipping."},
      {"adam_beta1", &C::adam_beta1, "float", "0.9", "AdamW beta1."},
      {"adam_beta2", &C::adam_beta2, "float", "0.999", "AdamW beta2."},
      {"adam_epsilon", &C::adam_epsilon, "float", "1e-08", "AdamW epsilon."},
      {"adapter", &C::adapter, "string", "lora",
       "lora (unquantized base weights) or qlora (base weights quantized to 4-bit NF4).", {"lora", "qlora"}, "Adapter"},
      {"load_in_4bit", &C::load_in_4bit, "bool", "(unset: true for qlora)",
       "Quantize the base model to NF4; must agree with adapter (qlora needs it, lora forbids it)."},
      {"offload_embeddings", &C::offload_embeddings, "bool", "(unset: true with load_in_4bit)",
       "CUDA: keep the input embedding table in pinned host memory (only the looked-up rows cross the bus); "
       "ignored for tied embeddings, which are also the lm_head."},
      {"offload_activations", &C::offload_activations, "bool", "false",
       "CUDA: keep the layer inputs saved for the backward (activation checkpoints) in pinned host memory, "
       "copied out and prefetched back beside the compute: two layers' worth on the GPU instead of one per layer."},
      {"offload_lora", &C::offload_lora, "bool", "false",
       "CUDA, one GPU: keep the LoRA training state (fp32 weights, gradients, AdamW moments: 16 bytes per "
       "parameter) in pinned host memory, streamed through two layers' worth on the GPU; for LoRA on every "
       "expert of a large MoE model. Same results; each step moves the state over the bus."},
      {"nf4_expert_chunk", &C::nf4_expert_chunk, "int", "0",
       "CUDA with load_in_4bit: dequantize a MoE layer's experts this many at a time right before their "
       "products (0: the whole layer at once). A smaller bf16 scratch (3 x chunk experts instead of 3 x all) "
       "for a little more dequantization work."},
      {"lora_r", &C::lora_r, "int", "8", "LoRA rank r (PEFT default)."},
      {"lora_alpha", &C::lora_alpha, "float", "8", "LoRA alpha; the update is scaled by alpha / r (PEFT default)."},
      {"lora_dropout", &C::lora_dropout, "float", "0.0", "Dropout on the LoRA input, in [0, 1) (PEFT default)."},
      {"lora_target_modules", &C::lora_target_modules, "list of strings", "[q_proj, v_proj]",
       "Projections with adapters: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear "
       "(all seven; MoE experts included). Default: PEFT's choice for Qwen models."},
      {"lora_target_linear", &C::lora_target_linear, "bool", "false",
       "Axolotl's switch for all-linear: adapters on all seven projections."},
      {"use_rslora", &C::use_rslora, "bool", "false", "Rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r."},
      {"peft_use_rslora", &C::use_rslora, "bool", "false", "Alias of use_rslora (Axolotl's name).", {}, nullptr, true},
      {"seed", &C::seed, "int", "42", "Seed for adapter init, shuffling and dropout (HF default).", {}, "Run"},
      {"output_dir", &C::output_dir, "string", "./model-out",
       "Where the adapter, checkpoints and the resolved config are written (Axolotl default)."},
      {"save_steps", &C::save_steps, "int", "0",
       "Save output_dir/checkpoint-STEP every N optimizer steps and at the end; 0 = no periodic checkpoints "
       "(the final adapter is always written to output_dir)."},
      {"save_total_limit", &C::save_total_limit, "int", "0",
       "Keep only the newest N checkpoints (older ones are deleted after each save); 0 = keep all."},
      {"eval_steps", &C::eval_steps, "int", "0",
       "Evaluate on the validation set every N steps; 0 = at the end only (when val_set_size > 0)."},
      {"logging_steps", &C::logging_steps, "int", "(unset: auto)",
       "Log every N steps; unset = max(min(int(0.005 x total steps), 10), 1) as Axolotl."},
      {"device", &C::device, "string", "auto",
       "Where to train: auto (cuda when this build has it, a GPU is visible and the model is dense; else cpu), "
       "cuda (GPU 0: bf16 weights and activations, fp32 LoRA masters and AdamW) or cpu (the exact fp32 reference).",
       {"auto", "cpu", "cuda"}},
  };
  return k;
}

const TrainConfig& defaults() {
  static const TrainConfig d;
  return d;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// " (did you mean 'x'?)" for the closest candidate, or "" when none is close.
std::string suggestion(const std::string& key, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const std::string& c : candidates) {
    const size_t d = edit_distance(key, c);
    if (d < best_d) best_d = d, best = c;
  }
  if (best.empty() || best_d > std::max<size_t>(2, key.size() / 3)) return "";
  return fmt::format(" (did you mean '{}'?)", best);
}

[[noreturn]] void unknown_key(const std::string& where, const std::string& key) {
  std::vector<std::string> names;
  for (const KeySpec& k : keys()) names.push_back(k.name);
  fail("config", "{}: unknown key '{}'{}", where, key, suggestion(key, names));
}

const KeySpec* find_key(const std::string& name) {
  for (const KeySpec& k : keys())
    if (name == k.name) return &k;
  return nullptr;
}

std::string node_text(const YAML::Node& n) {
  if (n.IsScalar()) return n.Scalar();
  YAML::Emitter e;
  e << YAML::Flow << n;
  return e.c_str();
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

void check_choice(const std::string& where, const std::string& value, const std::vector<std::string>& choices) {
  if (choices.empty() || std::find(choices.begin(), choices.end(), value) != choices.end()) return;
  fail("config", "{}: '{}' is not one of {}{}", where, value, join(choices, ", "), suggestion(value, choices));
}

// Scalar conversions; `where` is "<origin>: <key>".
template <typename T>
T scalar_as(const YAML::Node& n, const std::string& where, const char* expected) {
  if (!n.IsScalar()) fail("config", "{}: expected {}, got '{}'", where, expected, node_text(n));
  try {
    return n.as<T>();
  } catch (const YAML::Exception&) {
    fail("config", "{}: expected {}, got '{}'", where, expected, n.Scalar());
  }
}

double as_double(const YAML::Node& n, const std::string& where) {
  const double x = scalar_as<double>(n, where, "a number");
  if (!std::isfinite(x)) fail("config", "{}: expected a finite number, got '{}'", where, n.Scalar());
  return x;
}

// A scalar "a, b" (or one name) or a sequence of scalars -> trimmed, non-empty items.
std::vector<std::string> as_string_list(const YAML::Node& n, const std::string& where) {
  std::vector<std::string> out;
  auto add_split = [&](const std::string& s) {
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) {
      const size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
      if (b != std::string::npos) out.push_back(item.substr(b, e - b + 1));
    }
  };
  if (n.IsScalar()) {
    add_split(n.Scalar());
  } else if (n.IsSequence()) {
    for (const YAML::Node& item : n) out.push_back(scalar_as<std::string>(item, where, "a list of names"));
  } else {
    fail("config", "{}: expected a list of names, got '{}'", where, node_text(n));
  }
  return out;
}

std::vector<DatasetSpec> as_datasets(const YAML::Node& n, const std::string& where) {
  std::vector<DatasetSpec> out;
  auto add = [&](const YAML::Node& item, size_t i) {
    const std::string at = fmt::format("{}[{}]", where, i);
    DatasetSpec d;
    if (item.IsScalar()) {
      for (const std::string& p : as_string_list(item, at)) out.push_back(DatasetSpec{p, "auto"});
      return;
    }
    if (!item.IsMap()) fail("config", "{}: expected {{path, type}}, got '{}'", at, node_text(item));
    std::set<std::string> seen;
    for (const auto& kv : item) {
      const std::string k = scalar_as<std::string>(kv.first, at, "a key");
      if (!seen.insert(k).second) fail("config", "{}: key '{}' given twice", at, k);
      if (k == "path") {
        d.path = scalar_as<std::string>(kv.second, at + ".path", "a path");
      } else if (k == "type") {
        if (!kv.second.IsNull()) d.type = scalar_as<std::string>(kv.second, at + ".type", "a dataset type");
        check_choice(at + ".type", d.type, kDatasetTypes);
      } else {
        fail("config", "{}: unknown dataset key '{}'{}", at, k, suggestion(k, {"path", "type"}));
      }
    }
    if (d.path.empty()) fail("config", "{}: dataset without a path", at);
    out.push_back(d);
  };
  if (n.IsSequence()) {
    for (size_t i = 0; i < n.size(); ++i) add(n[i], i);
  } else if (n.IsScalar() || n.IsMap()) {
    add(n, 0);
  } else {
    fail("config", "{}: expected a list of datasets, got '{}'", where, node_text(n));
  }
  return out;
}

// Sets the key's field from a YAML value; null restores the default.
void set_key(TrainConfig& cfg, const KeySpec& k, const YAML::Node& v, const std::string& origin) {
  const std::string where = fmt::format("{}: {}", origin, k.name);
  std::visit(
      [&](auto ptr) {
        using F = std::remove_cvref_t<decltype(cfg.*ptr)>;
        if (!v.IsDefined() || v.IsNull()) {
          cfg.*ptr = defaults().*ptr;
          return;
        }
        if constexpr (std::is_same_v<F, bool> || std::is_same_v<F, std::optional<bool>>) {
          cfg.*ptr = scalar_as<bool>(v, where, "true or false");
        } else if constexpr (std::is_same_v<F, int64_t> || std::is_same_v<F, std::optional<int64_t>>) {
          cfg.*ptr = scalar_as<int64_t>(v, where, "an integer");
        } else if constexpr (std::is_same_v<F, double> || std::is_same_v<F, std::optional<double>>) {
          cfg.*ptr = as_double(v, where);
        } else if constexpr (std::is_same_v<F, std::string>) {
          cfg.*ptr = scalar_as<std::string>(v, where, "a string");
          check_choice(where, cfg.*ptr, k.choices);
        } else if constexpr (std::is_same_v<F, std::vector<std::string>>) {
          cfg.*ptr = as_string_list(v, where);
        } else {
          static_assert(std::is_same_v<F, std::vector<DatasetSpec>>);
          cfg.*ptr = as_datasets(v, where);
        }
      },
      k.field);
}

YAML::Node parse_yaml(const std::string& text, const std::string& where) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail("config", "{}: YAML error: {}", where, e.what());
  }
}

void apply_yaml(TrainConfig& cfg, const YAML::Node& root, const std::string& origin) {
  if (!root.IsDefined() || root.IsNull()) fail("config", "{}: the config is empty", origin);
  if (!root.IsMap()) fail("config", "{}: expected a map of keys at the top level, got '{}'", origin, node_text(root));
  std::set<const void*> seen_fields;  // catches a key given twice, also through an alias
  std::vector<std::string> seen_names;
  for (const auto& kv : root) {
    if (!kv.first.IsScalar()) fail("config", "{}: a key must be a name, got '{}'", origin, node_text(kv.first));
    const std::string name = kv.first.Scalar();
    const KeySpec* k = find_key(name);
    if (!k) unknown_key(origin, name);
    const void* field_id = std::visit([&](auto ptr) -> const void* { return &(cfg.*ptr); }, k->field);
    if (!seen_fields.insert(field_id).second) {
      std::string first;
      for (const std::string& s : seen_names)
        if (std::visit([&](auto ptr) -> const void* { return &(cfg.*ptr); }, find_key(s)->field) == field_id) first = s;
      if (first == name) fail("config", "{}: '{}' is set twice", origin, name);
      fail("config", "{}: '{}' is set twice (also as '{}')", origin, name, first);
    }
    seen_names.push_back(name);
    set_key(cfg, *k, kv.second, origin);
  }
}

void apply_overrides(TrainConfig& cfg, const std::vector<std::string>& args) {
  const std::string where = "command line";
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.size() < 3 || a.rfind("--", 0) != 0) fail("config", "{}: expected --key value, got '{}'", where, a);
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
      has_value = true;
    }
    std::replace(name.begin(), name.end(), '-', '_');
    const KeySpec* k = find_key(name);
    if (!k) unknown_key(where, name);
    const bool is_bool = std::holds_alternative<bool TrainConfig::*>(k->field) ||
                         std::holds_alternative<std::optional<bool> TrainConfig::*>(k->field);
    if (!has_value) {
      if (i + 1 < args.size() && !(is_bool && args[i + 1].rfind("--", 0) == 0)) {
        value = args[++i];
        has_value = true;
      } else if (is_bool) {
        value = "true";
        has_value = true;
      } else {
        fail("config", "{}: --{} needs a value", where, name);
      }
    }
    if (std::holds_alternative<std::string TrainConfig::*>(k->field)) {
      YAML::Node n(value);  // a string key takes the text as it is
      set_key(cfg, *k, n, where);
      continue;
    }
    if (value.find_first_not_of(" \t") == std::string::npos) fail("config", "{}: --{} needs a value", where, name);
    set_key(cfg, *k, parse_yaml(value, fmt::format("{}: --{}", where, name)), where);
  }
}

// Floats in YAML that any YAML reader types as floats: always with a '.' (5.0e-05, 1.0).
std::string float_text(double x) {
  std::string s = fmt::format("{}", x);
  if (s.find('.') != std::string::npos || s.find_first_of("ni") != std::string::npos) return s;
  const size_t e = s.find('e');
  if (e == std::string::npos) return s + ".0";
  return s.substr(0, e) + ".0" + s.substr(e);
}

}  // namespace

void TrainConfig::validate(const std::string& origin) const {
  auto need = [&](bool ok, const char* key, const char* rule, const std::string& got) {
    if (!ok) fail("config", "{}: {} must be {}, got {}", origin, key, rule, got);
  };
  auto num = [](auto x) { return fmt::format("{}", x); };
  need(!base_model.empty(), "base_model", "set (a model directory)", "nothing");
  need(!datasets.empty(), "datasets", "a non-empty list of {path, type}", "nothing");
  for (size_t i = 0; i < datasets.size(); ++i) {
    if (datasets[i].path.empty()) fail("config", "{}: datasets[{}]: dataset without a path", origin, i);
    check_choice(fmt::format("{}: datasets[{}].type", origin, i), datasets[i].type, kDatasetTypes);
  }
  for (const KeySpec& k : keys())  // string keys with a fixed set of values
    if (const auto* p = std::get_if<std::string TrainConfig::*>(&k.field))
      check_choice(fmt::format("{}: {}", origin, k.name), this->*(*p), k.choices);
  // Upper bounds keep products like micro_batch_size * sequence_len far from overflow.
  need(sequence_len >= 2 && sequence_len <= (int64_t(1) << 24), "sequence_len", "in [2, 2^24]", num(sequence_len));
  need(micro_batch_size >= 1 && micro_batch_size <= (int64_t(1) << 20), "micro_batch_size", "in [1, 2^20]",
       num(micro_batch_size));
  need(gradient_accumulation_steps >= 1 && gradient_accumulation_steps <= (int64_t(1) << 20),
       "gradient_accumulation_steps", "in [1, 2^20]", num(gradient_accumulation_steps));
  need(val_set_size >= 0 && (val_set_size < 1 || val_set_size == std::floor(val_set_size)), "val_set_size",
       "a fraction in [0, 1) or a whole count", num(val_set_size));
  if (!num_epochs && !max_steps)
    fail("config", "{}: set num_epochs or max_steps (neither is set)", origin);
  if (num_epochs) need(*num_epochs > 0, "num_epochs", "> 0", num(*num_epochs));
  if (max_steps) need(*max_steps >= 1, "max_steps", ">= 1", num(*max_steps));
  need(learning_rate >= 0, "learning_rate", ">= 0", num(learning_rate));
  if (warmup_steps && warmup_ratio)
    fail("config", "{}: set only one of warmup_steps ({}) and warmup_ratio ({})", origin, *warmup_steps, *warmup_ratio);
  if (warmup_steps) need(*warmup_steps >= 0, "warmup_steps", ">= 0", num(*warmup_steps));
  if (warmup_ratio) need(*warmup_ratio >= 0 && *warmup_ratio <= 1, "warmup_ratio", "in [0, 1]", num(*warmup_ratio));
  need(weight_decay >= 0, "weight_decay", ">= 0", num(weight_decay));
  need(max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 disables clipping)", num(max_grad_norm));
  need(adam_beta1 >= 0 && adam_beta1 < 1, "adam_beta1", "in [0, 1)", num(adam_beta1));
  need(adam_beta2 >= 0 && adam_beta2 < 1, "adam_beta2", "in [0, 1)", num(adam_beta2));
  need(adam_epsilon >= 0, "adam_epsilon", ">= 0", num(adam_epsilon));
  if (adapter == "qlora" && load_in_4bit == false)
    fail("config", "{}: adapter qlora needs load_in_4bit: true (got false)", origin);
  if (adapter == "lora" && load_in_4bit == true)
    fail("config", "{}: load_in_4bit: true needs adapter: qlora (got adapter: lora)", origin);
  need(lora_r >= 1 && lora_r <= (int64_t(1) << 20), "lora_r", "in [1, 2^20]", num(lora_r));
  need(nf4_expert_chunk >= 0, "nf4_expert_chunk", ">= 0 (0: the whole layer)", num(nf4_expert_chunk));
  need(lora_alpha > 0, "lora_alpha", "> 0", num(lora_alpha));
  need(lora_dropout >= 0 && lora_dropout < 1, "lora_dropout", "in [0, 1)", num(lora_dropout));
  if (!lora_target_linear) {
    need(!lora_target_modules.empty(), "lora_target_modules", "a non-empty list (or lora_target_linear: true)", "[]");
    std::vector<std::string> allowed = kAllLinear;
    allowed.push_back("all-linear");
    for (const std::string& m : lora_target_modules) check_choice(fmt::format("{}: lora_target_modules", origin), m, allowed);
  }
  need(seed >= 0, "seed", ">= 0", num(seed));
  need(!output_dir.empty(), "output_dir", "a directory", "nothing");
  need(save_steps >= 0, "save_steps", ">= 0", num(save_steps));
  need(save_total_limit >= 0, "save_total_limit", ">= 0", num(save_total_limit));
  need(eval_steps >= 0, "eval_steps", ">= 0", num(eval_steps));
  if (logging_steps) need(*logging_steps >= 1, "logging_steps", ">= 1", num(*logging_steps));
}

LoraConfig TrainConfig::lora_config() const {
  LoraConfig lc;
  lc.r = lora_r;
  lc.alpha = lora_alpha;
  lc.use_rslora = use_rslora;
  lc.dropout = lora_dropout;
  lc.base_model_name_or_path = base_model;
  const bool all = lora_target_linear ||
                   std::find(lora_target_modules.begin(), lora_target_modules.end(), "all-linear") != lora_target_modules.end();
  for (const std::string& m : all ? kAllLinear : lora_target_modules)
    if (std::find(lc.target_modules.begin(), lc.target_modules.end(), m) == lc.target_modules.end())
      lc.target_modules.push_back(m);
  return lc;
}

AdamWConfig TrainConfig::adamw_config() const {
  AdamWConfig a;
  a.beta1 = adam_beta1;
  a.beta2 = adam_beta2;
  a.eps = adam_epsilon;
  a.weight_decay = weight_decay;
  return a;
}

LrSchedulerKind TrainConfig::scheduler_kind() const {
  LrSchedulerKind k;
  if (!lr_scheduler_from_name(lr_scheduler, &k)) fail("config", "lr_scheduler '{}' is not supported", lr_scheduler);
  return k;
}

int64_t TrainConfig::warmup_steps_for(int64_t total_steps) const {
  return resolve_warmup_steps(warmup_steps, warmup_ratio, total_steps);
}

int64_t TrainConfig::logging_steps_for(int64_t total_steps) const {
  if (logging_steps) return *logging_steps;
  return std::max<int64_t>(std::min<int64_t>(int64_t(0.005 * double(total_steps)), 10), 1);
}

TrainConfig parse_train_config(const std::string& yaml_text, const std::string& origin,
                               const std::vector<std::string>& overrides) {
  TrainConfig cfg;
  apply_yaml(cfg, parse_yaml(yaml_text, origin), origin);
  apply_overrides(cfg, overrides);
  cfg.validate(origin);
  return cfg;
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("config", "{}: cannot read the config file", path);
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail("config", "{}: read error", path);
  return parse_train_config(ss.str(), path, overrides);
}

std::string train_config_help() {
  std::string s =
      "Usage: qwentune train CONFIG.yaml [--key value ...] [--resume [CHECKPOINT_DIR]] [--stop-after-steps N]\n\n"
      "CONFIG.yaml is a map of the keys below (Axolotl names). Any key can be overridden on the command\n"
      "line as --key value or --key=value; lists as a,b or [a, b]; a bool key alone means true.\n"
      "A key with an empty value keeps its default.\n\n"
      "Checkpoints: output_dir/checkpoint-STEP/ (a loadable PEFT adapter plus optimizer.safetensors and\n"
      "trainer_state.json) every save_steps steps and at the end, and when the run is stopped. Ctrl-C (or\n"
      "SIGTERM) finishes the current step, saves a checkpoint and exits with code 130 (143); a second\n"
      "Ctrl-C quits at once. A resumed run (same config) logs on the CPU exactly the losses of an\n"
      "uninterrupted one. Run options:\n"
      "  --resume [CHECKPOINT_DIR]  continue from the newest valid checkpoint in output_dir, or from the\n"
      "                             folder given (after CONFIG.yaml); the settings must match the checkpoint's\n"
      "  --stop-after-steps N       stop after N steps of this run with a checkpoint (schedule unchanged)\n";
  for (const KeySpec& k : keys()) {
    if (k.section) s += fmt::format("\n{}:\n", k.section);
    const std::string def = std::string(k.def) == "required" ? "required" : fmt::format("default: {}", k.def);
    s += fmt::format("  {:<28} {}; {}\n", k.name, k.type, def);
    // The meaning, word-wrapped at 100 columns, indented by 6.
    std::stringstream words(k.help);
    std::string w, line = "     ";
    while (words >> w) {
      if (line.size() + 1 + w.size() > 100) {
        s += line + "\n";
        line = "     ";
      }
      line += " " + w;
    }
    s += line + "\n";
  }
  return s;
}

std::string train_config_to_yaml(const TrainConfig& cfg) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  for (const KeySpec& k : keys()) {
    if (k.alias) continue;
    out << YAML::Key << k.name << YAML::Value;
    std::visit(
        [&](auto ptr) {
          using F = std::remove_cvref_t<decltype(cfg.*ptr)>;
          const F& v = cfg.*ptr;
          if constexpr (std::is_same_v<F, bool>) {
            out << (v ? "true" : "false");
          } else if constexpr (std::is_same_v<F, int64_t>) {
            out << fmt::format("{}", v);
          } else if constexpr (std::is_same_v<F, double>) {
            out << float_text(v);
          } else if constexpr (std::is_same_v<F, std::string>) {
            out << YAML::DoubleQuoted << v;
          } else if constexpr (std::is_same_v<F, std::optional<bool>>) {
            if (v) out << (*v ? "true" : "false"); else out << YAML::Null;
          } else if constexpr (std::is_same_v<F, std::optional<int64_t>>) {
            if (v) out << fmt::format("{}", *v); else out << YAML::Null;
          } else if constexpr (std::is_same_v<F, std::optional<double>>) {
            if (v) out << float_text(*v); else out << YAML::Null;
          } else if constexpr (std::is_same_v<F, std::vector<std::string>>) {
            out << YAML::Flow << YAML::BeginSeq;
            for (const std::string& x : v) out << YAML::DoubleQuoted << x;
            out << YAML::EndSeq;
          } else {
            out << YAML::BeginSeq;
            for (const DatasetSpec& d : v)
              out << YAML::BeginMap << YAML::Key << "path" << YAML::Value << YAML::DoubleQuoted << d.path << YAML::Key
                  << "type" << YAML::Value << d.type << YAML::EndMap;
            out << YAML::EndSeq;
          }
        },
        k.field);
  }
  out << YAML::EndMap;
  return std::string("# qwentune training config (resolved)\n") + out.c_str() + "\n";
}

}  // namespace qt
