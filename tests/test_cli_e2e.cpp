// The whole command line end to end on the tiny MoE config (random weights, the bundled tokenizer):
//   train (a few steps on data/sample/chat.jsonl) -> adapter -> generate (greedy, with the adapter;
//   also --chat with piped input) -> init-random (the same random base as a folder) -> merge (f32 and
//   bf16) -> generate with the merged f32 model -> eval with adapter, base and merged models;
// plus one-line errors for bad input and --help listing every flag. Runs the real binary (QT_BINARY).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include "test_files.h"

namespace fs = std::filesystem;

namespace {

using qt::test::TempDir;
using qt::test::read_file;

std::string quoted(const std::string& s) { return "'" + s + "'"; }
std::string quoted(const char* s) { return quoted(std::string(s)); }
std::string quoted(const fs::path& p) { return quoted(p.string()); }

struct RunResult {
  int status = -1;
  std::string out, err;
};

// Runs `qwentune ARGS`, stdout and stderr captured apart; `input` (if any) is piped to stdin.
RunResult run(const fs::path& tmp, const std::string& args, const std::string& input = "") {
  static int n = 0;
  const fs::path err = tmp / ("stderr_" + std::to_string(n++) + ".txt");
  std::string cmd = quoted(QT_BINARY) + " " + args + " 2>" + quoted(err);
  if (!input.empty()) {
    const fs::path in = tmp / ("stdin_" + std::to_string(n) + ".txt");
    std::ofstream(in) << input;
    cmd += " <" + quoted(in);
  }
  RunResult r;
  const auto t0 = std::chrono::steady_clock::now();
  const qt::test::CommandResult c = qt::test::run_command(cmd);
  r.status = c.status;
  r.out = c.output;
  r.err = read_file(err);
  std::printf("  [%5.1f s] qwentune %.90s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              args.c_str());
  return r;
}

const std::string kConfig = std::string(QT_SOURCE_DIR) + "/configs/tiny-qwen3-moe.json";

// The first n conversations of the bundled sample (8 to train on, 4 of them to evaluate).
fs::path write_data(const fs::path& dir, int n) {
  std::ifstream in(std::string(QT_SOURCE_DIR) + "/data/sample/chat.jsonl");
  const fs::path out = dir / ("chat" + std::to_string(n) + ".jsonl");
  std::ofstream f(out);
  std::string line;
  for (int i = 0; i < n && std::getline(in, line); ++i) f << line << "\n";
  return out;
}

double eval_loss(const fs::path& tmp, const std::string& model_args, const fs::path& data) {
  const RunResult r = run(tmp, "eval " + model_args + " --data " + quoted(data) + " --sequence-len 96 --batch 4 --json");
  EXPECT_EQ(r.status, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_TRUE(j.is_object()) << r.out;
  if (!j.is_object()) return std::nan("");
  EXPECT_NEAR(j["perplexity"].get<double>(), std::exp(j["loss"].get<double>()), 1e-9 * j["perplexity"].get<double>());
  EXPECT_EQ(j["sequences"].get<int64_t>(), 4);
  EXPECT_GT(j["tokens"].get<int64_t>(), 50);
  return j["loss"].get<double>();
}

}  // namespace

TEST(CliEndToEnd, TrainGenerateMergeEval) {
  TempDir tmp;
  const fs::path data = write_data(tmp.path, 8), eval_data = write_data(tmp.path, 4), adapter = tmp.path / "adapter";
  {
    std::ofstream f(tmp.path / "train.yaml");
    f << "base_model: " << kConfig << "\ndatasets:\n  - path: " << data.string() << "\n    type: chat\n"
      << "sequence_len: 96\nmicro_batch_size: 4\nmax_steps: 3\nlearning_rate: 1.0e-2\nlr_scheduler: constant\n"
      << "lora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
         "down_proj]\nseed: 7\nlogging_steps: 1\ndevice: cpu\noutput_dir: "
      << adapter.string() << "\n";
  }
  const RunResult train = run(tmp.path, "train " + quoted(tmp.path / "train.yaml"));
  ASSERT_EQ(train.status, 0) << train.out << train.err;
  ASSERT_TRUE(fs::exists(adapter / "adapter_model.safetensors"));

  // generate with the adapter on the bare config (random base weights of seed 7, as in training)
  const std::string prompt = " --prompt " + quoted("What is the boiling point of water?") + " --greedy --max-new-tokens 8 --device cpu";
  const std::string on_config = "--model " + quoted(kConfig) + " --model-seed 7";
  const RunResult g1 = run(tmp.path, "generate " + on_config + " --adapter " + quoted(adapter) + prompt);
  ASSERT_EQ(g1.status, 0) << g1.err;
  EXPECT_GT(g1.out.size(), 1u) << "no text generated";
  EXPECT_NE(g1.err.find("tok/s"), std::string::npos) << g1.err;
  // the same base as a folder: identical f32 weights, so identical tokens
  const fs::path base = tmp.path / "base";
  const RunResult init = run(tmp.path, "init-random --config " + quoted(kConfig) + " --seed 7 --out " + quoted(base));
  ASSERT_EQ(init.status, 0) << init.err;
  const RunResult g2 = run(tmp.path, "generate --model " + quoted(base) + " --adapter " + quoted(adapter) + prompt);
  ASSERT_EQ(g2.status, 0) << g2.err;
  EXPECT_EQ(g2.out, g1.out);

  // merged in f32: W + s*BA rounded once to f32 vs the unmerged sum, logits equal to ~1e-6 relative,
  // far below the gaps between the top logits here, so greedy decoding picks the same tokens.
  const fs::path merged32 = tmp.path / "merged_f32", merged16 = tmp.path / "merged_bf16";
  const RunResult m32 = run(tmp.path, "merge --model " + quoted(base) + " --adapter " + quoted(adapter) + " --out " +
                                          quoted(merged32) + " --dtype f32");
  ASSERT_EQ(m32.status, 0) << m32.err;
  const RunResult g3 = run(tmp.path, "generate --model " + quoted(merged32) + prompt);
  ASSERT_EQ(g3.status, 0) << g3.err;
  EXPECT_EQ(g3.out, g1.out);
  const RunResult m16 = run(tmp.path, "merge --model " + quoted(base) + " --adapter " + quoted(adapter) + " --out " +
                                          quoted(merged16));
  ASSERT_EQ(m16.status, 0) << m16.err;

  // eval: merged f32 agrees with base + adapter within float rounding; merged bf16 within bf16 rounding (below); the adapter lowers the loss on its
  // training data, by more than those tolerances, so the comparisons have teeth.
  const double l_adapter = eval_loss(tmp.path, "--model " + quoted(base) + " --adapter " + quoted(adapter), eval_data);
  const double l_base = eval_loss(tmp.path, "--model " + quoted(base), eval_data);
  const double l_m32 = eval_loss(tmp.path, "--model " + quoted(merged32), eval_data);
  const double l_m16 = eval_loss(tmp.path, "--model " + quoted(merged16), eval_data);
  std::printf("eval loss: base %.6f, adapter %.6f, merged f32 %.6f, merged bf16 %.6f\n", l_base, l_adapter, l_m32,
              l_m16);
  EXPECT_NEAR(l_m32, l_adapter, 1e-5 * l_adapter);
  // bf16 keeps 8 significant bits: every weight moves by <= 2^-9 of itself, so each logit by about
  // 2^-9 of its size (the errors of a dot product partly cancel), and the cross-entropy, whose
  // gradient in the logits has L1 norm <= 2, by <= 2 * 2^-9 * max |logit|. The tiny model's logits
  // stay below ~2, hence 8e-3.
  EXPECT_NEAR(l_m16, l_adapter, 8e-3);
  EXPECT_LT(l_adapter, l_base - 0.05) << "training did not lower the loss; the comparisons above prove little";

  // interactive chat with piped input: two turns, history kept, /exit ends it
  const RunResult chat = run(tmp.path, "generate --model " + quoted(base) + " --adapter " + quoted(adapter) +
                                           " --chat --greedy --max-new-tokens 4 --device cpu --system " + quoted("Be brief."),
                             "Hello!\nWhat is two plus two?\n/exit\nnot read\n");
  ASSERT_EQ(chat.status, 0) << chat.err;
  size_t speed_lines = 0;
  for (size_t p = chat.err.find("tok/s"); p != std::string::npos; p = chat.err.find("tok/s", p + 1)) ++speed_lines;
  EXPECT_EQ(speed_lines, 4u) << chat.err;  // "prompt ... tok/s, generated ... tok/s" per answer
  EXPECT_EQ(std::count(chat.out.begin(), chat.out.end(), '\n') >= 2, true) << chat.out;
}

TEST(CliEndToEnd, ErrorsAreOneClearLine) {
  TempDir tmp;
  auto expect_one_line = [&](const RunResult& r, const std::string& needle) {
    EXPECT_EQ(r.status, 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  };
  expect_one_line(run(tmp.path, "generate --model " + quoted(tmp.path / "nope") + " --prompt hi"),
                  "no such file or folder, and not a Hub model id");
  expect_one_line(run(tmp.path, "generate --model " + quoted(kConfig)), "exactly one of --prompt TEXT and --chat");
  expect_one_line(run(tmp.path, "generate --model " + quoted(kConfig) + " --prompt hi --top-p 2"), "--top-p 2 must be in (0, 1]");
  expect_one_line(run(tmp.path, "generate --model " + quoted(kConfig) + " --adapter " + quoted(tmp.path / "none") +
                                    " --prompt hi"),
                  "--adapter");
  expect_one_line(run(tmp.path, "eval --model " + quoted(kConfig) + " --data " + quoted(tmp.path / "missing.jsonl")),
                  "[eval] --data");
  expect_one_line(run(tmp.path, "init-random --config " + quoted(tmp.path / "missing.json") + " --out " +
                                    quoted(tmp.path / "o")),
                  "[init-random] --config");
  // --device cuda where it cannot run: a CPU-only build, or no visible GPU (test_cuda_generate covers a GPU)
  if (const char* why = qt::test::cuda_device_refusal())
    expect_one_line(run(tmp.path, "generate --model " + quoted(kConfig) + " --prompt hi --device cuda"),
                    std::string("[generate] device cuda: ") + why);
  expect_one_line(run(tmp.path, "quantize --model " + quoted(tmp.path) + " --out " + quoted(tmp.path / "q") +
                                    " --shard-size 5XB"),
                  "[quantize] '5XB' is not a size");
  std::ofstream(tmp.path / "bad.jsonl") << "{\"messages\": 3}\n";
  const RunResult bad = run(tmp.path, "eval --model " + quoted(kConfig) + " --data " + quoted(tmp.path / "bad.jsonl"));
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("bad.jsonl:1"), std::string::npos) << bad.err;
}

TEST(CliEndToEnd, HelpDocumentsEveryFlag) {
  TempDir tmp;
  const RunResult g = run(tmp.path, "generate --help");
  EXPECT_EQ(g.status, 0);
  for (const char* flag : {"--model", "--adapter", "--prompt", "--chat", "--system", "--raw", "--chat-template",
                           "--no-thinking", "--max-new-tokens", "--greedy", "--temperature", "--top-k", "--top-p",
                           "--seed", "--model-seed", "--load-in-4bit", "--device"})
    EXPECT_NE(g.out.find(flag), std::string::npos) << flag;
  const RunResult e = run(tmp.path, "eval --help");
  EXPECT_EQ(e.status, 0);
  for (const char* flag : {"--model", "--adapter", "--data", "--type", "--chat-template", "--sequence-len", "--batch",
                           "--train-on-inputs", "--lenient", "--json", "--model-seed", "--load-in-4bit"})
    EXPECT_NE(e.out.find(flag), std::string::npos) << flag;
}
