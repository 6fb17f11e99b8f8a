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
// dequantize(quantize(W)) once at load (the values a bitsandbytes model computes with), so host
// memory is that of the float model; the 4-bit storage itself is what `qwentune quantize` writes.
#pragma once
#include <cstdint>
#include <string>

#include "model/weights.h"

namespace qt {

// True for the Hub names of the quantized projections (see above).
bool is_4bit_target(const std::string& hub_name);

// Replaces every target weight of `w` (any float dtype) in place by its NF4 round trip: quantized
// with `storage` (BF16/F16/F32: the dtype recorded in the quant state, i.e. the checkpoint's),
// dequantized to `storage`, widened back to w's dtype. Returns the number of matrices quantized.
int64_t nf4_round_trip_weights(ModelWeights& w, DType storage);

// The float dtype of a checkpoint's weights (that of model.embed_tokens.weight).
DType checkpoint_weight_dtype(const std::string& dir);
// Whether a checkpoint holds bitsandbytes 4-bit weights (any X.quant_state.bitsandbytes__* tensor).
bool is_prequantized_checkpoint(const std::string& dir);

}  // namespace qt
