// Data-parallel training end to end on the CPU engine: two `qwentune train` processes started as a
// torchrun job would start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), meeting
// through the rendezvous and summing gradients over it (train/train_engine.h). Model: random
// weights of configs/tiny-qwen3.json; 10 training sequences in micro-batches of 2 = 5 per epoch.
//  - 2 ranks with gradient_accumulation_steps 1 take the steps of 1 process with 2: 3 steps per
//    epoch, the third holding one micro-batch (rank 1 then has none and still takes the step),
//    6 steps = 2 epochs, LoRA dropout on (masks keyed on the micro-batch's index in the global
//    step). Losses, gradient norms, the eval loss and the adapter agree within 1e-5 relative (the
//    only difference is the order of fp32 additions of the two micro-batches' gradients).
//  - Rank 0 alone writes output_dir; rank 1 reports and exits 0.
//  - A 2-rank run stopped at step 3 (--stop-after-steps, agreed by both ranks) and resumed with 2
//    ranks equals the uninterrupted 2-rank run exactly; resuming it with one process is refused
//    (world_size in the fingerprint); ranks with different settings are refused at start-up.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "dist/tcp.h"
#include "io/hf_config.h"
#include "model/lora.h"
#include "dist_train_case.h"
#include "test_files.h"

namespace fs = std::filesystem;

namespace {

using qt::test::CommandResult;
using qt::test::TempDir;

std::string quoted(const std::string& s) { return "'" + s + "'"; }
std::string model_path() { return std::string(QT_SOURCE_DIR) + "/configs/tiny-qwen3.json"; }

CommandResult run_single(const std::string& args) {
  return qt::test::run_command(quoted(QT_BINARY) + " " + args + " 2>&1");
}

// Two ranks of one job; returns each rank's exit status and output.
std::vector<CommandResult> run_two_ranks(const fs::path& dir, const std::string& args0, const std::string& args1) {
  const int port = qt::dist::pick_free_port();
  std::string sh = "cd " + quoted(dir.string()) + " && (";
  const std::string* args[2] = {&args0, &args1};
  for (int r = 0; r < 2; ++r)
    sh += "RANK=" + std::to_string(r) + " WORLD_SIZE=2 LOCAL_RANK=" + std::to_string(r) +
          " LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " + quoted(QT_BINARY) +
          " " + *args[r] + " > rank" + std::to_string(r) + ".out 2>&1 & ";
  sh += "wait %1; echo $? > rank0.status; wait %2; echo $? > rank1.status)";
  const CommandResult all = qt::test::run_command(sh);
  std::vector<CommandResult> out(2);
  for (int r = 0; r < 2; ++r) {
    out[size_t(r)].output = qt::test::read_file(dir / ("rank" + std::to_string(r) + ".out"));
    const std::string st = qt::test::read_file(dir / ("rank" + std::to_string(r) + ".status"));
    out[size_t(r)].status = st.empty() ? -1 : std::stoi(st);
  }
  return out;
}

struct Metrics {
  std::vector<double> loss, grad_norm, eval;
};

Metrics read_metrics(const fs::path& file) {
  return {qt::test::read_metric(file, "train", "loss"), qt::test::read_metric(file, "train", "grad_norm"),
          qt::test::read_metric(file, "eval", "eval_loss")};
}

void expect_close(const std::vector<double>& a, const std::vector<double>& b, double rel, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_LE(std::fabs(a[i] - b[i]), rel * std::fabs(a[i])) << what << " " << i << ": " << a[i] << " vs " << b[i];
}

// Largest |a - b| over every adapter tensor, relative to the largest |a|.
double adapter_rel_diff(const fs::path& a_dir, const fs::path& b_dir) {
  const qt::ModelConfig cfg = qt::load_hf_config(model_path());
  const qt::LoraAdapter a = qt::load_peft_adapter(a_dir.string(), cfg, qt::DType::F32);
  const qt::LoraAdapter b = qt::load_peft_adapter(b_dir.string(), cfg, qt::DType::F32);
  double max_diff = 0, max_abs = 0;
  for (size_t l = 0; l < a.layers.size(); ++l)
    for (size_t s = 0; s < a.layers[l].slot.size(); ++s) {
      const auto& pa = a.layers[l].slot[s];
      const auto& pb = b.layers[l].slot[s];
      if (!pa.present()) continue;
      const std::pair<const qt::Tensor*, const qt::Tensor*> pairs[2] = {{&pa.A, &pb.A}, {&pa.B, &pb.B}};
      for (const auto& [x, y] : pairs)
        for (int64_t i = 0; i < x->numel(); ++i) {
          max_abs = std::max(max_abs, double(std::fabs(x->data<float>()[i])));
          max_diff = std::max(max_diff, double(std::fabs(x->data<float>()[i] - y->data<float>()[i])));
        }
    }
  return max_abs > 0 ? max_diff / max_abs : max_diff;
}

TEST(DistTrain, TwoRanksEqualOneProcessWithTwiceTheAccumulation) {
  TempDir tmp("dist_train");
  const std::string ga2 = qt::test::write_dist_train_config(tmp.path, 2, "cpu"), ga1 = qt::test::write_dist_train_config(tmp.path, 1, "cpu");
  const fs::path one = tmp.path / "one", two = tmp.path / "two";
  const CommandResult r1 = run_single("train " + quoted(ga2) + " --output_dir " + quoted(one.string()));
  ASSERT_EQ(r1.status, 0) << r1.output;
  const std::string args = "train " + quoted(ga1) + " --output_dir " + quoted(two.string());
  const auto r2 = run_two_ranks(tmp.path, args, args);
  ASSERT_EQ(r2[0].status, 0) << r2[0].output;
  ASSERT_EQ(r2[1].status, 0) << r2[1].output;
  EXPECT_NE(r2[0].output.find("data parallel: rank 0 of 2"), std::string::npos) << r2[0].output;
  EXPECT_NE(r2[1].output.find("rank 1: done (6 steps"), std::string::npos) << r2[1].output;
  EXPECT_NE(r1.output.find("3 optimizer steps per epoch"), std::string::npos) << r1.output;
  EXPECT_NE(r2[0].output.find("3 optimizer steps per epoch"), std::string::npos) << r2[0].output;

  const Metrics m1 = read_metrics(one / "metrics.jsonl"), m2 = read_metrics(two / "metrics.jsonl");
  ASSERT_EQ(m1.loss.size(), 6u);
  expect_close(m1.loss, m2.loss, 1e-5, "loss");
  expect_close(m1.grad_norm, m2.grad_norm, 1e-5, "grad norm");
  expect_close(m1.eval, m2.eval, 1e-5, "eval loss");
  ASSERT_EQ(m1.eval.size(), 1u);
  EXPECT_LT(m1.loss.back(), m1.loss.front()) << "the run did not learn";
  EXPECT_LE(adapter_rel_diff(one, two), 1e-5);
  // Rank 0 alone wrote output_dir (one metrics line per step and evaluation, one adapter).
  EXPECT_TRUE(fs::exists(two / "adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(two / "qwentune_config.yaml"));
}

TEST(DistTrain, StopAndResumeWithTwoRanksIsExact) {
  TempDir tmp("dist_resume");
  const std::string ga1 = qt::test::write_dist_train_config(tmp.path, 1, "cpu");
  const fs::path full = tmp.path / "full", split = tmp.path / "split";
  const std::string full_args = "train " + quoted(ga1) + " --output_dir " + quoted(full.string());
  const auto rf = run_two_ranks(tmp.path, full_args, full_args);
  ASSERT_EQ(rf[0].status, 0) << rf[0].output;
  ASSERT_EQ(rf[1].status, 0) << rf[1].output;

  const std::string split_args = "train " + quoted(ga1) + " --output_dir " + quoted(split.string());
  const auto rs = run_two_ranks(tmp.path, split_args + " --stop-after-steps 3", split_args + " --stop-after-steps 3");
  ASSERT_EQ(rs[0].status, 0) << rs[0].output;
  ASSERT_EQ(rs[1].status, 0) << rs[1].output;
  EXPECT_TRUE(fs::exists(split / "checkpoint-3"));
  EXPECT_NE(rs[1].output.find("rank 0 saved the checkpoint"), std::string::npos) << rs[1].output;

  // One process cannot continue a 2-rank run.
  const CommandResult bad = run_single(split_args + " --resume");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("world_size (checkpoint 2, now 1)"), std::string::npos) << bad.output;

  const auto rr = run_two_ranks(tmp.path, split_args + " --resume", split_args + " --resume");
  ASSERT_EQ(rr[0].status, 0) << rr[0].output;
  ASSERT_EQ(rr[1].status, 0) << rr[1].output;
  const Metrics a = read_metrics(full / "metrics.jsonl"), b = read_metrics(split / "metrics.jsonl");
  ASSERT_EQ(a.loss.size(), 6u);
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.grad_norm, b.grad_norm);
  EXPECT_EQ(a.eval, b.eval);
  EXPECT_EQ(qt::test::read_file(full / "adapter_model.safetensors"), qt::test::read_file(split / "adapter_model.safetensors"));
}

TEST(DistTrain, RanksWithDifferentSettingsAreRefused) {
  TempDir tmp("dist_refuse");
  const std::string ga1 = qt::test::write_dist_train_config(tmp.path, 1, "cpu");
  const std::string base = "train " + quoted(ga1) + " --output_dir " + quoted((tmp.path / "out").string());
  const auto r = run_two_ranks(tmp.path, base, base + " --learning_rate 1e-3");
  EXPECT_NE(r[0].status, 0);
  EXPECT_NE(r[1].status, 0);
  for (const auto& x : r)
    EXPECT_NE(x.output.find("rank 1 has different training settings than rank 0: rank 0 has 'learning_rate: 0.005'"),
              std::string::npos)
        << x.output;
}

}  // namespace
