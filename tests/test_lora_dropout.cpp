// LoRA dropout (PEFT semantics, counter-based masks): the op's keep rate, scaling and determinism;
// p = 0 is bit-identical to no dropout; and, in float64 through the whole decoder (one dense layer and
// one MoE layer, LoRA on all seven modules), the hand-written gradients of every LoRA A and B match
// central differences of the loss WITH dropout on (valid because the mask is fixed by its counters).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "grad_check.h"
#include "io/hf_config.h"
#include "model/decoder.h"
#include "model/lora.h"
#include "model/weights.h"
#include "ops/cpu/ops.h"

using namespace qt;

namespace {

// ---- the op ---------------------------------------------------------------------------------

TEST(LoraDropoutOp, KeepRateScaleAndDeterminism) {
  const int64_t N = 300, D = 400;
  const double p = 0.3;
  std::vector<float> x(size_t(N * D), 2.0f), y(x.size()), y2(x.size());
  const uint64_t key = cpu::dropout_key(42, 7, 1, 3, kLoraQ);
  cpu::dropout_apply<float>(y.data(), x.data(), N, D, p, key, nullptr);
  int64_t kept = 0;
  for (float v : y) {
    if (v != 0) {
      ++kept;
      EXPECT_EQ(v, 2.0f * float(1.0 / (1.0 - p)));
    }
  }
  const double rate = double(kept) / double(N * D);
  // 120,000 Bernoulli(0.7) draws: standard deviation 0.0013.
  EXPECT_NEAR(rate, 1 - p, 0.007);
  cpu::dropout_apply<float>(y2.data(), x.data(), N, D, p, key, nullptr);
  EXPECT_EQ(y, y2) << "same counters, same mask";
  // In place gives the same result.
  cpu::dropout_apply<float>(x.data(), x.data(), N, D, p, key, nullptr);
  EXPECT_EQ(x, y);
}

// Fraction of positions where two masks agree (independent masks: p^2 + (1-p)^2 = 0.58 for p 0.3).
double agreement(uint64_t k1, uint64_t k2, double p) {
  const int64_t N = 64, D = 256;
  std::vector<double> ones(size_t(N * D), 1.0), a(ones.size()), b(ones.size());
  cpu::dropout_apply<double>(a.data(), ones.data(), N, D, p, k1, nullptr);
  cpu::dropout_apply<double>(b.data(), ones.data(), N, D, p, k2, nullptr);
  int64_t same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += (a[i] == 0) == (b[i] == 0);
  return double(same) / double(a.size());
}

TEST(LoraDropoutOp, EveryCounterChangesTheMask) {
  const double p = 0.3, independent = p * p + (1 - p) * (1 - p);
  const uint64_t base = cpu::dropout_key(42, 10, 0, 2, kLoraV);
  EXPECT_EQ(agreement(base, cpu::dropout_key(42, 10, 0, 2, kLoraV), p), 1.0);
  for (uint64_t other : {cpu::dropout_key(43, 10, 0, 2, kLoraV), cpu::dropout_key(42, 11, 0, 2, kLoraV),
                         cpu::dropout_key(42, 10, 1, 2, kLoraV), cpu::dropout_key(42, 10, 0, 3, kLoraV),
                         cpu::dropout_key(42, 10, 0, 2, kLoraK)})
    EXPECT_NEAR(agreement(base, other, p), independent, 0.03);
}

TEST(LoraDropoutOp, RowIdsSelectTheMaskRows) {
  const int64_t N = 6, D = 50;
  const uint64_t key = cpu::dropout_key(1, 2, 3, 4, kLoraUp);
  std::vector<double> x(size_t(N * D));
  std::iota(x.begin(), x.end(), 1.0);
  std::vector<double> plain(x.size()), permuted_in(x.size()), out(x.size());
  cpu::dropout_apply<double>(plain.data(), x.data(), N, D, 0.5, key, nullptr);
  const std::vector<int32_t> rows = {4, 0, 5, 2, 1, 3};
  for (int64_t n = 0; n < N; ++n)
    std::copy_n(x.begin() + rows[size_t(n)] * D, D, permuted_in.begin() + n * D);
  cpu::dropout_apply<double>(out.data(), permuted_in.data(), N, D, 0.5, key, rows.data());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < D; ++f) EXPECT_EQ(out[size_t(n * D + f)], plain[size_t(rows[size_t(n)] * D + f)]);
}

TEST(LoraDropoutOp, ZeroProbabilityIsTheIdentity) {
  const std::vector<double> x = qt::testing::random_vec(1000, 5);
  std::vector<double> y(x.size());
  cpu::dropout_apply<double>(y.data(), x.data(), 10, 100, 0.0, cpu::dropout_key(1, 1, 1, 1, 1), nullptr);
  EXPECT_EQ(x, y);
}

// ---- through the decoder --------------------------------------------------------------------

const char* kTinyMoeConfig = R"({"model_type": "qwen3_moe", "vocab_size": 40, "hidden_size": 8,
  "intermediate_size": 12, "moe_intermediate_size": 6, "num_hidden_layers": 2, "num_attention_heads": 2,
  "num_key_value_heads": 1, "head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true,
  "mlp_only_layers": [0], "tie_word_embeddings": false, "rope_theta": 10000.0})";

struct TinyModel {
  ModelWeights w;
  LoraAdapter lora, grads;
  Batch batch;
};

TinyModel make_setup() {
  TinyModel s;
  const ModelConfig cfg = parse_hf_config_json(kTinyMoeConfig, "test");
  s.w = random_model_weights(cfg, DType::F64, 3, 0.3);
  LoraConfig lc;
  lc.r = 2;
  lc.alpha = 3;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  s.lora = init_lora(cfg, lc, DType::F64, 11);
  // B away from zero so that every A has a gradient.
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0, 0.3);
  for (auto& layer : s.lora.layers)
    for (auto& p : layer.slot) {
      EXPECT_TRUE(p.present());
      for (int64_t i = 0; i < p.B.numel(); ++i) p.B.data<double>()[i] = nd(rng);
    }
  s.grads = s.lora.zeros_like();
  s.batch.B = 2;
  s.batch.S = 7;
  for (int64_t i = 0; i < 14; ++i) {
    s.batch.input_ids.push_back(int32_t((i * 7 + 3) % 40));
    s.batch.labels.push_back(i % 5 == 1 ? -100 : int32_t((i * 11 + 1) % 40));
  }
  return s;
}

void zero(LoraAdapter& g) {
  for (auto& layer : g.layers)
    for (auto& p : layer.slot) {
      std::fill_n(p.A.data<double>(), p.A.numel(), 0.0);
      std::fill_n(p.B.data<double>(), p.B.numel(), 0.0);
    }
}

bool same_values(const Tensor& a, const Tensor& b) {
  return std::equal(a.data<double>(), a.data<double>() + a.numel(), b.data<double>());
}

TEST(LoraDropoutDecoder, ZeroProbabilityIsBitIdenticalToNoDropout) {
  TinyModel s = make_setup();
  QwenDecoder<double> dec(s.w, &s.lora);
  const StepResult r0 = dec.forward_backward(s.batch, &s.grads, false, 1.0);
  LoraAdapter g1 = s.lora.zeros_like();
  const StepResult r1 = dec.forward_backward(s.batch, &g1, false, 1.0, LoraDropout{0.0, 42, 3, 1});
  EXPECT_EQ(r0.loss_sum, r1.loss_sum);
  for (size_t l = 0; l < g1.layers.size(); ++l)
    for (int sl = 0; sl < kNumLoraSlots; ++sl) {
      EXPECT_TRUE(same_values(s.grads.layers[l].slot[sl].A, g1.layers[l].slot[sl].A)) << l << " " << sl;
      EXPECT_TRUE(same_values(s.grads.layers[l].slot[sl].B, g1.layers[l].slot[sl].B)) << l << " " << sl;
    }
}

TEST(LoraDropoutDecoder, MasksDependOnTheStepAndEvalHasNone) {
  TinyModel s = make_setup();
  QwenDecoder<double> dec(s.w, &s.lora);
  const double eval = dec.forward_backward(s.batch, nullptr, false).loss_sum;
  const double a = dec.forward_backward(s.batch, nullptr, false, 0, LoraDropout{0.4, 42, 3, 0}).loss_sum;
  const double a2 = dec.forward_backward(s.batch, nullptr, false, 0, LoraDropout{0.4, 42, 3, 0}).loss_sum;
  const double b = dec.forward_backward(s.batch, nullptr, false, 0, LoraDropout{0.4, 42, 4, 0}).loss_sum;
  const double c = dec.forward_backward(s.batch, nullptr, false, 0, LoraDropout{0.4, 42, 3, 1}).loss_sum;
  EXPECT_EQ(a, a2);
  EXPECT_NE(a, eval);
  EXPECT_NE(a, b);
  EXPECT_NE(a, c);
  EXPECT_EQ(dec.forward_backward(s.batch, nullptr, false).loss_sum, eval);
}

TEST(LoraDropoutDecoder, GradientsMatchFiniteDifferencesWithDropoutOn) {
  TinyModel s = make_setup();
  QwenDecoder<double> dec(s.w, &s.lora);
  const LoraDropout drop{0.35, 42, 5, 2};
  zero(s.grads);
  dec.forward_backward(s.batch, &s.grads, false, 1.0, drop);  // gradient of loss_sum
  auto loss = [&] { return dec.forward_backward(s.batch, nullptr, false, 0, drop).loss_sum; };
  for (size_t l = 0; l < s.lora.layers.size(); ++l)
    for (int sl = 0; sl < kNumLoraSlots; ++sl)
      for (int which = 0; which < 2; ++which) {
        Tensor& t = which == 0 ? s.lora.layers[l].slot[sl].A : s.lora.layers[l].slot[sl].B;
        const Tensor& g = which == 0 ? s.grads.layers[l].slot[sl].A : s.grads.layers[l].slot[sl].B;
        std::vector<double> values(t.data<double>(), t.data<double>() + t.numel());
        const std::vector<double> numeric = qt::testing::numeric_grad(values, [&] {
          std::copy(values.begin(), values.end(), t.data<double>());
          return loss();
        });
        std::copy(values.begin(), values.end(), t.data<double>());
        const std::vector<double> analytic(g.data<double>(), g.data<double>() + g.numel());
        const std::string what = fmt::format("layer {} {} lora_{}", l, lora_slot_module(LoraSlot(sl)), "AB"[which]);
        qt::testing::expect_grad_close(analytic, numeric, what.c_str(), 1e-6);
      }
}

}  // namespace
