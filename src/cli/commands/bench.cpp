// qwentune bench: step time of LoRA training on random weights of a config's shape.
// Prints one JSON line: median step time, tokens/s, peak memory. On the CPU a step is forward +
// backward to the LoRA gradients (the optimizer arrives with the trainer). --load-in-4bit (QLoRA):
// the projections are NF4 (on the GPU quantized on the device and kept in NF4, dequantized per layer;
// on the CPU the NF4 round trip of model/weights_4bit.h).
#include <algorithm>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include <unistd.h>

#include <filesystem>

#include "cli/commands/commands.h"
#include "cli/commands/launch.h"
#include "dist/dist_env.h"
#include "dist/rendezvous.h"
#include "train/train_engine.h"
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
  std::optional<bool> offload_embeddings;  // unset: train's default (resolve_embeddings_on_host)
  bool offload_activations = false;        // the saved layer inputs in pinned host memory
  bool offload_lora = false;               // LoRA masters, gradients and AdamW moments in pinned host memory
  int64_t nf4_expert_chunk = 0;            // with --load-in-4bit: MoE experts dequantized this many at a time
  int gpus = 0;  // 0: the single-process benchmark; N >= 1: N data-parallel ranks through the engine
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

CudaOffload bench_offload(const BenchArgs& a, const ModelConfig& cfg) {
  return {.embeddings = resolve_embeddings_on_host(a.offload_embeddings, cfg, a.load_in_4bit),
          .layer_inputs = a.offload_activations,
          .lora_states = a.offload_lora,
          .expert_chunk = a.nf4_expert_chunk};
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
  const CudaOffload off = bench_offload(a, cfg);
  CudaDecoder dec(ctx, cfg, bench_lora_config(a), a.seed, a.load_in_4bit,
                  {.training = true,
                   .embeddings_on_host = off.embeddings,
                   .layer_inputs_on_host = off.layer_inputs,
                   .lora_states_on_host = off.lora_states,
                   .nf4_expert_chunk = off.expert_chunk});
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
                        {"embeddings_on_host", dec.embeddings_on_host()},
                        {"layer_inputs_on_host", dec.layer_inputs_on_host()},
                        {"lora_states_on_host", dec.lora_states_on_host()},
                        {"nf4_expert_chunk", a.load_in_4bit ? a.nf4_expert_chunk : 0},
                        {"step", "forward+backward(recompute)+clip+adamw"},
                        {"median_step_s", med},
                        {"tokens_per_s", double(a.batch * a.seq) / med},
                        {"peak_gpu_gib", double(free0 - min_free) / gib},
                        {"decoder_buffers_gib", double(dec.device_bytes()) / gib},
                        {"loss", dec.loss_sum() / double(dec.count())}};
  fmt::print("{}\n", out.dump());
}
#endif

// Data parallelism (`--gpus N`, or one rank of a torchrun-style job): every rank trains its own
// random micro-batch through the CUDA training engine (gradients all-reduced over NCCL in buckets
// during the backward); the step time (host clock around begin_step .. finish_step, which ends with
// the step's one synchronisation) is the same on every rank. Rank 0 prints the JSON line; weak
// scaling efficiency = tokens_per_s(N) / (N * tokens_per_s(1)) with `--gpus 1` as the baseline
// (the same code path with one rank).
void run_bench_ranks(const BenchArgs& a, const ModelConfig& cfg, const dist::DistEnv& de) {
  std::unique_ptr<dist::Rendezvous> rv;
  if (de.distributed()) {
    dist::RendezvousOptions ro;
    ro.rank = de.rank, ro.world_size = de.world_size, ro.master_addr = de.master_addr, ro.master_port = de.master_port;
    ro.op_timeout_s = 3600;
    rv = std::make_unique<dist::Rendezvous>(ro);
  }
  DataParallel dp;
  dp.rank = de.rank, dp.world_size = de.world_size, dp.local_rank = de.local_rank, dp.rv = rv.get();
#ifdef QT_HAVE_CUDA
  if (cuda::device_count() <= de.local_rank)
    fail("bench", "local rank {} needs {} visible CUDA device(s), {} visible", de.local_rank, de.local_rank + 1,
         cuda::device_count());
  QT_CUDA_CHECK(cudaSetDevice(de.local_rank));
  size_t free0 = 0, total = 0, min_free = 0;
  QT_CUDA_CHECK(cudaMemGetInfo(&free0, &total));
  min_free = free0;
#endif
  auto engine = make_cuda_bench_engine(cfg, bench_lora_config(a), a.seed, a.load_in_4bit, dp, bench_offload(a, cfg));
  std::mt19937_64 rng(a.seed + 2 + uint64_t(de.rank));  // each rank its own tokens
  const Batch b = random_batch(a, cfg.vocab_size, rng);
  const double scale = 1.0 / double(b.predicted_tokens() * de.world_size);
  std::vector<double> times;
  double loss = 0;
  for (int64_t s = 0; s < a.warmup + a.steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    engine->begin_step(1);
    engine->accumulate(b, scale, {});
    loss = engine->finish_step(1e-4, 1.0).loss_sum * scale;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
#ifdef QT_HAVE_CUDA
    size_t f = 0;
    QT_CUDA_CHECK(cudaMemGetInfo(&f, &total));
    min_free = std::min(min_free, f);
#endif
    if (s >= a.warmup) times.push_back(dt);
  }
  const double med = median(times);
  double peak = 0;
#ifdef QT_HAVE_CUDA
  peak = double(free0 - min_free) / (1024.0 * 1024.0 * 1024.0);
#endif
  if (de.is_rank0()) {
    const double tps = double(de.world_size * a.batch * a.seq) / med;
    nlohmann::json out = {{"config", a.config},       {"device", "cuda"},
                          {"world_size", de.world_size}, {"batch_per_gpu", a.batch},
                          {"seq", a.seq},             {"lora_targets", a.targets},
                          {"lora_r", a.lora_r},       {"load_in_4bit", a.load_in_4bit},
                          {"step", "engine: forward+backward(recompute)+all-reduce+clip+adamw"},
                          {"median_step_s", med},     {"tokens_per_s", tps},
                          {"tokens_per_s_per_gpu", tps / double(de.world_size)},
                          {"peak_gpu_gib_rank0", peak}, {"loss", loss}};
    fmt::print("{}\n", out.dump());
  }
  if (rv) rv->shutdown();
}

void run_bench(const BenchArgs& a) {
  if (a.device != "cpu" && a.device != "cuda") fail("bench", "unknown --device '{}' (cpu or cuda)", a.device);
  if (a.batch <= 0 || a.seq <= 0 || a.steps <= 0) fail("bench", "--batch, --seq and --steps must be positive");
  ModelConfig cfg = load_hf_config(a.config);
  const dist::DistEnv de = dist::read_dist_env();
  if (a.gpus != 0 || de.distributed()) {
    if (a.device != "cuda") fail("bench", "--gpus / a multi-process job: needs --device cuda");
    if (a.gpus < 0) fail("bench", "--gpus {}: must be at least 1", a.gpus);
    if (a.gpus > 1 && !de.distributed()) {  // start the ranks (this command without --gpus, as torchrun would)
      // the ranks take the data-parallel path (--gpus again; the world from the environment)
      std::exit(launch_self_as_ranks(
          a.gpus, (std::filesystem::temp_directory_path() / ("qwentune-bench-" + std::to_string(::getpid()))).string(),
          {"--gpus", std::to_string(a.gpus)}));
    }
    run_bench_ranks(a, cfg, de);
    return;
  }
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
  c->add_option("--gpus", a->gpus,
                "Data-parallel benchmark on N local GPUs through the training engine (N = 1: the same path, one "
                "rank: the weak-scaling baseline); prints global and per-GPU tokens/s");
  c->add_flag("--load-in-4bit", a->load_in_4bit, "QLoRA: the decoder projections in NF4 (kept in NF4 on the GPU)");
  c->add_option("--offload-embeddings", a->offload_embeddings,
                "true|false: the input embedding table in pinned host memory (default: true with --load-in-4bit, "
                "never for tied embeddings)");
  c->add_flag("--offload-activations", a->offload_activations,
              "The saved layer inputs (activation checkpoints) in pinned host memory");
  c->add_flag("--offload-lora", a->offload_lora,
              "The LoRA masters, gradients and AdamW moments in pinned host memory (one GPU)");
  c->add_option("--nf4-expert-chunk", a->nf4_expert_chunk,
                "With --load-in-4bit: dequantize a MoE layer's experts this many at a time (0: the whole layer)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c->callback([a] { run_bench(*a); });
}

}  // namespace qt::cli
