// The QLoRA CUDA decoder (model/cuda_decoder.h with ModelWeights::nf4: the projections kept in NF4 on
// the device and dequantized per layer into a bf16 scratch) against the bf16 CUDA decoder fed the
// dequantized weights (ModelWeights without nf4: the same values uploaded as bf16). The dequantized
// bf16 values are identical (test_cuda_nf4), and everything after them is the same kernels in the
// same order, so the two must agree BIT FOR BIT: loss, logits, LoRA gradients and the masters after
// AdamW steps, over two steps of two micro-batches with LoRA dropout. Cases: dense Qwen2 (biases)
// with quant-state dtypes bf16, f16 and f32, and a Qwen3-MoE with one dense and one MoE layer (the
// scratch shared by layers of both kinds; one NF4 tensor per expert). Also the random-weight
// (benchmark) constructor with load_in_4bit: a finite loss and less device memory than bf16.
// The untied MoE case also keeps the NF4 decoder's input embeddings in host memory (QLoRA's
// default): the gather reads the same bf16 rows, so the results stay bit for bit the same.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "cuda_parity.h"
#include "io/hf_config.h"
#include "model/cuda_decoder.h"
#include "model/weights_4bit.h"

namespace qt {
namespace {

ModelConfig qlora_config(bool moe) {
  const char* dense = R"({"model_type":"qwen2","vocab_size":256,"hidden_size":64,"intermediate_size":96,
    "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,
    "rope_theta":10000.0,"tie_word_embeddings":true})";
  const char* mixed = R"({"model_type":"qwen3_moe","vocab_size":256,"hidden_size":64,"intermediate_size":160,
    "moe_intermediate_size":32,"num_experts":4,"num_experts_per_tok":2,"num_hidden_layers":2,
    "mlp_only_layers":[1],"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"rms_norm_eps":1e-6,
    "rope_theta":1000000.0,"tie_word_embeddings":false,"norm_topk_prob":true})";
  return parse_hf_config_json(moe ? mixed : dense, moe ? "tiny-moe" : "tiny");
}

Batch qlora_batch(std::mt19937_64& rng) {
  Batch b;
  b.B = 2, b.S = 20;
  std::uniform_int_distribution<int32_t> tok(0, 255);
  for (int64_t i = 0; i < b.B * b.S; ++i) b.input_ids.push_back(tok(rng));
  b.labels = b.input_ids;
  b.labels[3] = -100;
  return b;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Every A and B of two adapters bit for bit.
void expect_same_adapter(const LoraAdapter& a, const LoraAdapter& b, const std::string& what) {
  testing::for_each_lora_pair(a, b, [&](const Tensor& x, const Tensor& y, const std::string& n) {
    EXPECT_TRUE(same_bits(x, y)) << what << " " << n;
  });
}

// On each decoder: zero_grads, then forward_backward of micro-batches b1 and b2 (grad scale 1/64,
// LoRA dropout p with the step's masks).
void accumulate_step(std::initializer_list<CudaDecoder*> decoders, const Batch& b1, const Batch& b2, int64_t step,
                     double p) {
  for (CudaDecoder* d : decoders) {
    d->zero_grads();
    int mb = 0;
    for (const Batch* b : {&b1, &b2}) {
      d->set_batch(*b);
      d->forward_backward(1.0 / 64.0, LoraDropout{p, 9, step, mb++});
    }
  }
}

void check_nf4_equals_bf16(bool moe, DType storage) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(moe ? 41 : 43);
  const ModelConfig cfg = qlora_config(moe);
  ModelWeights w = random_model_weights(cfg, DType::F32, 3, 0.08);
  const int64_t nq = nf4_round_trip_weights(w, storage);
  ASSERT_TRUE(w.nf4);
  EXPECT_EQ(nq, int64_t(w.nf4->tensors.size()));
  ModelWeights plain = w;  // the same dequantized floats, no NF4 data: the bf16 path
  plain.nf4 = nullptr;
  const LoraAdapter lora = testing::random_lora_all_modules(cfg, rng, 0.05f);
  const Batch b1 = qlora_batch(rng), b2 = qlora_batch(rng);

  cuda::Context ctx;
  CudaDecoder q4(ctx, w, lora, {.embeddings_on_host = moe}), bf(ctx, plain, lora);
  EXPECT_EQ(q4.embeddings_on_host(), moe);
  EXPECT_FALSE(bf.embeddings_on_host());
  for (CudaDecoder* d : {&q4, &bf}) {  // forward only
    d->set_batch(b1);
    d->forward();
  }
  EXPECT_EQ(q4.loss_sum(), bf.loss_sum()) << "forward loss";
  EXPECT_TRUE(same_bits(q4.logits(), bf.logits())) << "logits";
  for (int64_t step = 1; step <= 2; ++step) {
    accumulate_step({&q4, &bf}, b1, b2, step, 0.1);
    expect_same_adapter(q4.download_grads(), bf.download_grads(), "grads of step " + std::to_string(step));
    for (CudaDecoder* d : {&q4, &bf}) d->optimizer_step(step, 1e-3, 0.01, 1.0);
    const CudaDecoder::StepStats s4 = q4.read_step_stats(), sb = bf.read_step_stats();
    EXPECT_EQ(s4.loss_total, sb.loss_total) << "step " << step;
    EXPECT_EQ(s4.grad_norm, sb.grad_norm) << "step " << step;
    EXPECT_FALSE(s4.skipped);
    std::printf("[qlora] %s %s step %lld: loss total %.9g (both), grad norm %.9g\n", moe ? "moe" : "dense",
                std::string(dtype_name(storage)).c_str(), static_cast<long long>(step), s4.loss_total, s4.grad_norm);
  }
  expect_same_adapter(q4.download_lora(), bf.download_lora(), "masters after two steps");
  std::printf("[qlora] device bytes: nf4 %zu, bf16 %zu\n", q4.device_bytes(), bf.device_bytes());
}

TEST(CudaQlora, DenseNf4EqualsBf16OfDequantizedWeights) { check_nf4_equals_bf16(false, DType::BF16); }
TEST(CudaQlora, DenseF16QuantStateEqualsBf16OfDequantizedWeights) { check_nf4_equals_bf16(false, DType::F16); }
TEST(CudaQlora, DenseF32QuantStateEqualsBf16OfDequantizedWeights) { check_nf4_equals_bf16(false, DType::F32); }
TEST(CudaQlora, MoeNf4EqualsBf16OfDequantizedWeights) { check_nf4_equals_bf16(true, DType::BF16); }

// Every A and B of two adapters elementwise within rtol |ref| + atol max|ref| (expect_close).
void expect_close_adapter(const LoraAdapter& got, const LoraAdapter& ref, const std::string& what, double tol) {
  const auto vec = [](const Tensor& t) { return std::vector<float>(t.data<float>(), t.data<float>() + t.numel()); };
  testing::for_each_lora_pair(got, ref, [&](const Tensor& x, const Tensor& y, const std::string& n) {
    testing::expect_close(what + " " + n, vec(x), vec(y), tol, tol);
  });
}

// nf4_expert_chunk: a MoE layer's experts dequantized a chunk at a time train as with the whole
// layer's scratch: each chunk's products cover its experts' rows with the same kernels, so the losses
// agree to rounding (1e-5: at most a few activations rounded differently, should a product's tile
// choice depend on the number of experts) and the gradients and masters after two steps (the first with LoRA
// dropout, the second without: the fused LoRA input-gradient products) elementwise within 1e-3 of the
// scale (the expert LoRA weight gradients may be summed over rows in another split order; a chunk's
// wrong experts, rows or LoRA pointers would be off by the size of the values). Two shapes: the tiny
// mixed model (4 experts in chunks of 1 and 3: the last one short; thin products only) and a wider
// one whose expert products are wider than 64 columns (the wgmma path on Hopper; 6 experts in chunks
// of 4). The scratch holds 3 x chunk experts instead of 3 x E. The benchmark constructor makes the same
// NF4 experts chunk by chunk (the same loss).
void check_expert_chunks(const std::string& name, const ModelConfig& cfg, const std::vector<int64_t>& chunks) {
  std::mt19937_64 rng(47);
  ModelWeights w = random_model_weights(cfg, DType::F32, 3, 0.08);
  nf4_round_trip_weights(w, DType::BF16);
  const LoraAdapter lora = testing::random_lora_all_modules(cfg, rng, 0.05f, 8);
  const Batch b1 = qlora_batch(rng), b2 = qlora_batch(rng);
  const auto near = [](double a, double b) { return std::fabs(a - b) <= 1e-5 * std::fabs(b); };
  cuda::Context ctx;
  for (const int64_t chunk : chunks) {
    const std::string what = name + ", chunk " + std::to_string(chunk);
    CudaDecoder whole(ctx, w, lora), part(ctx, w, lora, {.nf4_expert_chunk = chunk});
    for (CudaDecoder* d : {&whole, &part}) d->set_batch(b1), d->forward();
    EXPECT_TRUE(near(part.loss_sum(), whole.loss_sum())) << what << ": " << part.loss_sum() << " vs " << whole.loss_sum();
    for (int64_t step = 1; step <= 2; ++step) {
      accumulate_step({&whole, &part}, b1, b2, step, step == 1 ? 0.1 : 0.0);
      expect_close_adapter(part.download_grads(), whole.download_grads(), what + " grads", 1e-3);
      for (CudaDecoder* d : {&whole, &part}) d->optimizer_step(step, 1e-3, 0.01, 1.0);
      const CudaDecoder::StepStats sp = part.read_step_stats(), sw = whole.read_step_stats();
      EXPECT_TRUE(near(sp.loss_total, sw.loss_total)) << what << " step " << step;
      EXPECT_TRUE(near(sp.grad_norm, sw.grad_norm)) << what << " step " << step;
    }
    expect_close_adapter(part.download_lora(), whole.download_lora(), what + " masters", 1e-3);
    EXPECT_EQ(whole.device_bytes() - part.device_bytes(),
              size_t(3 * (cfg.num_experts - chunk) * cfg.moe_intermediate_size * cfg.hidden_size * 2))
        << what;
  }
  double loss[2] = {0, 0};
  for (int c = 0; c < 2; ++c) {
    CudaDecoder d(ctx, cfg, lora.cfg, 7, /*load_in_4bit=*/true, {.nf4_expert_chunk = c ? chunks[0] : 0});
    d.set_batch(b1);
    d.forward();
    loss[c] = d.loss_sum();
  }
  EXPECT_TRUE(near(loss[1], loss[0])) << name << ": random weights made in chunks: " << loss[1] << " vs " << loss[0];
}

TEST(CudaQlora, ExpertChunksTrainAsTheWholeLayer) {
  QT_SKIP_WITHOUT_GPU();
  check_expert_chunks("tiny-moe", qlora_config(true), {1, 3});
  check_expert_chunks("wide-moe", parse_hf_config_json(R"({"model_type":"qwen3_moe","vocab_size":256,"hidden_size":128,
    "intermediate_size":256,"moe_intermediate_size":96,"num_experts":6,"num_experts_per_tok":2,"num_hidden_layers":2,
    "num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
    "tie_word_embeddings":false,"norm_topk_prob":true})", "wide-moe"),
                      {4});
}

// A base whose NF4 data misses a projection is refused with the tensor's name.
TEST(CudaQlora, MissingNf4TensorIsRefused) {
  QT_SKIP_WITHOUT_GPU();
  const ModelConfig cfg = qlora_config(true);
  ModelWeights w = random_model_weights(cfg, DType::F32, 3, 0.08);
  nf4_round_trip_weights(w, DType::BF16);
  auto partial = std::make_shared<Nf4Base>(*w.nf4);
  partial->tensors.erase("model.layers.0.mlp.experts.2.up_proj.weight");
  w.nf4 = partial;
  LoraConfig lc;
  lc.target_modules = {"q_proj"};
  const LoraAdapter lora = init_lora(cfg, lc, DType::F32, 1);
  cuda::Context ctx;
  try {
    CudaDecoder d(ctx, w, lora);
    ADD_FAILURE() << "accepted a base without experts.2.up_proj";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.experts.2.up_proj.weight"), std::string::npos) << e.what();
  }
}

// The benchmark constructor: random weights quantized on the device. The NF4 projections take about
// a quarter of their bf16 bytes (plus one layer's scratch), and a step runs to a finite loss near ln V.
TEST(CudaQlora, RandomWeightsIn4bit) {
  QT_SKIP_WITHOUT_GPU();
  const ModelConfig cfg = parse_hf_config_json(R"({"model_type":"qwen3","vocab_size":512,"hidden_size":512,
    "intermediate_size":1536,"num_hidden_layers":8,"num_attention_heads":8,"num_key_value_heads":4,"head_dim":64,
    "rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true})", "bench");
  LoraConfig lc;
  lc.r = 8, lc.alpha = 16;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  cuda::Context ctx;
  std::mt19937_64 rng(2);
  const Batch b = qlora_batch(rng);
  double loss[2] = {0, 0};
  size_t bytes[2] = {0, 0};
  for (int q = 0; q < 2; ++q) {
    CudaDecoder d(ctx, cfg, lc, 7, q == 1);
    d.set_batch(b);
    d.zero_grads();
    d.forward_backward();
    d.optimizer_step(1, 1e-4, 0.0, 1.0);
    const CudaDecoder::StepStats st = d.read_step_stats();
    loss[q] = st.loss_total / double(d.count());
    bytes[q] = d.device_bytes();
    EXPECT_TRUE(std::isfinite(st.grad_norm));
    EXPECT_FALSE(st.skipped);
  }
  std::printf("[qlora] random 8x512: loss bf16 %.5f nf4 %.5f; device bytes bf16 %zu nf4 %zu\n", loss[0], loss[1],
              bytes[0], bytes[1]);
  EXPECT_NEAR(loss[1], std::log(512.0), 0.5);
  // projections: 8 layers * (q 512x512 + k,v 256x512 + o 512x512 + 3 * 1536x512) elements
  const double proj = 8.0 * (2 * 512 * 512 + 2 * 256 * 512 + 3 * 1536 * 512);
  const double saved = double(bytes[0]) - double(bytes[1]);
  // minus the scratch, which holds one projection at a time (the largest, 1536x512)
  const double expect = proj * 2.0 - proj * (0.5 + 1.0 / 64 + 1.0 / 4096) - 1536.0 * 512.0 * 2.0;
  EXPECT_NEAR(saved, expect, 0.01 * proj) << "device_bytes does not show the NF4 saving";
}

// Input embeddings in host memory: the same loss and gradients bit for bit as on the device, V x H
// bf16 fewer device bytes; tied embeddings (the lm_head too) stay on the device whatever is asked.
TEST(CudaQlora, EmbeddingsOnHostEqualDevice) {
  QT_SKIP_WITHOUT_GPU();
  const ModelConfig cfg = qlora_config(true);  // untied
  const ModelWeights w = random_model_weights(cfg, DType::F32, 4, 0.08);
  LoraConfig lc;
  lc.r = 4, lc.alpha = 8;
  lc.target_modules = {"q_proj", "v_proj", "gate_proj", "down_proj"};
  const LoraAdapter lora = init_lora(cfg, lc, DType::F32, 6);
  std::mt19937_64 rng(8);
  const Batch b = qlora_batch(rng);
  cuda::Context ctx;
  CudaDecoder host(ctx, w, lora, {.embeddings_on_host = true}), dev(ctx, w, lora);
  ASSERT_TRUE(host.embeddings_on_host());
  for (CudaDecoder* d : {&host, &dev}) {
    d->set_batch(b);
    d->zero_grads();
    d->forward_backward();
  }
  EXPECT_EQ(host.read_step_stats().loss_total, dev.read_step_stats().loss_total);
  expect_same_adapter(host.download_grads(), dev.download_grads(), "grads");
  EXPECT_EQ(dev.device_bytes() - host.device_bytes(), size_t(cfg.vocab_size * cfg.hidden_size) * 2);
  const ModelConfig tied = qlora_config(false);
  const ModelWeights wt = random_model_weights(tied, DType::F32, 4, 0.08);
  CudaDecoder t(ctx, wt, init_lora(tied, lc, DType::F32, 6), {.embeddings_on_host = true});
  EXPECT_FALSE(t.embeddings_on_host());
}

}  // namespace
}  // namespace qt
