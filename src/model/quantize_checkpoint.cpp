// `qwentune quantize` (see quantize_checkpoint.h).
#include "model/quantize_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/hf_config.h"
#include "io/merge.h"
#include "io/safetensors.h"
#include "model/nf4.h"
#include "model/weights.h"
#include "model/weights_4bit.h"

namespace qt {

namespace fs = std::filesystem;

namespace {

const char* torch_dtype_name(DType d) { return d == DType::BF16 ? "bfloat16" : d == DType::F16 ? "float16" : "float32"; }

std::string read_text(const fs::path& p) {
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) fail("quantize", "{}: no such file", p.string());
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  if (!f && !f.eof()) fail("quantize", "{}: cannot read it", p.string());
  return ss.str();
}

// transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
// bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<dtype>).to_dict(), keys sorted as in config.json.
nlohmann::ordered_json bnb_quantization_config(const ModelConfig& cfg, DType dtype) {
  nlohmann::ordered_json skip = nlohmann::ordered_json::array({"lm_head"});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (cfg.family == ModelFamily::Qwen3Moe && cfg.is_moe_layer(l)) skip.push_back(fmt::format("model.layers.{}.mlp.gate", l));
  nlohmann::ordered_json q;
  q["_load_in_4bit"] = true;
  q["_load_in_8bit"] = false;
  q["bnb_4bit_compute_dtype"] = torch_dtype_name(dtype);
  q["bnb_4bit_quant_storage"] = "uint8";
  q["bnb_4bit_quant_type"] = "nf4";
  q["bnb_4bit_use_double_quant"] = true;
  q["llm_int8_enable_fp32_cpu_offload"] = false;
  q["llm_int8_has_fp16_weight"] = false;
  q["llm_int8_skip_modules"] = skip;
  q["llm_int8_threshold"] = 6.0;
  q["load_in_4bit"] = true;
  q["load_in_8bit"] = false;
  q["quant_method"] = "bitsandbytes";
  return q;
}

}  // namespace

QuantizeSummary quantize_checkpoint(const QuantizeOptions& opt) {
  std::error_code ec;
  if (opt.model_dir.empty() || !fs::is_directory(opt.model_dir, ec))
    fail("quantize", "--model {}: no such folder", opt.model_dir);
  if (opt.out_dir.empty()) fail("quantize", "--out is empty");
  if (fs::exists(opt.out_dir, ec) && fs::equivalent(opt.out_dir, opt.model_dir, ec))
    fail("quantize", "--out {} is the input folder", opt.out_dir);
  if (fs::exists(opt.out_dir, ec) && !(fs::is_directory(opt.out_dir, ec) && fs::is_empty(opt.out_dir, ec)) && !opt.force)
    fail("quantize", "--out {} exists and is not an empty folder (use --force to write into it)", opt.out_dir);
  const fs::path in(opt.model_dir), out(opt.out_dir);
  nlohmann::ordered_json cfg_json;
  try {
    cfg_json = nlohmann::ordered_json::parse(read_text(in / "config.json"));
  } catch (const nlohmann::json::exception& e) {
    fail("quantize", "{}: invalid JSON: {}", (in / "config.json").string(), e.what());
  }
  if (cfg_json.is_object() && cfg_json.contains("quantization_config") && !cfg_json["quantization_config"].is_null())
    fail("quantize", "{}: the model is already quantized (quantization_config)", opt.model_dir);
  if (is_prequantized_checkpoint(opt.model_dir))
    fail("quantize", "{}: the checkpoint already holds 4-bit weights", opt.model_dir);
  const ModelConfig cfg = load_hf_config(opt.model_dir);
  const DType dtype = checkpoint_weight_dtype(opt.model_dir);
  // Streamed: each projection matrix is quantized as it is read and only its bnb tensors are kept.
  std::map<std::string, std::vector<std::pair<std::string, Tensor>>> bnb;
  WeightsLoadOptions lo;
  lo.dtype = dtype;  // the kept tensors: converted via f32 like every load, so exact for bf16/f16/f32 inputs
  lo.keep_projections = false;
  lo.projection = [&](const std::string& name, const Tensor& values, Tensor&) {
    QT_ASSERT(is_4bit_target(name), "{}: not a 4-bit target", name);
    bnb.emplace(name, nf4_to_bnb_tensors(name, nf4_quantize(values, dtype)));
  };
  const ModelWeights w = load_model_weights(opt.model_dir, cfg, lo);

  QuantizeSummary sum;
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [name, t] : hub_named_tensors(w, true)) {
    if (is_4bit_target(name)) {
      auto it = bnb.find(name);
      QT_ASSERT(it != bnb.end(), "{}: not quantized", name);
      for (auto& nt : it->second) tensors.push_back(std::move(nt));
      bnb.erase(it);
      ++sum.quantized;
    } else if (t.defined()) {
      tensors.emplace_back(name, t);
      ++sum.kept;
    }
  }
  QT_ASSERT(bnb.empty(), "{} quantized tensors not written", bnb.size());
  for (const auto& nt : tensors) sum.bytes += nt.second.nbytes();

  fs::create_directories(out, ec);
  if (ec) fail("quantize", "--out {}: cannot create it: {}", opt.out_dir, ec.message());
  write_safetensors((out / "model.safetensors").string(), tensors, {{"format", "pt"}});
  cfg_json["quantization_config"] = bnb_quantization_config(cfg, dtype);
  write_file_atomically((out / "config.json").string(), cfg_json.dump(2) + "\n", "quantize");
  copy_model_side_files(opt.model_dir, opt.out_dir, "quantize");
  return sum;
}

}  // namespace qt
