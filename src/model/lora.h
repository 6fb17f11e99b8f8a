// LoRA adapters (PEFT format) in memory.
//   y = x W^T + scale * (dropout(x) A^T) B^T,  scale = alpha / r  (alpha / sqrt(r) with rslora)
// Dense modules: A (r,in), B (out,r). Expert modules of a MoE layer are held fused:
// A (E,r,in), B (E,out,r); they convert losslessly to PEFT's per-expert names
// base_model.model.model.layers.L.mlp.experts.E.{gate,up,down}_proj.lora_{A,B}.weight.
#pragma once
#include <array>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/hf_config.h"

namespace qt {

enum LoraSlot { kLoraQ, kLoraK, kLoraV, kLoraO, kLoraGate, kLoraUp, kLoraDown, kNumLoraSlots };
const char* lora_slot_module(LoraSlot s);  // "q_proj", ..., "down_proj"
bool lora_slot_from_module(const std::string& module, LoraSlot* out);  // inverse; false when unknown

// Shape of slot `s` in layer `layer`: in/out features of the base projection, and experts = E for
// the expert projections (gate/up/down) of a MoE layer (fused 3-D adapters), 0 otherwise.
struct LoraSlotShape {
  int64_t experts = 0, in = 0, out = 0;
};
LoraSlotShape lora_slot_shape(const ModelConfig& mcfg, int64_t layer, LoraSlot s);

struct LoraConfig {
  int64_t r = 16;
  double alpha = 16;
  bool use_rslora = false;
  double dropout = 0.0;
  std::vector<std::string> target_modules;  // short names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
  std::string base_model_name_or_path;
  double scale() const;
  bool targets(LoraSlot s) const;
  // Throws "[lora] ..." unless r >= 1, alpha finite, 0 <= dropout < 1 and every target is one of
  // the seven module names above (at least one).
  void validate() const;
};

struct LoraPair {
  Tensor A, B;  // both undefined when the module has no adapter
  bool present() const { return A.defined(); }
};

struct LayerLora {
  // For a MoE layer, gate/up/down slots hold the fused expert adapters (3-D tensors).
  std::array<LoraPair, kNumLoraSlots> slot;
};

struct LoraAdapter {
  LoraConfig cfg;
  std::vector<LayerLora> layers;
  // Same structure, all tensors zero (gradient buffers, optimizer states).
  LoraAdapter zeros_like() const;
};

// The LoRA dropout of one training forward pass. PEFT puts one nn.Dropout(p) in front of lora_A of
// every adapted module (q, k and v each drop their shared input independently), active in training
// only: y = x W^T + scale * B A dropout(x), dropout(x) = x * mask / (1 - p). The mask of (layer,
// slot, row, feature) is cpu::dropout_key(seed, step, micro_batch, layer, slot) hashed with the row
// and feature (ops/cpu/ops.h), so it needs no saved state. p = 0: no dropout.
struct LoraDropout {
  double p = 0;
  uint64_t seed = 0;
  int64_t step = 0, micro_batch = 0;
  bool active() const { return p > 0; }
};

// Fresh adapter as PEFT initialises it: A kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)),
// B zeros; deterministic for a seed.
LoraAdapter init_lora(const ModelConfig& mcfg, const LoraConfig& lcfg, DType dtype, uint64_t seed);

// PEFT names <-> tensors. Per-expert names by default; `fused_experts` writes (E,r,in)/(E,out,r)
// under base_model.model.model.layers.L.mlp.{gate,up,down}_proj.lora_{A,B}.weight.
std::vector<std::pair<std::string, Tensor>> lora_named_tensors(const LoraAdapter& a, const ModelConfig& mcfg,
                                                               bool fused_experts = false);

// adapter_config.json text -> LoraConfig, resolved against the model: target_modules may be a
// list (PEFT suffix match on module names), "all-linear", or a regex string (full match on names
// like model.layers.3.self_attn.q_proj / model.layers.3.mlp.experts.7.up_proj); the selection must
// cover a slot in every layer or in none. Unsupported PEFT features throw "[adapter] <origin>: ...".
LoraConfig parse_peft_adapter_config(const std::string& json_text, const std::string& origin, const ModelConfig& mcfg);

// DIR/adapter_config.json + DIR/adapter_model.safetensors. Reading accepts per-expert or fused
// expert names, validates every shape against the model, and converts to `dtype`.
LoraAdapter load_peft_adapter(const std::string& dir, const ModelConfig& mcfg, DType dtype);
void save_peft_adapter(const std::string& dir, const LoraAdapter& a, const ModelConfig& mcfg,
                       bool fused_experts = false);

}  // namespace qt
