// Checkpoints without training: the atomic writer and the validating loader (train/checkpoint.h).
// A checkpoint of a small MoE adapter and a stepped AdamW round-trips bit-exactly; a flipped byte, a
// truncated or missing file, or a broken trainer_state.json is refused with a message naming it;
// the resume search falls back to the newest valid checkpoint and ignores hidden temporaries;
// save_total_limit keeps the newest; fingerprints name every differing key; metrics.jsonl is cut
// back to a step; the stop-signal guard flags the first signal and exits on the second. (tests/test_checkpoint_resume.cpp runs the real binary: resume equality, kill
// during a save, Ctrl-C.)
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/hf_config.h"
#include "model/lora.h"
#include "train/checkpoint.h"
#include "train/interrupt.h"
#include "train/optimizer.h"
#include "test_files.h"

using namespace qt;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using qt::test::TempDir;

// Layer 0 MoE (E=3, I=5), layer 1 dense (I=10); H=8.
ModelConfig small_moe() {
  json j{{"model_type", "qwen3_moe"}, {"vocab_size", 11},           {"hidden_size", 8},
         {"intermediate_size", 10},   {"num_hidden_layers", 2},     {"num_attention_heads", 2},
         {"num_key_value_heads", 1},  {"head_dim", 6},              {"num_experts", 3},
         {"num_experts_per_tok", 2},  {"moe_intermediate_size", 5}, {"mlp_only_layers", {1}}};
  return parse_hf_config_json(j.dump(), "test");
}

LoraConfig lora_cfg() {
  LoraConfig c;
  c.r = 2;
  c.alpha = 4;
  c.target_modules = {"q_proj", "v_proj", "up_proj"};
  return c;
}

// An adapter with B moved off zero and an AdamW with non-zero moments: `steps` updates with
// deterministic pseudo-random gradients.
struct Trained {
  ModelConfig mcfg = small_moe();
  LoraAdapter lora = init_lora(mcfg, lora_cfg(), DType::F32, 5);
  AdamW opt{lora, AdamWConfig{}};
  explicit Trained(int steps) {
    LoraAdapter g = lora.zeros_like();
    uint32_t x = 12345;
    for (int s = 0; s < steps; ++s) {
      for (auto& layer : g.layers)
        for (auto& p : layer.slot)
          if (p.present())
            for (Tensor* t : {&p.A, &p.B})
              for (int64_t i = 0; i < t->numel(); ++i) {
                x = x * 1664525u + 1013904223u;
                t->data<float>()[i] = float(int32_t(x >> 8) % 2001 - 1000) * 1e-3f;
              }
      opt.step(lora, g, 1e-2);
    }
  }
};

TrainerState state_at(int64_t step) {
  TrainerState st;
  st.global_step = step;
  st.total_steps = 10;
  st.epoch = 1;
  st.batch_in_epoch = 2;
  st.optimizer_step = step - 1;
  st.seed = 7;
  st.steps_done = step - 1;
  st.steps_skipped = 1;
  st.first_loss = 11.9;
  st.last_loss = 0.1 + 0.2;  // not exactly representable in a short decimal
  st.loss_since_log = 1.0 / 3.0;
  st.steps_since_log = 1;
  st.tokens_since_log = 64;
  st.elapsed_s = 2.5;
  for (int64_t s = 1; s < step; ++s) st.train_loss.push_back({s, 12.0 / double(s) + 1e-17 * double(s)});
  st.eval_loss.push_back({2, std::nextafter(3.0, 4.0)});
  st.fingerprint = {{"seed", 7}, {"lora_r", 2}};
  return st;
}

std::string save(const std::string& out, int64_t step, int64_t limit = 0) {
  Trained t(int(step - 1));
  return save_checkpoint(out, t.lora, t.mcfg, t.opt, state_at(step), limit);
}

void flip_byte(const fs::path& p, size_t offset) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << p;
  f.seekg(std::streamoff(offset));
  char c = 0;
  f.read(&c, 1);
  c = char(c ^ 0x10);
  f.seekp(std::streamoff(offset));
  f.write(&c, 1);
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool tensors_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

TEST(Checkpoint, RoundTripIsBitExact) {
  TempDir tmp("roundtrip");
  Trained t(3);
  const TrainerState st = state_at(4);
  const std::string dir = save_checkpoint(tmp.str(), t.lora, t.mcfg, t.opt, st, 0);
  EXPECT_EQ(dir, (tmp.path / "checkpoint-4").string());
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"})
    EXPECT_TRUE(fs::exists(fs::path(dir) / f)) << f;

  const TrainerState got = validate_checkpoint(dir);
  EXPECT_EQ(got.global_step, 4);
  EXPECT_EQ(got.total_steps, 10);
  EXPECT_EQ(got.epoch, 1);
  EXPECT_EQ(got.batch_in_epoch, 2);
  EXPECT_EQ(got.optimizer_step, 3);  // from AdamW itself
  EXPECT_EQ(got.steps_skipped, 1);
  EXPECT_EQ(got.last_loss, st.last_loss);
  EXPECT_EQ(got.loss_since_log, st.loss_since_log);
  EXPECT_EQ(got.tokens_since_log, 64);
  EXPECT_EQ(got.train_loss, st.train_loss);  // doubles survive the JSON text exactly
  EXPECT_EQ(got.eval_loss, st.eval_loss);
  EXPECT_EQ(got.fingerprint, st.fingerprint);

  // The checkpoint is a PEFT adapter on its own.
  const LoraAdapter as_adapter = load_peft_adapter(dir, t.mcfg, DType::F32);
  EXPECT_TRUE(tensors_equal(as_adapter.layers[0].slot[kLoraUp].A, t.lora.layers[0].slot[kLoraUp].A));

  // Restoring into a fresh adapter and optimizer gives the same bits, and the same next update.
  Trained fresh(0);
  load_checkpoint_weights({dir, got}, fresh.mcfg, fresh.lora, fresh.opt);
  EXPECT_EQ(fresh.opt.step_count(), 3);
  for (size_t l = 0; l < t.lora.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const LoraPair& a = t.lora.layers[l].slot[size_t(s)];
      const LoraPair& b = fresh.lora.layers[l].slot[size_t(s)];
      ASSERT_EQ(a.present(), b.present());
      if (!a.present()) continue;
      EXPECT_TRUE(tensors_equal(a.A, b.A) && tensors_equal(a.B, b.B)) << "layer " << l << " slot " << s;
    }
  const OptimizerState sa = t.opt.state(), sb = fresh.opt.state();
  ASSERT_EQ(sa.tensors.size(), sb.tensors.size());
  for (size_t i = 0; i < sa.tensors.size(); ++i) {
    EXPECT_EQ(sa.tensors[i].first, sb.tensors[i].first);
    EXPECT_TRUE(tensors_equal(sa.tensors[i].second, sb.tensors[i].second)) << sa.tensors[i].first;
  }
}

TEST(Checkpoint, DamagedFilesAreRefusedNamingThem) {
  TempDir tmp("damaged");
  const fs::path dir = save(tmp.str(), 3);
  ASSERT_NO_THROW(validate_checkpoint(dir.string()));
  const fs::path keep = tmp.path / "pristine";
  fs::copy(dir, keep);
  auto restore = [&] {
    fs::remove_all(dir);
    fs::copy(keep, dir);
  };
  for (const char* f : {"adapter_model.safetensors", "optimizer.safetensors", "adapter_config.json"}) {
    flip_byte(dir / f, fs::file_size(dir / f) / 2);
    const std::string e = error_of([&] { validate_checkpoint(dir.string()); });
    EXPECT_NE(e.find(f), std::string::npos) << e;
    EXPECT_NE(e.find("SHA-256"), std::string::npos) << e;
    restore();
  }
  fs::resize_file(dir / "optimizer.safetensors", fs::file_size(dir / "optimizer.safetensors") - 4);
  EXPECT_NE(error_of([&] { validate_checkpoint(dir.string()); }).find("bytes"), std::string::npos);
  restore();
  fs::remove(dir / "adapter_model.safetensors");
  EXPECT_NE(error_of([&] { validate_checkpoint(dir.string()); }).find("adapter_model.safetensors is missing"),
            std::string::npos);
  restore();
  fs::remove(dir / "trainer_state.json");
  EXPECT_NE(error_of([&] { validate_checkpoint(dir.string()); }).find("no readable trainer_state.json"),
            std::string::npos);
  restore();
  fs::resize_file(dir / "trainer_state.json", fs::file_size(dir / "trainer_state.json") / 2);  // torn write
  EXPECT_NE(error_of([&] { validate_checkpoint(dir.string()); }).find("does not parse"), std::string::npos);
  restore();
  // A state that lists no optimizer file, and one whose counters contradict each other.
  auto edit_state = [&](const std::function<void(json&)>& fn) {
    std::ifstream in(dir / "trainer_state.json");
    json j = json::parse(in);
    in.close();
    fn(j);
    std::ofstream(dir / "trainer_state.json") << j.dump();
  };
  edit_state([](json& j) { j["files"].erase("optimizer.safetensors"); });
  EXPECT_NE(error_of([&] { validate_checkpoint(dir.string()); }).find("does not list optimizer.safetensors"),
            std::string::npos);
  restore();
  edit_state([](json& j) { j["files"]["../escape"] = {{"size", 1}, {"sha256", "00"}}; });
  EXPECT_NE(error_of([&] { validate_checkpoint(dir.string()); }).find("bad file name"), std::string::npos);
  restore();
  edit_state([](json& j) { j["steps_done"] = 99; });
  EXPECT_NE(error_of([&] { validate_checkpoint(dir.string()); }).find("inconsistent counters"), std::string::npos);
  restore();
  fs::rename(dir, tmp.path / "checkpoint-5");  // a name that disagrees with the state
  EXPECT_NE(error_of([&] { validate_checkpoint((tmp.path / "checkpoint-5").string()); }).find("named for step 5"),
            std::string::npos);
}

TEST(Checkpoint, ResumeSearchFallsBackToTheNewestValid) {
  TempDir tmp("search");
  EXPECT_NE(error_of([&] { find_resume_checkpoint(tmp.str()); }).find("no checkpoint to resume from"),
            std::string::npos);
  save(tmp.str(), 2);
  save(tmp.str(), 3);
  const std::string c4 = save(tmp.str(), 4);
  EXPECT_EQ(find_resume_checkpoint(tmp.str()).dir, c4);
  flip_byte(fs::path(c4) / "optimizer.safetensors", 100);
  // A complete-looking but hidden temporary of a later step (a save killed before its rename).
  fs::copy(tmp.path / "checkpoint-3", tmp.path / ".checkpoint-9.tmp-12345");
  const ResumePoint rp = find_resume_checkpoint(tmp.str());
  EXPECT_EQ(rp.dir, (tmp.path / "checkpoint-3").string());
  EXPECT_EQ(rp.state.global_step, 3);
  // The next save removes the leftover; a bad checkpoint alone is reported as such.
  save(tmp.str(), 5);
  EXPECT_FALSE(fs::exists(tmp.path / ".checkpoint-9.tmp-12345"));
  for (const char* n : {"checkpoint-2", "checkpoint-3", "checkpoint-5"}) fs::remove_all(tmp.path / n);
  EXPECT_NE(error_of([&] { find_resume_checkpoint(tmp.str()); }).find("none valid"), std::string::npos);
}

TEST(Checkpoint, TotalLimitKeepsTheNewestAndSameStepIsReplaced) {
  TempDir tmp("limit");
  for (int64_t s = 1; s <= 4; ++s) save(tmp.str(), s, 2);
  EXPECT_EQ(list_checkpoints(tmp.str()), (std::vector<std::string>{"checkpoint-3", "checkpoint-4"}));
  // Writing an older step (a resume from an explicit older checkpoint) never deletes what was just written.
  save(tmp.str(), 1, 2);
  EXPECT_EQ(list_checkpoints(tmp.str()), (std::vector<std::string>{"checkpoint-1", "checkpoint-4"}));
  // A second save of step 4 replaces the first one whole.
  Trained t(3);
  TrainerState st = state_at(4);
  st.last_loss = 42.0;
  save_checkpoint(tmp.str(), t.lora, t.mcfg, t.opt, st, 2);
  EXPECT_EQ(validate_checkpoint((tmp.path / "checkpoint-4").string()).last_loss, 42.0);
  for (const auto& e : fs::directory_iterator(tmp.path))
    EXPECT_EQ(e.path().filename().string().rfind(".checkpoint-", 0), std::string::npos) << e.path();
}

TEST(Checkpoint, FingerprintMismatchNamesEveryKey) {
  const json saved = {{"seed", 7}, {"lora_r", 8}, {"sequence_len", 64}, {"old_key", 1}};
  const json now = {{"seed", 8}, {"lora_r", 8}, {"sequence_len", 128}};
  const std::string e = error_of([&] { check_fingerprint(saved, now, "out/checkpoint-3"); });
  EXPECT_NE(e.find("out/checkpoint-3"), std::string::npos) << e;
  EXPECT_NE(e.find("seed (checkpoint 7, now 8)"), std::string::npos) << e;
  EXPECT_NE(e.find("sequence_len (checkpoint 64, now 128)"), std::string::npos) << e;
  EXPECT_NE(e.find("old_key (checkpoint 1, now (absent))"), std::string::npos) << e;
  EXPECT_EQ(e.find("lora_r"), std::string::npos) << e;
  EXPECT_NO_THROW(check_fingerprint(now, now, "x"));
}

TEST(Checkpoint, NamesAndMetricsTruncation) {
  EXPECT_EQ(checkpoint_step_from_name("checkpoint-12"), 12);
  EXPECT_EQ(checkpoint_step_from_name("checkpoint-0"), 0);
  for (const char* bad : {"checkpoint-", "checkpoint-1a", "checkpoint--1", "checkpoint-99999999999999999999",
                          ".checkpoint-3.tmp-1", "ckpt-3"})
    EXPECT_EQ(checkpoint_step_from_name(bad), -1) << bad;

  TempDir tmp("metrics");
  const fs::path m = tmp.path / "metrics.jsonl";
  std::ofstream(m) << R"({"type":"train","step":1,"loss":3.0})" "\n"
                   << R"({"type":"train","step":2,"loss":2.0})" "\n"
                   << R"({"type":"eval","step":2,"eval_loss":2.5})" "\n"
                   << R"({"type":"train","step":3,"loss":1.0})" "\n"
                   << R"({"type":"train","st)";  // torn by a kill
  truncate_metrics(m.string(), 2);
  std::ifstream in(m);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), R"({"type":"train","step":1,"loss":3.0})" "\n"
                      R"({"type":"train","step":2,"loss":2.0})" "\n"
                      R"({"type":"eval","step":2,"eval_loss":2.5})" "\n");
  truncate_metrics((tmp.path / "none.jsonl").string(), 2);
  EXPECT_FALSE(fs::exists(tmp.path / "none.jsonl"));
}

TEST(StopSignal, FirstSignalIsAFlagSecondExitsAt128PlusSignal) {
  // In a child: signals raised with raise() are handled before it returns, so this is deterministic.
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    {
      const StopSignalGuard guard;
      if (stop_signal() != 0) ::_exit(10);
      std::raise(SIGTERM);
      if (stop_signal() != SIGTERM) ::_exit(11);
    }
    if (stop_signal() != SIGTERM) ::_exit(12);  // the flag outlives the guard; the handler does not
    const StopSignalGuard again;
    if (stop_signal() != 0) ::_exit(13);
    std::raise(SIGINT);
    std::raise(SIGINT);
    ::_exit(14);  // not reached: the second signal exits
  }
  int st = 0;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFEXITED(st)) << "killed by signal " << (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  EXPECT_EQ(WEXITSTATUS(st), 130);

  // Outside any guard the previous disposition is back: here SIGTERM's default kills the child.
  const pid_t pid2 = ::fork();
  ASSERT_GE(pid2, 0);
  if (pid2 == 0) {
    { const StopSignalGuard guard; }
    std::raise(SIGTERM);
    ::_exit(0);
  }
  ASSERT_EQ(::waitpid(pid2, &st, 0), pid2);
  EXPECT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM);
}

}  // namespace
