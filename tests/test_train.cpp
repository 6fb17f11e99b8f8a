// `qwentune train` end to end on the CPU: random weights of configs/tiny-qwen3-moe.json, the bundled
// Qwen3 tokenizer, a tiny repeated chat dataset, a few steps. Checks that the loss falls, the adapter
// is written and loads, metrics.jsonl has one line per logged step, runs are reproducible for a
// seed, and bad configs fail with a message naming the problem.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "model/lora.h"
#include "test_files.h"

namespace fs = std::filesystem;

namespace {

using qt::test::TempDir;

std::string quoted(const std::string& s) { return "'" + s + "'"; }

using RunResult = qt::test::CommandResult;

RunResult run(const std::string& args) { return qt::test::run_command(quoted(QT_BINARY) + " " + args + " 2>&1"); }

std::string model_config() { return std::string(QT_SOURCE_DIR) + "/configs/tiny-qwen3-moe.json"; }

// A tiny dataset: the same two short conversations, repeated, so a few steps can fit it.
void write_dataset(const fs::path& file) {
  std::ofstream f(file);
  for (int i = 0; i < 4; ++i) {
    f << R"({"messages": [{"role": "user", "content": "Say the colour of the sky."}, )"
         R"({"role": "assistant", "content": "The sky is blue."}]})"
      << "\n";
    f << R"({"messages": [{"role": "user", "content": "What is two plus two?"}, )"
         R"({"role": "assistant", "content": "Two plus two is four."}]})"
      << "\n";
  }
}

std::string write_config(const fs::path& dir, const std::string& extra = "") {
  write_dataset(dir / "data.jsonl");
  const fs::path cfg = dir / "train.yaml";
  std::ofstream f(cfg);
  f << "base_model: " << model_config() << "\n"
    << "datasets:\n  - path: " << (dir / "data.jsonl").string() << "\n    type: chat\n"
    << "chat_template: chatml\nsequence_len: 64\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\n"
    << "max_steps: 6\nlearning_rate: 1.0e-2\nlr_scheduler: constant\n"
    << "lora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]\n"
    << "seed: 7\nlogging_steps: 1\ndevice: cpu\n"
    << extra;
  return cfg.string();
}

std::vector<nlohmann::json> read_metrics(const fs::path& file) {
  std::vector<nlohmann::json> out;
  std::ifstream f(file);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  // The expert-load lines of MoE models (checked in Train.LossFallsAdapterSavedMetricsLoggedAndReproducible).
  std::erase_if(out, [](const nlohmann::json& j) { return j["type"] == "expert_load"; });
  return out;
}

TEST(Train, LossFallsAdapterSavedMetricsLoggedAndReproducible) {
  TempDir tmp("run");
  const std::string cfg = write_config(tmp.path);
  const fs::path out1 = tmp.path / "out1", out2 = tmp.path / "out2";
  const RunResult r1 = run("train " + quoted(cfg) + " --output_dir " + quoted(out1.string()));
  ASSERT_EQ(r1.status, 0) << r1.output;
  EXPECT_NE(r1.output.find("step 6/6"), std::string::npos) << r1.output;

  const auto m1 = read_metrics(out1 / "metrics.jsonl");
  ASSERT_EQ(m1.size(), 6u);  // logging_steps 1, no validation set
  for (size_t i = 0; i < m1.size(); ++i) {
    EXPECT_EQ(m1[i]["type"], "train");
    EXPECT_EQ(m1[i]["step"].get<int64_t>(), int64_t(i + 1));
    EXPECT_TRUE(m1[i]["loss"].is_number());
  }
  // MoE model: one expert-load line per logged step; every MoE layer routes the same tokens, so each
  // layer's counts (tokens per expert, E of them) have the same sum, a multiple of top-k.
  {
    std::ifstream f(out1 / "metrics.jsonl");
    std::string line;
    int64_t loads = 0;
    const qt::ModelConfig mc = qt::load_hf_config(model_config());
    while (std::getline(f, line)) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j["type"] != "expert_load") continue;
      ++loads;
      EXPECT_EQ(j["step"].get<int64_t>(), loads);
      const auto layers = j["tokens_per_expert"].get<std::vector<std::vector<int64_t>>>();
      ASSERT_EQ(layers.size(), size_t(mc.num_hidden_layers));
      int64_t first_sum = -1;
      for (const auto& l : layers) {
        ASSERT_EQ(l.size(), size_t(mc.num_experts));
        int64_t sum = 0;
        for (int64_t c : l) sum += c;
        if (first_sum < 0) first_sum = sum;
        EXPECT_EQ(sum, first_sum);
        EXPECT_EQ(sum % mc.num_experts_per_tok, 0);
      }
      EXPECT_GT(first_sum, 0);
    }
    EXPECT_EQ(loads, 6);
    EXPECT_NE(r1.output.find("expert load since the last log: busiest expert"), std::string::npos) << r1.output;
  }
  const double first = m1.front()["loss"].get<double>(), last = m1.back()["loss"].get<double>();
  // Random weights (std 0.15, the tiny config's initializer_range) give a little above
  // ln(151936) = 11.9; a fall of half a nat in 6 steps is a clear signal of learning.
  EXPECT_GT(first, 10.0);
  EXPECT_LT(last, first - 0.5) << "loss did not fall: " << first << " -> " << last;

  // The adapter files exist and load against the model; B moved away from its zero init.
  ASSERT_TRUE(fs::exists(out1 / "adapter_config.json"));
  ASSERT_TRUE(fs::exists(out1 / "adapter_model.safetensors"));
  ASSERT_TRUE(fs::exists(out1 / "qwentune_config.yaml"));
  {
    std::ifstream svg(out1 / "loss.svg");
    std::stringstream text;
    text << svg.rdbuf();
    EXPECT_NE(text.str().find("<polyline class=\"train\""), std::string::npos) << "loss.svg has no training curve";
  }
  const qt::ModelConfig mcfg = qt::load_hf_config(model_config());
  const qt::LoraAdapter a = qt::load_peft_adapter(out1.string(), mcfg, qt::DType::F32);
  ASSERT_EQ(a.layers.size(), size_t(mcfg.num_hidden_layers));
  EXPECT_EQ(a.cfg.r, 8);
  double b_abs = 0;
  for (const auto& layer : a.layers)
    for (const auto& p : layer.slot) {
      ASSERT_TRUE(p.present());
      for (int64_t i = 0; i < p.B.numel(); ++i) b_abs += std::abs(p.B.data<float>()[i]);
    }
  EXPECT_GT(b_abs, 0.0);

  // Same seed, same data: identical losses, learning rates and gradient norms.
  const RunResult r2 = run("train " + quoted(cfg) + " --output_dir=" + quoted(out2.string()));
  ASSERT_EQ(r2.status, 0) << r2.output;
  const auto m2 = read_metrics(out2 / "metrics.jsonl");
  ASSERT_EQ(m2.size(), m1.size());
  for (size_t i = 0; i < m1.size(); ++i)
    for (const char* key : {"step", "loss", "lr", "grad_norm", "epoch"})
      EXPECT_EQ(m1[i][key], m2[i][key]) << key << " at line " << i;
}

TEST(Train, LoraDropoutTrainsAndChangesTheSteps) {
  TempDir tmp("dropout");
  const std::string cfg = write_config(tmp.path);
  const fs::path out0 = tmp.path / "p0", out1 = tmp.path / "p1";
  const RunResult r0 = run("train " + quoted(cfg) + " --max_steps 2 --output_dir " + quoted(out0.string()));
  const RunResult r1 =
      run("train " + quoted(cfg) + " --max_steps 2 --lora_dropout 0.3 --output_dir " + quoted(out1.string()));
  ASSERT_EQ(r0.status, 0) << r0.output;
  ASSERT_EQ(r1.status, 0) << r1.output;
  const auto m0 = read_metrics(out0 / "metrics.jsonl"), m1 = read_metrics(out1 / "metrics.jsonl");
  ASSERT_EQ(m0.size(), 2u);
  ASSERT_EQ(m1.size(), 2u);
  // Step 1: B = 0, so the LoRA path adds nothing and dropout cannot change the loss. Step 2: it does.
  EXPECT_EQ(m0[0]["loss"], m1[0]["loss"]);
  EXPECT_NE(m0[1]["loss"], m1[1]["loss"]);
  EXPECT_TRUE(m1[1]["loss"].is_number());
  const qt::LoraAdapter a = qt::load_peft_adapter(out1.string(), qt::load_hf_config(model_config()), qt::DType::F32);
  EXPECT_DOUBLE_EQ(a.cfg.dropout, 0.3);
}

TEST(Train, ValidationSplitIsEvaluated) {
  TempDir tmp("val");
  const std::string cfg = write_config(tmp.path, "val_set_size: 2\neval_steps: 2\n");
  const fs::path out = tmp.path / "out";
  const RunResult r = run("train " + quoted(cfg) + " --output_dir " + quoted(out.string()) + " --max_steps 4");
  ASSERT_EQ(r.status, 0) << r.output;
  int train_lines = 0, eval_lines = 0;
  for (const auto& j : read_metrics(out / "metrics.jsonl")) {
    if (j["type"] == "train") ++train_lines;
    if (j["type"] == "eval") {
      ++eval_lines;
      EXPECT_TRUE(j["eval_loss"].is_number());
      EXPECT_EQ(j["step"].get<int64_t>() % 2, 0);
    }
  }
  EXPECT_EQ(train_lines, 4);
  EXPECT_EQ(eval_lines, 2);  // steps 2 and 4
}

TEST(Train, UnknownKeyFailsNamingIt) {
  TempDir tmp("bad");
  const std::string cfg = write_config(tmp.path);
  const RunResult r = run("train " + quoted(cfg) + " --learning_rat 1e-3 --output_dir " + quoted((tmp.path / "o").string()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("learning_rat"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(tmp.path / "o" / "adapter_model.safetensors"));

  const std::string cfg2 = write_config(tmp.path, "lora_rnk: 4\n");
  const RunResult r2 = run("train " + quoted(cfg2));
  EXPECT_NE(r2.status, 0);
  EXPECT_NE(r2.output.find("lora_rnk"), std::string::npos) << r2.output;
}

TEST(Train, QloraTrainsOnAnNf4Base) {
  // adapter: qlora quantizes the random base's projections to NF4 at load (load_in_4bit implied);
  // the loss falls and the adapter is written.
  TempDir tmp("qlora");
  const std::string cfg = write_config(tmp.path, "adapter: qlora\n");
  const fs::path out = tmp.path / "out";
  const RunResult r = run("train " + quoted(cfg) + " --max_steps 4 --output_dir " + quoted(out.string()));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("quantized to NF4"), std::string::npos) << r.output;
  const auto m = read_metrics(out / "metrics.jsonl");
  ASSERT_EQ(m.size(), 4u);
  EXPECT_LT(m.back()["loss"].get<double>(), m.front()["loss"].get<double>() - 0.2);
  EXPECT_TRUE(fs::exists(out / "adapter_model.safetensors"));
}

TEST(Train, UnsupportedSettingsFailClearly) {
  TempDir tmp("unsup");
  const std::string cfg = write_config(tmp.path);
  const std::string out = " --output_dir " + quoted((tmp.path / "o").string());
  // --device cuda without a usable GPU (with one, test_cuda_train covers the device).
  if (const char* want = qt::test::cuda_device_refusal()) {
    const RunResult cuda = run("train " + quoted(cfg) + out + " --device cuda");
    EXPECT_NE(cuda.status, 0);
    EXPECT_NE(cuda.output.find(want), std::string::npos) << cuda.output;
  }
  const RunResult nomodel = run("train " + quoted(cfg) + out + " --base_model " + quoted((tmp.path / "nope").string()));
  EXPECT_NE(nomodel.status, 0);
  EXPECT_NE(nomodel.output.find("nope"), std::string::npos) << nomodel.output;
}

}  // namespace
