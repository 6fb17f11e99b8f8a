// Base model weights of one Qwen decoder (Qwen2, Qwen3, Qwen3-MoE), frozen during LoRA training.
// Shapes (PyTorch nn.Linear layout, W (out, in)):
//   embed (V,H); per layer: input_norm (H), post_norm (H),
//   q_w (nh*hd, H) [+ q_b], k_w (nkv*hd, H) [+ k_b], v_w (nkv*hd, H) [+ v_b], o_w (H, nh*hd),
//   q_norm, k_norm (hd) [qwen3 only];
//   dense MLP: gate (I,H), up (I,H), down (H,I);
//   MoE: router (E,H); experts fused: gate (E,I,H), up (E,I,H), down (E,H,I);
//   final_norm (H); lm_head (V,H), the same tensor as embed when tie_word_embeddings.
// On disk the loader accepts the Hub's per-expert names, transformers v5's fused
// mlp.experts.gate_up_proj (E,2I,H) / down_proj (E,H,I), and transformers-qwen3-moe-fused's
// mlp.{gate,up,down}_proj.weight (E,out,in); any float dtype on disk.
// The decoder projections (q/k/v/o, gate/up/down: what QLoRA stores in NF4) can instead be handed to
// a hook one matrix at a time (WeightsLoadOptions) and left undefined in the result: the streaming
// 4-bit load of model/weights_4bit.h, which never holds the float model.
#pragma once
#include <array>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "io/hf_config.h"

namespace qt {

struct AttentionWeights {
  Tensor q_w, k_w, v_w, o_w;
  Tensor q_b, k_b, v_b;   // undefined when the model has no attention bias
  Tensor q_norm, k_norm;  // undefined unless cfg.qk_norm
};

struct MlpWeights {
  // dense layer: gate (I,H), up (I,H), down (H,I)
  // MoE layer:   gate (E,I,H), up (E,I,H), down (E,H,I), router (E,H)
  Tensor gate, up, down;
  Tensor router;  // undefined for dense layers
};

struct LayerWeights {
  bool is_moe = false;
  Tensor input_norm, post_norm;
  AttentionWeights attn;
  MlpWeights mlp;
};

struct Nf4Base;  // model/weights_4bit.h

struct ModelWeights {
  ModelConfig cfg;
  Tensor embed;       // (V,H)
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // (H)
  Tensor lm_head;     // (V,H); shares storage with embed when tied
  // QLoRA: the NF4 data of the quantized projections (whose float tensors above hold the dequantized
  // values); the CUDA engine keeps these on the device instead of bf16 copies. Null without 4-bit.
  std::shared_ptr<const Nf4Base> nf4;
};

// Loads DIR (config.json + model.safetensors or sharded) into `dtype` (F32 for the CPU engine,
// F64 for exactness tests; BF16/F16 also work). Missing, unexpected or mis-shaped tensors:
// "[weights] <name>: ..." naming it. Tolerated and ignored: lm_head.weight when tied (transformers
// ignores it too) and legacy self_attn.rotary_emb.inv_freq buffers. The expert layout is detected
// per layer; a layer mixing layouts fails on the left-over tensors.
ModelWeights load_model_weights(const std::string& dir, DType dtype);
ModelWeights load_model_weights(const std::string& dir, const ModelConfig& cfg, DType dtype);

// How load_model_weights treats the decoder projections (every q/k/v/o_proj and gate/up/down_proj
// matrix; each expert's matrix of a MoE layer separately, whatever the layout on disk).
struct WeightsLoadOptions {
  DType dtype = DType::F32;  // of every float tensor loaded
  // Called once per projection matrix, one at a time, instead of the copy: hub_name is its Hub name
  // (model.layers.N.mlp.experts.E.gate_proj.weight for experts), values the matrix (out,in) as stored
  // (a view of the mapped checkpoint in its dtype; a pre-quantized weight dequantized; F32 if it
  // had to be gathered), whose F32 conversion is what load_model_weights(F32) gives; dst its place in
  // the weights (`dtype`, to be filled by the hook) or undefined without keep_projections. The
  // checkpoint's pages of a source tensor are released (madvise) once its last matrix is done, so
  // host memory holds one source tensor at a time.
  std::function<void(const std::string& hub_name, const Tensor& values, Tensor& dst)> projection;
  // false: the projection tensors stay undefined (with no hook they are validated but not read).
  bool keep_projections = true;
};
ModelWeights load_model_weights(const std::string& dir, const ModelConfig& cfg, const WeightsLoadOptions& opt);

// A layer's decoder projections in model/lora.h's LoraSlot order: q, k, v, o, gate, up, down (a MoE
// layer's gate/up/down are its experts (E,out,in)); what QLoRA stores in NF4.
constexpr int kNumProjections = 7;
std::array<Tensor*, kNumProjections> projection_tensors(LayerWeights& L);
std::array<const Tensor*, kNumProjections> projection_tensors(const LayerWeights& L);

// Whether every decoder projection tensor is defined (false for weights loaded for the CUDA engine
// with an NF4 base, whose projections exist only in ModelWeights::nf4); the CPU decoders assert it.
bool has_projection_floats(const ModelWeights& w);

// Random weights of a config's shape (for benchmarks and the embedded default), deterministic
// for a seed (independent of the thread count and the C++ library): normal(0, std) for matrices
// (router and embeddings included), ones for norms, zeros for biases; lm_head = embed when tied.
ModelWeights random_model_weights(const ModelConfig& cfg, DType dtype, uint64_t seed, double std = 0.02);

// The weights under the Hub's tensor names (model.embed_tokens.weight, ..., per-expert
// mlp.experts.E.{gate,up,down}_proj.weight; no lm_head.weight when tied), sharing storage.
// Undefined tensors (absent biases, q/k norms) are left out; with_undefined lists them too, at their
// place, as undefined tensors (for weights whose projections were left undefined). Without
// with_undefined the projections must be defined (asserted).
std::vector<std::pair<std::string, Tensor>> hub_named_tensors(const ModelWeights& w, bool with_undefined = false);

}  // namespace qt
