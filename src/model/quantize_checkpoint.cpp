// `qwentune quantize` (see quantize_checkpoint.h).
#include "model/quantize_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <cerrno>
#include <cstring>
#include <map>
#include <set>
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


using Named = std::pair<std::string, Tensor>;

uint64_t bytes_of(const std::vector<Named>& ts) {
  uint64_t n = 0;
  for (const auto& nt : ts) n += nt.second.nbytes();
  return n;
}

// model.safetensors, model.safetensors.index.json, model-NNNNN-of-NNNNN.safetensors and the parts
// of a run that was killed (model.part-NNNNN.safetensors) in `dir`.
bool is_weights_file(const std::string& name) {
  if (name == "model.safetensors" || name == "model.safetensors.index.json") return true;
  const bool shard = name.size() == 32 && name.compare(0, 6, "model-") == 0 && name.compare(11, 4, "-of-") == 0 &&
                     name.compare(20, 12, ".safetensors") == 0;  // model-00001-of-00002.safetensors
  const bool part = name.size() == 28 && name.compare(0, 11, "model.part-") == 0 &&
                    name.compare(16, 12, ".safetensors") == 0;  // model.part-00001.safetensors
  return shard || part;
}

// The weight a tensor belongs to: a bnb weight's six tensors (X.weight, X.weight.absmax, ...) share
// "X.weight"; shards never split them (older transformers read a weight's quant state from its shard).
std::string weight_group(const std::string& name) {
  const size_t at = name.find(".weight");
  return at == std::string::npos ? name : name.substr(0, at + 7);
}

// The output's weights, shard by shard. Each projection's bnb tensors arrive as they are made; when
// the held ones would pass shard_bytes they are written as a part (model.part-NNNNN.safetensors) and
// dropped, so host memory holds at most about one shard of NF4 output. finish() writes the rest: if
// everything fits one shard, one model.safetensors in the order given; else more parts (greedy by
// size, a weight's tensors kept together), every part renamed to its Hub shard name, and the index.
// Weights files of an earlier output in the folder (--force, or parts of a killed run) are removed
// at the end; parts left by a failure are removed.
class ShardedOutput {
 public:
  struct Written {
    uint64_t bytes = 0;
    int64_t shards = 0;
  };
  ShardedOutput(fs::path dir, uint64_t shard_bytes) : dir_(std::move(dir)), shard_bytes_(shard_bytes) {}
  ShardedOutput(const ShardedOutput&) = delete;
  ShardedOutput& operator=(const ShardedOutput&) = delete;
  ~ShardedOutput() {
    if (done_) return;
    std::error_code ec;
    for (const Part& p : parts_) fs::remove(dir_ / p.file, ec);
  }

  void add(const std::string& name, std::vector<Named> ts) {
    const uint64_t b = bytes_of(ts);
    if (!held_order_.empty() && held_bytes_ + b > shard_bytes_) flush();
    held_bytes_ += b;
    held_order_.push_back(name);
    held_.emplace(name, std::move(ts));
  }
  // The tensors of `name` still held (empty when they went into a part), handed over.
  std::vector<Named> take_held(const std::string& name) {
    auto it = held_.find(name);
    if (it == held_.end()) {
      QT_ASSERT(written_.count(name), "{}: not quantized", name);
      return {};
    }
    std::vector<Named> ts = std::move(it->second);
    held_.erase(it);
    return ts;
  }

  Written finish(std::vector<Named> rest) {
    QT_ASSERT(held_.empty(), "{} quantized tensors not written", held_.size());
    Written w;
    w.bytes = total_ + bytes_of(rest);
    std::set<std::string> keep;
    if (parts_.empty() && w.bytes <= shard_bytes_) {
      write_safetensors((dir_ / "model.safetensors").string(), rest, {{"format", "pt"}});
      keep.insert("model.safetensors");
      w.shards = 1;
    } else {
      std::vector<Named> part;
      uint64_t part_bytes = 0;
      for (size_t i = 0; i < rest.size();) {  // one weight's tensors (consecutive in `rest`) at a time
        size_t j = i + 1;
        while (j < rest.size() && weight_group(rest[j].first) == weight_group(rest[i].first)) ++j;
        uint64_t b = 0;
        for (size_t t = i; t < j; ++t) b += rest[t].second.nbytes();
        if (!part.empty() && part_bytes + b > shard_bytes_) write_part(std::move(part)), part = {}, part_bytes = 0;
        part_bytes += b;
        for (; i < j; ++i) part.push_back(std::move(rest[i]));
      }
      if (!part.empty()) write_part(std::move(part));
      const size_t n = parts_.size();
      if (n > 99999) fail("quantize", "{} shards of at most {} bytes: raise --shard-size", n, shard_bytes_);
      nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
      for (size_t i = 0; i < n; ++i) {
        const std::string file = shard_file_name(i, n);
        if (::rename((dir_ / parts_[i].file).c_str(), (dir_ / file).c_str()) != 0)
          fail("quantize", "{}: cannot rename {} to it: {}", (dir_ / file).string(), parts_[i].file, std::strerror(errno));
        parts_[i].file = file;
        for (const std::string& name : parts_[i].names) weight_map[name] = file;
        keep.insert(file);
      }
      write_file_atomically((dir_ / "model.safetensors.index.json").string(), shard_index_json(weight_map, w.bytes),
                            "quantize");
      keep.insert("model.safetensors.index.json");
      w.shards = int64_t(n);
    }
    done_ = true;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir_, ec)) {
      const std::string name = entry.path().filename().string();
      if (is_weights_file(name) && !keep.count(name)) fs::remove(entry.path(), ec);
    }
    fsync_directory(dir_.string());
    return w;
  }

 private:
  struct Part {
    std::string file;
    std::vector<std::string> names;
  };
  void flush() {
    std::vector<Named> ts;
    for (const std::string& name : held_order_) {
      auto it = held_.find(name);
      for (auto& nt : it->second) ts.push_back(std::move(nt));
      held_.erase(it);
      written_.insert(name);
    }
    held_order_.clear();
    held_bytes_ = 0;
    write_part(std::move(ts));
  }
  void write_part(std::vector<Named> ts) {
    Part p;
    p.file = fmt::format("model.part-{:05d}.safetensors", parts_.size() + 1);
    for (const auto& nt : ts) p.names.push_back(nt.first);
    parts_.push_back(p);  // listed first: removed on failure even if the write throws half way
    write_safetensors((dir_ / p.file).string(), ts, {{"format", "pt"}});
    total_ += bytes_of(ts);
  }

  fs::path dir_;
  uint64_t shard_bytes_;
  std::map<std::string, std::vector<Named>> held_;
  std::vector<std::string> held_order_;
  uint64_t held_bytes_ = 0, total_ = 0;
  std::set<std::string> written_;
  std::vector<Part> parts_;
  bool done_ = false;
};

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
  if (opt.shard_bytes == 0) fail("quantize", "the shard size must be positive");
  const ModelConfig cfg = load_hf_config(opt.model_dir);
  const DType dtype = checkpoint_weight_dtype(opt.model_dir);
  fs::create_directories(out, ec);
  if (ec) fail("quantize", "--out {}: cannot create it: {}", opt.out_dir, ec.message());
  // Streamed: each projection matrix is quantized as it is read; its bnb tensors wait in `output`
  // until a shard's worth is written out.
  ShardedOutput output(out, opt.shard_bytes);
  WeightsLoadOptions lo;
  lo.dtype = dtype;  // the kept tensors: converted via f32 like every load, so exact for bf16/f16/f32 inputs
  lo.keep_projections = false;
  lo.projection = [&](const std::string& name, const Tensor& values, Tensor&) {
    QT_ASSERT(is_4bit_target(name), "{}: not a 4-bit target", name);
    output.add(name, nf4_to_bnb_tensors(name, nf4_quantize(values, dtype)));
  };
  const ModelWeights w = load_model_weights(opt.model_dir, cfg, lo);

  // The rest in the Hub's tensor order (the whole output when it fits one shard).
  QuantizeSummary sum;
  std::vector<std::pair<std::string, Tensor>> rest;
  for (const auto& [name, t] : hub_named_tensors(w, true)) {
    if (is_4bit_target(name)) {
      for (auto& nt : output.take_held(name)) rest.push_back(std::move(nt));
      ++sum.quantized;
    } else if (t.defined()) {
      rest.emplace_back(name, t);
      ++sum.kept;
    }
  }
  const ShardedOutput::Written written = output.finish(std::move(rest));
  sum.bytes = written.bytes;
  sum.shards = written.shards;
  cfg_json["quantization_config"] = bnb_quantization_config(cfg, dtype);
  write_file_atomically((out / "config.json").string(), cfg_json.dump(2) + "\n", "quantize");
  copy_model_side_files(opt.model_dir, opt.out_dir, "quantize");
  return sum;
}

}  // namespace qt
