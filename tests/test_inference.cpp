// KV-cache decoding (model/inference.h) against the training decoder's full forward, for the three
// families (qwen2 with q/k/v biases and untied head, qwen3 with q/k norm and head_dim != H/heads,
// qwen3_moe with routing, mlp_only_layers and the bundled tiny config), with and without a LoRA
// adapter whose A and B are random and non-zero; greedy generation against repeated argmax of the
// full forward; top-k = 1 sampling against greedy; eval's loss against the decoder's; and both
// against the HF float64 golden fixtures.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <vector>

#include "io/batch_json.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "model/generation.h"
#include "model/inference.h"
#include "model/lora.h"
#include "model/weights.h"
#include "train/evaluate.h"

using namespace qt;
namespace fs = std::filesystem;

namespace {

std::string qwen2_json() {
  return R"({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 101, "tie_word_embeddings": false,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128})";
}
std::string qwen3_json() {
  return R"({"model_type": "qwen3", "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 97,
    "tie_word_embeddings": true, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128})";
}
// Three layers: MoE, dense (mlp_only_layers), MoE; top-2 of 4 experts without renormalisation.
std::string moe_json() {
  return R"({"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 24,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
    "num_experts_per_tok": 2, "norm_topk_prob": false, "mlp_only_layers": [1], "decoder_sparse_step": 1,
    "vocab_size": 89, "tie_word_embeddings": false, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 128})";
}
std::string bundled_moe_json() {
  std::ifstream f(std::string(QT_SOURCE_DIR) + "/configs/tiny-qwen3-moe.json");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// An adapter on all seven modules with random, non-zero A and B.
LoraAdapter random_lora(const ModelConfig& cfg, DType dtype, uint64_t seed) {
  LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  LoraAdapter a = init_lora(cfg, lc, dtype, seed);
  std::mt19937_64 rng(seed + 1);
  std::normal_distribution<double> d(0.0, 0.1);
  for (auto& layer : a.layers)
    for (auto& p : layer.slot)
      if (p.present())
        for (Tensor* t : {&p.A, &p.B}) {
          std::vector<double> v(static_cast<size_t>(t->numel()));
          for (double& x : v) x = d(rng);
          convert_elements(t->raw(), dtype, v.data(), DType::F64, v.size());
        }
  return a;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = int32_t(rng() % uint64_t(V));
  return ids;
}

// Logits (S,V) of the full forward over ids.
template <typename T>
std::vector<T> full_logits(const ModelWeights& w, const LoraAdapter* lora, const std::vector<int32_t>& ids) {
  Batch b;
  b.B = 1;
  b.S = int64_t(ids.size());
  b.input_ids = ids;
  b.labels.assign(ids.size(), -100);
  QwenDecoder<T> dec(w, lora);
  const StepResult r = dec.forward_backward(b, nullptr, true);
  return std::vector<T>(r.logits.data<T>(), r.logits.data<T>() + r.logits.numel());
}

// Logits (S,V) through the KV cache: the prompt in two chunks (so a chunk of several tokens
// attends to a non-empty cache), then one token at a time.
template <typename T>
std::vector<T> cached_logits(const ModelWeights& w, const LoraAdapter* lora, const std::vector<int32_t>& ids,
                             int64_t prompt) {
  KvDecoder<T> dec(w, lora);
  std::vector<T> out;
  const int64_t first = prompt / 2;
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, first}, {first, prompt}}) {
    const std::vector<T> l = dec.append(std::vector<int32_t>(ids.begin() + b, ids.begin() + e), true);
    out.insert(out.end(), l.begin(), l.end());
  }
  for (size_t i = size_t(prompt); i < ids.size(); ++i) {
    const std::vector<T> l = dec.append({ids[i]});
    out.insert(out.end(), l.begin(), l.end());
  }
  EXPECT_EQ(dec.length(), int64_t(ids.size()));
  return out;
}

struct Diff {
  double max_abs = 0, max_ref = 0;
};
template <typename T>
Diff compare(const std::vector<T>& got, const std::vector<T>& ref) {
  Diff d;
  EXPECT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    d.max_abs = std::max(d.max_abs, std::fabs(double(got[i]) - double(ref[i])));
    d.max_ref = std::max(d.max_ref, std::fabs(double(ref[i])));
  }
  return d;
}

// with_f64: also the float64 comparison (skipped for the bundled config: its 151,936-token
// vocabulary makes float64 weights slow to draw, and the small configs cover the same code).
void check_family(const std::string& json, double weight_std, bool with_f64 = true) {
  const ModelConfig cfg = parse_hf_config_json(json, "test");
  const std::vector<int32_t> ids = random_ids(13, cfg.vocab_size, 5);  // 8 prompt + 5 decoded
  const ModelWeights w64 = with_f64 ? random_model_weights(cfg, DType::F64, 11, weight_std) : ModelWeights{};
  const ModelWeights w32 = random_model_weights(cfg, DType::F32, 11, weight_std);
  const LoraAdapter lora64 = with_f64 ? random_lora(cfg, DType::F64, 3) : LoraAdapter{};
  const LoraAdapter lora32 = random_lora(cfg, DType::F32, 3);
  for (bool with_lora : {false, true}) {
    SCOPED_TRACE(with_lora ? "with LoRA" : "base");
    // float64: the cache path does the same arithmetic as the full forward except the summation
    // order inside the matrix products (BLAS blocks differently for 1 row than for 13), so the two
    // agree to a few ulps of double.
    if (with_f64) {
      const LoraAdapter* lp64 = with_lora ? &lora64 : nullptr;
      const Diff d64 = compare(cached_logits<double>(w64, lp64, ids, 8), full_logits<double>(w64, lp64, ids));
      EXPECT_LE(d64.max_abs, 1e-12 * std::max(1.0, d64.max_ref)) << "f64 max |logit| " << d64.max_ref;
    }
    // float32 (the engine): the same reordering in each of the ~2L+2 chained matrix products
    // (inner dimension <= 256) gives differences of order sqrt(K) * eps32 ~ 1e-6 of the largest
    // logit (measured: <= 8e-7 on these configs). 1e-5 of it leaves a 10x margin and still catches
    // any wrong position, mask, cache row or LoRA term, which move logits by O(max |logit|).
    const LoraAdapter* lp32 = with_lora ? &lora32 : nullptr;
    const Diff d32 = compare(cached_logits<float>(w32, lp32, ids, 8), full_logits<float>(w32, lp32, ids));
    std::printf("  f32 %s: max |diff| %.3g, max |logit| %.3g\n", with_lora ? "lora" : "base", d32.max_abs,
                d32.max_ref);
    EXPECT_LE(d32.max_abs, 1e-5 * d32.max_ref);
  }
}

}  // namespace

TEST(KvCache, Qwen2MatchesFullForward) { check_family(qwen2_json(), 0.2); }
TEST(KvCache, Qwen3MatchesFullForward) { check_family(qwen3_json(), 0.2); }
TEST(KvCache, Qwen3MoeMatchesFullForward) { check_family(moe_json(), 0.2); }
TEST(KvCache, BundledTinyMoeMatchesFullForward) { check_family(bundled_moe_json(), 0.05, false); }

TEST(KvCache, TruncateThenReplayGivesTheSameLogits) {
  const ModelConfig cfg = parse_hf_config_json(qwen3_json(), "test");
  const ModelWeights w = random_model_weights(cfg, DType::F64, 2, 0.2);
  const std::vector<int32_t> ids = random_ids(10, cfg.vocab_size, 9);
  KvDecoder<double> dec(w, nullptr);
  const std::vector<double> ref = dec.append(ids);
  dec.truncate(4);
  EXPECT_EQ(dec.length(), 4);
  EXPECT_EQ(dec.tokens(), std::vector<int32_t>(ids.begin(), ids.begin() + 4));
  const std::vector<double> again = dec.append(std::vector<int32_t>(ids.begin() + 4, ids.end()));
  const Diff d = compare(again, ref);
  EXPECT_LE(d.max_abs, 1e-12 * std::max(1.0, d.max_ref));
}

TEST(KvCache, OutOfVocabularyIdIsAUserError) {
  const ModelConfig cfg = parse_hf_config_json(qwen3_json(), "test");
  const ModelWeights w = random_model_weights(cfg, DType::F32, 2);
  KvDecoder<float> dec(w, nullptr);
  try {
    dec.append({1, int32_t(cfg.vocab_size)});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[generate] token id 97"), std::string::npos) << e.what();
  }
  EXPECT_EQ(dec.length(), 0);
}

TEST(Generation, UncachedSuffixKeepsTheCommonPrefix) {
  const ModelConfig cfg = parse_hf_config_json(qwen3_json(), "test");
  const ModelWeights w = random_model_weights(cfg, DType::F32, 2);
  KvDecoder<float> dec(w, nullptr);
  dec.append({5, 6, 7, 8});
  EXPECT_EQ(uncached_suffix(dec, {5, 6, 7, 8, 9, 10}), (std::vector<int32_t>{9, 10}));
  EXPECT_EQ(dec.length(), 4);
  EXPECT_EQ(uncached_suffix(dec, {5, 6, 1, 2}), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(dec.length(), 2);
  EXPECT_EQ(uncached_suffix(dec, {5, 6}), (std::vector<int32_t>{6}));  // the last token runs again
  EXPECT_EQ(dec.length(), 1);
}

// Greedy generation through the cache picks, at every step, the argmax of the full forward over the
// sequence so far; sampling with top_k = 1 (any temperature) is greedy too.
TEST(Generation, GreedyEqualsRepeatedFullForwardArgmax) {
  for (const std::string& json : {qwen2_json(), moe_json()}) {
    const ModelConfig cfg = parse_hf_config_json(json, "test");
    const ModelWeights w = random_model_weights(cfg, DType::F32, 21, 0.3);
    const LoraAdapter lora = random_lora(cfg, DType::F32, 4);
    const std::vector<int32_t> prompt = random_ids(6, cfg.vocab_size, 8);
    const int64_t n_new = 8;

    std::vector<int32_t> expected, seq = prompt;
    for (int64_t i = 0; i < n_new; ++i) {
      const std::vector<float> l = full_logits<float>(w, &lora, seq);
      const int32_t id = argmax_token(l.data() + (seq.size() - 1) * size_t(cfg.vocab_size), cfg.vocab_size);
      expected.push_back(id);
      seq.push_back(id);
    }

    auto run = [&](const SamplingOptions& so, uint64_t seed) {
      KvDecoder<float> dec(w, &lora);
      Sampler s(so, seed);
      std::vector<int32_t> got;
      const GenerationStats st = generate(dec, prompt, s, n_new, {}, [&](int32_t id) { got.push_back(id); });
      EXPECT_EQ(st.new_tokens, n_new);
      EXPECT_FALSE(st.stopped);
      EXPECT_EQ(dec.length(), int64_t(prompt.size()) + n_new - 1);  // the last token is not run
      return got;
    };
    EXPECT_EQ(run(SamplingOptions{}, 0), expected);
    SamplingOptions top1;
    top1.do_sample = true;
    top1.temperature = 0.7;
    top1.top_k = 1;
    EXPECT_EQ(run(top1, 1), expected);
    EXPECT_EQ(run(top1, 2), expected);

    // A stop token ends generation before it is emitted.
    KvDecoder<float> dec(w, &lora);
    Sampler greedy(SamplingOptions{}, 0);
    std::vector<int32_t> got;
    const GenerationStats st = generate(dec, prompt, greedy, n_new, {expected[3]}, [&](int32_t id) { got.push_back(id); });
    const auto first_stop = std::find(expected.begin(), expected.end(), expected[3]) - expected.begin();
    EXPECT_TRUE(st.stopped);
    EXPECT_EQ(got, std::vector<int32_t>(expected.begin(), expected.begin() + first_stop));
  }
}

// evaluate_dataset (eval's loss) equals the decoder's loss on each sequence as its own batch, and
// does not depend on the micro-batch size (padding never reaches the loss).
TEST(Eval, LossEqualsDecoderLoss) {
  const ModelConfig cfg = parse_hf_config_json(moe_json(), "test");
  const ModelWeights w = random_model_weights(cfg, DType::F32, 31, 0.3);
  const LoraAdapter lora = random_lora(cfg, DType::F32, 6);
  data::TokenizedDataset ds;
  const std::vector<int64_t> lengths = {7, 12, 4, 9};
  for (size_t i = 0; i < lengths.size(); ++i) {
    const std::vector<int32_t> ids = random_ids(lengths[i], cfg.vocab_size, 40 + i);
    ds.input_ids.insert(ds.input_ids.end(), ids.begin(), ids.end());
    for (int64_t t = 0; t < lengths[i]; ++t) ds.labels.push_back(t < 2 ? -100 : ids[size_t(t)]);
    ds.doc_lengths.push_back(int32_t(lengths[i]));
    ds.seq_offsets.push_back(int64_t(ds.input_ids.size()));
    ds.seq_doc_offsets.push_back(int64_t(ds.doc_lengths.size()));
  }
  QwenDecoder<float> dec(w, &lora);
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < ds.size(); ++i) {
    Batch b;
    b.B = 1;
    b.S = ds.length(i);
    b.input_ids.assign(ds.ids(i).begin(), ds.ids(i).end());
    b.labels.assign(ds.label_span(i).begin(), ds.label_span(i).end());
    const StepResult r = dec.forward_backward(b, nullptr, false);
    sum += r.loss_sum;
    count += r.count;
  }
  EXPECT_EQ(count, 7 - 2 + 12 - 2 + 4 - 2 + 9 - 2);
  for (int64_t mb : {1, 3}) {
    const EvalResult e = evaluate_dataset(dec, ds, mb, 0);
    EXPECT_EQ(e.count, count);
    EXPECT_EQ(e.sequences, 4);
    // float32 losses of batches padded to different lengths: the same per-token values up to
    // matrix-product summation order (relative 1e-6 of the ~log(V) = 4.5 loss).
    EXPECT_NEAR(e.ce_loss(), sum / double(count), 1e-6 * sum / double(count)) << "micro batch " << mb;
    EXPECT_DOUBLE_EQ(e.perplexity(), std::exp(e.ce_loss()));
    EXPECT_EQ(e.loss(), e.ce_loss());  // no router aux loss in this config
  }
}

// Against HF transformers + PEFT in float64 (tests/golden): every row of every fixture batch run
// through the KV cache (first half as a prefill, then token by token) in float64 gives HF's logits
// as closely as the full forward does, and eval's loss over the batch rows (the float32 engine)
// gives HF's loss.
TEST(Golden, KvCacheLogitsAndEvalLossMatchHf) {
  const fs::path root = fs::path(QT_SOURCE_DIR) / "tests" / "golden";
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    const fs::path dir = entry.path();
    if (!fs::exists(dir / "expected.safetensors")) continue;
    SCOPED_TRACE(dir.filename().string());
    ++cases;
    const ModelConfig cfg = load_hf_config(dir.string());
    const Batch batch = load_batch_json((dir / "batch.json").string());
    ASSERT_TRUE(batch.position_ids.empty() && batch.segment_ids.empty());
    SafetensorsFile expected((dir / "expected.safetensors").string());
    const Tensor ref_logits = expected.view("logits");  // (B,S,V) F64
    const double ref_loss = expected.view("loss").data<double>()[0];

    const ModelWeights w64 = load_model_weights(dir.string(), cfg, DType::F64);
    const LoraAdapter a64 = load_peft_adapter((dir / "adapter").string(), cfg, DType::F64);
    const int64_t S = batch.S, V = cfg.vocab_size;
    for (int64_t b = 0; b < batch.B; ++b) {
      const std::vector<int32_t> row(batch.input_ids.begin() + b * S, batch.input_ids.begin() + (b + 1) * S);
      const std::vector<double> got = cached_logits<double>(w64, &a64, row, S / 2);
      const std::vector<double> want(ref_logits.data<double>() + b * S * V, ref_logits.data<double>() + (b + 1) * S * V);
      const std::vector<double> full = full_logits<double>(w64, &a64, row);
      const Diff d_hf = compare(got, want), d_full = compare(got, full), d_full_hf = compare(full, want);
      std::printf("  row %lld: cache vs HF %.3g, cache vs full %.3g, full vs HF %.3g (max |logit| %.3g)\n",
                  (long long)b, d_hf.max_abs, d_full.max_abs, d_full_hf.max_abs, d_hf.max_ref);
      // The cache reproduces our float64 full forward to rounding; the fixtures themselves carry
      // float32 rounding (HF's RMSNorm upcasts to float32, which in a float64 model rounds), which
      // our full forward sees too (measured <= 6e-7 of the largest logit for both).
      EXPECT_LE(d_full.max_abs, 1e-12 * d_hf.max_ref) << "row " << b;
      EXPECT_LE(d_hf.max_abs, 2e-6 * d_hf.max_ref) << "row " << b;
      EXPECT_LE(d_hf.max_abs, d_full_hf.max_abs + 1e-12 * d_hf.max_ref) << "row " << b;
    }

    const ModelWeights w32 = load_model_weights(dir.string(), cfg, DType::F32);
    const LoraAdapter a32 = load_peft_adapter((dir / "adapter").string(), cfg, DType::F32);
    data::TokenizedDataset ds;
    for (int64_t b = 0; b < batch.B; ++b) {
      ds.input_ids.insert(ds.input_ids.end(), batch.input_ids.begin() + b * S, batch.input_ids.begin() + (b + 1) * S);
      ds.labels.insert(ds.labels.end(), batch.labels.begin() + b * S, batch.labels.begin() + (b + 1) * S);
      ds.doc_lengths.push_back(int32_t(S));
      ds.seq_offsets.push_back(int64_t(ds.input_ids.size()));
      ds.seq_doc_offsets.push_back(int64_t(ds.doc_lengths.size()));
    }
    QwenDecoder<float> dec(w32, &a32);
    const EvalResult e = evaluate_dataset(dec, ds, 1, 0);
    EXPECT_NEAR(e.loss(), ref_loss, 1e-5 * ref_loss);  // the golden tolerance of the float32 engine
  }
  EXPECT_GE(cases, 7);
}
