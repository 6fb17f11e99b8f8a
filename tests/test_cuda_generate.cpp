// `generate --device cuda`: the CUDA KV-cache decoder (model/cuda_kv_decoder.h) and its attention
// kernel (ops/cuda attention_kv_forward) against the CPU (model/inference.h, cpu::attention_kv_forward).
//
//  - Kernel: n new queries over a cache of past + n keys, odd lengths, GQA ratios 1..8, head_dim
//    8..256, vs the CPU in float on the same bf16 inputs; cache rows past past + n hold NaN (never read).
//  - Decoder: tiny random models (Qwen2 with q/k/v bias and head_dim 128; Qwen3 with q/k norm and head_dim
//    64 != H/heads; Qwen3-MoE with a dense layer in between, 8 experts top-2), each without and with a
//    LoRA adapter on all seven modules (B != 0), and an NF4 base (dense and MoE). Both engines read the
//    same bf16-rounded weights (NF4: the dequantized values). The prompt runs in two chunks (the second
//    attends to a non-empty cache and returns every row's logits), then single-token decode steps.
//    Then truncate + the same appends again must give the same logits bit for bit, and a truncate into
//    the decoded part followed by other tokens must match the CPU doing the same (stale rows unread).
//    NF4 also equals the bf16 decoder on the dequantized weights bit for bit (as test_cuda_qlora).
//  - Greedy generation (model/generation.h's loop over the TokenDecoder interface): 16 tokens equal the
//    CPU's, for a prompt whose 16 CPU steps all have a clear top-2 gap (searched on the CPU, so the
//    check is deterministic: bf16 rounding cannot flip a clear choice, and a broken kernel does).
//
// Tolerances. The GPU keeps activations in bf16 (2^-9 relative per rounding, a dozen roundings per
// layer on the way to a logit) and LoRA's products on bf16 copies of the masters; the CPU is fp32
// throughout. test_cuda_decoder measured logits within a few 1e-3 relative for two layers, so each
// logits row must satisfy ||gpu - cpu||_2 / ||cpu||_2 < kRelL2 = 2e-2. A row's argmax must match where
// the CPU's top-2 gap is clear: gap > kClearGap = 0.1 * rms(cpu row), several times the largest
// element error the bound allows in practice (the tests print max |err| / rms). A wrong op (missing
// bias, LoRA or norm, a wrong RoPE position, a cache row off by one) moves logits by O(1) relative.
// Measured on the CPU, relative noise of 3e-3 on every weight (about twice the GPU's effective bf16
// noise) moves these models' rows by 0.9e-2 to 1.4e-2, so the GPU should land near 0.5e-2 to 0.7e-2.
// MoE routing is the exception: a token whose top-k experts are within noise of a tie takes another
// expert and its row moves by 5e-2 to 0.26; the tests pick seeds and prompts without such a token,
// deterministically on the CPU (well_conditioned), before comparing with the GPU.
// The attention kernel rounds once to bf16: |got - ref| <= 2^-8 |ref| + 2e-4 max|ref| (cuda_parity.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cuda_parity.h"
#include "io/hf_config.h"
#include "model/cuda_kv_decoder.h"
#include "model/generation.h"
#include "model/inference.h"
#include "model/lora.h"
#include "model/sampling.h"
#include "model/weights_4bit.h"
#include "ops/cpu/ops.h"

namespace qt {
namespace {

constexpr double kRelL2 = 2e-2;
constexpr double kClearGap = 0.1;

// ---- the attention kernel -------------------------------------------------------------------

struct KvShape {
  int64_t n, past, nh, nkv, hd;
};

TEST(CudaAttentionKv, MatchesCpuReference) {
  QT_SKIP_WITHOUT_GPU();
  const KvShape shapes[] = {
      {1, 0, 4, 4, 64},    {1, 1, 4, 4, 64},     {1, 37, 8, 2, 128},  {5, 11, 6, 3, 64},  {17, 0, 8, 1, 128},
      {1, 300, 14, 2, 64}, {33, 65, 4, 2, 128},  {7, 130, 28, 4, 128}, {2, 5, 4, 2, 16},  {9, 3, 4, 1, 8},
      {3, 20, 4, 2, 80},   {1, 1000, 16, 8, 256}, {130, 0, 2, 1, 128}, {1, 4095, 8, 1, 64},
  };
  constexpr int64_t kSpareRows = 3;  // cache rows past past + n: NaN, must not be read
  cuda::Context ctx;
  std::mt19937_64 rng(17);
  for (const KvShape& s : shapes) {
    const int64_t S = s.past + s.n, row = s.nkv * s.hd;
    const std::vector<float> q = testing::randn_bf16(size_t(s.n * s.nh * s.hd), rng);
    std::vector<float> k = testing::randn_bf16(size_t(S * row), rng), v = testing::randn_bf16(size_t(S * row), rng);
    std::vector<float> ref(q.size());
    cpu::attention_kv_forward(ref.data(), static_cast<float*>(nullptr), q.data(), k.data(), v.data(), 1, s.n, s.past,
                              s.nh, s.nkv, s.hd);
    k.resize(size_t((S + kSpareRows) * row), std::numeric_limits<float>::quiet_NaN());
    v.resize(size_t((S + kSpareRows) * row), std::numeric_limits<float>::quiet_NaN());
    const cuda::Buffer<cuda::bf16> dq = testing::dev_bf16(q), dk = testing::dev_bf16(k), dv = testing::dev_bf16(v);
    cuda::Buffer<cuda::bf16> out = testing::dev_poison_bf16(ref.size());
    cuda::attention_kv_forward(ctx, out.get(), dq.get(), dk.get(), dv.get(), s.n, s.past, s.nh, s.nkv, s.hd);
    ctx.synchronize();
    testing::expect_close(fmt::format("attention_kv n={} past={} nh={} nkv={} hd={}", s.n, s.past, s.nh, s.nkv, s.hd),
                          testing::host_f32(out), ref, testing::kBf16Rtol, testing::kAtolReduction);
  }
}

// ---- the decoder ----------------------------------------------------------------------------

enum class Family { kQwen2, kQwen3, kMoe };

ModelConfig model_config(Family f) {
  // q/k/v bias, head_dim 128, GQA 2, tied head
  const char* qwen2 = R"({"model_type":"qwen2","vocab_size":256,"hidden_size":256,"intermediate_size":192,
    "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"rms_norm_eps":1e-6,
    "rope_theta":10000.0,"tie_word_embeddings":true})";
  // q/k head norm, head_dim 64 != hidden / heads
  const char* qwen3 = R"({"model_type":"qwen3","vocab_size":256,"hidden_size":64,"intermediate_size":96,
    "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":64,"rms_norm_eps":1e-6,
    "rope_theta":1000000.0,"tie_word_embeddings":false})";
  // MoE, dense (mlp_only_layers), MoE; 8 experts, top-2 renormalised; GQA 4
  const char* moe = R"({"model_type":"qwen3_moe","vocab_size":256,"hidden_size":64,"intermediate_size":160,
    "moe_intermediate_size":32,"num_experts":8,"num_experts_per_tok":2,"num_hidden_layers":3,
    "mlp_only_layers":[1],"num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,"rms_norm_eps":1e-6,
    "rope_theta":1000000.0,"tie_word_embeddings":false,"norm_topk_prob":true})";
  switch (f) {
    case Family::kQwen2: return parse_hf_config_json(qwen2, "tiny-qwen2");
    case Family::kQwen3: return parse_hf_config_json(qwen3, "tiny-qwen3");
    case Family::kMoe: break;
  }
  return parse_hf_config_json(moe, "tiny-qwen3-moe");
}

const char* family_name(Family f) { return f == Family::kQwen2 ? "qwen2" : f == Family::kQwen3 ? "qwen3" : "qwen3_moe"; }

// A tiny model with bf16-representable weights (NF4: projections quantized, the floats holding their
// dequantized bf16 values) and, when with_lora, an adapter on all seven modules with B != 0.
struct Setup {
  ModelConfig cfg;
  ModelWeights w;
  LoraAdapter lora;
  bool with_lora = false;
  const LoraAdapter* adapter() const { return with_lora ? &lora : nullptr; }
};
Setup make_setup(Family f, bool with_lora, bool nf4, std::mt19937_64& rng) {
  Setup s;
  s.cfg = model_config(f);
  // qwen2's wider layers (H 256, head_dim 128) are twice as sensitive to rounding at the same std
  s.w = random_model_weights(s.cfg, DType::F32, 3 + uint64_t(f), f == Family::kQwen2 ? 0.05 : 0.08);
  testing::randomise_and_round(s.w, rng);
  for (auto& l : s.w.layers) {  // MoE routers too
    if (!l.mlp.router.defined()) continue;
    float* p = l.mlp.router.data<float>();
    for (int64_t i = 0; i < l.mlp.router.numel(); ++i) p[i] = testing::round_bf16(p[i]);
  }
  if (nf4) {
    EXPECT_GT(nf4_round_trip_weights(s.w, DType::BF16), 0);
  }
  s.with_lora = with_lora;
  if (with_lora) s.lora = testing::random_lora_all_modules(s.cfg, rng, 0.1f);
  return s;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, std::mt19937_64& rng) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = int32_t(rng() % uint64_t(V));
  return ids;
}

struct Step {
  std::vector<int32_t> ids;
  bool all_logits = false;
};
// The prompt in two chunks (8 tokens, then 13 attending to them, every row's logits), then 6 decode steps.
std::vector<Step> schedule(int64_t V, std::mt19937_64& rng) {
  std::vector<Step> steps{{random_ids(8, V, rng), false}, {random_ids(13, V, rng), true}};
  for (int i = 0; i < 6; ++i) steps.push_back({random_ids(1, V, rng), false});
  return steps;
}

// Worst numbers over the compared rows.
struct Agreement {
  double worst_rel_l2 = 0, worst_err_over_rms = 0;
  int rows = 0, argmax_checked = 0;
};

// Compares logits (rows, V) row by row: relative L2 error, finiteness, the argmax where the CPU's
// top-2 gap is clear.
void compare_logits(const std::vector<float>& gpu, const std::vector<float>& cpu, int64_t V, const std::string& what,
                    Agreement& a) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  ASSERT_EQ(cpu.size() % size_t(V), 0u) << what;
  for (size_t r = 0; r < cpu.size() / size_t(V); ++r) {
    const float* g = gpu.data() + r * size_t(V);
    const float* c = cpu.data() + r * size_t(V);
    double e2 = 0, c2 = 0, emax = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double d = double(g[j]) - double(c[j]);
      e2 += d * d, c2 += double(c[j]) * double(c[j]);
      emax = std::max(emax, std::fabs(d));
    }
    const double rel = std::sqrt(e2 / c2), rms = std::sqrt(c2 / double(V));
    EXPECT_LT(rel, kRelL2) << what << " row " << r << ": relative L2 error " << rel << ", max |err| " << emax
                           << ", rms " << rms;
    a.worst_rel_l2 = std::max(a.worst_rel_l2, std::isfinite(rel) ? rel : 1e30);
    a.worst_err_over_rms = std::max(a.worst_err_over_rms, emax / rms);
    ++a.rows;
    const int32_t top = argmax_token(c, V);
    float second = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < V; ++j)
      if (j != top) second = std::max(second, c[j]);
    if (double(c[top]) - double(second) > kClearGap * rms) {
      ++a.argmax_checked;
      EXPECT_EQ(argmax_token(g, V), top) << what << " row " << r << ": top-2 gap " << c[top] - second << ", rms " << rms;
    }
  }
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    if (!(d <= m)) m = d;  // NaN sticks
  }
  return m;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& ref) {
  double e2 = 0, r2 = 0;
  for (size_t i = 0; i < ref.size() && i < a.size(); ++i)
    e2 += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]), r2 += double(ref[i]) * ref[i];
  return std::sqrt(e2 / r2);
}

// The CPU logits of each step.
std::vector<std::vector<float>> cpu_logits(const ModelWeights& w, const LoraAdapter* lora, const std::vector<Step>& steps) {
  KvDecoder<float> dec(w, lora);
  std::vector<std::vector<float>> out;
  for (const Step& st : steps) out.push_back(dec.append(st.ids, st.all_logits));
  return out;
}

// Whether data is fit for a bf16 comparison: with relative noise kNoise on every projection and
// router weight, in each of kDraws draws, no CPU logits row moves by kRelL2 or more. kNoise is about
// twice what the GPU's bf16 activations amount to (a dozen roundings per layer of rms 2^-9/sqrt(3)
// ~ 1.1e-3 against seven weight matrices at 3e-3: sqrt(12) 1.1e-3 ~ 3.8e-3 vs sqrt(7) 3e-3 ~ 7.9e-3).
// The tiny models here move by 0.9e-2 to 1.4e-2 under it; a token whose top-k experts are within
// noise of a tie moves its row by 5e-2 to 0.26 (another expert is chosen), and the GPU comparison of
// such data would be a coin toss, so the tests choose data without one, deterministically on the CPU.
constexpr double kNoise = 3e-3;
constexpr int kDraws = 8;
bool well_conditioned(const Setup& s, const std::vector<Step>& steps, double* worst) {
  const int64_t V = s.cfg.vocab_size;
  const std::vector<std::vector<float>> ref = cpu_logits(s.w, s.adapter(), steps);
  *worst = 0;
  for (uint64_t draw = 0; draw < uint64_t(kDraws); ++draw) {
    ModelWeights noisy = s.w;  // shares storage: each perturbed tensor is replaced by a copy
    std::mt19937_64 rng(7 + draw);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& l : noisy.layers)
      for (Tensor* t : {&l.attn.q_w, &l.attn.k_w, &l.attn.v_w, &l.attn.o_w, &l.mlp.gate, &l.mlp.up, &l.mlp.down,
                        &l.mlp.router}) {
        if (!t->defined()) continue;
        *t = t->clone();
        float* p = t->data<float>();
        for (int64_t i = 0; i < t->numel(); ++i) p[i] *= 1.f + float(kNoise) * nd(rng);
      }
    const std::vector<std::vector<float>> got = cpu_logits(noisy, s.adapter(), steps);
    for (size_t i = 0; i < steps.size(); ++i)
      for (size_t r = 0; r < ref[i].size() / size_t(V); ++r) {
        const std::vector<float> a(got[i].begin() + int64_t(r) * V, got[i].begin() + int64_t(r + 1) * V);
        const std::vector<float> b(ref[i].begin() + int64_t(r) * V, ref[i].begin() + int64_t(r + 1) * V);
        *worst = std::max(*worst, rel_l2(a, b));
      }
  }
  return *worst < kRelL2;
}

void check_decoder(Family f, bool with_lora, bool nf4 = false) {
  QT_SKIP_WITHOUT_GPU();
  // The first of a few seeds whose model and tokens are well conditioned (see well_conditioned).
  // The steps, then (after a truncate into the decoded tokens) other tokens: both sequences checked.
  Setup s;
  std::vector<Step> steps, after;
  std::mt19937_64 rng;
  double sensitivity = 0, sensitivity_after = 0;
  bool found = false;
  for (uint64_t attempt = 0; attempt < 20 && !found; ++attempt) {
    rng.seed(100 + 10 * uint64_t(f) + (with_lora ? 1 : 0) + (nf4 ? 2 : 0) + 1000 * attempt);
    s = make_setup(f, with_lora, nf4, rng);
    steps = schedule(s.cfg.vocab_size, rng);
    std::vector<int32_t> all;
    for (const Step& st : steps) all.insert(all.end(), st.ids.begin(), st.ids.end());
    const size_t keep = all.size() - 3;
    const int32_t other = int32_t((all[keep] + 1) % s.cfg.vocab_size), last = int32_t(s.cfg.vocab_size - 1);
    after = {{std::vector<int32_t>(all.begin(), all.begin() + int64_t(keep)), false}, {{other}, false}, {{7, last}, true}};
    found = well_conditioned(s, steps, &sensitivity) && well_conditioned(s, after, &sensitivity_after);
    sensitivity = std::max(sensitivity, sensitivity_after);
    std::printf("[generate] %s seed attempt %llu: rows move by <= %.3e under %.0e weight noise%s\n", family_name(f),
                (unsigned long long)attempt, sensitivity, kNoise, found ? "" : " (near a routing tie: next seed)");
  }
  ASSERT_TRUE(found) << "no well-conditioned tiny model among 20 seeds";
  const int64_t V = s.cfg.vocab_size;
  const std::string name = fmt::format("{}{}{}", family_name(f), with_lora ? " + LoRA" : "", nf4 ? " NF4" : "");

  KvDecoder<float> cpu(s.w, s.adapter());
  CudaKvDecoder gpu(s.w, s.adapter());
  std::printf("[generate] %s on %s\n", name.c_str(), gpu.describe().c_str());
  Agreement agree;
  std::vector<std::vector<float>> first;  // the GPU's logits of each step
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::vector<float> c = cpu.append(steps[i].ids, steps[i].all_logits);
    first.push_back(gpu.append(steps[i].ids, steps[i].all_logits));
    compare_logits(first.back(), c, V, fmt::format("{} step {}", name, i), agree);
  }
  EXPECT_EQ(gpu.length(), cpu.length());
  EXPECT_EQ(gpu.tokens(), cpu.tokens());

  if (with_lora) {  // the adapter changes the logits by far more than the tolerance: the comparison sees it
    KvDecoder<float> bare(s.w, nullptr);
    std::vector<float> with, without;
    for (const Step& st : steps) {
      const std::vector<float> l = bare.append(st.ids, st.all_logits);
      without.insert(without.end(), l.begin(), l.end());
    }
    for (const auto& l : first) with.insert(with.end(), l.begin(), l.end());
    const double effect = rel_l2(without, with);
    std::printf("[generate] %s: the adapter moves the logits by %.3f (relative L2)\n", name.c_str(), effect);
    EXPECT_GT(effect, 5 * kRelL2);
  }

  if (nf4) {  // the NF4 base equals the bf16 decoder on the dequantized weights bit for bit
    ModelWeights plain = s.w;
    plain.nf4 = nullptr;
    CudaKvDecoder bf16(plain, s.adapter());
    for (size_t i = 0; i < steps.size(); ++i)
      EXPECT_EQ(max_abs_diff(bf16.append(steps[i].ids, steps[i].all_logits), first[i]), 0.0)
          << name << " step " << i << ": NF4 vs bf16 weights";
  }

  // Truncate to the first chunk and run the same steps again: the same logits bit for bit.
  const int64_t first_chunk = int64_t(steps[0].ids.size());
  gpu.truncate(first_chunk);
  ASSERT_EQ(gpu.length(), first_chunk);
  EXPECT_EQ(gpu.tokens(), steps[0].ids);
  for (size_t i = 1; i < steps.size(); ++i)
    EXPECT_EQ(max_abs_diff(gpu.append(steps[i].ids, steps[i].all_logits), first[i]), 0.0)
        << name << " step " << i << " after truncate(" << first_chunk << ")";

  // Truncate into the decoded tokens and go on with other ones (`after` past its first chunk), on both engines.
  const int64_t keep = int64_t(after[0].ids.size());
  ASSERT_EQ(keep, cpu.length() - 3);
  cpu.truncate(keep), gpu.truncate(keep);
  ASSERT_EQ(gpu.length(), keep);
  EXPECT_EQ(gpu.tokens(), cpu.tokens());
  EXPECT_EQ(gpu.tokens(), after[0].ids);
  for (size_t i = 1; i < after.size(); ++i)
    compare_logits(gpu.append(after[i].ids, after[i].all_logits), cpu.append(after[i].ids, after[i].all_logits), V,
                   fmt::format("{} after truncate({}), step {}", name, keep, i), agree);

  std::printf("[generate] %s: %d logits rows, worst relative L2 %.3e (bound %.0e), worst max|err|/rms %.3e, "
              "argmax checked on %d rows\n",
              name.c_str(), agree.rows, agree.worst_rel_l2, kRelL2, agree.worst_err_over_rms, agree.argmax_checked);
  EXPECT_GE(agree.argmax_checked, agree.rows / 4) << "too few rows with a clear top-2 gap: the argmax check is weak";
}

TEST(CudaGenerate, Qwen2BiasMatchesCpu) { check_decoder(Family::kQwen2, false); }
TEST(CudaGenerate, Qwen2BiasLoraMatchesCpu) { check_decoder(Family::kQwen2, true); }
TEST(CudaGenerate, Qwen3QkNormMatchesCpu) { check_decoder(Family::kQwen3, false); }
TEST(CudaGenerate, Qwen3QkNormLoraMatchesCpu) { check_decoder(Family::kQwen3, true); }
TEST(CudaGenerate, Qwen3MoeMatchesCpu) { check_decoder(Family::kMoe, false); }
TEST(CudaGenerate, Qwen3MoeLoraMatchesCpu) { check_decoder(Family::kMoe, true); }
TEST(CudaGenerate, Nf4Qwen2LoraMatchesCpuAndBf16) { check_decoder(Family::kQwen2, true, true); }
TEST(CudaGenerate, Nf4Qwen3MoeLoraMatchesCpuAndBf16) { check_decoder(Family::kMoe, true, true); }

// ---- greedy generation ----------------------------------------------------------------------

// Greedy decoding on the CPU, and the smallest top-2 gap / rms over the steps.
struct CpuGreedy {
  std::vector<int32_t> tokens;
  double min_gap = std::numeric_limits<double>::infinity();
};
CpuGreedy cpu_greedy(const Setup& s, const std::vector<int32_t>& prompt, int64_t n) {
  const int64_t V = s.cfg.vocab_size;
  KvDecoder<float> dec(s.w, s.adapter());
  CpuGreedy g;
  std::vector<float> l = dec.append(prompt);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t top = argmax_token(l.data(), V);
    double c2 = 0;
    float second = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < V; ++j) {
      c2 += double(l[size_t(j)]) * l[size_t(j)];
      if (j != top) second = std::max(second, l[size_t(j)]);
    }
    g.min_gap = std::min(g.min_gap, (double(l[size_t(top)]) - second) / std::sqrt(c2 / double(V)));
    g.tokens.push_back(top);
    if (i + 1 < n) l = dec.append({top});
  }
  return g;
}

void check_greedy(Family f) {
  QT_SKIP_WITHOUT_GPU();
  constexpr int64_t kNew = 16, kPromptLen = 12, kTries = 400;
  const std::vector<int32_t> kChatTurn{3, 5};  // tokens of a following chat turn
  std::mt19937_64 rng(200 + uint64_t(f));
  const Setup s = make_setup(f, true, false, rng);
  const int64_t V = s.cfg.vocab_size;
  // The first prompt whose kNew CPU steps all have a clear top-2 gap (deterministic: CPU only).
  std::vector<int32_t> prompt;
  CpuGreedy want;
  double best = 0;
  for (int t = 0; t < kTries && prompt.empty(); ++t) {
    const std::vector<int32_t> p = random_ids(kPromptLen, V, rng);
    const CpuGreedy g = cpu_greedy(s, p, kNew);
    best = std::max(best, g.min_gap);
    if (!(g.min_gap > kClearGap)) continue;
    // and well conditioned: the prompt, the generated tokens and the chat turn's (below) as one chunk,
    // every row's logits
    std::vector<int32_t> seq = p;
    seq.insert(seq.end(), g.tokens.begin(), g.tokens.end());
    seq.insert(seq.end(), kChatTurn.begin(), kChatTurn.end());
    double sensitivity = 0;
    if (well_conditioned(s, {{seq, true}}, &sensitivity)) prompt = p, want = g;
  }
  ASSERT_FALSE(prompt.empty()) << "no prompt among " << kTries << " with " << kNew
                               << " clear, well-conditioned greedy steps on the CPU (best smallest gap/rms " << best
                               << ")";
  std::printf("[generate] %s greedy: smallest top-2 gap / rms over %lld steps %.3f; tokens", family_name(f),
              (long long)kNew, want.min_gap);
  for (int32_t id : want.tokens) std::printf(" %d", id);
  std::printf("\n");

  const SamplingOptions greedy_opts;  // do_sample false: argmax
  CudaKvDecoder gpu(s.w, s.adapter());
  Sampler greedy(greedy_opts, 0);
  std::vector<int32_t> got;
  const GenerationStats st = generate(gpu, prompt, greedy, kNew, {}, [&](int32_t id) { got.push_back(id); });
  EXPECT_EQ(st.new_tokens, kNew);
  EXPECT_FALSE(st.stopped);
  ASSERT_EQ(int64_t(got.size()), kNew);
  EXPECT_EQ(got, want.tokens) << family_name(f) << ": GPU greedy tokens differ from the CPU's";
  // the generated tokens are in the cache (all but the last), after the prompt
  EXPECT_EQ(gpu.length(), kPromptLen + kNew - 1);

  // A chat turn: the conversation re-rendered in full; only the uncached tail runs (uncached_suffix).
  std::vector<int32_t> full = gpu.tokens();
  full.push_back(got.back());
  full.insert(full.end(), kChatTurn.begin(), kChatTurn.end());
  const std::vector<int32_t> tail = uncached_suffix(gpu, full);
  EXPECT_EQ(tail, (std::vector<int32_t>{got.back(), kChatTurn[0], kChatTurn[1]}));
  KvDecoder<float> cpu(s.w, s.adapter());
  Agreement agree;
  compare_logits(gpu.append(tail), cpu.append(full), V, std::string(family_name(f)) + " chat turn", agree);
}

TEST(CudaGenerate, GreedyQwen2LoraMatchesCpu) { check_greedy(Family::kQwen2); }
TEST(CudaGenerate, GreedyQwen3LoraMatchesCpu) { check_greedy(Family::kQwen3); }
TEST(CudaGenerate, GreedyQwen3MoeLoraMatchesCpu) { check_greedy(Family::kMoe); }

}  // namespace
}  // namespace qt
