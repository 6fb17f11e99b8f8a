// LoRA adapters in memory: configuration, PEFT initialisation, and the PEFT tensor names.
//
// Init (PEFT's LoraLayer.reset_lora_parameters with init_lora_weights=True):
//   A ~ kaiming_uniform(a=sqrt(5)) on (r,in): gain = sqrt(2/(1+a^2)) = sqrt(1/3),
//       bound = gain * sqrt(3/fan_in) = 1/sqrt(in)  ->  A ~ U(-1/sqrt(in), 1/sqrt(in));
//   B = 0.  Fused experts: A (E,r,in) with each expert's (r,in) block drawn the same way.
// Randomness: tensor (layer, slot) draws from mt19937_64 seeded with splitmix64 of
// (seed, layer, slot), 53-bit uniforms; no std:: distributions (their output differs between
// standard libraries), so an adapter is identical for a seed everywhere.
//
// Names: base_model.model.model.layers.L.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight,
//   dense MLP  base_model.model.model.layers.L.mlp.{gate,up,down}_proj.lora_{A,B}.weight,
//   MoE layer  base_model.model.model.layers.L.mlp.experts.E.{gate,up,down}_proj.lora_{A,B}.weight
//   (or, fused, the dense-MLP names with 3-D tensors A (E,r,in), B (E,out,r)).
#include "model/lora.h"

#include <cmath>
#include <random>

namespace qt {

namespace {

constexpr const char* kModules[kNumLoraSlots] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

bool is_float(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16 || t == DType::F16; }

// "self_attn.q_proj" / "mlp.gate_proj" relative to model.layers.L.
std::string module_path(LoraSlot s) {
  return std::string(s <= kLoraO ? "self_attn." : "mlp.") + kModules[s];
}

}  // namespace

const char* lora_slot_module(LoraSlot s) {
  QT_ASSERT(s >= 0 && s < kNumLoraSlots, "bad LoRA slot {}", int(s));
  return kModules[s];
}

bool lora_slot_from_module(const std::string& module, LoraSlot* out) {
  for (int s = 0; s < kNumLoraSlots; ++s)
    if (module == kModules[s]) {
      *out = LoraSlot(s);
      return true;
    }
  return false;
}

LoraSlotShape lora_slot_shape(const ModelConfig& c, int64_t layer, LoraSlot s) {
  QT_ASSERT(layer >= 0 && layer < c.num_hidden_layers, "layer {} of {}", layer, c.num_hidden_layers);
  const int64_t H = c.hidden_size;
  switch (s) {
    case kLoraQ: return {0, H, c.q_dim()};
    case kLoraK:
    case kLoraV: return {0, H, c.kv_dim()};
    case kLoraO: return {0, c.q_dim(), H};
    default: break;
  }
  const bool moe = c.is_moe_layer(layer);
  const int64_t I = moe ? c.moe_intermediate_size : c.intermediate_size, E = moe ? c.num_experts : 0;
  if (s == kLoraDown) return {E, I, H};
  return {E, H, I};
}

double LoraConfig::scale() const {
  return use_rslora ? alpha / std::sqrt(double(r)) : alpha / double(r);
}

bool LoraConfig::targets(LoraSlot s) const {
  for (const std::string& m : target_modules)
    if (m == lora_slot_module(s)) return true;
  return false;
}

void LoraConfig::validate() const {
  if (r < 1 || r > (int64_t(1) << 20)) fail("lora", "rank r must be in [1, 2^20], got {}", r);
  if (!std::isfinite(alpha)) fail("lora", "lora_alpha must be finite, got {}", alpha);
  if (!(dropout >= 0.0 && dropout < 1.0)) fail("lora", "lora_dropout must be in [0, 1), got {}", dropout);
  if (target_modules.empty()) fail("lora", "target_modules is empty");
  for (const std::string& m : target_modules) {
    LoraSlot s;
    if (!lora_slot_from_module(m, &s))
      fail("lora", "target module '{}' is not supported (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)", m);
  }
}

LoraAdapter LoraAdapter::zeros_like() const {
  LoraAdapter z;
  z.cfg = cfg;
  z.layers.resize(layers.size());
  for (size_t l = 0; l < layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const LoraPair& p = layers[l].slot[size_t(s)];
      if (!p.present()) continue;
      z.layers[l].slot[size_t(s)].A = Tensor::zeros(p.A.shape(), p.A.dtype());
      z.layers[l].slot[size_t(s)].B = Tensor::zeros(p.B.shape(), p.B.dtype());
    }
  return z;
}

LoraAdapter init_lora(const ModelConfig& mcfg, const LoraConfig& lcfg, DType dtype, uint64_t seed) {
  lcfg.validate();
  if (!is_float(dtype)) fail("lora", "adapter dtype {} is not a float type", dtype_name(dtype));
  LoraAdapter a;
  a.cfg = lcfg;
  a.layers.resize(size_t(mcfg.num_hidden_layers));
  std::vector<std::pair<int64_t, int>> todo;  // (layer, slot) with an adapter
  for (int64_t l = 0; l < mcfg.num_hidden_layers; ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      if (!lcfg.targets(LoraSlot(s))) continue;
      const LoraSlotShape sh = lora_slot_shape(mcfg, l, LoraSlot(s));
      LoraPair& p = a.layers[size_t(l)].slot[size_t(s)];
      p.A = sh.experts ? Tensor::empty({sh.experts, lcfg.r, sh.in}, dtype) : Tensor::empty({lcfg.r, sh.in}, dtype);
      p.B = sh.experts ? Tensor::zeros({sh.experts, sh.out, lcfg.r}, dtype) : Tensor::zeros({sh.out, lcfg.r}, dtype);
      todo.emplace_back(l, s);
    }
  const int64_t n = int64_t(todo.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) {
    const auto [l, s] = todo[size_t(i)];
    Tensor& A = a.layers[size_t(l)].slot[size_t(s)].A;
    const double bound = 1.0 / std::sqrt(double(A.dim(-1)));
    std::mt19937_64 rng(splitmix64(seed ^ splitmix64(uint64_t(l) * kNumLoraSlots + uint64_t(s))));
    std::vector<double> v(size_t(A.numel()));
    for (double& x : v) x = (2.0 * double(rng() >> 11) * 0x1.0p-53 - 1.0) * bound;  // [-bound, bound)
    convert_elements(A.raw(), dtype, v.data(), DType::F64, v.size());
  }
  return a;
}

std::vector<std::pair<std::string, Tensor>> lora_named_tensors(const LoraAdapter& a, const ModelConfig& mcfg,
                                                               bool fused_experts) {
  QT_ASSERT(int64_t(a.layers.size()) == mcfg.num_hidden_layers, "adapter has {} layers, model {}", a.layers.size(),
            mcfg.num_hidden_layers);
  std::vector<std::pair<std::string, Tensor>> out;
  for (int64_t l = 0; l < mcfg.num_hidden_layers; ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const LoraPair& p = a.layers[size_t(l)].slot[size_t(s)];
      if (!p.present()) continue;
      QT_ASSERT(p.B.defined(), "layer {} {}: lora_A without lora_B", l, kModules[s]);
      const LoraSlotShape sh = lora_slot_shape(mcfg, l, LoraSlot(s));
      const std::string base = fmt::format("base_model.model.model.layers.{}.", l);
      if (!sh.experts || fused_experts) {
        QT_ASSERT(p.A.ndim() == (sh.experts ? 3 : 2), "layer {} {}: A is {}", l, kModules[s], shape_str(p.A.shape()));
        out.emplace_back(base + module_path(LoraSlot(s)) + ".lora_A.weight", p.A);
        out.emplace_back(base + module_path(LoraSlot(s)) + ".lora_B.weight", p.B);
        continue;
      }
      QT_ASSERT(p.A.ndim() == 3 && p.A.dim(0) == sh.experts && p.B.ndim() == 3 && p.B.dim(0) == sh.experts,
                "layer {} {}: expert adapter shapes {} {}", l, kModules[s], shape_str(p.A.shape()), shape_str(p.B.shape()));
      for (int64_t e = 0; e < sh.experts; ++e) {
        const std::string name = fmt::format("{}mlp.experts.{}.{}", base, e, kModules[s]);
        out.emplace_back(name + ".lora_A.weight", p.A.slice_rows(e, e + 1).reshape({p.A.dim(1), p.A.dim(2)}));
        out.emplace_back(name + ".lora_B.weight", p.B.slice_rows(e, e + 1).reshape({p.B.dim(1), p.B.dim(2)}));
      }
    }
  return out;
}

}  // namespace qt
