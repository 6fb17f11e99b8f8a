// ModelWeights -> the Hub's tensor names (the inverse of load_model_weights for the Hub layout).
#include "model/weights.h"

namespace qt {

std::vector<std::pair<std::string, Tensor>> hub_named_tensors(const ModelWeights& w) {
  const ModelConfig& c = w.cfg;
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](const std::string& name, const Tensor& t) {
    if (t.defined()) out.emplace_back(name, t);
  };
  add("model.embed_tokens.weight", w.embed);
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string pre = fmt::format("model.layers.{}.", l), a = pre + "self_attn.";
    add(pre + "input_layernorm.weight", L.input_norm);
    add(pre + "post_attention_layernorm.weight", L.post_norm);
    add(a + "q_proj.weight", L.attn.q_w);
    add(a + "k_proj.weight", L.attn.k_w);
    add(a + "v_proj.weight", L.attn.v_w);
    add(a + "o_proj.weight", L.attn.o_w);
    add(a + "q_proj.bias", L.attn.q_b);
    add(a + "k_proj.bias", L.attn.k_b);
    add(a + "v_proj.bias", L.attn.v_b);
    add(a + "q_norm.weight", L.attn.q_norm);
    add(a + "k_norm.weight", L.attn.k_norm);
    if (L.is_moe) {
      add(pre + "mlp.gate.weight", L.mlp.router);
      const int64_t E = L.mlp.gate.dim(0);
      for (int64_t e = 0; e < E; ++e) {
        const std::string ep = fmt::format("{}mlp.experts.{}.", pre, e);
        add(ep + "gate_proj.weight", L.mlp.gate.slice_rows(e, e + 1).reshape({L.mlp.gate.dim(1), L.mlp.gate.dim(2)}));
        add(ep + "up_proj.weight", L.mlp.up.slice_rows(e, e + 1).reshape({L.mlp.up.dim(1), L.mlp.up.dim(2)}));
        add(ep + "down_proj.weight", L.mlp.down.slice_rows(e, e + 1).reshape({L.mlp.down.dim(1), L.mlp.down.dim(2)}));
      }
    } else {
      add(pre + "mlp.gate_proj.weight", L.mlp.gate);
      add(pre + "mlp.up_proj.weight", L.mlp.up);
      add(pre + "mlp.down_proj.weight", L.mlp.down);
    }
  }
  add("model.norm.weight", w.final_norm);
  if (!c.tie_word_embeddings) add("lm_head.weight", w.lm_head);
  return out;
}

}  // namespace qt
