// Training config: YAML parsing, defaults, command-line overrides, errors, help and round trip.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "train/train_config.h"
#include "train/train_engine.h"

using namespace qt;

namespace {

const char* kHead = "base_model: /models/qwen3-0.6b\nnum_epochs: 1\n";
const std::string kMinimal = std::string(kHead) + "datasets:\n  - path: data/train.jsonl\n";

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_train_config(yaml, "cfg.yaml", overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

#define EXPECT_ERROR(yaml, overrides, needle)                                                  \
  do {                                                                                         \
    const std::string msg_ = error_of(yaml, overrides);                                        \
    EXPECT_NE(msg_.find(needle), std::string::npos) << "message: " << msg_ << "\nwanted: " << needle; \
  } while (0)

std::string with(const std::string& extra) { return kMinimal + extra + "\n"; }
// The minimal config with its own datasets.
std::string with_data(const std::string& datasets) { return kHead + datasets + "\n"; }

}  // namespace

TEST(TrainConfig, MinimalUsesDocumentedDefaults) {
  const TrainConfig c = parse_train_config(kMinimal, "cfg.yaml");
  EXPECT_EQ(c.base_model, "/models/qwen3-0.6b");
  ASSERT_EQ(c.datasets.size(), 1u);
  EXPECT_EQ(c.datasets[0].path, "data/train.jsonl");
  EXPECT_EQ(c.datasets[0].type, "auto");
  EXPECT_EQ(c.num_epochs, 1.0);
  EXPECT_FALSE(c.max_steps.has_value());
  EXPECT_EQ(c.chat_template, "auto");
  EXPECT_FALSE(c.train_on_inputs);
  EXPECT_EQ(c.sequence_len, 512);
  EXPECT_FALSE(c.sample_packing);
  EXPECT_EQ(c.micro_batch_size, 1);
  EXPECT_EQ(c.gradient_accumulation_steps, 1);
  EXPECT_EQ(c.learning_rate, 5e-5);
  EXPECT_EQ(c.lr_scheduler, "cosine");
  EXPECT_EQ(c.weight_decay, 0.0);
  EXPECT_EQ(c.max_grad_norm, 1.0);
  EXPECT_EQ(c.adapter, "lora");
  EXPECT_FALSE(c.quantize_base());
  EXPECT_EQ(c.lora_r, 8);
  EXPECT_EQ(c.lora_alpha, 8.0);
  EXPECT_EQ(c.lora_dropout, 0.0);
  EXPECT_EQ(c.lora_target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_FALSE(c.use_rslora);
  EXPECT_EQ(c.seed, 42);
  EXPECT_EQ(c.output_dir, "./model-out");
  EXPECT_EQ(c.optimizer, "adamw_torch");
  EXPECT_EQ(c.adam_beta1, 0.9);
  EXPECT_EQ(c.adam_beta2, 0.999);
  EXPECT_EQ(c.adam_epsilon, 1e-8);
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.warmup_steps_for(1000), 0);
  EXPECT_EQ(c.scheduler_kind(), LrSchedulerKind::Cosine);
}

// Where the CUDA engine keeps the input embeddings: host memory by default only for a 4-bit base,
// never when they are tied to the lm_head; the key overrides the default.
TEST(TrainConfig, OffloadEmbeddings) {
  const TrainConfig unset = parse_train_config(kMinimal, "c");
  EXPECT_FALSE(unset.offload_embeddings.has_value());
  ModelConfig untied, tied;
  untied.tie_word_embeddings = false, tied.tie_word_embeddings = true;
  EXPECT_TRUE(resolve_embeddings_on_host(unset.offload_embeddings, untied, /*four_bit=*/true));
  EXPECT_FALSE(resolve_embeddings_on_host(unset.offload_embeddings, untied, /*four_bit=*/false));
  EXPECT_FALSE(resolve_embeddings_on_host(unset.offload_embeddings, tied, /*four_bit=*/true));
  const TrainConfig off = parse_train_config(std::string(kMinimal) + "offload_embeddings: false\n", "c");
  EXPECT_FALSE(resolve_embeddings_on_host(off.offload_embeddings, untied, /*four_bit=*/true));
  const TrainConfig on = parse_train_config(std::string(kMinimal) + "offload_embeddings: true\n", "c");
  EXPECT_TRUE(resolve_embeddings_on_host(on.offload_embeddings, untied, /*four_bit=*/false));
  EXPECT_FALSE(resolve_embeddings_on_host(on.offload_embeddings, tied, /*four_bit=*/false));
}

// The saved layer inputs and the LoRA states stay on the GPU unless a key asks for host memory.
TEST(TrainConfig, OffloadActivationsAndLora) {
  const TrainConfig plain = parse_train_config(kMinimal, "c");
  EXPECT_FALSE(plain.offload_activations);
  EXPECT_FALSE(plain.offload_lora);
  EXPECT_TRUE(parse_train_config(std::string(kMinimal) + "offload_activations: true\n", "c").offload_activations);
  EXPECT_TRUE(parse_train_config(std::string(kMinimal) + "offload_lora: true\n", "c").offload_lora);
  EXPECT_THROW(parse_train_config(std::string(kMinimal) + "offload_activations: sometimes\n", "c"), Error);
  EXPECT_THROW(parse_train_config(std::string(kMinimal) + "offload_lora: 2\n", "c"), Error);
  EXPECT_EQ(plain.nf4_expert_chunk, 0);
  EXPECT_EQ(parse_train_config(std::string(kMinimal) + "nf4_expert_chunk: 16\n", "c").nf4_expert_chunk, 16);
  EXPECT_THROW(parse_train_config(std::string(kMinimal) + "nf4_expert_chunk: -1\n", "c"), Error);
}

TEST(TrainConfig, AxolotlStyleFile) {
  const char* yaml = R"(
base_model: ./Qwen2.5-7B
load_in_4bit: true
adapter: qlora
datasets:
  - path: chats.jsonl
    type: chat
  - path: alpaca.json
    type: alpaca
chat_template: qwen2.5
val_set_size: 0.05
output_dir: ./qlora-out
sequence_len: 4096
sample_packing: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - k_proj
peft_use_rslora: true
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 3
max_steps:
optimizer: adamw_torch_fused
lr_scheduler: linear
learning_rate: 2e-4
train_on_inputs: false
warmup_steps:
warmup_ratio: 0.1
weight_decay: 0.01
max_grad_norm: 0.3
logging_steps: 5
eval_steps: 20
save_steps: 50
save_total_limit: 2
seed: 3407
device: cpu
adam_beta2: 0.95
)";
  const TrainConfig c = parse_train_config(yaml, "cfg.yaml");
  EXPECT_TRUE(c.quantize_base());
  EXPECT_EQ(c.load_in_4bit, true);
  ASSERT_EQ(c.datasets.size(), 2u);
  EXPECT_EQ(c.datasets[1], (DatasetSpec{"alpaca.json", "alpaca"}));
  EXPECT_EQ(c.chat_template, "qwen2.5");
  EXPECT_EQ(c.val_set_size, 0.05);
  EXPECT_EQ(c.sequence_len, 4096);
  EXPECT_TRUE(c.sample_packing);
  EXPECT_TRUE(c.use_rslora);
  EXPECT_EQ(c.learning_rate, 2e-4);
  EXPECT_FALSE(c.max_steps.has_value());   // empty value = default
  EXPECT_FALSE(c.warmup_steps.has_value());
  EXPECT_EQ(c.warmup_steps_for(95), 10);   // ceil(9.5)
  EXPECT_EQ(c.logging_steps_for(100000), 5);
  EXPECT_EQ(c.adam_beta2, 0.95);
  EXPECT_EQ(c.seed, 3407);
  const LoraConfig lc = c.lora_config();
  EXPECT_EQ(lc.r, 32);
  EXPECT_EQ(lc.alpha, 16.0);
  EXPECT_TRUE(lc.use_rslora);
  EXPECT_EQ(lc.dropout, 0.05);
  EXPECT_EQ(lc.target_modules, (std::vector<std::string>{"q_proj", "k_proj"}));
  EXPECT_EQ(lc.base_model_name_or_path, "./Qwen2.5-7B");
  const AdamWConfig a = c.adamw_config();
  EXPECT_EQ(a.beta1, 0.9);
  EXPECT_EQ(a.beta2, 0.95);
  EXPECT_EQ(a.weight_decay, 0.01);
  EXPECT_EQ(c.scheduler_kind(), LrSchedulerKind::Linear);
}

TEST(TrainConfig, AllLinearTargets) {
  const std::vector<std::string> seven = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  EXPECT_EQ(parse_train_config(with("lora_target_modules: all-linear"), "c").lora_config().target_modules, seven);
  EXPECT_EQ(parse_train_config(with("lora_target_linear: true"), "c").lora_config().target_modules, seven);
  EXPECT_EQ(parse_train_config(with("lora_target_modules: [v_proj, q_proj, v_proj]"), "c").lora_config().target_modules,
            (std::vector<std::string>{"v_proj", "q_proj"}));
}

TEST(TrainConfig, LoggingStepsAutoAsAxolotl) {
  const TrainConfig c = parse_train_config(kMinimal, "c");
  EXPECT_EQ(c.logging_steps_for(50), 1);     // int(0.25) = 0 -> 1
  EXPECT_EQ(c.logging_steps_for(1000), 5);
  EXPECT_EQ(c.logging_steps_for(100000), 10);
}

TEST(TrainConfig, CommandLineOverrides) {
  const TrainConfig c = parse_train_config(
      kMinimal, "cfg.yaml",
      {"--learning_rate", "1e-4", "--lora_target_modules", "q_proj, k_proj", "--sample_packing", "--seed=7",
       "--output-dir", "out dir", "--datasets", "a.jsonl,b.jsonl", "--max_steps", "100", "--num_epochs", "null",
       "--train_on_inputs", "false", "--lora_alpha", "32"});
  EXPECT_EQ(c.learning_rate, 1e-4);
  EXPECT_EQ(c.lora_target_modules, (std::vector<std::string>{"q_proj", "k_proj"}));
  EXPECT_TRUE(c.sample_packing);
  EXPECT_EQ(c.seed, 7);
  EXPECT_EQ(c.output_dir, "out dir");
  EXPECT_EQ(c.datasets, (std::vector<DatasetSpec>{{"a.jsonl", "auto"}, {"b.jsonl", "auto"}}));
  EXPECT_EQ(c.max_steps, 100);
  EXPECT_FALSE(c.num_epochs.has_value());
  EXPECT_FALSE(c.train_on_inputs);
  EXPECT_EQ(c.lora_alpha, 32.0);

  const TrainConfig d = parse_train_config(
      kMinimal, "cfg.yaml",
      {"--lora_target_modules", "[o_proj, up_proj]", "--datasets", "[{path: x.jsonl, type: sharegpt}]", "--sample_packing",
       "--use_rslora"});
  EXPECT_EQ(d.lora_target_modules, (std::vector<std::string>{"o_proj", "up_proj"}));
  EXPECT_EQ(d.datasets, (std::vector<DatasetSpec>{{"x.jsonl", "sharegpt"}}));
  EXPECT_TRUE(d.sample_packing);
  EXPECT_TRUE(d.use_rslora);
}

TEST(TrainConfig, UnknownKeysSuggest) {
  EXPECT_EQ(error_of(with("lerning_rate: 1e-4")),
            "[config] cfg.yaml: unknown key 'lerning_rate' (did you mean 'learning_rate'?)");
  EXPECT_EQ(error_of(kMinimal, {"--lora_rank", "8"}), "[config] command line: unknown key 'lora_rank' (did you mean 'lora_r'?)");
  EXPECT_EQ(error_of(with("wandb_project: foo")), "[config] cfg.yaml: unknown key 'wandb_project'");
  EXPECT_ERROR(with_data("datasets:\n  - path: a\n    tpye: chat"), std::vector<std::string>{},
               "unknown dataset key 'tpye' (did you mean 'type'?)");
}

TEST(TrainConfig, BadValuesNameKeyAndValue) {
  const std::vector<std::string> none;
  EXPECT_ERROR(with("learning_rate: -1e-4"), none, "learning_rate must be >= 0, got -0.0001");
  EXPECT_ERROR(with("learning_rate: abc"), none, "cfg.yaml: learning_rate: expected a number, got 'abc'");
  EXPECT_ERROR(with("learning_rate: .nan"), none, "learning_rate: expected a finite number");
  EXPECT_ERROR(with("lora_r: 0"), none, "lora_r must be in [1, 2^20], got 0");
  EXPECT_ERROR(with("sequence_len: 3.5"), none, "sequence_len: expected an integer, got '3.5'");
  EXPECT_ERROR(with("sample_packing: maybe"), none, "sample_packing: expected true or false, got 'maybe'");
  EXPECT_ERROR(with("lr_scheduler: cosin"), none,
               "lr_scheduler: 'cosin' is not one of cosine, linear, constant, constant_with_warmup (did you mean 'cosine'?)");
  EXPECT_ERROR(with("optimizer: adamw_bnb_8bit"), none, "optimizer: 'adamw_bnb_8bit' is not one of adamw_torch");
  EXPECT_ERROR(with("adapter: full"), none, "adapter: 'full' is not one of lora, qlora");
  EXPECT_ERROR(with("chat_template: llama3"), none, "chat_template: 'llama3' is not one of");
  EXPECT_ERROR(with("device: tpu"), none, "device: 'tpu' is not one of auto, cpu, cuda");
  EXPECT_ERROR(with("warmup_steps: 10\nwarmup_ratio: 0.1"), none, "set only one of warmup_steps (10) and warmup_ratio (0.1)");
  EXPECT_ERROR(with("warmup_ratio: 1.5"), none, "warmup_ratio must be in [0, 1], got 1.5");
  EXPECT_ERROR(with("adapter: qlora\nload_in_4bit: false"), none, "adapter qlora needs load_in_4bit: true");
  EXPECT_ERROR(with("load_in_4bit: true"), none, "load_in_4bit: true needs adapter: qlora");
  EXPECT_ERROR(with("lora_target_modules: [q_proj, lm_head]"), none, "lora_target_modules: 'lm_head' is not one of");
  EXPECT_ERROR(with("lora_dropout: 1"), none, "lora_dropout must be in [0, 1), got 1");
  EXPECT_ERROR(with("micro_batch_size: 0"), none, "micro_batch_size must be in [1, 2^20], got 0");
  EXPECT_ERROR(with("sequence_len: 99999999999"), none, "sequence_len must be in [2, 2^24], got 99999999999");
  EXPECT_ERROR(with("sequence_len: 99999999999999999999999"), none, "sequence_len: expected an integer");
  EXPECT_ERROR(with("max_grad_norm: -1"), none, "max_grad_norm must be >= 0");
  EXPECT_ERROR(with("val_set_size: 2.5"), none, "val_set_size must be a fraction in [0, 1) or a whole count, got 2.5");
  EXPECT_ERROR(with("adam_beta1: 1.0"), none, "adam_beta1 must be in [0, 1), got 1");
  EXPECT_ERROR("base_model: m\ndatasets: [d]\nnum_epochs: 0\n", none, "num_epochs must be > 0, got 0");
  EXPECT_ERROR(with("use_rslora: true\npeft_use_rslora: true"), none,
               "'peft_use_rslora' is set twice (also as 'use_rslora')");
  EXPECT_EQ(error_of(with("seed: 1\nseed: 2")), "[config] cfg.yaml: 'seed' is set twice");
  EXPECT_ERROR(with_data("datasets:\n  - path: a\n    type: jsonl"), none, "datasets[0].type: 'jsonl' is not one of auto, text");
  EXPECT_ERROR(with_data("datasets:\n  - type: chat"), none, "datasets[0]: dataset without a path");
  EXPECT_ERROR(with_data("datasets: []"), none, "datasets must be a non-empty list");
  EXPECT_ERROR(with("lora_target_modules: {a: 1}"), none, "lora_target_modules: expected a list of names");
  EXPECT_ERROR("base_model: [a, b]\ndatasets: [d]\nmax_steps: 1\n", none, "base_model: expected a string, got '[a, b]'");
  EXPECT_ERROR("base_model: m\ndatasets: [d.jsonl]\n", none, "set num_epochs or max_steps (neither is set)");
  EXPECT_ERROR("datasets: [d.jsonl]\nmax_steps: 3\n", none, "base_model must be set");
  EXPECT_ERROR("", none, "cfg.yaml: the config is empty");
  EXPECT_ERROR("- a\n- b\n", none, "expected a map of keys at the top level");
  EXPECT_ERROR("base_model: [unclosed\n", none, "cfg.yaml: YAML error");
  // Command line.
  EXPECT_ERROR(kMinimal, (std::vector<std::string>{"--learning_rate"}), "command line: --learning_rate needs a value");
  EXPECT_ERROR(kMinimal, (std::vector<std::string>{"--lora_r", "eight"}), "command line: lora_r: expected an integer, got 'eight'");
  EXPECT_ERROR(kMinimal, (std::vector<std::string>{"lora_r", "8"}), "expected --key value, got 'lora_r'");
  EXPECT_ERROR(kMinimal, (std::vector<std::string>{"--lora_r", ""}), "--lora_r needs a value");
  EXPECT_ERROR(kMinimal, (std::vector<std::string>{"--lora_r", "-3"}), "cfg.yaml: lora_r must be in [1, 2^20], got -3");
  EXPECT_ERROR(kMinimal, (std::vector<std::string>{"--lora_target_modules", "[q_proj"}), "--lora_target_modules: YAML error");
}

TEST(TrainConfig, YamlRoundTrip) {
  TrainConfig c = parse_train_config(kMinimal, "c");
  c.datasets = {{"data/with space: and colon.jsonl", "sharegpt"}, {"b.jsonl", "text"}};
  c.learning_rate = 2e-4;
  c.max_steps = 250;
  c.num_epochs = std::nullopt;
  c.warmup_ratio = 0.03;
  c.lora_target_modules = {"all-linear"};
  c.use_rslora = true;
  c.adapter = "qlora";
  c.load_in_4bit = true;
  c.offload_embeddings = false;
  c.output_dir = "out/\"quoted\"";
  c.adam_epsilon = 1e-6;
  c.val_set_size = 100;
  c.chat_template = "qwen3";
  c.base_model = "yes";  // a string that YAML would read as a bool if written plainly
  const std::string text = train_config_to_yaml(c);
  const TrainConfig back = parse_train_config(text, "saved.yaml");
  EXPECT_EQ(back, c) << text;
  // The defaults round-trip too (unset optional keys are written as null).
  const TrainConfig d = parse_train_config(kMinimal, "c");
  EXPECT_EQ(parse_train_config(train_config_to_yaml(d), "saved.yaml"), d);
  // Floats are written so that any YAML reader types them as floats.
  const YAML::Node n = YAML::Load(text);
  EXPECT_EQ(n["learning_rate"].Scalar(), "0.0002");
  EXPECT_EQ(n["adam_epsilon"].Scalar(), "1.0e-06");
  EXPECT_EQ(n["val_set_size"].Scalar(), "100.0");
  EXPECT_TRUE(n["num_epochs"].IsNull());
  EXPECT_FALSE(n["peft_use_rslora"].IsDefined());  // aliases are not written
}

TEST(TrainConfig, HelpDocumentsEveryKey) {
  const std::string help = train_config_help();
  const YAML::Node all = YAML::Load(train_config_to_yaml(parse_train_config(kMinimal, "c")));
  size_t n = 0;
  for (const auto& kv : all) {
    const std::string key = kv.first.Scalar();
    ++n;
    const size_t at = help.find("  " + key + " ");
    ASSERT_NE(at, std::string::npos) << key;
    const std::string line = help.substr(at, help.find('\n', at) - at);
    EXPECT_TRUE(line.find("; default: ") != std::string::npos || line.find("; required") != std::string::npos) << line;
  }
  EXPECT_EQ(n, 40u);
  EXPECT_NE(help.find("peft_use_rslora"), std::string::npos);
  EXPECT_NE(help.find("Usage: qwentune train CONFIG.yaml"), std::string::npos);
}

TEST(TrainConfig, LoadsFiles) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "qt_test_train_config";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "cfg.yaml").string();
  {
    std::ofstream f(path);
    f << kMinimal;
  }
  const TrainConfig c = load_train_config(path, {"--lora_r", "16"});
  EXPECT_EQ(c.lora_r, 16);
  try {
    load_train_config((dir / "missing.yaml").string());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.yaml: cannot read"), std::string::npos) << e.what();
  }
  try {  // validation messages name the file
    std::ofstream(path) << "base_model: m\ndatasets: [d]\nmax_steps: 0\n";
    load_train_config(path);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "[config] " + path + ": max_steps must be >= 1, got 0");
  }
  std::filesystem::remove_all(dir);
}
