// Parity of the CUDA decoder (model/cuda_decoder.h) with the CPU QwenDecoder<float> on tiny random
// Qwen2 (q/k/v bias) and Qwen3 (q/k head norm, head_dim != hidden/heads) models, LoRA on all seven
// slots, one packed row (positions restart, segments) and masked labels. Both engines read the same
// bf16-rounded base weights; the CPU runs in fp32 throughout.
//
// Tolerances. The GPU stores every activation in bf16 (half an ulp = 2^-9 relative per rounding)
// and runs LoRA's GEMMs on bf16 copies of the fp32 masters. Through two layers that is about a
// dozen roundings on the path to each logit, so logits carry a relative error of a few 1e-3 and the
// mean loss (an average over tokens of errors of both signs) stays within 1e-2 relative. Gradients
// go through as many roundings again on the way back (dx chains of bf16), so each LoRA gradient
// tensor is compared by its relative Frobenius error ||g_gpu - g_cpu|| / ||g_cpu|| <= 5e-2, and
// the global gradient direction by cosine >= 0.999. A broken op (wrong sign, missing term, a
// swapped operand) moves these by O(1).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "cuda_parity.h"
#include "io/hf_config.h"
#include "model/cuda_decoder.h"
#include "model/decoder.h"
#include "train/optimizer.h"

namespace qt {
namespace {

ModelConfig tiny_config(bool qwen3) {
  const char* q2 = R"({"model_type":"qwen2","vocab_size":256,"hidden_size":64,"intermediate_size":96,
    "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,
    "rope_theta":10000.0,"tie_word_embeddings":true})";
  const char* q3 = R"({"model_type":"qwen3","vocab_size":256,"hidden_size":64,"intermediate_size":96,
    "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"rms_norm_eps":1e-6,
    "rope_theta":1000000.0,"tie_word_embeddings":false,"attention_bias":false})";
  return parse_hf_config_json(qwen3 ? q3 : q2, "tiny");
}

Batch tiny_batch(std::mt19937_64& rng) {
  Batch b;
  b.B = 2, b.S = 24;
  std::uniform_int_distribution<int32_t> tok(0, 255);
  for (int64_t i = 0; i < b.B * b.S; ++i) b.input_ids.push_back(tok(rng));
  b.labels = b.input_ids;
  for (int i = 0; i < 5; ++i) b.labels[size_t(3 * i + 2)] = -100;
  // row 1 packs two documents of 10 and 14 tokens
  for (int64_t r = 0; r < b.B; ++r)
    for (int64_t s = 0; s < b.S; ++s) {
      const bool second = r == 1 && s >= 10;
      b.position_ids.push_back(int32_t(second ? s - 10 : s));
      b.segment_ids.push_back(second ? 1 : 0);
    }
  return b;
}

// A tiny model (bf16-rounded weights) with LoRA on all seven slots and B != 0.
struct TinySetup {
  ModelConfig cfg;
  ModelWeights w;
  LoraAdapter lora;
};
TinySetup tiny_setup(bool qwen3, std::mt19937_64& rng) {
  TinySetup t;
  t.cfg = tiny_config(qwen3);
  t.w = random_model_weights(t.cfg, DType::F32, 11, 0.08);
  testing::randomise_and_round(t.w, rng);
  t.lora = testing::random_lora_all_modules(t.cfg, rng, 0.05f);
  return t;
}

// Every A and B of two fp32 adapters of one structure equal bit for bit.
void expect_same_bits(const LoraAdapter& a, const LoraAdapter& b, const std::string& what) {
  testing::for_each_lora_pair(a, b, [&](const Tensor& x, const Tensor& y, const std::string& n) {
    EXPECT_EQ(std::memcmp(x.data<float>(), y.data<float>(), size_t(x.numel()) * sizeof(float)), 0) << what << " " << n;
  });
}

// dropout_p > 0: the training forward with LoRA dropout (masks from the same counter hash).
void check_parity(bool qwen3, double dropout_p = 0) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(qwen3 ? 7 : 3);
  TinySetup t = tiny_setup(qwen3, rng);
  const ModelWeights& w = t.w;
  const LoraAdapter& lora = t.lora;
  const Batch batch = tiny_batch(rng);
  const LoraDropout drop{dropout_p, 99, 4, 1};

  QwenDecoder<float> cpu(w, &lora);
  LoraAdapter g_cpu = lora.zeros_like();
  const StepResult ref = cpu.forward_backward(batch, &g_cpu, false, 0, drop);

  cuda::Context ctx;
  CudaDecoder gpu(ctx, w, lora);
  gpu.set_batch(batch);
  ASSERT_EQ(gpu.count(), ref.count);
  gpu.forward();
  const double loss_fwd = gpu.loss_sum() / double(gpu.count());
  gpu.zero_grads();
  gpu.forward_backward(0, drop);
  const double loss = gpu.loss_sum() / double(gpu.count());
  if (dropout_p == 0)
    EXPECT_NEAR(loss, loss_fwd, 1e-9 * std::fabs(loss_fwd)) << "forward-only and training forward must agree";
  else
    EXPECT_GT(std::fabs(loss - loss_fwd), 1e-6 * std::fabs(loss_fwd)) << "dropout changed nothing";
  const double loss_err = std::fabs(loss - ref.loss()) / std::fabs(ref.loss());
  std::printf("[parity] %s loss cpu %.6f gpu %.6f rel %.2e\n", qwen3 ? "qwen3" : "qwen2", ref.loss(), loss, loss_err);
  EXPECT_LE(loss_err, 1e-2);

  const LoraAdapter g_gpu = gpu.download_grads();
  double dot = 0, n_cpu = 0, n_gpu = 0, worst = 0;
  for (size_t l = 0; l < g_cpu.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s)
      for (bool is_b : {false, true}) {
        const Tensor& c = is_b ? g_cpu.layers[l].slot[s].B : g_cpu.layers[l].slot[s].A;
        const Tensor& gg = is_b ? g_gpu.layers[l].slot[s].B : g_gpu.layers[l].slot[s].A;
        ASSERT_EQ(c.numel(), gg.numel());
        double diff = 0, ref_n = 0;
        for (int64_t i = 0; i < c.numel(); ++i) {
          const double a = c.data<float>()[i], b = gg.data<float>()[i];
          ASSERT_TRUE(std::isfinite(b));
          diff += (a - b) * (a - b), ref_n += a * a;
          dot += a * b, n_cpu += a * a, n_gpu += b * b;
        }
        const double rel = std::sqrt(diff / ref_n);
        worst = std::max(worst, rel);
        EXPECT_LE(rel, 5e-2) << "layer " << l << " slot " << lora_slot_module(LoraSlot(s)) << (is_b ? " B" : " A");
      }
  const double cosine = dot / std::sqrt(n_cpu * n_gpu);
  std::printf("[parity] %s grads worst rel-Frobenius %.2e, cosine %.8f\n", qwen3 ? "qwen3" : "qwen2", worst, cosine);
  EXPECT_GE(cosine, 0.999);

  // One clipped AdamW step on the device against train/optimizer on the same (device) gradients.
  // AdamW is bitwise equal (test_cuda_ops) and the clip coefficient comes from sums of squares that
  // agree to ~1e-14 relative, so the masters agree to a few fp32 ulps: rtol 1e-6.
  LoraAdapter params = gpu.download_lora(), g = gpu.download_grads();
  const double max_norm = 1e-3, lr = 1e-3;
  ASSERT_GT(clip_grad_norm(g, max_norm), max_norm) << "the check needs an active clip";
  AdamWConfig oc;
  oc.weight_decay = 0.01;
  AdamW opt(params, oc);
  opt.step(params, g, lr);
  gpu.optimizer_step(1, lr, oc.weight_decay, max_norm, oc.beta1, oc.beta2, oc.eps);
  const LoraAdapter got = gpu.download_lora();
  double worst_p = 0;
  for (size_t l = 0; l < params.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s)
      for (bool is_b : {false, true}) {
        const Tensor& want = is_b ? params.layers[l].slot[s].B : params.layers[l].slot[s].A;
        const Tensor& have = is_b ? got.layers[l].slot[s].B : got.layers[l].slot[s].A;
        for (int64_t i = 0; i < want.numel(); ++i) {
          const double a = want.data<float>()[i], b = have.data<float>()[i];
          worst_p = std::max(worst_p, std::fabs(a - b));
          ASSERT_LE(std::fabs(a - b), 1e-6 * std::fabs(a) + 1e-12) << "layer " << l << " slot " << s << " i " << i;
        }
      }
  std::printf("[parity] %s clip + AdamW step: worst |gpu - cpu| %.2e\n", qwen3 ? "qwen3" : "qwen2", worst_p);
}

TEST(CudaDecoder, Qwen2MatchesCpu) { check_parity(false); }
TEST(CudaDecoder, Qwen3MatchesCpu) { check_parity(true); }
TEST(CudaDecoder, Qwen3WithLoraDropoutMatchesCpu) { check_parity(true, 0.25); }

// Gradient accumulation over two micro-batches equals the sum of their separate gradients; the
// step's loss total is the sum of their loss sums; the norm read back is that of the sum.
TEST(CudaDecoder, AccumulatesMicroBatches) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(21);
  TinySetup t = tiny_setup(false, rng);
  const Batch b1 = tiny_batch(rng), b2 = tiny_batch(rng);
  cuda::Context ctx;
  CudaDecoder gpu(ctx, t.w, t.lora);
  auto grads_of = [&](const Batch& b, double* loss) {
    gpu.set_batch(b);
    gpu.zero_grads();
    gpu.forward_backward(0.01);
    *loss = gpu.loss_sum();
    return gpu.download_grads();
  };
  double l1 = 0, l2 = 0;
  const LoraAdapter g1 = grads_of(b1, &l1), g2 = grads_of(b2, &l2);
  gpu.zero_grads();
  gpu.set_batch(b1);
  gpu.forward_backward(0.01);
  gpu.set_batch(b2);  // queued behind the first micro-batch's work: no synchronisation between them
  gpu.forward_backward(0.01);
  const LoraAdapter g12 = gpu.download_grads();
  double sum_sq = 0;
  LoraAdapter expect = g1.zeros_like();
  for (size_t l = 0; l < g1.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s)
      for (bool is_b : {false, true}) {
        const Tensor& a = is_b ? g1.layers[l].slot[s].B : g1.layers[l].slot[s].A;
        const Tensor& b = is_b ? g2.layers[l].slot[s].B : g2.layers[l].slot[s].A;
        Tensor& e = is_b ? expect.layers[l].slot[s].B : expect.layers[l].slot[s].A;
        for (int64_t i = 0; i < a.numel(); ++i) e.data<float>()[i] = a.data<float>()[i] + b.data<float>()[i];
      }
  testing::for_each_lora_pair(expect, g12, [&](const Tensor& e, const Tensor& g, const std::string& what) {
    for (int64_t i = 0; i < e.numel(); ++i) {
      const double x = e.data<float>()[i], y = g.data<float>()[i];
      sum_sq += y * y;
      // fp32 accumulation inside the GEMM epilogue vs the host sum: a few ulps
      ASSERT_LE(std::fabs(x - y), 1e-5 * std::fabs(x) + 1e-9) << what << " i " << i;
    }
  });
  gpu.optimizer_step(1, 1e-3, 0.0, 0.0);
  const CudaDecoder::StepStats st = gpu.read_step_stats();
  EXPECT_FALSE(st.skipped);
  EXPECT_NEAR(st.loss_total, l1 + l2, 1e-12 * (l1 + l2));
  EXPECT_NEAR(st.grad_norm, std::sqrt(sum_sq), 1e-9 * std::sqrt(sum_sq));
}

// A non-finite loss skips the update on the device: masters and moments keep their bits (also
// where they live in host memory).
void check_non_finite_step(bool on_host) {
  SCOPED_TRACE(on_host ? "LoRA states on the host" : "LoRA states on the device");
  std::mt19937_64 rng(5);
  TinySetup t = tiny_setup(true, rng);
  const Batch b = tiny_batch(rng);
  cuda::Context ctx;
  CudaDecoder gpu(ctx, t.w, t.lora, {.lora_states_on_host = on_host});
  gpu.set_batch(b);
  gpu.zero_grads();
  gpu.forward_backward();
  gpu.optimizer_step(1, 1e-3, 0.01, 1.0);  // one good step: non-zero moments
  ASSERT_FALSE(gpu.read_step_stats().skipped);
  LoraAdapter bad = gpu.download_lora();
  bad.layers[0].slot[kLoraV].A.data<float>()[3] = std::nanf("");
  const auto [m, v] = gpu.download_moments();
  gpu.upload_state(bad, m, v);
  gpu.zero_grads();
  gpu.forward_backward();
  gpu.optimizer_step(2, 1e-3, 0.01, 1.0);
  const CudaDecoder::StepStats st = gpu.read_step_stats();
  EXPECT_TRUE(st.skipped);
  EXPECT_FALSE(std::isfinite(st.loss_total));
  const auto [m2, v2] = gpu.download_moments();
  const LoraAdapter after = gpu.download_lora();
  expect_same_bits(bad, after, "masters");
  expect_same_bits(m, m2, "exp_avg");
  expect_same_bits(v, v2, "exp_avg_sq");
}
TEST(CudaDecoder, NonFiniteStepChangesNothing) {
  QT_SKIP_WITHOUT_GPU();
  check_non_finite_step(false);
  check_non_finite_step(true);
}

// The router load-balancing loss (output_router_logits) on a tiny 2-layer Qwen3-MoE against the CPU
// decoder: the aux value, the step's loss total (CE + count * coef * aux), every LoRA gradient with
// the aux term on (per tensor relative Frobenius error <= 5e-2, as check_parity), and the part the
// aux term adds (coef 0.5 minus coef 0: the path through the routers, the softmax and the hidden
// states of both layers) must be a visible share of the gradient, point the same way as the CPU's
// (cosine >= 0.99) and have its size (within 5%). The difference of two bf16 runs carries both
// runs' errors relative to a smaller vector, so it is held to its direction and size rather than
// to the per-tensor bound. Expert-load counts: every layer
// routes N * k assignments, and the GPU's counts are the CPU's (bf16 routing may flip a near-tie:
// at most 2% of the assignments move).
TEST(CudaDecoder, RouterAuxLossMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  auto config = [](double coef) {
    const std::string j = R"({"model_type":"qwen3_moe","vocab_size":256,"hidden_size":64,"intermediate_size":96,
      "moe_intermediate_size":32,"num_experts":8,"num_experts_per_tok":2,"num_hidden_layers":2,
      "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"norm_topk_prob":true,
      "output_router_logits":true,"router_aux_loss_coef":)" + std::to_string(coef) + "}";
    return parse_hf_config_json(j, "tiny-moe");
  };
  std::mt19937_64 rng(17);
  ModelWeights w = random_model_weights(config(0.5), DType::F32, 13, 0.08);
  testing::randomise_and_round(w, rng);
  for (auto& l : w.layers)
    for (int64_t i = 0; i < l.mlp.router.numel(); ++i)
      l.mlp.router.data<float>()[i] = testing::round_bf16(l.mlp.router.data<float>()[i] * 3.f);  // decisive routing
  LoraConfig lc;
  lc.r = 4, lc.alpha = 8;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  LoraAdapter lora = init_lora(w.cfg, lc, DType::F32, 5);
  std::normal_distribution<float> nd(0.f, 0.05f);
  for (auto& l : lora.layers)
    for (auto& p : l.slot)
      for (int64_t i = 0; i < p.B.numel(); ++i) p.B.data<float>()[i] = nd(rng);
  const Batch batch = tiny_batch(rng);

  struct Run {
    StepResult cpu;
    LoraAdapter g_cpu, g_gpu;
    double gpu_aux = 0, gpu_total = 0;
    std::vector<std::vector<int64_t>> gpu_load;
  };
  auto run = [&](double coef) {
    ModelWeights wc = w;
    wc.cfg = config(coef);
    Run r;
    QwenDecoder<float> cpu(wc, &lora);
    r.g_cpu = lora.zeros_like();
    r.cpu = cpu.forward_backward(batch, &r.g_cpu, false);
    cuda::Context ctx;
    CudaDecoder gpu(ctx, wc, lora);
    gpu.set_batch(batch);
    gpu.zero_grads();
    gpu.forward_backward();
    r.gpu_aux = gpu.aux_loss();
    r.g_gpu = gpu.download_grads();
    r.gpu_load = gpu.take_expert_load();
    gpu.optimizer_step(1, 0.0, 0.0, 0.0);
    r.gpu_total = gpu.read_step_stats().loss_total;
    EXPECT_TRUE(gpu.take_expert_load()[0] == std::vector<int64_t>(8, 0)) << "take_expert_load must reset";
    return r;
  };
  const Run with = run(0.5), without = run(0.0);
  const int64_t count = with.cpu.count;
  std::printf("[aux] cpu aux %.6f gpu aux %.6f; totals cpu %.6f gpu %.6f\n", with.cpu.aux_loss, with.gpu_aux,
              with.cpu.loss_sum + double(count) * 0.5 * with.cpu.aux_loss, with.gpu_total);
  EXPECT_GT(with.cpu.aux_loss, 0.5);
  EXPECT_NEAR(with.gpu_aux, with.cpu.aux_loss, 1e-2 * with.cpu.aux_loss);
  const double cpu_total = with.cpu.loss_sum + double(count) * 0.5 * with.cpu.aux_loss;
  EXPECT_NEAR(with.gpu_total, cpu_total, 1e-2 * cpu_total);
  EXPECT_NEAR(without.gpu_total, without.cpu.loss_sum, 1e-2 * without.cpu.loss_sum);

  double diff = 0, ref = 0, dot = 0, n_gpu = 0, full = 0, worst = 0, worst0 = 0;
  for (size_t l = 0; l < with.g_cpu.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s)
      for (bool is_b : {false, true}) {
        auto get = [&](const LoraAdapter& a) -> const Tensor& {
          return is_b ? a.layers[l].slot[s].B : a.layers[l].slot[s].A;
        };
        const Tensor &cw = get(with.g_cpu), &c0 = get(without.g_cpu), &gw = get(with.g_gpu), &g0 = get(without.g_gpu);
        if (!cw.defined()) continue;
        double t_diff = 0, t_ref = 0;
        for (int64_t i = 0; i < cw.numel(); ++i) {
          const double e = double(gw.data<float>()[i]) - double(cw.data<float>()[i]);
          t_diff += e * e, t_ref += double(cw.data<float>()[i]) * double(cw.data<float>()[i]);
        }
        worst = std::max(worst, std::sqrt(t_diff / t_ref));
        t_diff = 0, t_ref = 0;
        for (int64_t i = 0; i < c0.numel(); ++i) {
          const double e = double(g0.data<float>()[i]) - double(c0.data<float>()[i]);
          t_diff += e * e, t_ref += double(c0.data<float>()[i]) * double(c0.data<float>()[i]);
        }
        worst0 = std::max(worst0, std::sqrt(t_diff / t_ref));
        for (int64_t i = 0; i < cw.numel(); ++i) {
          const double dc = double(cw.data<float>()[i]) - double(c0.data<float>()[i]);
          const double dg = double(gw.data<float>()[i]) - double(g0.data<float>()[i]);
          diff += (dc - dg) * (dc - dg), ref += dc * dc, dot += dc * dg, n_gpu += dg * dg;
          full += double(cw.data<float>()[i]) * double(cw.data<float>()[i]);
        }
      }
  const double rel = std::sqrt(diff / ref), cosine = dot / std::sqrt(ref * n_gpu), size = std::sqrt(n_gpu / ref);
  std::printf("[aux] gradients without aux: worst rel-Frobenius %.2e\n", worst0);
  std::printf("[aux] gradients with aux: worst rel-Frobenius %.2e; aux part: |d_cpu|/|g_cpu| %.3e, rel-Frobenius "
              "%.2e, cosine %.6f, |d_gpu|/|d_cpu| %.4f\n", worst, std::sqrt(ref / full), rel, cosine, size);
  EXPECT_LE(worst0, 5e-2);
  EXPECT_LE(worst, 5e-2);
  EXPECT_GT(std::sqrt(ref / full), 1e-1) << "the aux term must be a visible part of the gradient";
  EXPECT_GE(cosine, 0.99);
  EXPECT_NEAR(size, 1.0, 0.05);

  ASSERT_EQ(with.gpu_load.size(), 2u);
  ASSERT_EQ(with.cpu.expert_load.size(), 16u);
  int64_t moved = 0;
  for (size_t l = 0; l < 2; ++l) {
    int64_t total = 0;
    for (int64_t e = 0; e < 8; ++e) {
      total += with.gpu_load[l][size_t(e)];
      moved += std::abs(with.gpu_load[l][size_t(e)] - with.cpu.expert_load[l * 8 + size_t(e)]);
    }
    EXPECT_EQ(total, batch.B * batch.S * 2) << "layer " << l;
  }
  EXPECT_LE(moved, int64_t(0.02 * 2 * 2 * double(batch.B * batch.S * 2)));
}

// Every device copy delayed by 3 ms (QT_TEST_COPY_DELAY_US, far longer than a tiny layer's work)
// while it lives, so a missing wait on a copy gives stale data and a different result.
struct DelayedCopies {
  DelayedCopies() { setenv("QT_TEST_COPY_DELAY_US", "3000", 1); }
  ~DelayedCopies() { unsetenv("QT_TEST_COPY_DELAY_US"); }
};

// An offload option changes where data waits, not what is computed: two steps of two micro-batches
// (the second larger: the buffers grow), an evaluation forward between them, then a step with no
// micro-batch, give the same loss, gradients (before and after the clipping step), gradient norm,
// AdamW masters and moments bit for bit as the plain decoder, for 1, 2 and 5 layers, dense, MoE and
// mixed (every second layer MoE: layers of unequal size), with LoRA dropout and clipping, every copy
// delayed. bytes_saved(cfg, layers, largest batch tokens, masters) = how many fewer device bytes the
// offloading decoder must hold.
template <typename BytesSaved>
void expect_offload_changes_nothing(const CudaDecoderOptions& opt, BytesSaved&& bytes_saved) {
  const DelayedCopies delayed;
  for (const char* kind : {"dense", "moe", "mixed"})
    for (const int layers : {1, 2, 5}) {
      const bool moe = std::string(kind) != "dense";
      const std::string j =
          std::string(R"({"model_type":)") + (moe ? R"("qwen3_moe")" : R"("qwen3")") +
          (std::string(kind) == "mixed" ? R"(,"decoder_sparse_step":2)" : "") +
          R"(,"vocab_size":256,"hidden_size":64,"intermediate_size":96,"moe_intermediate_size":32,
          "num_experts":8,"num_experts_per_tok":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
          "tie_word_embeddings":false,"num_hidden_layers":)" + std::to_string(layers) + "}";
      const ModelConfig cfg = parse_hf_config_json(j, "tiny");
      LoraConfig lc;
      lc.r = 4, lc.alpha = 8;
      lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
      std::mt19937_64 rng(31);
      Batch small = tiny_batch(rng), large = tiny_batch(rng);
      large.B = 3;
      for (int64_t i = 0; i < large.S; ++i) {
        large.input_ids.push_back(int32_t(i * 7 % 256)), large.labels.push_back(int32_t(i * 11 % 256));
        large.position_ids.push_back(int32_t(i)), large.segment_ids.push_back(0);
      }
      cuda::Context ctx;
      CudaDecoder host(ctx, cfg, lc, 9, false, opt), dev(ctx, cfg, lc, 9);
      EXPECT_EQ(host.layer_inputs_on_host(), opt.layer_inputs_on_host);
      EXPECT_EQ(host.lora_states_on_host(), opt.lora_states_on_host);
      ASSERT_FALSE(dev.layer_inputs_on_host() || dev.lora_states_on_host());
      const std::string what = std::string(kind) + ", " + std::to_string(layers) + " layers";
      for (int step = 1; step <= 2; ++step) {
        for (CudaDecoder* d : {&host, &dev}) {
          d->zero_grads();
          for (const Batch* b : {&small, &large}) {
            d->set_batch(*b);
            d->forward_backward(0.01, {.p = 0.1, .seed = 4, .step = step, .micro_batch = b == &large});
          }
        }
        expect_same_bits(host.download_grads(), dev.download_grads(), what + " grads");
        for (CudaDecoder* d : {&host, &dev}) d->optimizer_step(step, 1e-2, 0.0, 1e-4);
        const auto hs = host.read_step_stats(), ds = dev.read_step_stats();
        EXPECT_EQ(hs.loss_total, ds.loss_total) << what;
        EXPECT_EQ(hs.grad_norm, ds.grad_norm) << what;
        EXPECT_GT(hs.grad_norm, 1e-4) << what << ": the clipping is exercised";
        expect_same_bits(host.download_grads(), dev.download_grads(), what + " clipped grads");
        for (CudaDecoder* d : {&host, &dev}) d->set_batch(small), d->forward();
        EXPECT_EQ(host.loss_sum(), dev.loss_sum()) << what;
      }
      for (CudaDecoder* d : {&host, &dev}) d->zero_grads(), d->optimizer_step(3, 1e-2, 0.0, 1e-4);  // no micro-batch
      EXPECT_FALSE(host.read_step_stats().skipped) << what;
      EXPECT_EQ(host.read_step_stats().grad_norm, 0.0) << what;
      expect_same_bits(host.download_grads(), dev.download_grads(), what + " zero grads");
      const LoraAdapter masters = dev.download_lora();
      expect_same_bits(host.download_lora(), masters, what + " masters");
      const auto [hm, hv] = host.download_moments();
      const auto [dm, dv] = dev.download_moments();
      expect_same_bits(hm, dm, what + " exp_avg");
      expect_same_bits(hv, dv, what + " exp_avg_sq");
      EXPECT_EQ(dev.device_bytes() - host.device_bytes(), bytes_saved(cfg, layers, large.B * large.S, masters)) << what;
    }
}

// layer_inputs_on_host (the saved layer inputs in pinned host memory, copied on a second stream):
// the device holds two (N,H) buffers instead of L+1.
TEST(CudaDecoder, LayerInputsOnHostChangeNothing) {
  QT_SKIP_WITHOUT_GPU();
  expect_offload_changes_nothing({.layer_inputs_on_host = true},
                                 [](const ModelConfig& cfg, int layers, int64_t tokens, const LoraAdapter&) {
                                   return size_t(layers + 1 - 2) * size_t(tokens * cfg.hidden_size) * 2;
                                 });
}

// Floats of each layer's part of the decoder's flat LoRA layout: every tensor and the layer's end
// padded to 64 floats (cuda_decoder.cpp kLoraAlign).
std::vector<int64_t> padded_lora_elems_per_layer(const LoraAdapter& a) {
  const auto pad = [](int64_t n) { return (n + 63) / 64 * 64; };
  std::vector<int64_t> out;
  for (const auto& layer : a.layers) {
    int64_t n = 0;
    for (const auto& p : layer.slot)
      if (p.present()) n = pad(pad(n) + p.A.numel()) + p.B.numel();
    out.push_back(pad(n));
  }
  return out;
}

// lora_states_on_host (masters, gradients and moments in pinned host memory, streamed per layer and
// per optimizer chunk), alone and with the saved layer inputs on the host too: the device holds two
// layers' masters and two layers' gradients (a slot rounded up to an even size) instead of four flat
// buffers of every parameter.
TEST(CudaDecoder, LoraStatesOnHostChangeNothing) {
  QT_SKIP_WITHOUT_GPU();
  const auto saved = [](bool inputs_too) {
    return [inputs_too](const ModelConfig& cfg, int layers, int64_t tokens, const LoraAdapter& masters) {
      const std::vector<int64_t> per = padded_lora_elems_per_layer(masters);
      int64_t total = 0, slot = 0;
      for (int64_t n : per) total += n, slot = std::max(slot, n);
      slot = (slot + 127) / 128 * 128;  // two halves of 64-float multiples
      size_t bytes = size_t(4 * total - 4 * slot) * sizeof(float);
      if (inputs_too) bytes += size_t(layers + 1 - 2) * size_t(tokens * cfg.hidden_size) * 2;
      return bytes;
    };
  };
  expect_offload_changes_nothing({.lora_states_on_host = true}, saved(false));
  expect_offload_changes_nothing({.layer_inputs_on_host = true, .lora_states_on_host = true}, saved(true));
}

// A resume pushes masters and moments into the host state (upload_state) and a checkpoint reads them
// back (download_lora / download_moments): the same bits either way. The decoders run a forward
// first, so the device slots hold the old masters when the upload replaces them: the next forward
// and training step of the decoder with lora_states_on_host equal those of a plain decoder resumed
// from the same state (every copy delayed).
TEST(CudaDecoder, LoraStatesOnHostResume) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(5);
  TinySetup t = tiny_setup(true, rng);
  const Batch batch = tiny_batch(rng);
  cuda::Context ctx;
  CudaDecoder src(ctx, t.w, t.lora);
  src.zero_grads(), src.set_batch(batch), src.forward_backward(), src.optimizer_step(1, 1e-2, 0.0, 1.0);
  const LoraAdapter w = src.download_lora();
  const auto [m, v] = src.download_moments();
  const DelayedCopies delayed;
  CudaDecoder host(ctx, t.w, t.lora, {.lora_states_on_host = true}), dev(ctx, t.w, t.lora);
  expect_same_bits(host.download_grads(), dev.download_grads(), "zero gradients before any step");
  for (CudaDecoder* d : {&host, &dev}) d->set_batch(batch), d->forward();
  const double before = host.loss_sum();
  EXPECT_EQ(before, dev.loss_sum()) << "before the upload";
  for (CudaDecoder* d : {&host, &dev}) d->upload_state(w, m, v), d->forward();
  EXPECT_EQ(host.loss_sum(), dev.loss_sum()) << "after the upload";
  EXPECT_NE(host.loss_sum(), before) << "the uploaded masters change the loss (stale slots would not)";
  expect_same_bits(host.download_lora(), w, "uploaded masters");
  expect_same_bits(host.download_moments().first, m, "uploaded exp_avg");
  expect_same_bits(host.download_moments().second, v, "uploaded exp_avg_sq");
  for (CudaDecoder* d : {&host, &dev})
    d->zero_grads(), d->set_batch(batch), d->forward_backward(), d->optimizer_step(2, 1e-2, 0.01, 1.0);
  EXPECT_EQ(host.read_step_stats().grad_norm, dev.read_step_stats().grad_norm);
  expect_same_bits(host.download_lora(), dev.download_lora(), "masters after the resumed step");
  expect_same_bits(host.download_moments().first, dev.download_moments().first, "exp_avg after the resumed step");
  expect_same_bits(host.download_moments().second, dev.download_moments().second, "exp_avg_sq after the resumed step");
}

}  // namespace
}  // namespace qt
