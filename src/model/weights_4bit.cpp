// QLoRA base weights (see weights_4bit.h).
#include "model/weights_4bit.h"

#include <cstring>
#include <regex>

#include "io/safetensors.h"
#include "model/nf4.h"

namespace qt {

bool is_4bit_target(const std::string& hub_name) {
  static const std::regex re(
      R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight)");
  return std::regex_match(hub_name, re);
}

int64_t nf4_round_trip_weights(ModelWeights& w, DType storage) {
  int64_t n = 0;
  for (auto& [name, t] : hub_named_tensors(w)) {
    if (!is_4bit_target(name)) continue;
    const Tensor back = nf4_dequantize(nf4_quantize(t, storage), t.dtype());
    QT_ASSERT(back.nbytes() == t.nbytes(), "{}: round trip changed the size", name);
    std::memcpy(t.raw(), back.raw(), t.nbytes());  // t shares storage with w
    ++n;
  }
  return n;
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
