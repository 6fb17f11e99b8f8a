// Base weight loading: every name and shape of REFERENCE.md section 3, the three expert layouts,
// float dtypes on disk, sharding, tied embeddings, and errors naming the tensor; random init.
//
// The reference values are small multiples of 1/8 (exact in f32, bf16 and f16), generated here
// independently of the loader, so every loaded element can be compared exactly.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/weights.h"
#include "test_files.h"

using namespace qt;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using qt::test::TempDir;

// Tiny Qwen3-MoE: layers 0 and 2 MoE, layer 1 dense (mlp_only_layers); head_dim 6 != 8/2.
json moe_config_json(bool tie = false) {
  return json{{"model_type", "qwen3_moe"}, {"vocab_size", 11},         {"hidden_size", 8},
              {"intermediate_size", 10},   {"num_hidden_layers", 3},   {"num_attention_heads", 2},
              {"num_key_value_heads", 1},  {"head_dim", 6},            {"num_experts", 4},
              {"num_experts_per_tok", 2},  {"moe_intermediate_size", 5}, {"mlp_only_layers", {1}},
              {"tie_word_embeddings", tie}, {"rope_theta", 1e6}};
}
json qwen2_config_json(bool tie) {
  return json{{"model_type", "qwen2"},        {"vocab_size", 13},     {"hidden_size", 8},
              {"intermediate_size", 12},      {"num_hidden_layers", 2}, {"num_attention_heads", 4},
              {"num_key_value_heads", 2},     {"tie_word_embeddings", tie}};
}

// Deterministic values k/8, k in [-64, 64], from a simple LCG (not the code under test).
Tensor ref_tensor(const Shape& shape, uint64_t& state) {
  Tensor t = Tensor::empty(shape, DType::F32);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    p[i] = float(int64_t((state >> 33) % 129) - 64) / 8.0f;
  }
  return t;
}

// The Hub layout (per-expert names) of a config, as F32 reference tensors.
std::map<std::string, Tensor> hub_tensors(const ModelConfig& c, uint64_t seed) {
  std::map<std::string, Tensor> m;
  uint64_t s = seed;
  const int64_t H = c.hidden_size;
  m["model.embed_tokens.weight"] = ref_tensor({c.vocab_size, H}, s);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    m[p + "input_layernorm.weight"] = ref_tensor({H}, s);
    m[p + "post_attention_layernorm.weight"] = ref_tensor({H}, s);
    m[p + "self_attn.q_proj.weight"] = ref_tensor({c.q_dim(), H}, s);
    m[p + "self_attn.k_proj.weight"] = ref_tensor({c.kv_dim(), H}, s);
    m[p + "self_attn.v_proj.weight"] = ref_tensor({c.kv_dim(), H}, s);
    m[p + "self_attn.o_proj.weight"] = ref_tensor({H, c.q_dim()}, s);
    if (c.attention_bias) {
      m[p + "self_attn.q_proj.bias"] = ref_tensor({c.q_dim()}, s);
      m[p + "self_attn.k_proj.bias"] = ref_tensor({c.kv_dim()}, s);
      m[p + "self_attn.v_proj.bias"] = ref_tensor({c.kv_dim()}, s);
    }
    if (c.qk_norm) {
      m[p + "self_attn.q_norm.weight"] = ref_tensor({c.head_dim}, s);
      m[p + "self_attn.k_norm.weight"] = ref_tensor({c.head_dim}, s);
    }
    if (c.is_moe_layer(l)) {
      const int64_t I = c.moe_intermediate_size;
      m[p + "mlp.gate.weight"] = ref_tensor({c.num_experts, H}, s);
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
        m[q + "gate_proj.weight"] = ref_tensor({I, H}, s);
        m[q + "up_proj.weight"] = ref_tensor({I, H}, s);
        m[q + "down_proj.weight"] = ref_tensor({H, I}, s);
      }
    } else {
      m[p + "mlp.gate_proj.weight"] = ref_tensor({c.intermediate_size, H}, s);
      m[p + "mlp.up_proj.weight"] = ref_tensor({c.intermediate_size, H}, s);
      m[p + "mlp.down_proj.weight"] = ref_tensor({H, c.intermediate_size}, s);
    }
  }
  m["model.norm.weight"] = ref_tensor({H}, s);
  if (!c.tie_word_embeddings) m["lm_head.weight"] = ref_tensor({c.vocab_size, H}, s);
  return m;
}

// Stacks E per-expert (out,in) tensors into (E,out,in); optionally gate and up interleaved per
// expert into transformers v5's gate_up_proj (E,2*out,in).
Tensor stack(const std::vector<Tensor>& ts) {
  Shape sh = ts[0].shape();
  sh.insert(sh.begin(), int64_t(ts.size()));
  Tensor r = Tensor::empty(sh, DType::F32);
  for (size_t e = 0; e < ts.size(); ++e)
    std::memcpy(r.data<float>() + e * size_t(ts[e].numel()), ts[e].data<float>(), ts[e].nbytes());
  return r;
}

enum class ExpertLayout { PerExpert, V5Fused, MoeFused };

std::map<std::string, Tensor> to_layout(const ModelConfig& c, std::map<std::string, Tensor> m, ExpertLayout layout) {
  if (layout == ExpertLayout::PerExpert) return m;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    std::map<std::string, std::vector<Tensor>> per;
    for (const char* proj : {"gate_proj", "up_proj", "down_proj"})
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string n = p + "experts." + std::to_string(e) + "." + proj + ".weight";
        per[proj].push_back(m.at(n));
        m.erase(n);
      }
    if (layout == ExpertLayout::MoeFused) {
      for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) m[p + proj + ".weight"] = stack(per[proj]);
    } else {
      std::vector<Tensor> gate_up;
      for (int64_t e = 0; e < c.num_experts; ++e) gate_up.push_back(stack({per["gate_proj"][size_t(e)], per["up_proj"][size_t(e)]}));
      const int64_t I = c.moe_intermediate_size, H = c.hidden_size;
      m[p + "experts.gate_up_proj"] = stack(gate_up).reshape({c.num_experts, 2 * I, H});
      m[p + "experts.down_proj"] = stack(per["down_proj"]);
    }
  }
  return m;
}

void write_checkpoint(const TempDir& d, const json& cfg, const std::map<std::string, Tensor>& m, DType disk,
                      int shards = 1) {
  std::ofstream(d.path / "config.json") << cfg.dump();
  std::vector<std::vector<std::pair<std::string, Tensor>>> parts(static_cast<size_t>(shards));
  json weight_map = json::object();
  size_t i = 0;
  for (const auto& [name, t] : m) {
    size_t k = i++ % size_t(shards);
    parts[k].emplace_back(name, t.to(disk));
    weight_map[name] = "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
  }
  if (shards == 1) {
    write_safetensors((d.path / "model.safetensors").string(), parts[0]);
    return;
  }
  for (int k = 0; k < shards; ++k)
    write_safetensors((d.path / ("model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(shards) +
                                 ".safetensors")).string(), parts[size_t(k)]);
  std::ofstream(d.path / "model.safetensors.index.json") << json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump();
}

// Exact comparison of a loaded tensor (F32 or F64) against F32 reference values.
void expect_equal(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_TRUE(got.defined()) << what;
  ASSERT_EQ(got.shape(), want.shape()) << what;
  Tensor g = got.to(DType::F64), w = want.to(DType::F64);
  for (int64_t i = 0; i < g.numel(); ++i)
    ASSERT_EQ(g.data<double>()[i], w.data<double>()[i]) << what << " element " << i;
}

// Every field of `w` against the Hub-layout reference tensors.
void expect_matches_reference(const ModelWeights& w, const std::map<std::string, Tensor>& m) {
  const ModelConfig& c = w.cfg;
  expect_equal(w.embed, m.at("model.embed_tokens.weight"), "embed");
  ASSERT_EQ(int64_t(w.layers.size()), c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = w.layers[size_t(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    EXPECT_EQ(L.is_moe, c.is_moe_layer(l));
    expect_equal(L.input_norm, m.at(p + "input_layernorm.weight"), p + "input_norm");
    expect_equal(L.post_norm, m.at(p + "post_attention_layernorm.weight"), p + "post_norm");
    expect_equal(L.attn.q_w, m.at(p + "self_attn.q_proj.weight"), p + "q");
    expect_equal(L.attn.k_w, m.at(p + "self_attn.k_proj.weight"), p + "k");
    expect_equal(L.attn.v_w, m.at(p + "self_attn.v_proj.weight"), p + "v");
    expect_equal(L.attn.o_w, m.at(p + "self_attn.o_proj.weight"), p + "o");
    if (c.attention_bias) {
      expect_equal(L.attn.q_b, m.at(p + "self_attn.q_proj.bias"), p + "q_b");
      expect_equal(L.attn.k_b, m.at(p + "self_attn.k_proj.bias"), p + "k_b");
      expect_equal(L.attn.v_b, m.at(p + "self_attn.v_proj.bias"), p + "v_b");
    } else {
      EXPECT_FALSE(L.attn.q_b.defined() || L.attn.k_b.defined() || L.attn.v_b.defined());
    }
    if (c.qk_norm) {
      expect_equal(L.attn.q_norm, m.at(p + "self_attn.q_norm.weight"), p + "q_norm");
      expect_equal(L.attn.k_norm, m.at(p + "self_attn.k_norm.weight"), p + "k_norm");
    } else {
      EXPECT_FALSE(L.attn.q_norm.defined() || L.attn.k_norm.defined());
    }
    if (L.is_moe) {
      expect_equal(L.mlp.router, m.at(p + "mlp.gate.weight"), p + "router");
      std::vector<Tensor> g, u, d;
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
        g.push_back(m.at(q + "gate_proj.weight"));
        u.push_back(m.at(q + "up_proj.weight"));
        d.push_back(m.at(q + "down_proj.weight"));
      }
      expect_equal(L.mlp.gate, stack(g), p + "experts gate");
      expect_equal(L.mlp.up, stack(u), p + "experts up");
      expect_equal(L.mlp.down, stack(d), p + "experts down");
    } else {
      EXPECT_FALSE(L.mlp.router.defined());
      expect_equal(L.mlp.gate, m.at(p + "mlp.gate_proj.weight"), p + "gate");
      expect_equal(L.mlp.up, m.at(p + "mlp.up_proj.weight"), p + "up");
      expect_equal(L.mlp.down, m.at(p + "mlp.down_proj.weight"), p + "down");
    }
  }
  expect_equal(w.final_norm, m.at("model.norm.weight"), "final_norm");
  if (c.tie_word_embeddings) {
    EXPECT_EQ(w.lm_head.raw(), w.embed.raw());  // the same storage
  } else {
    expect_equal(w.lm_head, m.at("lm_head.weight"), "lm_head");
  }
}

void expect_load_error(const TempDir& d, const std::vector<std::string>& needles) {
  try {
    load_model_weights(d.str(), DType::F32);
    FAIL() << "no error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.rfind("[weights] ", 0), 0u) << msg;
    for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

}  // namespace

TEST(Weights, EveryExpertLayoutAndDiskDtypeLoadsTheSameValues) {
  const ModelConfig cfg = parse_hf_config_json(moe_config_json().dump(), "test");
  const auto ref = hub_tensors(cfg, 7);
  for (ExpertLayout layout : {ExpertLayout::PerExpert, ExpertLayout::V5Fused, ExpertLayout::MoeFused})
    for (DType disk : {DType::F32, DType::BF16, DType::F16, DType::F64})
      for (DType dtype : {DType::F32, DType::F64}) {
        SCOPED_TRACE(::testing::Message() << "layout " << int(layout) << " disk " << dtype_name(disk) << " dtype "
                                          << dtype_name(dtype));
        TempDir d("layouts");
        write_checkpoint(d, moe_config_json(), to_layout(cfg, ref, layout), disk);
        ModelWeights w = load_model_weights(d.str(), dtype);
        EXPECT_EQ(w.embed.dtype(), dtype);
        EXPECT_EQ(w.layers[0].mlp.gate.dtype(), dtype);
        expect_matches_reference(w, ref);
      }
}

TEST(Weights, Qwen2BiasesAndTiedEmbeddings) {
  for (bool tie : {false, true}) {
    const ModelConfig cfg = parse_hf_config_json(qwen2_config_json(tie).dump(), "test");
    const auto ref = hub_tensors(cfg, 11);
    TempDir d("qwen2");
    write_checkpoint(d, qwen2_config_json(tie), ref, DType::BF16);
    ModelWeights w = load_model_weights(d.str(), DType::F32);
    EXPECT_EQ(w.cfg.family, ModelFamily::Qwen2);
    expect_matches_reference(w, ref);
  }
}

TEST(Weights, TiedCheckpointWithLmHeadIsAccepted) {
  const ModelConfig cfg = parse_hf_config_json(qwen2_config_json(true).dump(), "test");
  auto ref = hub_tensors(cfg, 3);
  uint64_t s = 99;
  ref["lm_head.weight"] = ref_tensor({cfg.vocab_size, cfg.hidden_size}, s);
  TempDir d("tied_lm_head");
  write_checkpoint(d, qwen2_config_json(true), ref, DType::F32);
  ModelWeights w = load_model_weights(d.str(), DType::F32);
  EXPECT_EQ(w.lm_head.raw(), w.embed.raw());  // transformers ties and ignores the stored lm_head
  expect_equal(w.lm_head, ref.at("model.embed_tokens.weight"), "lm_head");
}

TEST(Weights, LegacyRotaryBuffersAreIgnored) {
  const ModelConfig cfg = parse_hf_config_json(qwen2_config_json(false).dump(), "test");
  auto ref = hub_tensors(cfg, 2);
  auto with = ref;
  with["model.layers.1.self_attn.rotary_emb.inv_freq"] = Tensor::zeros({1}, DType::F32);
  TempDir d("inv_freq");
  write_checkpoint(d, qwen2_config_json(false), with, DType::F32);
  expect_matches_reference(load_model_weights(d.str(), DType::F32), ref);
}

TEST(Weights, Sharded) {
  const ModelConfig cfg = parse_hf_config_json(moe_config_json().dump(), "test");
  const auto ref = hub_tensors(cfg, 5);
  TempDir d("sharded");
  write_checkpoint(d, moe_config_json(), to_layout(cfg, ref, ExpertLayout::V5Fused), DType::BF16, 3);
  ASSERT_FALSE(fs::exists(d.path / "model.safetensors"));
  expect_matches_reference(load_model_weights(d.str(), DType::F64), ref);
}

TEST(Weights, ExplicitConfigOverload) {
  const ModelConfig cfg = parse_hf_config_json(moe_config_json().dump(), "test");
  const auto ref = hub_tensors(cfg, 5);
  TempDir d("explicit_cfg");
  write_checkpoint(d, moe_config_json(), ref, DType::F32);
  fs::remove(d.path / "config.json");
  expect_matches_reference(load_model_weights(d.str(), cfg, DType::F32), ref);
}

TEST(Weights, MissingTensorIsNamed) {
  const ModelConfig cfg = parse_hf_config_json(moe_config_json().dump(), "test");
  for (const std::string name : {"model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.1.self_attn.k_norm.weight",
                                 "lm_head.weight", "model.layers.0.mlp.gate.weight", "model.norm.weight"}) {
    auto ref = hub_tensors(cfg, 1);
    ref.erase(name);
    TempDir d("missing");
    write_checkpoint(d, moe_config_json(), ref, DType::F32);
    expect_load_error(d, {name, "missing"});
  }
  // Fused layouts: a half-present pair names the absent tensor.
  auto v5 = to_layout(cfg, hub_tensors(cfg, 1), ExpertLayout::V5Fused);
  v5.erase("model.layers.2.mlp.experts.down_proj");
  TempDir d("missing_v5");
  write_checkpoint(d, moe_config_json(), v5, DType::F32);
  expect_load_error(d, {"model.layers.2.mlp.experts.down_proj", "missing"});
  auto mf = to_layout(cfg, hub_tensors(cfg, 1), ExpertLayout::MoeFused);
  mf.erase("model.layers.0.mlp.up_proj.weight");
  TempDir d2("missing_fused");
  write_checkpoint(d2, moe_config_json(), mf, DType::F32);
  expect_load_error(d2, {"model.layers.0.mlp.up_proj.weight", "missing"});
}

TEST(Weights, UnexpectedTensorIsNamed) {
  const ModelConfig cfg = parse_hf_config_json(moe_config_json().dump(), "test");
  uint64_t s = 1;
  for (const std::string name : {"model.layers.0.mlp.experts.4.up_proj.weight", "model.layers.3.input_layernorm.weight",
                                 "model.layers.1.self_attn.q_proj.bias", "score.weight"}) {
    auto ref = hub_tensors(cfg, 1);
    ref[name] = ref_tensor({2, 2}, s);
    TempDir d("extra");
    write_checkpoint(d, moe_config_json(), ref, DType::F32);
    expect_load_error(d, {name, "unexpected"});
  }
  // Both a fused and the per-expert layout in one layer: the per-expert tensors are left over.
  auto both = hub_tensors(cfg, 1);
  for (auto& [n, t] : to_layout(cfg, hub_tensors(cfg, 1), ExpertLayout::V5Fused))
    if (n.find("experts.gate_up_proj") != std::string::npos || n.find("experts.down_proj") != std::string::npos)
      both[n] = t;
  TempDir d("both_layouts");
  write_checkpoint(d, moe_config_json(), both, DType::F32);
  expect_load_error(d, {"model.layers.0.mlp.experts.0.down_proj.weight", "unexpected"});
}

TEST(Weights, MisShapedTensorIsNamed) {
  const ModelConfig cfg = parse_hf_config_json(moe_config_json().dump(), "test");
  uint64_t s = 1;
  const std::vector<std::pair<std::string, Shape>> cases = {
      {"model.layers.0.self_attn.q_proj.weight", {8, 12}},  // transposed
      {"model.embed_tokens.weight", {12, 8}},
      {"model.layers.2.mlp.experts.1.gate_proj.weight", {5, 9}},
      {"model.layers.1.mlp.down_proj.weight", {8, 10, 1}},
  };
  for (const auto& [name, shape] : cases) {
    auto ref = hub_tensors(cfg, 1);
    ref[name] = ref_tensor(shape, s);
    TempDir d("shape");
    write_checkpoint(d, moe_config_json(), ref, DType::F32);
    expect_load_error(d, {name, shape_str(shape)});
  }
  auto v5 = to_layout(cfg, hub_tensors(cfg, 1), ExpertLayout::V5Fused);
  v5["model.layers.0.mlp.experts.gate_up_proj"] = ref_tensor({4, 5, 8}, s);  // not 2*I rows
  TempDir d("shape_v5");
  write_checkpoint(d, moe_config_json(), v5, DType::F32);
  expect_load_error(d, {"model.layers.0.mlp.experts.gate_up_proj", "[4, 10, 8]"});
}

TEST(Weights, NonFloatTensorIsRejected) {
  const ModelConfig cfg = parse_hf_config_json(qwen2_config_json(false).dump(), "test");
  auto ref = hub_tensors(cfg, 1);
  TempDir d("int");
  std::ofstream(d.path / "config.json") << qwen2_config_json(false).dump();
  std::vector<std::pair<std::string, Tensor>> ts;
  for (auto& [n, t] : ref) ts.emplace_back(n, n == "model.norm.weight" ? t.to(DType::I32) : t);
  write_safetensors((d.path / "model.safetensors").string(), ts);
  expect_load_error(d, {"model.norm.weight", "I32"});
}

TEST(Weights, RandomWeights) {
  const ModelConfig cfg = parse_hf_config_json(moe_config_json().dump(), "test");
  ModelWeights a = random_model_weights(cfg, DType::F32, 42, 0.5);
  ModelWeights b = random_model_weights(cfg, DType::F32, 42, 0.5);
  ModelWeights c = random_model_weights(cfg, DType::F32, 43, 0.5);
  auto same = [](const Tensor& x, const Tensor& y) {
    return x.shape() == y.shape() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
  };
  EXPECT_TRUE(same(a.embed, b.embed));
  EXPECT_TRUE(same(a.layers[2].mlp.down, b.layers[2].mlp.down));
  EXPECT_FALSE(same(a.embed, c.embed));
  EXPECT_FALSE(same(a.layers[2].mlp.down, c.layers[2].mlp.down));
  EXPECT_FALSE(same(a.layers[0].attn.q_w, a.layers[1].attn.q_w));  // tensors draw different streams
  EXPECT_EQ(a.layers[0].mlp.gate.shape(), (Shape{4, 5, 8}));
  EXPECT_EQ(a.layers[0].mlp.down.shape(), (Shape{4, 8, 5}));
  EXPECT_EQ(a.layers[1].mlp.gate.shape(), (Shape{10, 8}));
  EXPECT_EQ(a.layers[0].mlp.router.shape(), (Shape{4, 8}));
  EXPECT_EQ(a.layers[1].attn.q_norm.shape(), (Shape{6}));
  EXPECT_EQ(a.lm_head.shape(), (Shape{11, 8}));
  EXPECT_NE(a.lm_head.raw(), a.embed.raw());
  for (const Tensor* t : {&a.layers[0].input_norm, &a.layers[1].attn.k_norm, &a.final_norm})
    for (int64_t i = 0; i < t->numel(); ++i) EXPECT_EQ(t->data<float>()[i], 1.0f);

  // Biases zero (qwen2), tied lm_head, and the normal's moments on a large matrix.
  json j = qwen2_config_json(true);
  j["vocab_size"] = 4096;
  j["hidden_size"] = 64;
  j["num_attention_heads"] = 4;
  const ModelConfig q = parse_hf_config_json(j.dump(), "test");
  ModelWeights w = random_model_weights(q, DType::F64, 1, 0.02);
  EXPECT_EQ(w.lm_head.raw(), w.embed.raw());
  for (int64_t i = 0; i < w.layers[0].attn.k_b.numel(); ++i) EXPECT_EQ(w.layers[0].attn.k_b.data<double>()[i], 0.0);
  const double* e = w.embed.data<double>();
  const int64_t n = w.embed.numel();
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < n; ++i) sum += e[i], sq += e[i] * e[i];
  const double mean = sum / double(n), sd = std::sqrt(sq / double(n) - mean * mean);
  EXPECT_LT(std::fabs(mean), 4 * 0.02 / std::sqrt(double(n)));  // 4 standard errors
  EXPECT_NEAR(sd, 0.02, 4 * 0.02 / std::sqrt(2.0 * double(n)));
}
