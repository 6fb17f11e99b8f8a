// LoRA adapters: config scale, PEFT init, PEFT names, adapter_config.json parsing, and the
// save/load round trip (per-expert and fused expert layouts, bit-exact), plus bad adapters.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "test_files.h"

using namespace qt;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using qt::test::TempDir;

// Layers 0 and 2 MoE (E=3, I=5), layer 1 dense (I=10); H=8, q_dim 12, kv_dim 6.
ModelConfig moe_model() {
  json j{{"model_type", "qwen3_moe"}, {"vocab_size", 11},         {"hidden_size", 8},
         {"intermediate_size", 10},   {"num_hidden_layers", 3},   {"num_attention_heads", 2},
         {"num_key_value_heads", 1},  {"head_dim", 6},            {"num_experts", 3},
         {"num_experts_per_tok", 2},  {"moe_intermediate_size", 5}, {"mlp_only_layers", {1}}};
  return parse_hf_config_json(j.dump(), "test");
}
ModelConfig dense_model() {
  json j{{"model_type", "qwen2"},   {"vocab_size", 11},         {"hidden_size", 8},
         {"intermediate_size", 12}, {"num_hidden_layers", 2},   {"num_attention_heads", 4},
         {"num_key_value_heads", 2}};
  return parse_hf_config_json(j.dump(), "test");
}

LoraConfig all_targets(int64_t r = 4) {
  LoraConfig c;
  c.r = r;
  c.alpha = 8;
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  c.base_model_name_or_path = "Qwen/Test";
  return c;
}

// Fills every A and B with distinct non-trivial values (B is zero after init).
void fill_values(LoraAdapter& a, uint64_t seed) {
  uint64_t s = seed;
  for (LayerLora& L : a.layers)
    for (LoraPair& p : L.slot) {
      if (!p.present()) continue;
      for (Tensor* t : {&p.A, &p.B}) {
        float* d = t->data<float>();
        for (int64_t i = 0; i < t->numel(); ++i) {
          s = s * 6364136223846793005ull + 1442695040888963407ull;
          d[i] = float(int64_t(s >> 40) - (int64_t(1) << 23)) * 0x1.0p-20f;  // arbitrary f32 bits
        }
      }
    }
}

bool bit_equal(const Tensor& x, const Tensor& y) {
  return x.defined() == y.defined() && (!x.defined() || (x.shape() == y.shape() && x.dtype() == y.dtype() &&
                                                         std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0));
}
void expect_bit_equal(const LoraAdapter& a, const LoraAdapter& b) {
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      EXPECT_TRUE(bit_equal(a.layers[l].slot[size_t(s)].A, b.layers[l].slot[size_t(s)].A)) << "layer " << l << " slot " << s;
      EXPECT_TRUE(bit_equal(a.layers[l].slot[size_t(s)].B, b.layers[l].slot[size_t(s)].B)) << "layer " << l << " slot " << s;
    }
}

json peft_config(json targets) {
  return json{{"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"r", 4},        {"lora_alpha", 8},
              {"lora_dropout", 0.05}, {"use_rslora", false},      {"bias", "none"}, {"target_modules", targets},
              {"modules_to_save", nullptr}, {"rank_pattern", json::object()}, {"use_dora", false}};
}

void expect_adapter_error(const std::function<void()>& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    FAIL() << "no error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_TRUE(msg.rfind("[adapter] ", 0) == 0 || msg.rfind("[lora] ", 0) == 0) << msg;
    for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

std::vector<std::string> parse_targets(const json& cfg, const ModelConfig& m) {
  return parse_peft_adapter_config(cfg.dump(), "adapter_config.json", m).target_modules;
}

}  // namespace

TEST(LoraConfig, Scale) {
  LoraConfig c;
  c.r = 16;
  c.alpha = 32;
  EXPECT_EQ(c.scale(), 2.0);
  c.use_rslora = true;
  EXPECT_EQ(c.scale(), 8.0);  // 32 / sqrt(16)
  c.r = 2;
  EXPECT_DOUBLE_EQ(c.scale(), 32 / std::sqrt(2.0));
}

TEST(LoraConfig, TargetsAndValidate) {
  LoraConfig c;
  c.target_modules = {"q_proj", "down_proj"};
  EXPECT_TRUE(c.targets(kLoraQ));
  EXPECT_TRUE(c.targets(kLoraDown));
  EXPECT_FALSE(c.targets(kLoraV));
  EXPECT_FALSE(c.targets(kLoraGate));
  c.validate();
  for (int s = 0; s < kNumLoraSlots; ++s) {
    LoraSlot back;
    ASSERT_TRUE(lora_slot_from_module(lora_slot_module(LoraSlot(s)), &back));
    EXPECT_EQ(back, LoraSlot(s));
  }
  c.target_modules = {"lm_head"};
  EXPECT_THROW(c.validate(), Error);
  c.target_modules = {};
  EXPECT_THROW(c.validate(), Error);
  c.target_modules = {"q_proj"};
  c.r = 0;
  EXPECT_THROW(c.validate(), Error);
  c.r = 4;
  c.dropout = 1.0;
  EXPECT_THROW(c.validate(), Error);
}

TEST(LoraInit, ShapesBoundsZerosAndDeterminism) {
  const ModelConfig m = moe_model();
  LoraConfig lc = all_targets();
  lc.target_modules = {"q_proj", "o_proj", "gate_proj", "down_proj"};
  LoraAdapter a = init_lora(m, lc, DType::F32, 1234);
  ASSERT_EQ(a.layers.size(), 3u);
  for (int64_t l = 0; l < 3; ++l) {
    const auto& S = a.layers[size_t(l)].slot;
    EXPECT_FALSE(S[kLoraK].present());
    EXPECT_FALSE(S[kLoraV].present());
    EXPECT_FALSE(S[kLoraUp].present());
    EXPECT_EQ(S[kLoraQ].A.shape(), (Shape{4, 8}));
    EXPECT_EQ(S[kLoraQ].B.shape(), (Shape{12, 4}));
    EXPECT_EQ(S[kLoraO].A.shape(), (Shape{4, 12}));
    EXPECT_EQ(S[kLoraO].B.shape(), (Shape{8, 4}));
    if (l == 1) {
      EXPECT_EQ(S[kLoraGate].A.shape(), (Shape{4, 8}));
      EXPECT_EQ(S[kLoraGate].B.shape(), (Shape{10, 4}));
      EXPECT_EQ(S[kLoraDown].A.shape(), (Shape{4, 10}));
      EXPECT_EQ(S[kLoraDown].B.shape(), (Shape{8, 4}));
    } else {
      EXPECT_EQ(S[kLoraGate].A.shape(), (Shape{3, 4, 8}));
      EXPECT_EQ(S[kLoraGate].B.shape(), (Shape{3, 5, 4}));
      EXPECT_EQ(S[kLoraDown].A.shape(), (Shape{3, 4, 5}));
      EXPECT_EQ(S[kLoraDown].B.shape(), (Shape{3, 8, 4}));
    }
    for (const LoraPair& p : S) {
      if (!p.present()) continue;
      const double bound = 1.0 / std::sqrt(double(p.A.dim(-1)));
      for (int64_t i = 0; i < p.A.numel(); ++i) {
        EXPECT_LE(std::fabs(p.A.data<float>()[i]), bound);
      }
      for (int64_t i = 0; i < p.B.numel(); ++i) EXPECT_EQ(p.B.data<float>()[i], 0.0f);
    }
  }
  expect_bit_equal(a, init_lora(m, lc, DType::F32, 1234));
  LoraAdapter other = init_lora(m, lc, DType::F32, 1235);
  EXPECT_FALSE(bit_equal(a.layers[0].slot[kLoraQ].A, other.layers[0].slot[kLoraQ].A));
  EXPECT_FALSE(bit_equal(a.layers[0].slot[kLoraQ].A, a.layers[1].slot[kLoraQ].A));
  // Experts of one fused tensor get different values.
  const Tensor& g = a.layers[0].slot[kLoraGate].A;
  EXPECT_NE(std::memcmp(g.data<float>(), g.data<float>() + 32, 32 * sizeof(float)), 0);

  LoraAdapter z = a.zeros_like();
  for (size_t l = 0; l < 3; ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const LoraPair& p = a.layers[l].slot[size_t(s)];
      const LoraPair& q = z.layers[l].slot[size_t(s)];
      ASSERT_EQ(p.present(), q.present());
      if (!p.present()) continue;
      EXPECT_EQ(q.A.shape(), p.A.shape());
      EXPECT_EQ(q.B.shape(), p.B.shape());
      for (int64_t i = 0; i < q.A.numel(); ++i) EXPECT_EQ(q.A.data<float>()[i], 0.0f);
    }
}

TEST(LoraInit, UniformStatistics) {
  json j{{"model_type", "qwen2"}, {"vocab_size", 11}, {"hidden_size", 512}, {"intermediate_size", 16},
         {"num_hidden_layers", 1}, {"num_attention_heads", 8}, {"num_key_value_heads", 8}};
  const ModelConfig m = parse_hf_config_json(j.dump(), "test");
  LoraConfig lc = all_targets(64);
  lc.target_modules = {"q_proj"};
  LoraAdapter a = init_lora(m, lc, DType::F64, 9);
  const Tensor& A = a.layers[0].slot[kLoraQ].A;  // (64, 512): 32768 draws from U(-b, b), b = 1/sqrt(512)
  const double b = 1.0 / std::sqrt(512.0);
  double sum = 0, sq = 0, mn = 1, mx = -1;
  for (int64_t i = 0; i < A.numel(); ++i) {
    double v = A.data<double>()[i];
    sum += v, sq += v * v, mn = std::min(mn, v), mx = std::max(mx, v);
  }
  const double n = double(A.numel()), mean = sum / n, var = sq / n - mean * mean;
  EXPECT_LT(std::fabs(mean), 4 * b / std::sqrt(3 * n));        // 4 standard errors
  EXPECT_NEAR(var, b * b / 3, 4 * b * b * std::sqrt(4.0 / 45.0 / n));  // var of U(-b,b) = b^2/3
  EXPECT_GT(mx, 0.99 * b);
  EXPECT_LT(mn, -0.99 * b);
  EXPECT_GE(mn, -b);
  EXPECT_LE(mx, b);
}

TEST(LoraNames, PerExpertAndFused) {
  const ModelConfig m = moe_model();
  LoraAdapter a = init_lora(m, all_targets(), DType::F32, 1);
  fill_values(a, 5);
  auto per = lora_named_tensors(a, m, false);
  auto fused = lora_named_tensors(a, m, true);
  // Per layer: 4 attention pairs; dense MLP 3 pairs; MoE 3 x E pairs (per-expert) or 3 (fused).
  EXPECT_EQ(per.size(), size_t(2 * (4 * 3 + 3 + 2 * 3 * 3)));
  EXPECT_EQ(fused.size(), size_t(2 * (4 * 3 + 3 + 2 * 3)));
  std::map<std::string, Tensor> P(per.begin(), per.end()), F(fused.begin(), fused.end());
  EXPECT_EQ(P.at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape(), (Shape{4, 8}));
  EXPECT_EQ(P.at("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight").shape(), (Shape{10, 4}));
  const Tensor& e1 = P.at("base_model.model.model.layers.2.mlp.experts.1.down_proj.lora_B.weight");
  EXPECT_EQ(e1.shape(), (Shape{8, 4}));
  const Tensor& fz = F.at("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight");
  EXPECT_EQ(fz.shape(), (Shape{3, 8, 4}));
  EXPECT_EQ(std::memcmp(e1.raw(), fz.data<float>() + 32, 32 * sizeof(float)), 0);  // expert 1's block
  EXPECT_EQ(P.count("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"), 0u);
  EXPECT_EQ(F.count("base_model.model.model.layers.2.mlp.experts.0.down_proj.lora_B.weight"), 0u);
}

TEST(LoraIo, RoundTripBitExactBothLayouts) {
  const ModelConfig m = moe_model();
  LoraAdapter a = init_lora(m, all_targets(), DType::F32, 77);
  fill_values(a, 3);
  for (bool fused : {false, true}) {
    TempDir d(fused ? "rt_fused" : "rt_per");
    save_peft_adapter(d.str(), a, m, fused);
    LoraAdapter b = load_peft_adapter(d.str(), m, DType::F32);
    expect_bit_equal(a, b);
    EXPECT_EQ(b.cfg.r, 4);
    EXPECT_EQ(b.cfg.alpha, 8);
    EXPECT_EQ(b.cfg.target_modules, all_targets().target_modules);
    EXPECT_EQ(b.cfg.base_model_name_or_path, "Qwen/Test");

    // The files: PEFT keys, F32 tensors under the layout's names, no temporary files left.
    json cfg = json::parse(std::ifstream(d.path / "adapter_config.json"));
    EXPECT_EQ(cfg.at("peft_type"), "LORA");
    EXPECT_EQ(cfg.at("task_type"), "CAUSAL_LM");
    EXPECT_EQ(cfg.at("r"), 4);
    EXPECT_EQ(cfg.at("lora_alpha"), 8);
    EXPECT_EQ(cfg.at("bias"), "none");
    EXPECT_EQ(cfg.at("use_rslora"), false);
    EXPECT_EQ(cfg.at("base_model_name_or_path"), "Qwen/Test");
    EXPECT_EQ(cfg.at("target_modules").size(), 7u);
    SafetensorsCheckpoint st((d.path / "adapter_model.safetensors").string());
    for (const std::string& n : st.names()) EXPECT_EQ(st.entry(n).dtype, DType::F32) << n;
    EXPECT_EQ(st.contains("base_model.model.model.layers.0.mlp.experts.2.up_proj.lora_A.weight"), !fused);
    EXPECT_EQ(st.contains("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"), fused);
    EXPECT_TRUE(st.contains("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"));
    for (const auto& f : fs::directory_iterator(d.path))
      EXPECT_EQ(f.path().filename().string().find(".tmp"), std::string::npos) << f.path();

    // Converting layouts: load (either) -> save the other way -> load: same bits.
    TempDir d2(fused ? "rt_fused2" : "rt_per2");
    save_peft_adapter(d2.str(), b, m, !fused);
    expect_bit_equal(a, load_peft_adapter(d2.str(), m, DType::F32));
  }
  // Loading into f64 converts exactly.
  TempDir d("rt_f64");
  save_peft_adapter(d.str(), a, m);
  LoraAdapter w = load_peft_adapter(d.str(), m, DType::F64);
  const Tensor& x = a.layers[2].slot[kLoraUp].B;
  const Tensor& y = w.layers[2].slot[kLoraUp].B;
  ASSERT_EQ(y.dtype(), DType::F64);
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(double(x.data<float>()[i]), y.data<double>()[i]);
}

TEST(LoraIo, RsloraAndDefaultSuffixAndBf16File) {
  const ModelConfig m = dense_model();
  LoraConfig lc = all_targets();
  lc.use_rslora = true;
  lc.alpha = 6.5;
  lc.target_modules = {"v_proj", "up_proj"};
  LoraAdapter a = init_lora(m, lc, DType::F32, 2);
  fill_values(a, 8);
  TempDir d("suffix");
  save_peft_adapter(d.str(), a, m);
  LoraAdapter b = load_peft_adapter(d.str(), m, DType::F32);
  EXPECT_TRUE(b.cfg.use_rslora);
  EXPECT_EQ(b.cfg.alpha, 6.5);
  EXPECT_EQ(b.cfg.scale(), 6.5 / 2.0);
  expect_bit_equal(a, b);

  // Rewrite the tensors as raw state-dict names (".lora_A.default.weight") stored in bf16.
  std::vector<std::pair<std::string, Tensor>> renamed;
  for (auto& [n, t] : lora_named_tensors(a, m)) {
    std::string k = n;
    k.replace(k.rfind(".weight"), 7, ".default.weight");
    renamed.emplace_back(k, t.to(DType::BF16));
  }
  write_safetensors((d.path / "adapter_model.safetensors").string(), renamed);
  LoraAdapter c = load_peft_adapter(d.str(), m, DType::F32);
  const Tensor& x = a.layers[1].slot[kLoraV].A;
  const Tensor& y = c.layers[1].slot[kLoraV].A;
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(y.data<float>()[i], bf16_to_f32(f32_to_bf16(x.data<float>()[i])));
}

TEST(LoraIo, TargetModuleResolution) {
  const ModelConfig moe = moe_model(), dense = dense_model();
  using V = std::vector<std::string>;
  EXPECT_EQ(parse_targets(peft_config({"v_proj", "q_proj"}), dense), (V{"q_proj", "v_proj"}));
  EXPECT_EQ(parse_targets(peft_config({"self_attn.q_proj", "mlp.down_proj"}), dense), (V{"q_proj", "down_proj"}));
  // A MoE model: "gate_proj" covers the dense layer's MLP and every expert.
  EXPECT_EQ(parse_targets(peft_config({"gate_proj", "o_proj"}), moe), (V{"o_proj", "gate_proj"}));
  EXPECT_EQ(parse_targets(peft_config({"q_proj", "not_a_module"}), dense), (V{"q_proj"}));  // PEFT ignores unmatched entries
  EXPECT_EQ(parse_targets(peft_config("all-linear"), dense).size(), 7u);
  EXPECT_EQ(parse_targets(peft_config(R"(model\.layers\.\d+\.self_attn\.(q|v)_proj)"), dense), (V{"q_proj", "v_proj"}));
  EXPECT_EQ(parse_targets(peft_config(R"(.*\.(experts\.\d+\.)?up_proj)"), moe), (V{"up_proj"}));

  const std::string f = "adapter_config.json";
  expect_adapter_error([&] { parse_targets(peft_config({"lm_head", "q_proj"}), dense); }, {f, "lm_head"});
  expect_adapter_error([&] { parse_targets(peft_config({"gate"}), moe); }, {"model.layers.0.mlp.gate"});
  expect_adapter_error([&] { parse_targets(peft_config({"embed_tokens"}), dense); }, {"embed_tokens"});
  expect_adapter_error([&] { parse_targets(peft_config("all-linear"), moe); }, {"router"});
  expect_adapter_error([&] { parse_targets(peft_config(R"(model\.layers\.0\.self_attn\.q_proj)"), dense); },
                       {"q_proj", "only 1 of 2"});
  // Per-expert subset: only expert 0's up_proj in MoE layers (+ the dense layer's).
  expect_adapter_error([&] { parse_targets(peft_config(R"(model\.layers\.\d+\.mlp\.(experts\.0\.)?up_proj)"), moe); }, {"up_proj", "only"});
  expect_adapter_error([&] { parse_targets(peft_config("(?P<x>q_proj)"), dense); }, {"regex"});
  expect_adapter_error([&] { parse_targets(peft_config({"nothing"}), dense); }, {"matches no module"});
  expect_adapter_error([&] { parse_targets(peft_config(3), dense); }, {"target_modules"});
  expect_adapter_error([&] { parse_targets(peft_config({1}), dense); }, {"target_modules"});
}

TEST(LoraIo, UnsupportedConfigs) {
  const ModelConfig m = dense_model();
  auto with = [](const char* key, json v) {
    json j = peft_config({"q_proj"});
    j[key] = v;
    return j;
  };
  const std::vector<std::pair<json, std::string>> cases = {
      {with("peft_type", "LOHA"), "peft_type"},
      {with("bias", "all"), "bias"},
      {with("modules_to_save", {"lm_head"}), "modules_to_save"},
      {with("use_dora", true), "use_dora"},
      {with("rank_pattern", {{"q_proj", 8}}), "rank_pattern"},
      {with("alpha_pattern", {{"q_proj", 8}}), "alpha_pattern"},
      {with("layers_to_transform", {0}), "layers_to_transform"},
      {with("target_parameters", {"mlp.experts.gate_up_proj"}), "target_parameters"},
      {with("fan_in_fan_out", true), "fan_in_fan_out"},
      {with("lora_bias", true), "lora_bias"},
      {with("r", 0), "r"},
      {with("r", 2.5), "'r'"},
      {with("lora_alpha", "8"), "lora_alpha"},
      {with("lora_dropout", 1.5), "lora_dropout"},
      {with("use_rslora", "yes"), "use_rslora"},
      {with("target_modules", nullptr), "target_modules"},
  };
  for (const auto& [cfg, needle] : cases)
    expect_adapter_error([&] { parse_peft_adapter_config(cfg.dump(), "a.json", m); }, {"a.json", needle});
  json ok = with("modules_to_save", json::array());
  ok["layers_to_transform"] = nullptr;
  EXPECT_EQ(parse_peft_adapter_config(ok.dump(), "a.json", m).r, 4);
  expect_adapter_error([&] { parse_peft_adapter_config("{", "a.json", m); }, {"invalid JSON"});
}

TEST(LoraIo, BadAdapterFiles) {
  const ModelConfig m = moe_model();
  LoraAdapter a = init_lora(m, all_targets(), DType::F32, 4);
  fill_values(a, 1);
  auto tensors = lora_named_tensors(a, m);
  auto write_without = [&](const TempDir& d, const std::string& drop, std::vector<std::pair<std::string, Tensor>> extra) {
    save_peft_adapter(d.str(), a, m);
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const auto& [n, t] : tensors)
      if (n != drop) ts.emplace_back(n, t);
    for (auto& e : extra) ts.push_back(e);
    write_safetensors((d.path / "adapter_model.safetensors").string(), ts);
  };
  {
    TempDir d("missing_expert");
    const std::string n = "base_model.model.model.layers.2.mlp.experts.1.gate_proj.lora_B.weight";
    write_without(d, n, {});
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {n, "missing"});
  }
  {
    TempDir d("missing_attn");
    const std::string n = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight";
    write_without(d, n, {});
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {n, "missing"});
  }
  {
    TempDir d("extra");
    const std::string n = "base_model.model.lm_head.lora_A.weight";
    write_without(d, "", {{n, Tensor::zeros({4, 8}, DType::F32)}});
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {n, "unexpected"});
  }
  {
    TempDir d("extra_expert");
    const std::string n = "base_model.model.model.layers.0.mlp.experts.3.up_proj.lora_A.weight";  // E = 3
    write_without(d, "", {{n, Tensor::zeros({4, 8}, DType::F32)}});
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {n, "unexpected"});
  }
  {
    TempDir d("mixed_layouts");  // fused tensors next to the per-expert ones: the per-expert ones are unused
    auto fused = lora_named_tensors(a, m, true);
    std::vector<std::pair<std::string, Tensor>> extra;
    for (auto& [n, t] : fused)
      if (n.find("layers.0.mlp.up_proj") != std::string::npos) extra.emplace_back(n, t);
    write_without(d, "", extra);
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); },
                         {"base_model.model.model.layers.0.mlp.experts.0.up_proj.lora_A.weight", "unexpected"});
  }
  {
    TempDir d("bad_shape");
    const std::string n = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight";
    write_without(d, n, {{n, Tensor::zeros({4, 8}, DType::F32)}});  // o_proj in = q_dim 12
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {n, "[4, 8]", "[4, 12]"});
  }
  {
    TempDir d("rank_mismatch");
    LoraConfig lc = all_targets(2);
    LoraAdapter small = init_lora(m, lc, DType::F32, 1);
    save_peft_adapter(d.str(), small, m);
    json cfg = json::parse(std::ifstream(d.path / "adapter_config.json"));
    cfg["r"] = 4;
    std::ofstream(d.path / "adapter_config.json") << cfg.dump();
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {"base_model.model.model.layers.0", "[2, 8]"});
  }
  {
    TempDir d("fused_wrong_e");
    const std::string n = "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight";
    std::vector<std::pair<std::string, Tensor>> ts;
    for (auto& [k, t] : lora_named_tensors(a, m, true))
      ts.emplace_back(k, k == n ? Tensor::zeros({2, 4, 5}, DType::F32) : t);
    save_peft_adapter(d.str(), a, m);
    write_safetensors((d.path / "adapter_model.safetensors").string(), ts);
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {n, "[3, 4, 5]"});
  }
  {
    TempDir d("no_file");
    save_peft_adapter(d.str(), a, m);
    fs::remove(d.path / "adapter_model.safetensors");
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {"adapter_model.safetensors", "missing"});
    std::ofstream(d.path / "adapter_model.bin") << "pickle";
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {"adapter_model.bin"});
    fs::remove(d.path / "adapter_config.json");
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {"adapter_config.json"});
  }
  {
    TempDir d("no_experts");  // gate_proj targeted, but only the dense layer's tensors were saved
    save_peft_adapter(d.str(), a, m);
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const auto& [n, t] : tensors)
      if (n.find(".experts.") == std::string::npos) ts.emplace_back(n, t);
    write_safetensors((d.path / "adapter_model.safetensors").string(), ts);
    expect_adapter_error([&] { load_peft_adapter(d.str(), m, DType::F32); }, {"no LoRA tensors for the experts' gate_proj in MoE layer 0"});
  }
  {
    TempDir d("wrong_model");  // an adapter for the MoE model loaded against a dense one
    save_peft_adapter(d.str(), a, m);
    expect_adapter_error([&] { load_peft_adapter(d.str(), dense_model(), DType::F32); }, {"base_model.model.model.layers"});
  }
}

// adapter_config.json exactly as PEFT 0.21.0 (transformers 5.17) wrote it for a Qwen2 model with
// get_peft_model(LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=<all 7>)).
TEST(LoraIo, Peft021AdapterConfig) {
  const char* text = R"({
  "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
  "auto_mapping": {"base_model_class": "Qwen2ForCausalLM", "parent_library": "transformers.models.qwen2.modeling_qwen2"},
  "base_model_name_or_path": null, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
  "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
  "init_lora_weights": true, "kasa_config": null, "layer_replication": null, "layers_pattern": null,
  "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false, "lora_dropout": 0.0,
  "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
  "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.0", "qalora_group_size": 16, "r": 4,
  "rank_pattern": {}, "revision": null,
  "target_modules": ["down_proj", "v_proj", "o_proj", "k_proj", "gate_proj", "q_proj", "up_proj"],
  "target_parameters": null, "task_type": null, "trainable_token_indices": null, "use_bdlora": null,
  "use_dora": false, "use_qalora": false, "use_rslora": true, "velora_config": null})";
  const ModelConfig m = dense_model();
  LoraConfig c = parse_peft_adapter_config(text, "adapter_config.json", m);
  EXPECT_EQ(c.r, 4);
  EXPECT_EQ(c.alpha, 8);
  EXPECT_TRUE(c.use_rslora);
  EXPECT_EQ(c.scale(), 4.0);  // 8 / sqrt(4)
  EXPECT_EQ(c.target_modules.size(), 7u);
  EXPECT_EQ(c.base_model_name_or_path, "");

  // A feature this engine does not know, switched on, is refused by name.
  json j = json::parse(text);
  j["velora_config"] = {{"rank", 2}};
  expect_adapter_error([&] { parse_peft_adapter_config(j.dump(), "a.json", m); }, {"velora_config"});
  j = json::parse(text);
  j["use_bdlora"] = true;
  expect_adapter_error([&] { parse_peft_adapter_config(j.dump(), "a.json", m); }, {"use_bdlora"});
  j = json::parse(text);
  j["some_future_feature"] = 3;
  expect_adapter_error([&] { parse_peft_adapter_config(j.dump(), "a.json", m); }, {"some_future_feature"});
}
