// Parses a Hugging Face config.json for qwen2 / qwen3 / qwen3_moe into ModelConfig.
//
// Defaults for absent keys are those of transformers' config classes (Qwen2Config, Qwen3Config,
// Qwen3MoeConfig, v4.5x and v5):
//   rms_norm_eps 1e-6, rope_theta 10000, tie_word_embeddings false, max_position_embeddings 32768,
//   initializer_range 0.02 (the std of random init; used only for random weights),
//   num_key_value_heads: absent -> 32 (qwen2, qwen3) or 4 (qwen3_moe), null -> num_attention_heads;
//   head_dim: qwen3 absent -> 128 (Qwen3Config's default), qwen2/qwen3_moe absent -> hidden/heads
//     (the modeling code's getattr fallback); null -> hidden/heads;
//   attention_bias false; qwen3_moe: decoder_sparse_step 1, norm_topk_prob false, mlp_only_layers [],
//     output_router_logits false, router_aux_loss_coef 0.001.
// The core sizes (vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size
// where a dense layer exists, and the MoE sizes) are required: a silent default there would build
// a different model.
// RoPE: v4 writes rope_theta at the top level and rope_scaling (null for plain RoPE); v5 writes
// rope_parameters {"rope_type": "default", "rope_theta": ...}. rope_theta is taken from the dict
// first, then the top level, then 10000 (v5's order). Any rope type but "default" is rejected.
#include "io/hf_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <sys/stat.h>

#include "core/error.h"

namespace qt {

bool ModelConfig::is_moe_layer(int64_t i) const {
  if (family != ModelFamily::Qwen3Moe || num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), i) != mlp_only_layers.end()) return false;
  return (i + 1) % decoder_sparse_step == 0;
}

namespace {

using json = nlohmann::json;

// Typed access to the top-level object, every error naming the file and the key.
class ConfigReader {
 public:
  ConfigReader(const json& j, const std::string& origin) : j_(j), origin_(origin) {}

  [[noreturn]] void error(const std::string& msg) const { fail("config", "{}: {}", origin_, msg); }

  bool has(const char* key) const { return j_.contains(key); }
  bool is_null(const char* key) const { return j_.contains(key) && j_.at(key).is_null(); }
  const json& at(const char* key) const { return j_.at(key); }

  int64_t integer(const json& v, const std::string& key) const {
    if (v.is_number_unsigned()) {
      if (v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())) error(fmt::format("'{}' is out of range", key));
      return int64_t(v.get<uint64_t>());
    }
    if (!v.is_number_integer()) error(fmt::format("'{}' must be an integer, got {}", key, v.dump()));
    return v.get<int64_t>();
  }
  int64_t required_int(const char* key) const {
    if (!has(key) || at(key).is_null()) error(fmt::format("missing required key '{}'", key));
    return integer(at(key), key);
  }
  int64_t optional_int(const char* key, int64_t fallback) const {
    if (!has(key) || at(key).is_null()) return fallback;
    return integer(at(key), key);
  }
  double number(const json& v, const std::string& key) const {
    if (!v.is_number()) error(fmt::format("'{}' must be a number, got {}", key, v.dump()));
    double d = v.get<double>();
    if (!std::isfinite(d)) error(fmt::format("'{}' must be finite", key));
    return d;
  }
  double optional_number(const char* key, double fallback) const {
    if (!has(key) || at(key).is_null()) return fallback;
    return number(at(key), key);
  }
  bool optional_bool(const char* key, bool fallback) const {
    if (!has(key) || at(key).is_null()) return fallback;
    if (!at(key).is_boolean()) error(fmt::format("'{}' must be true or false, got {}", key, at(key).dump()));
    return at(key).get<bool>();
  }
  std::string optional_string(const char* key, const std::string& fallback) const {
    if (!has(key) || at(key).is_null()) return fallback;
    if (!at(key).is_string()) error(fmt::format("'{}' must be a string, got {}", key, at(key).dump()));
    return at(key).get<std::string>();
  }
  // Sizes: positive and small enough that products of a few of them cannot overflow int64.
  void check_size(const char* key, int64_t v, int64_t max = int64_t(1) << 24) const {
    if (v <= 0) error(fmt::format("'{}' must be positive, got {}", key, v));
    if (v > max) error(fmt::format("'{}' = {} is implausibly large (limit {})", key, v, max));
  }

 private:
  const json& j_;
  const std::string& origin_;
};

// RoPE settings: only plain RoPE ("default") is implemented.
void parse_rope(const ConfigReader& r, ModelConfig& c) {
  // v5 gives priority to a legacy rope_scaling dict over rope_parameters.
  const char* dict_key = nullptr;
  for (const char* k : {"rope_scaling", "rope_parameters"}) {
    if (!r.has(k) || r.at(k).is_null()) continue;
    if (!r.at(k).is_object()) r.error(fmt::format("'{}' must be an object or null, got {}", k, r.at(k).dump()));
    if (!r.at(k).empty()) { dict_key = k; break; }
  }
  double theta = r.optional_number("rope_theta", 10000.0);
  if (dict_key) {
    const json& d = r.at(dict_key);
    std::string type = "default";
    for (const char* tk : {"rope_type", "type"}) {
      if (!d.contains(tk) || d.at(tk).is_null()) continue;
      if (!d.at(tk).is_string()) r.error(fmt::format("'{}.{}' must be a string, got {}", dict_key, tk, d.at(tk).dump()));
      type = d.at(tk).get<std::string>();
      break;
    }
    if (type != "default") r.error(fmt::format("rope_scaling type '{}' is not supported yet", type));
    if (d.contains("rope_theta") && !d.at("rope_theta").is_null())
      theta = r.number(d.at("rope_theta"), std::string(dict_key) + ".rope_theta");
    if (d.contains("partial_rotary_factor") && !d.at("partial_rotary_factor").is_null() &&
        r.number(d.at("partial_rotary_factor"), std::string(dict_key) + ".partial_rotary_factor") != 1.0)
      r.error(fmt::format("'{}.partial_rotary_factor' != 1 is not supported yet", dict_key));
  }
  if (r.has("partial_rotary_factor") && !r.is_null("partial_rotary_factor") &&
      r.number(r.at("partial_rotary_factor"), "partial_rotary_factor") != 1.0)
    r.error("'partial_rotary_factor' != 1 is not supported yet");
  if (!(theta > 0)) r.error(fmt::format("'rope_theta' must be positive, got {}", theta));
  c.rope_theta = theta;
}

// Settings that change the math in ways this engine does not implement.
void reject_unsupported(const ConfigReader& r, ModelConfig& c) {
  std::string act = r.optional_string("hidden_act", "silu");
  if (act != "silu") r.error(fmt::format("'hidden_act' '{}' is not supported (only silu)", act));
  if (r.optional_bool("use_sliding_window", false))
    r.error("'use_sliding_window' true (sliding-window attention) is not supported yet");
  if (r.has("layer_types") && !r.is_null("layer_types")) {
    if (!r.at("layer_types").is_array()) r.error("'layer_types' must be a list");
    for (const json& t : r.at("layer_types"))
      if (!t.is_string() || t.get<std::string>() != "full_attention")
        r.error(fmt::format("'layer_types' entry {} is not supported (only \"full_attention\")", t.dump()));
  }
  double dropout = r.optional_number("attention_dropout", 0.0);
  if (dropout != 0.0) r.error(fmt::format("'attention_dropout' {} is not supported (only 0)", dropout));
  if (c.family == ModelFamily::Qwen3Moe && r.has("shared_expert_intermediate_size") &&
      !r.is_null("shared_expert_intermediate_size") && r.integer(r.at("shared_expert_intermediate_size"), "shared_expert_intermediate_size") != 0)
    r.error("'shared_expert_intermediate_size' (a shared expert) is not supported for qwen3_moe");
}

void parse_moe(const ConfigReader& r, ModelConfig& c) {
  // transformers v5 maps num_experts to num_local_experts; accept either spelling.
  bool has_e = r.has("num_experts") && !r.is_null("num_experts");
  bool has_local = r.has("num_local_experts") && !r.is_null("num_local_experts");
  if (!has_e && !has_local) r.error("missing required key 'num_experts'");
  c.num_experts = has_e ? r.required_int("num_experts") : r.required_int("num_local_experts");
  if (has_e && has_local && r.required_int("num_local_experts") != c.num_experts)
    r.error(fmt::format("'num_experts' {} and 'num_local_experts' {} disagree", c.num_experts,
                        r.required_int("num_local_experts")));
  r.check_size("num_experts", c.num_experts, 1 << 16);
  c.num_experts_per_tok = r.required_int("num_experts_per_tok");
  if (c.num_experts_per_tok < 1 || c.num_experts_per_tok > c.num_experts)
    r.error(fmt::format("'num_experts_per_tok' must be in [1, num_experts={}], got {}", c.num_experts,
                        c.num_experts_per_tok));
  c.moe_intermediate_size = r.required_int("moe_intermediate_size");
  r.check_size("moe_intermediate_size", c.moe_intermediate_size);
  c.norm_topk_prob = r.optional_bool("norm_topk_prob", false);
  c.decoder_sparse_step = r.optional_int("decoder_sparse_step", 1);
  if (c.decoder_sparse_step < 1) r.error(fmt::format("'decoder_sparse_step' must be >= 1, got {}", c.decoder_sparse_step));
  c.mlp_only_layers.clear();
  if (r.has("mlp_only_layers") && !r.is_null("mlp_only_layers")) {
    const json& l = r.at("mlp_only_layers");
    if (!l.is_array()) r.error(fmt::format("'mlp_only_layers' must be a list of layer indices, got {}", l.dump()));
    for (const json& v : l) {
      int64_t i = r.integer(v, "mlp_only_layers");
      if (i < 0 || i >= c.num_hidden_layers)
        r.error(fmt::format("'mlp_only_layers' entry {} is outside [0, num_hidden_layers={})", i, c.num_hidden_layers));
      c.mlp_only_layers.push_back(i);
    }
  }
  c.output_router_logits = r.optional_bool("output_router_logits", false);
  c.router_aux_loss_coef = r.optional_number("router_aux_loss_coef", 0.001);
  if (c.router_aux_loss_coef < 0) r.error(fmt::format("'router_aux_loss_coef' must be >= 0, got {}", c.router_aux_loss_coef));
}

}  // namespace

ModelConfig parse_hf_config_json(const std::string& json_text, const std::string& origin) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail("config", "{}: invalid JSON: {}", origin, e.what());
  }
  if (!j.is_object()) fail("config", "{}: the top level must be a JSON object", origin);
  ConfigReader r(j, origin);

  ModelConfig c;
  if (!r.has("model_type") || r.is_null("model_type")) r.error("missing required key 'model_type'");
  c.model_type = r.optional_string("model_type", "");
  if (c.model_type == "qwen2") c.family = ModelFamily::Qwen2;
  else if (c.model_type == "qwen3") c.family = ModelFamily::Qwen3;
  else if (c.model_type == "qwen3_moe") c.family = ModelFamily::Qwen3Moe;
  else r.error(fmt::format("'model_type' '{}' is not supported (qwen2, qwen3, qwen3_moe)", c.model_type));
  const bool moe = c.family == ModelFamily::Qwen3Moe;

  c.vocab_size = r.required_int("vocab_size");
  r.check_size("vocab_size", c.vocab_size);
  c.hidden_size = r.required_int("hidden_size");
  r.check_size("hidden_size", c.hidden_size);
  c.num_hidden_layers = r.required_int("num_hidden_layers");
  r.check_size("num_hidden_layers", c.num_hidden_layers, 1 << 16);
  c.num_attention_heads = r.required_int("num_attention_heads");
  r.check_size("num_attention_heads", c.num_attention_heads, 1 << 16);

  if (r.has("num_key_value_heads")) {
    c.num_key_value_heads = r.optional_int("num_key_value_heads", c.num_attention_heads);  // null -> heads
  } else {
    c.num_key_value_heads = moe ? 4 : 32;  // the config classes' defaults
  }
  r.check_size("num_key_value_heads", c.num_key_value_heads, 1 << 16);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.error(fmt::format("'num_attention_heads' {} is not a multiple of 'num_key_value_heads' {}", c.num_attention_heads,
                        c.num_key_value_heads));

  if (r.has("head_dim") && !r.is_null("head_dim")) {
    c.head_dim = r.required_int("head_dim");
  } else if (!r.has("head_dim") && c.family == ModelFamily::Qwen3) {
    c.head_dim = 128;  // Qwen3Config's default
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      r.error(fmt::format("'head_dim' is absent and 'hidden_size' {} is not divisible by 'num_attention_heads' {}",
                          c.hidden_size, c.num_attention_heads));
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  r.check_size("head_dim", c.head_dim, 1 << 16);
  if (c.head_dim % 2 != 0) r.error(fmt::format("'head_dim' must be even for RoPE, got {}", c.head_dim));

  c.rms_norm_eps = r.optional_number("rms_norm_eps", 1e-6);
  if (!(c.rms_norm_eps > 0)) r.error(fmt::format("'rms_norm_eps' must be positive, got {}", c.rms_norm_eps));
  c.initializer_range = r.optional_number("initializer_range", 0.02);
  if (!(c.initializer_range > 0 && c.initializer_range < 1e3))
    r.error(fmt::format("'initializer_range' must be positive, got {}", c.initializer_range));
  parse_rope(r, c);
  c.tie_word_embeddings = r.optional_bool("tie_word_embeddings", false);
  c.max_position_embeddings = r.optional_int("max_position_embeddings", 32768);
  r.check_size("max_position_embeddings", c.max_position_embeddings, int64_t(1) << 40);

  if (c.family == ModelFamily::Qwen2) {
    // Qwen2Attention hard-codes bias on q/k/v (none on o); the key is not read by the model.
    c.attention_bias = true;
    c.qk_norm = false;
  } else {
    c.attention_bias = r.optional_bool("attention_bias", false);
    c.qk_norm = true;
    // Qwen3 puts the bias on o_proj too (LlamaAttention); the weights have no slot for it.
    if (c.attention_bias) r.error("'attention_bias' true (bias on q/k/v/o for qwen3) is not supported yet");
  }
  reject_unsupported(r, c);

  if (moe) parse_moe(r, c);
  bool any_dense = false;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) any_dense = any_dense || !c.is_moe_layer(i);
  if (!moe || any_dense || r.has("intermediate_size")) {
    c.intermediate_size = r.required_int("intermediate_size");
    r.check_size("intermediate_size", c.intermediate_size);
  }

  // Total parameter count must stay far from int64 overflow (each size is already bounded).
  long double params = (long double)c.vocab_size * c.hidden_size * 2;
  long double attn = (long double)c.hidden_size * (c.q_dim() * 2 + c.kv_dim() * 2);
  long double mlp = moe ? (long double)c.num_experts * 3 * c.moe_intermediate_size * c.hidden_size
                        : (long double)3 * c.intermediate_size * c.hidden_size;
  params += (long double)c.num_hidden_layers * (attn + mlp + (long double)3 * c.intermediate_size * c.hidden_size);
  if (params > 1e15L) r.error(fmt::format("the model described has ~{:.3g} parameters; refusing", (double)params));
  return c;
}

ModelConfig load_hf_config(const std::string& dir_or_file) {
  std::string path = dir_or_file;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) path += "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("config", "{}: cannot open", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("config", "{}: read error", path);
  return parse_hf_config_json(ss.str(), path);
}

}  // namespace qt
