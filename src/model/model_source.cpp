// Model string -> LoadedModel (see model_source.h): the weights loaded for their consumer.
#include "model/model_source.h"

#include <filesystem>

#include "core/error.h"
#include "io/hub.h"
#include "model/weights_4bit.h"

namespace qt {

namespace fs = std::filesystem;

namespace {

// The CUDA engine with an NF4 base reads the projections from weights.nf4 only.
void drop_projection_floats(ModelWeights& w) {
  for (LayerWeights& L : w.layers)
    for (Tensor* t : projection_tensors(L)) *t = Tensor();
}

bool has_safetensors(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ".safetensors") return true;
  return false;
}

}  // namespace

std::string bundled_tokenizer_dir() { return (fs::path(QT_SOURCE_DIR) / "data" / "qwen3-tokenizer").string(); }

LoadedModel load_model_source(const std::string& base_model, uint64_t seed, const std::string& context,
                              bool load_in_4bit, WeightsFor use) {
  // A Hub id (ORG/NAME[@REV]) becomes its snapshot folder in the HF cache (downloaded when files are
  // missing); an existing path comes back unchanged.
  const fs::path p(hub::resolve_model_dir(base_model, hub::HubOptions{}));
  const bool cuda = use == WeightsFor::Cuda;
  std::error_code ec;
  LoadedModel m;
  if (fs::is_directory(p, ec)) {
    if (!fs::exists(p / "config.json")) fail(context, "base_model {}: the folder has no config.json", base_model);
    if (!has_safetensors(p)) fail(context, "base_model {}: the folder has no .safetensors weights", base_model);
    m.config_path = (p / "config.json").string();
    m.cfg = load_hf_config(p.string());
    m.tokenizer_path = fs::exists(p / "tokenizer.json") ? p.string() : bundled_tokenizer_dir();
    m.description = fmt::format("{} (weights from the folder)", base_model);
    WeightsLoadOptions opt;
    opt.dtype = cuda ? DType::BF16 : DType::F32;
    if (is_prequantized_checkpoint(p.string())) {
      m.base_4bit = true;
      // The CUDA engine needs no dequantized copies of the projections it has in NF4.
      std::shared_ptr<const Nf4Base> nf4 = cuda ? read_nf4_base(p.string()) : nullptr;
      opt.keep_projections = !nf4;
      m.weights = load_model_weights(p.string(), m.cfg, opt);
      m.weights.nf4 = cuda ? std::move(nf4) : read_nf4_base(p.string());
      m.description = fmt::format("{} (NF4 weights from the folder, dequantized)", base_model);
    } else if (load_in_4bit) {
      const DType storage = checkpoint_weight_dtype(p.string());
      m.weights = load_nf4_model_weights(p.string(), m.cfg, storage, opt.dtype, !cuda);
      const auto n = int64_t(m.weights.nf4->tensors.size());
      m.base_4bit = true;
      m.description = fmt::format("{} (weights from the folder, {} projections quantized to NF4 from {})", base_model,
                                  n, dtype_name(storage));
    } else {
      m.weights = load_model_weights(p.string(), m.cfg, opt);
    }
  } else if (fs::is_regular_file(p, ec)) {
    m.config_path = p.string();
    m.cfg = load_hf_config(p.string());
    m.weights = random_model_weights(m.cfg, DType::F32, seed, m.cfg.initializer_range);
    m.random_weights = true;
    const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
    m.tokenizer_path = fs::exists(dir / "tokenizer.json") ? dir.string() : bundled_tokenizer_dir();
    m.description = fmt::format("{} (random weights, seed {})", base_model, seed);
    if (load_in_4bit) {
      const int64_t n = nf4_round_trip_weights(m.weights, DType::BF16);
      if (cuda) drop_projection_floats(m.weights);
      m.base_4bit = true;
      m.description = fmt::format("{} (random weights, seed {}, {} projections quantized to NF4 from BF16)", base_model,
                                  seed, n);
    }
  } else {
    fail(context, "base_model {}: no such folder or config file", base_model);
  }
  return m;
}

}  // namespace qt
