// qwentune bench: step time of LoRA training on random weights of a config's shape.
// Prints one JSON line: median step time, tokens/s, peak memory. On the CPU a step is forward +
// backward to the LoRA gradients (the optimizer arrives with the trainer).
#include <algorithm>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "model/decoder.h"

namespace qt::cli {

namespace {

struct BenchArgs {
  std::string config;
  int64_t batch = 1, seq = 256, lora_r = 16, steps = 5, warmup = 1;
  double lora_alpha = 16;
  std::string targets = "all", device = "cpu";
  uint64_t seed = 0;
};

double peak_rss_gib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / (1024.0 * 1024.0);  // kB -> GiB
  return 0;
}

void run_bench(const BenchArgs& a) {
  if (a.device != "cpu") fail("bench", "device '{}' is not available in this build; use --device cpu", a.device);
  if (a.batch <= 0 || a.seq <= 0 || a.steps <= 0) fail("bench", "--batch, --seq and --steps must be positive");
  ModelConfig cfg = load_hf_config(a.config);
  ModelWeights w = random_model_weights(cfg, DType::F32, a.seed);
  LoraConfig lc;
  lc.r = a.lora_r;
  lc.alpha = a.lora_alpha;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  if (a.targets == "all") lc.target_modules.insert(lc.target_modules.end(), {"gate_proj", "up_proj", "down_proj"});
  LoraAdapter lora = init_lora(cfg, lc, DType::F32, a.seed + 1);
  // PEFT starts B at zero; a non-zero B makes the benchmark exercise every LoRA path like mid-training.
  std::mt19937_64 rng(a.seed + 2);
  std::normal_distribution<float> nd(0.f, 0.01f);
  for (auto& layer : lora.layers)
    for (auto& p : layer.slot)
      if (p.present())
        for (int64_t i = 0; i < p.B.numel(); ++i) p.B.data<float>()[i] = nd(rng);

  Batch b;
  b.B = a.batch;
  b.S = a.seq;
  std::uniform_int_distribution<int32_t> tok(0, int32_t(cfg.vocab_size - 1));
  for (int64_t i = 0; i < a.batch * a.seq; ++i) b.input_ids.push_back(tok(rng));
  b.labels = b.input_ids;

  QwenDecoder<float> dec(w, &lora);
  LoraAdapter grads = lora.zeros_like();
  std::vector<double> times;
  double loss = 0;
  for (int64_t s = 0; s < a.warmup + a.steps; ++s) {
    auto t0 = std::chrono::steady_clock::now();
    loss = dec.forward_backward(b, &grads, false).loss();
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s >= a.warmup) times.push_back(dt);
  }
  std::sort(times.begin(), times.end());
  double med = times[times.size() / 2];
  nlohmann::json out = {{"config", a.config},       {"device", a.device},
                        {"batch", a.batch},         {"seq", a.seq},
                        {"lora_targets", a.targets}, {"lora_r", a.lora_r},
                        {"step", "forward+backward"}, {"median_step_s", med},
                        {"tokens_per_s", double(a.batch * a.seq) / med}, {"peak_host_gib", peak_rss_gib()},
                        {"loss", loss}};
  fmt::print("{}\n", out.dump());
}

}  // namespace

void register_bench_command(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  auto* c = app.add_subcommand("bench", "Time LoRA training steps on random weights of a config's shape");
  c->add_option("--config", a->config, "HF config.json (or a directory holding one)")->required();
  c->add_option("--batch", a->batch, "Micro-batch size")->capture_default_str();
  c->add_option("--seq", a->seq, "Sequence length")->capture_default_str();
  c->add_option("--lora-targets", a->targets, "all (q,k,v,o,gate,up,down) or attn (q,k,v,o)")
      ->check(CLI::IsMember({"all", "attn"}))
      ->capture_default_str();
  c->add_option("--lora-r", a->lora_r, "LoRA rank")->capture_default_str();
  c->add_option("--lora-alpha", a->lora_alpha, "LoRA alpha")->capture_default_str();
  c->add_option("--steps", a->steps, "Timed steps (median reported)")->capture_default_str();
  c->add_option("--warmup", a->warmup, "Untimed first steps")->capture_default_str();
  c->add_option("--device", a->device, "cpu (the CUDA backend is not built yet)")->capture_default_str();
  c->add_option("--seed", a->seed, "Seed for weights and tokens")->capture_default_str();
  c->callback([a] { run_bench(*a); });
}

}  // namespace qt::cli
