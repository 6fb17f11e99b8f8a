// QLoRA base weights: which tensors are stored in 4-bit NF4 (model/nf4.h), and the 4-bit base of the
// CPU engine.
//
// Quantized (as bitsandbytes' Linear4bit under transformers / Unsloth): every decoder projection,
// model.layers.N.self_attn.{q,k,v,o}_proj.weight and mlp.{gate,up,down}_proj.weight, and for MoE
// layers each expert's matrix separately (the Hub's per-expert mlp.experts.E.{gate,up,down}_proj.weight,
// one NF4 tensor with its own absmax and double-quantization offset per expert, whatever the
// checkpoint's expert layout). Kept in their float dtype: embeddings, lm_head, norms, biases and the
// MoE router (mlp.gate.weight).
//
// The CPU engine computes with the dequantized values: load_in_4bit replaces each quantized weight by
// dequantize(quantize(W)) at load (the values a bitsandbytes model computes with), so host memory is
// that of the float model; the 4-bit storage itself is what `qwentune quantize` writes.
// The NF4 data is kept beside the float weights (ModelWeights::nf4, about n/2 bytes per matrix of n
// elements): the CUDA engine uploads it and dequantizes one layer at a time (model/cuda_nf4_weights.h),
// so it needs no float projections at all.
// Streaming (load_nf4_model_weights): each projection matrix is read from the mapped checkpoint,
// quantized and released before the next, so host memory holds the NF4 model, the other float
// tensors and one source tensor (one fused expert tensor at most), never the float model.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "model/nf4.h"
#include "model/weights.h"

namespace qt {

// The NF4 tensors of a model's quantized projections, by Hub name (per-expert names for MoE layers).
struct Nf4Base {
  std::map<std::string, Nf4Tensor> tensors;
};

// True for the Hub names of the quantized projections (see above).
bool is_4bit_target(const std::string& hub_name);
// The Hub name of projection `slot` (model/lora.h's LoraSlot order: q k v o gate up down) of a layer;
// expert >= 0: that expert's matrix of a MoE layer (mlp.experts.E.<proj>.weight).
std::string projection_hub_name(int64_t layer, int slot, int64_t expert = -1);

// Replaces every target weight of `w` (any float dtype) in place by its NF4 round trip: quantized
// with `storage` (BF16/F16/F32: the dtype recorded in the quant state, i.e. the checkpoint's),
// dequantized to `storage`, widened back to w's dtype; w.nf4 gets the NF4 tensors. Returns the number
// of matrices quantized.
int64_t nf4_round_trip_weights(ModelWeights& w, DType storage);
// Loads a float checkpoint with every projection quantized while loading (one matrix at a time, see
// above): w.nf4 gets the NF4 tensors, the other tensors are in `dtype`. keep_projections: the
// projection tensors hold the round trip in `dtype` (with F32 bit for bit what load_model_weights(F32)
// then nf4_round_trip_weights(storage) give: the CPU engine); otherwise they stay undefined (the CUDA
// engine). The NF4 tensors are the same either way.
ModelWeights load_nf4_model_weights(const std::string& dir, const ModelConfig& cfg, DType storage, DType dtype,
                                    bool keep_projections);
// The NF4 tensors of a pre-quantized checkpoint (every bitsandbytes 4-bit weight, validated); null
// when one of them is not a per-expert projection name of is_4bit_target (the caller then has only
// the dequantized floats).
std::shared_ptr<const Nf4Base> read_nf4_base(const std::string& dir);

// The float dtype of a checkpoint's weights (that of model.embed_tokens.weight).
DType checkpoint_weight_dtype(const std::string& dir);
// Whether a checkpoint holds bitsandbytes 4-bit weights (any X.quant_state.bitsandbytes__* tensor).
bool is_prequantized_checkpoint(const std::string& dir);

}  // namespace qt
