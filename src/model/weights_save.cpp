// ModelWeights -> the Hub's tensor names (the inverse of load_model_weights for the Hub layout), and
// the projections of a layer (projection_tensors, has_projection_floats).
#include "model/weights.h"

#include "core/error.h"
#include "model/lora.h"

namespace qt {

static_assert(kNumProjections == kNumLoraSlots, "projection_tensors follows the LoraSlot order");

std::array<Tensor*, kNumProjections> projection_tensors(LayerWeights& L) {
  return {&L.attn.q_w, &L.attn.k_w, &L.attn.v_w, &L.attn.o_w, &L.mlp.gate, &L.mlp.up, &L.mlp.down};
}
std::array<const Tensor*, kNumProjections> projection_tensors(const LayerWeights& L) {
  return {&L.attn.q_w, &L.attn.k_w, &L.attn.v_w, &L.attn.o_w, &L.mlp.gate, &L.mlp.up, &L.mlp.down};
}

bool has_projection_floats(const ModelWeights& w) {
  for (const LayerWeights& L : w.layers)
    for (const Tensor* t : projection_tensors(L))
      if (!t->defined()) return false;
  return true;
}

std::vector<std::pair<std::string, Tensor>> hub_named_tensors(const ModelWeights& w, bool with_undefined) {
  QT_ASSERT(with_undefined || has_projection_floats(w),
            "hub_named_tensors: the projections are undefined (weights loaded for the CUDA engine's NF4 base)");
  const ModelConfig& c = w.cfg;
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](const std::string& name, const Tensor& t) {
    if (t.defined() || with_undefined) out.emplace_back(name, t);
  };
  // Expert e's (out,in) matrix of a fused (E,out,in) tensor; undefined when the tensor is.
  auto expert = [](const Tensor& t, int64_t e) {
    return t.defined() ? t.slice_rows(e, e + 1).reshape({t.dim(1), t.dim(2)}) : Tensor();
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
      const int64_t E = L.mlp.gate.defined() ? L.mlp.gate.dim(0) : c.num_experts;
      for (int64_t e = 0; e < E; ++e) {
        const std::string ep = fmt::format("{}mlp.experts.{}.", pre, e);
        add(ep + "gate_proj.weight", expert(L.mlp.gate, e));
        add(ep + "up_proj.weight", expert(L.mlp.up, e));
        add(ep + "down_proj.weight", expert(L.mlp.down, e));
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
