// HF config.json for model_type qwen2, qwen3 and qwen3_moe: every key that changes the math.
// parse_hf_config_json validates types and consistency and throws "[config] <file>: ..." on errors.
// Absent optional keys take transformers' class defaults (see hf_config.cpp), notably: qwen3's
// head_dim defaults to 128 (Qwen3Config), qwen2/qwen3_moe's to hidden/heads; num_key_value_heads
// absent -> 32 (qwen2, qwen3) or 4 (qwen3_moe), null -> num_attention_heads. Both the v4 keys
// (rope_theta, rope_scaling) and v5's rope_parameters are read; only plain RoPE is supported.
// Rejected as unsupported: rope scaling, sliding-window attention, qwen3 attention_bias=true
// (it adds an o_proj bias), hidden_act other than silu, attention_dropout != 0.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qt {

enum class ModelFamily { Qwen2, Qwen3, Qwen3Moe };

struct ModelConfig {
  ModelFamily family = ModelFamily::Qwen3;
  std::string model_type;         // "qwen2" | "qwen3" | "qwen3_moe"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // dense MLP width
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;           // absent in the file -> hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  double initializer_range = 0.02;  // std of HF's random init (normal(0, std) for linears, embeddings)
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;    // q/k/v bias: qwen2 always true; qwen3 from the key
  bool qk_norm = false;           // per-head q_norm/k_norm: qwen3 and qwen3_moe
  int64_t max_position_embeddings = 0;
  // MoE (qwen3_moe)
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  bool norm_topk_prob = false;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool output_router_logits = false;
  double router_aux_loss_coef = 0.001;

  // A layer is MoE iff it is not in mlp_only_layers and (i+1) % decoder_sparse_step == 0.
  bool is_moe_layer(int64_t i) const;
  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

ModelConfig parse_hf_config_json(const std::string& json_text, const std::string& origin);
ModelConfig load_hf_config(const std::string& dir_or_file);  // DIR/config.json or a file path

}  // namespace qt
