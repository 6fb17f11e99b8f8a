// config.json parsing for qwen2 / qwen3 / qwen3_moe: values, HF defaults, and every error path
// ("[config] <origin>: ..." naming the key).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "core/error.h"
#include "io/hf_config.h"

using namespace qt;
using json = nlohmann::json;

namespace {

// Qwen2.5-0.5B's published config.json (trimmed to the keys that matter).
json qwen2_config() {
  return json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": null, "tie_word_embeddings": true,
    "use_sliding_window": false, "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": true, "bos_token_id": 151643
  })");
}

// Qwen3-0.6B: head_dim 128 while hidden/heads = 64.
json qwen3_config() {
  return json::parse(R"({
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu", "attention_bias": false,
    "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": null, "tie_word_embeddings": true,
    "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28, "attention_dropout": 0.0
  })");
}

// Qwen3-30B-A3B.
json qwen3_moe_config() {
  return json::parse(R"({
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
    "attention_bias": false, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": null,
    "tie_word_embeddings": false, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": false,
    "router_aux_loss_coef": 0.001, "use_sliding_window": false, "max_window_layers": 48, "attention_dropout": 0.0
  })");
}

ModelConfig parse(const json& j) { return parse_hf_config_json(j.dump(), "test/config.json"); }

// Parsing must throw qt::Error starting with "[config] test/config.json:" and mentioning `needle`.
void expect_error(const json& j, const std::string& needle) {
  try {
    parse(j);
    FAIL() << "no error for config mentioning '" << needle << "': " << j.dump();
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.rfind("[config] test/config.json: ", 0), 0u) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << "'" << needle << "' not in: " << msg;
  }
}

}  // namespace

TEST(HfConfig, Qwen2) {
  ModelConfig c = parse(qwen2_config());
  EXPECT_EQ(c.family, ModelFamily::Qwen2);
  EXPECT_EQ(c.model_type, "qwen2");
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.hidden_size, 896);
  EXPECT_EQ(c.intermediate_size, 4864);
  EXPECT_EQ(c.num_hidden_layers, 24);
  EXPECT_EQ(c.num_attention_heads, 14);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 64);  // absent: 896 / 14
  EXPECT_EQ(c.q_dim(), 896);
  EXPECT_EQ(c.kv_dim(), 128);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.attention_bias);  // Qwen2 always has q/k/v bias
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) EXPECT_FALSE(c.is_moe_layer(i));
}

TEST(HfConfig, Qwen2IgnoresAttentionBiasKey) {
  json j = qwen2_config();
  j["attention_bias"] = false;
  EXPECT_TRUE(parse(j).attention_bias);
}

TEST(HfConfig, Qwen3HeadDimDiffersFromHiddenOverHeads) {
  ModelConfig c = parse(qwen3_config());
  EXPECT_EQ(c.family, ModelFamily::Qwen3);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_dim(), 2048);
  EXPECT_EQ(c.kv_dim(), 1024);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.max_position_embeddings, 40960);
}

TEST(HfConfig, HeadDimDefaults) {
  // qwen3: absent -> Qwen3Config's default 128; null -> hidden / heads.
  json j = qwen3_config();
  j["hidden_size"] = 512;
  j["num_attention_heads"] = 8;
  j["num_key_value_heads"] = 4;
  j.erase("head_dim");
  EXPECT_EQ(parse(j).head_dim, 128);
  j["head_dim"] = nullptr;
  EXPECT_EQ(parse(j).head_dim, 64);
  // qwen2 and qwen3_moe have no head_dim attribute: hidden / heads.
  json m = qwen3_moe_config();
  m.erase("head_dim");
  EXPECT_EQ(parse(m).head_dim, 64);
  json q2 = qwen2_config();
  q2["num_attention_heads"] = 7;
  q2["num_key_value_heads"] = 7;
  EXPECT_EQ(parse(q2).head_dim, 128);
  q2["num_attention_heads"] = 12;
  q2["num_key_value_heads"] = 2;
  expect_error(q2, "head_dim");  // 896 % 12 != 0
}

TEST(HfConfig, KvHeadDefaults) {
  json j = qwen3_config();
  j["num_attention_heads"] = 32;
  j.erase("num_key_value_heads");
  EXPECT_EQ(parse(j).num_key_value_heads, 32);  // Qwen3Config default
  j["num_key_value_heads"] = nullptr;
  EXPECT_EQ(parse(j).num_key_value_heads, 32);  // null -> num_attention_heads
  j["num_attention_heads"] = 16;
  EXPECT_EQ(parse(j).num_key_value_heads, 16);
  json m = qwen3_moe_config();
  m.erase("num_key_value_heads");
  EXPECT_EQ(parse(m).num_key_value_heads, 4);  // Qwen3MoeConfig default
}

TEST(HfConfig, OptionalDefaults) {
  json j = qwen3_config();
  for (const char* k : {"rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "max_position_embeddings",
                        "attention_bias", "hidden_act", "use_sliding_window", "attention_dropout"})
    j.erase(k);
  ModelConfig c = parse(j);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.initializer_range, 0.02);
  j["initializer_range"] = 0.15;
  EXPECT_EQ(parse(j).initializer_range, 0.15);
}

TEST(HfConfig, Qwen3Moe) {
  ModelConfig c = parse(qwen3_moe_config());
  EXPECT_EQ(c.family, ModelFamily::Qwen3Moe);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.moe_intermediate_size, 768);
  EXPECT_EQ(c.intermediate_size, 6144);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_TRUE(c.mlp_only_layers.empty());
  EXPECT_FALSE(c.output_router_logits);
  EXPECT_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_dim(), 4096);
  for (int64_t i = 0; i < 48; ++i) EXPECT_TRUE(c.is_moe_layer(i));
}

TEST(HfConfig, Qwen3MoeDefaultsAndLayerPattern) {
  json j = qwen3_moe_config();
  for (const char* k : {"norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "output_router_logits",
                        "router_aux_loss_coef"})
    j.erase(k);
  ModelConfig c = parse(j);
  EXPECT_FALSE(c.norm_topk_prob);  // Qwen3MoeConfig default
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_EQ(c.router_aux_loss_coef, 0.001);

  j["num_hidden_layers"] = 6;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  j["output_router_logits"] = true;
  j["router_aux_loss_coef"] = 0.01;
  c = parse(j);
  // MoE iff not in mlp_only_layers and (i+1) % step == 0: layers 1 and 5 (3 is excluded).
  std::vector<bool> moe;
  for (int64_t i = 0; i < 6; ++i) moe.push_back(c.is_moe_layer(i));
  EXPECT_EQ(moe, (std::vector<bool>{false, true, false, false, false, true}));
  EXPECT_TRUE(c.output_router_logits);
  EXPECT_EQ(c.router_aux_loss_coef, 0.01);
  EXPECT_EQ(c.mlp_only_layers, (std::vector<int64_t>{3}));
}

TEST(HfConfig, Qwen3MoeIntermediateSizeOnlyNeededForDenseLayers) {
  json j = qwen3_moe_config();
  j.erase("intermediate_size");
  EXPECT_EQ(parse(j).intermediate_size, 0);  // every layer is MoE
  j["mlp_only_layers"] = {0};
  expect_error(j, "'intermediate_size'");
}

TEST(HfConfig, NumLocalExpertsAlias) {
  json j = qwen3_moe_config();
  j.erase("num_experts");
  j["num_local_experts"] = 64;
  EXPECT_EQ(parse(j).num_experts, 64);
  j["num_experts"] = 32;
  expect_error(j, "num_local_experts");
}

TEST(HfConfig, RopeParametersV5) {
  json j = qwen3_config();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e5}};
  EXPECT_EQ(parse(j).rope_theta, 5e5);
  j["rope_theta"] = 1234.0;  // the dict wins over the top-level key (v5's priority)
  EXPECT_EQ(parse(j).rope_theta, 5e5);
  j["rope_parameters"] = {{"rope_type", "default"}};
  EXPECT_EQ(parse(j).rope_theta, 1234.0);
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"rope_theta", 1e6}};
  expect_error(j, "rope_scaling type 'yarn' is not supported yet");
  j["rope_parameters"] = "default";
  expect_error(j, "rope_parameters");
}

TEST(HfConfig, RopeScalingV4) {
  json j = qwen2_config();
  j["rope_scaling"] = {{"type", "default"}};
  EXPECT_EQ(parse(j).rope_theta, 1e6);
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  expect_error(j, "rope_scaling type 'linear' is not supported yet");
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  expect_error(j, "rope_scaling type 'yarn' is not supported yet");
  j["rope_scaling"] = {{"rope_type", 3}};
  expect_error(j, "rope_type");
  j["rope_scaling"] = nullptr;
  j["rope_theta"] = -1.0;
  expect_error(j, "rope_theta");
  j["rope_theta"] = "big";
  expect_error(j, "rope_theta");
}

TEST(HfConfig, Errors) {
  json j = qwen3_config();
  j["model_type"] = "llama";
  expect_error(j, "model_type");
  j.erase("model_type");
  expect_error(j, "model_type");

  for (const char* key : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"}) {
    json m = qwen3_config();
    m.erase(key);
    expect_error(m, key);
    m[key] = "12";
    expect_error(m, key);
    m[key] = 12.5;
    expect_error(m, key);
    m[key] = 0;
    expect_error(m, key);
    m[key] = -4;
    expect_error(m, key);
  }
  json m = qwen3_config();
  m["num_key_value_heads"] = 3;  // 16 % 3 != 0
  expect_error(m, "num_key_value_heads");
  m = qwen3_config();
  m["head_dim"] = 0;
  expect_error(m, "head_dim");
  m["head_dim"] = 63;
  expect_error(m, "head_dim");
  m = qwen3_config();
  m["rms_norm_eps"] = true;
  expect_error(m, "rms_norm_eps");
  m["rms_norm_eps"] = 0;
  expect_error(m, "rms_norm_eps");
  m = qwen3_config();
  m["initializer_range"] = 0;
  expect_error(m, "initializer_range");
  m["initializer_range"] = "0.02";
  expect_error(m, "initializer_range");
  m = qwen3_config();
  m["tie_word_embeddings"] = "yes";
  expect_error(m, "tie_word_embeddings");
  m = qwen3_config();
  m["hidden_act"] = "gelu";
  expect_error(m, "hidden_act");
  m = qwen3_config();
  m["use_sliding_window"] = true;
  expect_error(m, "use_sliding_window");
  m = qwen3_config();
  m["attention_bias"] = true;
  expect_error(m, "attention_bias");
  m = qwen3_config();
  m["attention_dropout"] = 0.1;
  expect_error(m, "attention_dropout");
  m = qwen3_config();
  m["hidden_size"] = int64_t(1) << 40;
  expect_error(m, "hidden_size");
  m["hidden_size"] = 18446744073709551615ull;
  expect_error(m, "hidden_size");
}

TEST(HfConfig, MoeErrors) {
  auto with = [](const char* key, json v) {
    json j = qwen3_moe_config();
    j[key] = v;
    return j;
  };
  expect_error(with("num_experts_per_tok", 0), "num_experts_per_tok");
  expect_error(with("num_experts_per_tok", 129), "num_experts_per_tok");
  expect_error(with("num_experts", 0), "num_experts");
  expect_error(with("moe_intermediate_size", -1), "moe_intermediate_size");
  expect_error(with("decoder_sparse_step", 0), "decoder_sparse_step");
  expect_error(with("mlp_only_layers", json::array({48})), "mlp_only_layers");
  expect_error(with("mlp_only_layers", json::array({-1})), "mlp_only_layers");
  expect_error(with("mlp_only_layers", json::array({"1"})), "mlp_only_layers");
  expect_error(with("mlp_only_layers", 3), "mlp_only_layers");
  expect_error(with("norm_topk_prob", 1), "norm_topk_prob");
  expect_error(with("router_aux_loss_coef", "x"), "router_aux_loss_coef");
  for (const char* key : {"num_experts", "num_experts_per_tok", "moe_intermediate_size"}) {
    json j = qwen3_moe_config();
    j.erase(key);
    expect_error(j, key);
  }
}

TEST(HfConfig, BadJson) {
  try {
    parse_hf_config_json("{\"model_type\": ", "x.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("[config] x.json: invalid JSON", 0), 0u) << e.what();
  }
  EXPECT_THROW(parse_hf_config_json("[1, 2]", "x.json"), Error);
  EXPECT_THROW(parse_hf_config_json("", "x.json"), Error);
}

TEST(HfConfig, LoadFromDirectoryOrFile) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("qt_test_hf_config_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  {
    std::ofstream(dir / "config.json") << qwen3_moe_config().dump();
  }
  EXPECT_EQ(load_hf_config(dir.string()).num_experts, 128);
  EXPECT_EQ(load_hf_config((dir / "config.json").string()).num_experts, 128);
  try {
    load_hf_config((dir / "nope").string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[config]"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos);
  }
  fs::remove_all(dir);
}

// config.json as transformers 5.17 saved Qwen3MoeConfig(...): num_local_experts, rope_parameters.
TEST(HfConfig, Transformers5SavedMoeConfig) {
  ModelConfig c = parse_hf_config_json(R"({
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": null, "decoder_sparse_step": 1, "dtype": "float32", "eos_token_id": null, "head_dim": 16,
  "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
  "max_position_embeddings": 32768, "mlp_only_layers": [1], "model_type": "qwen3_moe",
  "moe_intermediate_size": 24, "norm_topk_prob": false, "num_attention_heads": 4, "num_experts_per_tok": 2,
  "num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 4, "output_router_logits": false,
  "pad_token_id": null, "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
  "router_aux_loss_coef": 0.001, "sliding_window": null, "tie_word_embeddings": false,
  "transformers_version": "5.17.0", "use_cache": true, "use_sliding_window": false, "vocab_size": 64})",
                                       "config.json");
  EXPECT_EQ(c.num_experts, 4);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.is_moe_layer(0));
  EXPECT_FALSE(c.is_moe_layer(1));
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.intermediate_size, 48);
  // Qwen3 as saved by v5 lists layer_types.
  json q = qwen3_config();
  q["layer_types"] = {"full_attention", "full_attention"};
  EXPECT_NO_THROW(parse(q));
  q["layer_types"] = {"full_attention", "sliding_attention"};
  expect_error(q, "layer_types");
}
