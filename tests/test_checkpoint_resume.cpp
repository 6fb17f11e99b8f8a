// Checkpoints end to end: the real `qwentune train` binary on configs/tiny-default.yaml (the bundled
// tiny Qwen3-MoE config, random weights) with a 5-conversation dataset and small overrides.
//   - a run stopped with --stop-after-steps and resumed logs exactly the losses, learning rates and
//     gradient norms of an uninterrupted run and writes the same adapter bytes (gradient
//     accumulation 2, the stop inside an epoch, epochs crossed);
//   - a run killed by SIGKILL during the save of checkpoint-4 (test hook QT_FAULT_KILL_DURING_SAVE)
//     keeps checkpoint-2 valid, leaves no valid-looking checkpoint-4, and --resume reaches the same
//     losses (a log window spanning the resume included) and adapter; save_total_limit keeps the
//     newest; a corrupted newest checkpoint is skipped in favour of the previous one;
//   - a kill after trainer_state.json but before the rename leaves nothing to resume from;
//   - SIGINT saves a checkpoint and exits with 130; changed settings are refused naming the keys.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "io/hf_config.h"
#include "model/lora.h"
#include "train/checkpoint.h"
#include "test_files.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using qt::test::TempDir;
using qt::test::read_file;

// Starts `qwentune args...` with extra environment variables, stdout and stderr to `log`.
pid_t spawn(const std::vector<std::string>& args, const std::vector<std::pair<std::string, std::string>>& env,
            const fs::path& log) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) ::_exit(127);
  ::dup2(fd, 1);
  ::dup2(fd, 2);
  for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
  std::vector<char*> argv{const_cast<char*>(QT_BINARY)};
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  ::execv(QT_BINARY, argv.data());
  ::_exit(127);
}

struct Outcome {
  int exit_code = -1;  // when it exited
  int signal = 0;      // when a signal killed it
  std::string output;
};

Outcome wait_for(pid_t pid, const fs::path& log) {
  int st = 0;
  Outcome o;
  if (::waitpid(pid, &st, 0) != pid) return o;
  if (WIFEXITED(st)) o.exit_code = WEXITSTATUS(st);
  if (WIFSIGNALED(st)) o.signal = WTERMSIG(st);
  o.output = read_file(log);
  return o;
}

// The training command line: tiny-default.yaml with a small, fast setting and `extra` overrides.
class Runner {
 public:
  explicit Runner(const fs::path& root) : root_(root) {
    std::ofstream f(root / "data.jsonl");
    const char* qa[][2] = {{"Say the colour of the sky.", "The sky is blue."},
                           {"What is two plus two?", "Two plus two is four."},
                           {"Name a warm colour.", "Red is a warm colour."},
                           {"What do bees make?", "Bees make honey."},
                           {"Say hello.", "Hello!"}};
    for (const auto& p : qa)
      f << json{{"messages", {{{"role", "user"}, {"content", p[0]}}, {{"role", "assistant"}, {"content", p[1]}}}}}.dump()
        << "\n";
  }
  std::vector<std::string> args(const fs::path& out, const std::vector<std::string>& extra) const {
    const std::string src = QT_SOURCE_DIR;
    std::vector<std::string> a = {"train", src + "/configs/tiny-default.yaml",
                                  "--base_model", src + "/configs/tiny-qwen3-moe.json",
                                  "--datasets", (root_ / "data.jsonl").string(),
                                  "--output_dir", out.string(),
                                  "--sequence_len", "64", "--micro_batch_size", "2", "--lora_r", "8",
                                  "--max_steps", "6", "--warmup_steps", "2", "--logging_steps", "1"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  Outcome run(const fs::path& out, const std::vector<std::string>& extra,
              const std::vector<std::pair<std::string, std::string>>& env = {}) {
    const fs::path log = root_ / fmt::format("log{}.txt", ++runs_);
    return wait_for(spawn(args(out, extra), env, log), log);
  }
  pid_t start(const fs::path& out, const std::vector<std::string>& extra, const fs::path& log) {
    return spawn(args(out, extra), {}, log);
  }

 private:
  fs::path root_;
  int runs_ = 0;
};

std::vector<json> read_metrics(const fs::path& file) {
  std::vector<json> out;
  std::ifstream f(file);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(json::parse(line));
  // The expert-load lines of MoE models (checked in Train.LossFallsAdapterSavedMetricsLoggedAndReproducible).
  std::erase_if(out, [](const json& j) { return j["type"] == "expert_load"; });
  return out;
}

// Every logged step of `b` equals `a`'s: step, loss, lr, grad norm, epoch (exact doubles).
void expect_same_training(const fs::path& a, const fs::path& b, size_t lines) {
  const auto ma = read_metrics(a / "metrics.jsonl"), mb = read_metrics(b / "metrics.jsonl");
  ASSERT_EQ(ma.size(), lines);
  ASSERT_EQ(mb.size(), lines);
  for (size_t i = 0; i < lines; ++i)
    for (const char* key : {"type", "step", "loss", "lr", "grad_norm", "epoch"})
      EXPECT_EQ(ma[i][key], mb[i][key]) << key << " at line " << i << ": " << ma[i].dump() << " vs " << mb[i].dump();
  const std::string wa = read_file(a / "adapter_model.safetensors"), wb = read_file(b / "adapter_model.safetensors");
  EXPECT_FALSE(wa.empty());
  EXPECT_TRUE(wa == wb) << "the final adapters differ";
}

bool has(const std::string& text, const std::string& what) { return text.find(what) != std::string::npos; }

bool hidden_leftovers(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind(".checkpoint-", 0) == 0) return true;
  return false;
}

TEST(CheckpointResume, StopAndResumeReproducesTheUninterruptedRun) {
  TempDir tmp("equal");
  Runner r(tmp.path);
  // 5 sequences in micro-batches of 2: 3 micro-batches per epoch; with accumulation 2 an epoch is a
  // step of 2 and a step of 1, so 6 steps span 3 epochs and the stop at step 3 is inside epoch 1.
  const std::vector<std::string> ga2 = {"--gradient_accumulation_steps", "2"};
  const fs::path full = tmp.path / "full", split = tmp.path / "split";
  const Outcome f = r.run(full, ga2);
  ASSERT_EQ(f.exit_code, 0) << f.output;

  std::vector<std::string> stop = ga2;
  stop.insert(stop.end(), {"--stop-after-steps", "3"});
  const Outcome s = r.run(split, stop);
  ASSERT_EQ(s.exit_code, 0) << s.output;
  EXPECT_TRUE(has(s.output, "stopped (--stop-after-steps) at step 3: saved " + (split / "checkpoint-3").string()))
      << s.output;
  EXPECT_FALSE(fs::exists(split / "adapter_model.safetensors"));  // the run is not finished
  const qt::TrainerState st = qt::validate_checkpoint((split / "checkpoint-3").string());
  EXPECT_EQ(st.global_step, 3);
  EXPECT_EQ(st.epoch, 1);
  EXPECT_EQ(st.batch_in_epoch, 2);
  ASSERT_EQ(st.train_loss.size(), 3u);
  const auto mf = read_metrics(full / "metrics.jsonl");
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(st.train_loss[i].loss, mf[i]["loss"].get<double>());
  // The checkpoint is itself a PEFT adapter.
  const qt::ModelConfig mcfg = qt::load_hf_config(std::string(QT_SOURCE_DIR) + "/configs/tiny-qwen3-moe.json");
  EXPECT_EQ(qt::load_peft_adapter((split / "checkpoint-3").string(), mcfg, qt::DType::F32).cfg.r, 8);

  // Settings that would change the run are refused, naming each.
  std::vector<std::string> changed = ga2;
  changed.insert(changed.end(), {"--resume", "--seed", "8", "--sequence_len", "48"});
  const Outcome bad = r.run(split, changed);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_TRUE(has(bad.output, "settings differ") && has(bad.output, "seed (checkpoint 42, now 8)") &&
              has(bad.output, "sequence_len (checkpoint 64, now 48)"))
      << bad.output;

  std::vector<std::string> resume = ga2;
  resume.push_back("--resume");
  const Outcome res = r.run(split, resume);
  ASSERT_EQ(res.exit_code, 0) << res.output;
  EXPECT_TRUE(has(res.output, "resumed from " + (split / "checkpoint-3").string() + " at step 3/6")) << res.output;
  expect_same_training(full, split, 6);
}

TEST(CheckpointResume, KillDuringSaveKeepsThePreviousCheckpointUsable) {
  TempDir tmp("kill");
  Runner r(tmp.path);
  // Checkpoints at 2, 4, 6 (at most 2 kept); logging every 3 steps, so the first log window
  // (steps 1-3) spans the resume from checkpoint-2.
  const std::vector<std::string> cfg = {"--save_steps", "2", "--save_total_limit", "2", "--logging_steps", "3"};
  const fs::path full = tmp.path / "full", killed = tmp.path / "killed";
  const Outcome f = r.run(full, cfg);
  ASSERT_EQ(f.exit_code, 0) << f.output;
  EXPECT_EQ(qt::list_checkpoints(full.string()), (std::vector<std::string>{"checkpoint-4", "checkpoint-6"}));
  EXPECT_EQ(qt::validate_checkpoint((full / "checkpoint-6").string()).global_step, 6);

  const Outcome k = r.run(killed, cfg, {{"QT_FAULT_KILL_DURING_SAVE", "4:optimizer"}});
  ASSERT_EQ(k.signal, SIGKILL) << "exit " << k.exit_code << "\n" << k.output;
  EXPECT_EQ(qt::validate_checkpoint((killed / "checkpoint-2").string()).global_step, 2);
  EXPECT_EQ(qt::list_checkpoints(killed.string()), (std::vector<std::string>{"checkpoint-2"}));
  EXPECT_TRUE(hidden_leftovers(killed));  // the half-written .checkpoint-4.tmp-PID
  EXPECT_EQ(qt::find_resume_checkpoint(killed.string()).dir, (killed / "checkpoint-2").string());

  std::vector<std::string> resume = cfg;
  resume.push_back("--resume");
  const Outcome res = r.run(killed, resume);
  ASSERT_EQ(res.exit_code, 0) << res.output;
  EXPECT_TRUE(has(res.output, "resumed from " + (killed / "checkpoint-2").string())) << res.output;
  expect_same_training(full, killed, 2);  // logged steps 3 and 6
  EXPECT_FALSE(hidden_leftovers(killed));
  EXPECT_EQ(qt::list_checkpoints(killed.string()), (std::vector<std::string>{"checkpoint-4", "checkpoint-6"}));

  // A corrupted newest checkpoint: named explicitly it is refused; otherwise the previous one is used.
  const fs::path bad = killed / "checkpoint-6" / "adapter_model.safetensors";
  {
    std::fstream io(bad, std::ios::in | std::ios::out | std::ios::binary);
    const auto at = std::streamoff(fs::file_size(bad) - 3);
    io.seekg(at);
    const char c = char(io.get() ^ 0x01);
    io.seekp(at);
    io.put(c);
  }
  std::vector<std::string> named = cfg;
  named.insert(named.end(), {"--resume", (killed / "checkpoint-6").string()});
  const Outcome n = r.run(killed, named);
  EXPECT_EQ(n.exit_code, 1);
  EXPECT_TRUE(has(n.output, "adapter_model.safetensors does not match its recorded SHA-256")) << n.output;
  const Outcome fb = r.run(killed, resume);
  ASSERT_EQ(fb.exit_code, 0) << fb.output;
  EXPECT_TRUE(has(fb.output, "skipping checkpoint-6")) << fb.output;
  EXPECT_TRUE(has(fb.output, "resumed from " + (killed / "checkpoint-4").string())) << fb.output;
  expect_same_training(full, killed, 2);
}

TEST(CheckpointResume, KillBeforeTheRenameLeavesNothingThatLooksValid) {
  TempDir tmp("kill_rename");
  Runner r(tmp.path);
  const std::vector<std::string> cfg = {"--save_steps", "2", "--max_steps", "4"};
  const fs::path out = tmp.path / "out";
  const Outcome k = r.run(out, cfg, {{"QT_FAULT_KILL_DURING_SAVE", "2:state"}});
  ASSERT_EQ(k.signal, SIGKILL) << k.output;
  // The temporary folder is complete (trainer_state.json and all) but is never taken for a checkpoint.
  bool complete_tmp = false;
  for (const auto& e : fs::directory_iterator(out))
    if (e.path().filename().string().rfind(".checkpoint-2.tmp-", 0) == 0)
      complete_tmp = fs::exists(e.path() / "trainer_state.json");
  EXPECT_TRUE(complete_tmp);
  EXPECT_TRUE(qt::list_checkpoints(out.string()).empty());
  std::vector<std::string> resume = cfg;
  resume.push_back("--resume");
  const Outcome res = r.run(out, resume);
  EXPECT_EQ(res.exit_code, 1);
  EXPECT_TRUE(has(res.output, "no checkpoint to resume from")) << res.output;
}

// Waits for the first metrics line of a run writing to `out`: its loop (and signal handler) is running.
void wait_for_first_metrics(const fs::path& out) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (read_file(out / "metrics.jsonl").find('\n') == std::string::npos &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
}

TEST(CheckpointResume, SigintSavesACheckpointAndExits130) {
  TempDir tmp("sigint");
  Runner r(tmp.path);
  const fs::path out = tmp.path / "out", log = tmp.path / "sigint.txt";
  const std::vector<std::string> cfg = {"--max_steps", "200"};
  const pid_t pid = r.start(out, cfg, log);
  ASSERT_GT(pid, 0);
  wait_for_first_metrics(out);
  ASSERT_EQ(::kill(pid, SIGINT), 0);
  const Outcome o = wait_for(pid, log);
  ASSERT_EQ(o.exit_code, 130) << "signal " << o.signal << "\n" << o.output;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(o.output, m, std::regex("interrupted at step (\\d+): saved (\\S+); continue with --resume")))
      << o.output;
  const int64_t step = std::stoll(m[1].str());
  EXPECT_GE(step, 1);
  EXPECT_LT(step, 200);
  EXPECT_EQ(m[2].str(), (out / fmt::format("checkpoint-{}", step)).string());
  EXPECT_EQ(qt::validate_checkpoint(m[2].str()).global_step, step);
  EXPECT_FALSE(fs::exists(out / "adapter_model.safetensors"));

  // It continues from there; --stop-after-steps counts the steps of this run.
  std::vector<std::string> resume = cfg;
  resume.insert(resume.end(), {"--resume", "--stop-after-steps", "1"});
  const Outcome res = r.run(out, resume);
  ASSERT_EQ(res.exit_code, 0) << res.output;
  EXPECT_TRUE(has(res.output, fmt::format("resumed from {} at step {}/200", m[2].str(), step))) << res.output;
  EXPECT_TRUE(fs::exists(out / fmt::format("checkpoint-{}", step + 1))) << res.output;
}

}  // namespace
