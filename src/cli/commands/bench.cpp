// qwentune bench: step time of LoRA training on random weights of a config's shape.
// Prints one JSON line: median step time, tokens/s, peak memory. On the CPU a step is forward +
// backward to the LoRA gradients (the optimizer arrives with the trainer). --load-in-4bit (QLoRA):
// the projections are NF4 (on the GPU quantized on the device and kept in NF4, dequantized per layer;
// on the CPU the NF4 round trip of model/weights_4bit.h).
#include <algorithm>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "model/decoder.h"
#include "model/weights_4bit.h"
#ifdef QT_HAVE_CUDA
#include "model/cuda_decoder.h"
#include "ops/cuda/runtime.h"
#endif

namespace qt::cli {

namespace {

struct BenchArgs {
  std::string config;
  int64_t batch = 1, seq = 256, lora_r = 16, steps = 5, warmup = 1;
  double lora_alpha = 16;
  std::string targets = "all", device = "cpu";
  uint64_t seed = 0;
  bool load_in_4bit = false;
};

double peak_rss_gib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / (1024.0 * 1024.0);  // kB -> GiB
  return 0;
}

LoraConfig bench_lora_config(const BenchArgs& a) {
  LoraConfig lc;
  lc.r = a.lora_r;
  lc.alpha = a.lora_alpha;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  if (a.targets == "all") lc.target_modules.insert(lc.target_modules.end(), {"gate_proj", "up_proj", "down_proj"});
  lc.validate();
  return lc;
}

Batch random_batch(const BenchArgs& a, int64_t vocab, std::mt19937_64& rng) {
  Batch b;
  b.B = a.batch;
  b.S = a.seq;
  std::uniform_int_distribution<int32_t> tok(0, int32_t(vocab - 1));
  for (int64_t i = 0; i < a.batch * a.seq; ++i) b.input_ids.push_back(tok(rng));
  b.labels = b.input_ids;
  return b;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

#ifdef QT_HAVE_CUDA
// A step on the GPU: forward + backward (per-layer recompute) + clip + AdamW, timed with events
// around the step (no host synchronisation inside it; one after it to read the timer).
void run_bench_cuda(const BenchArgs& a, const ModelConfig& cfg) {
  if (cuda::device_count() == 0) fail("bench", "--device cuda: no CUDA device is visible");
  size_t free0 = 0, total = 0;
  QT_CUDA_CHECK(cudaMemGetInfo(&free0, &total));
  cuda::Context ctx;
  CudaDecoder dec(ctx, cfg, bench_lora_config(a), a.seed, a.load_in_4bit);
  std::mt19937_64 rng(a.seed + 2);
  dec.set_batch(random_batch(a, cfg.vocab_size, rng));
  cuda::Event t0, t1;
  std::vector<double> times;
  size_t min_free = free0;
  for (int64_t s = 0; s < a.warmup + a.steps; ++s) {
    t0.record(ctx.stream());
    dec.zero_grads();
    dec.forward_backward();
    dec.optimizer_step(s + 1, 1e-4, 0.0, 1.0);
    t1.record(ctx.stream());
    t1.synchronize();
    size_t f = 0;
    QT_CUDA_CHECK(cudaMemGetInfo(&f, &total));
    min_free = std::min(min_free, f);
    if (s >= a.warmup) times.push_back(t1.elapsed_since(t0) / 1000.0);
  }
  const double med = median(times);
  const double gib = 1024.0 * 1024.0 * 1024.0;
  nlohmann::json out = {{"config", a.config},
                        {"device", "cuda"},
                        {"batch", a.batch},
                        {"seq", a.seq},
                        {"lora_targets", a.targets},
                        {"lora_r", a.lora_r},
                        {"load_in_4bit", a.load_in_4bit},
                        {"step", "forward+backward(recompute)+clip+adamw"},
                        {"median_step_s", med},
                        {"tokens_per_s", double(a.batch * a.seq) / med},
                        {"peak_gpu_gib", double(free0 - min_free) / gib},
                        {"decoder_buffers_gib", double(dec.device_bytes()) / gib},
                        {"loss", dec.loss_sum() / double(dec.count())}};
  fmt::print("{}\n", out.dump());
}
#endif

void run_bench(const BenchArgs& a) {
  if (a.device != "cpu" && a.device != "cuda") fail("bench", "unknown --device '{}' (cpu or cuda)", a.device);
  if (a.batch <= 0 || a.seq <= 0 || a.steps <= 0) fail("bench", "--batch, --seq and --steps must be positive");
  ModelConfig cfg = load_hf_config(a.config);
  if (a.device == "cuda") {
#ifdef QT_HAVE_CUDA
    run_bench_cuda(a, cfg);
    return;
#else
    fail("bench", "--device cuda: this build has no CUDA backend (configure with -DQT_CUDA=ON)");
#endif
  }
  ModelWeights w = random_model_weights(cfg, DType::F32, a.seed);
  if (a.load_in_4bit) nf4_round_trip_weights(w, DType::BF16);
  LoraAdapter lora = init_lora(cfg, bench_lora_config(a), DType::F32, a.seed + 1);
  // PEFT starts B at zero; a non-zero B makes the benchmark exercise every LoRA path like mid-training.
  std::mt19937_64 rng(a.seed + 2);
  std::normal_distribution<float> nd(0.f, 0.01f);
  for (auto& layer : lora.layers)
    for (auto& p : layer.slot)
      if (p.present())
        for (int64_t i = 0; i < p.B.numel(); ++i) p.B.data<float>()[i] = nd(rng);

  Batch b = random_batch(a, cfg.vocab_size, rng);

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
  double med = median(times);
  nlohmann::json out = {{"config", a.config},       {"device", a.device},
                        {"batch", a.batch},         {"seq", a.seq},
                        {"lora_targets", a.targets}, {"lora_r", a.lora_r},
                        {"load_in_4bit", a.load_in_4bit}, {"step", "forward+backward"}, {"median_step_s", med},
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
  c->add_option("--device", a->device, "cpu or cuda (cuda: builds with -DQT_CUDA=ON)")->capture_default_str();
  c->add_option("--seed", a->seed, "Seed for weights and tokens")->capture_default_str();
  c->add_flag("--load-in-4bit", a->load_in_4bit, "QLoRA: the decoder projections in NF4 (kept in NF4 on the GPU)");
  c->callback([a] { run_bench(*a); });
}

}  // namespace qt::cli
