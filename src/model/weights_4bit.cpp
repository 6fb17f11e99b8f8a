// QLoRA base weights (see weights_4bit.h).
#include "model/weights_4bit.h"

#include <cstring>
#include <regex>

#include <fmt/core.h>

#include "io/safetensors.h"
#include "model/lora.h"

namespace qt {

bool is_4bit_target(const std::string& hub_name) {
  static const std::regex re(
      R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight)");
  return std::regex_match(hub_name, re);
}

std::string projection_hub_name(int64_t layer, int slot, int64_t expert) {
  QT_ASSERT(slot >= 0 && slot < kNumLoraSlots, "projection slot {}", slot);
  const char* part = slot < kLoraGate ? "self_attn" : "mlp";
  const std::string e = expert >= 0 ? fmt::format("experts.{}.", expert) : std::string();
  return fmt::format("model.layers.{}.{}.{}{}.weight", layer, part, e, lora_slot_module(LoraSlot(slot)));
}

namespace {

// `name`'s NF4 tensor into base; with a defined dst (sharing storage with the weights), dst gets the
// dequantized values in its dtype.
void quantize_into(Nf4Base& base, const std::string& name, const Tensor& values, DType storage, Tensor& dst) {
  Nf4Tensor q = nf4_quantize(values, storage);
  if (dst.defined()) {
    const Tensor back = nf4_dequantize(q, dst.dtype());
    QT_ASSERT(back.nbytes() == dst.nbytes(), "{}: round trip changed the size", name);
    std::memcpy(dst.raw(), back.raw(), dst.nbytes());
  }
  const bool added = base.tensors.emplace(name, std::move(q)).second;
  QT_ASSERT(added, "{}: quantized twice", name);
}

}  // namespace

int64_t nf4_round_trip_weights(ModelWeights& w, DType storage) {
  auto base = std::make_shared<Nf4Base>();
  for (auto& [name, t] : hub_named_tensors(w))
    if (is_4bit_target(name)) quantize_into(*base, name, t, storage, t);
  const auto n = int64_t(base->tensors.size());
  w.nf4 = std::move(base);
  return n;
}

ModelWeights load_nf4_model_weights(const std::string& dir, const ModelConfig& cfg, DType storage, DType dtype,
                                    bool keep_projections) {
  auto base = std::make_shared<Nf4Base>();
  WeightsLoadOptions opt;
  opt.dtype = dtype;
  opt.keep_projections = keep_projections;
  opt.projection = [&](const std::string& name, const Tensor& values, Tensor& dst) {
    QT_ASSERT(is_4bit_target(name), "{}: not a 4-bit target", name);
    quantize_into(*base, name, values, storage, dst);
  };
  ModelWeights w = load_model_weights(dir, cfg, opt);
  w.nf4 = std::move(base);
  return w;
}

std::shared_ptr<const Nf4Base> read_nf4_base(const std::string& dir) {
  const SafetensorsCheckpoint ckpt(dir);
  auto base = std::make_shared<Nf4Base>();
  for (const std::string& name : ckpt.names()) {
    if (!is_bnb_4bit_weight(ckpt, name)) continue;
    if (!is_4bit_target(name)) return nullptr;
    base->tensors.emplace(name, nf4_from_bnb(ckpt, name));
  }
  return base;
}

DType checkpoint_weight_dtype(const std::string& dir) {
  const SafetensorsCheckpoint ckpt(dir);
  const std::string embed = "model.embed_tokens.weight";
  if (!ckpt.contains(embed)) fail("weights", "{}: missing from the checkpoint {}", embed, dir);
  const DType d = ckpt.entry(embed).dtype;
  if (d == DType::F64) return DType::F32;
  if (d != DType::BF16 && d != DType::F16 && d != DType::F32)
    fail("weights", "{}: dtype {} is not a float type", embed, dtype_name(d));
  return d;
}

bool is_prequantized_checkpoint(const std::string& dir) {
  const SafetensorsCheckpoint ckpt(dir);
  for (const std::string& n : ckpt.names())
    if (n.find(".quant_state.bitsandbytes__") != std::string::npos) return true;
  return false;
}

}  // namespace qt
