// Generation defaults, stop tokens and the decoding loop (see generation.h).
#include "model/generation.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace qt {

namespace fs = std::filesystem;

namespace {

nlohmann::json read_json_file(const fs::path& path) {
  std::ifstream f(path);
  if (!f) fail("generate", "{}: cannot read the file", path.string());
  std::stringstream ss;
  ss << f.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("generate", "{}: not a JSON object", path.string());
  return j;
}

// eos_token_id: an int, a list of ints, or null/absent.
void add_eos_ids(const nlohmann::json& j, const fs::path& origin, std::vector<int32_t>& out) {
  if (!j.contains("eos_token_id") || j["eos_token_id"].is_null()) return;
  const nlohmann::json& e = j["eos_token_id"];
  auto add = [&](const nlohmann::json& v) {
    if (!v.is_number_integer()) fail("generate", "{}: eos_token_id must be an integer or a list of integers", origin.string());
    out.push_back(v.get<int32_t>());
  };
  if (e.is_array()) {
    for (const auto& v : e) add(v);
  } else {
    add(e);
  }
}

template <typename T>
void read_number(const nlohmann::json& j, const char* key, const fs::path& origin, T& out) {
  if (!j.contains(key) || j[key].is_null()) return;
  if (!j[key].is_number()) fail("generate", "{}: {} must be a number", origin.string(), key);
  out = j[key].get<T>();
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

GenerationDefaults read_generation_defaults(const std::string& config_path) {
  GenerationDefaults d;
  d.sampling.top_k = 50;  // HF GenerationConfig's default
  const fs::path cfg(config_path);
  add_eos_ids(read_json_file(cfg), cfg, d.eos_ids);
  const fs::path gen = cfg.parent_path() / "generation_config.json";
  std::error_code ec;
  if (fs::is_regular_file(gen, ec)) {
    const nlohmann::json j = read_json_file(gen);
    d.from_generation_config = true;
    if (j.contains("do_sample") && !j["do_sample"].is_null()) {
      if (!j["do_sample"].is_boolean()) fail("generate", "{}: do_sample must be true or false", gen.string());
      d.sampling.do_sample = j["do_sample"].get<bool>();
    }
    read_number(j, "temperature", gen, d.sampling.temperature);
    read_number(j, "top_k", gen, d.sampling.top_k);
    read_number(j, "top_p", gen, d.sampling.top_p);
    add_eos_ids(j, gen, d.eos_ids);
  }
  return d;
}

std::vector<int32_t> stop_token_ids(const std::vector<int32_t>& eos_ids, const Tokenizer& tok) {
  std::vector<int32_t> ids = eos_ids;
  for (int32_t id : {tok.eos_id(), tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")})
    if (id >= 0) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

GenerationStats generate(TokenDecoder& dec, const std::vector<int32_t>& prompt, Sampler& sampler,
                         int64_t max_new_tokens, const std::vector<int32_t>& stop_ids,
                         const std::function<void(int32_t)>& on_token) {
  QT_ASSERT(!prompt.empty(), "generate with an empty prompt");
  GenerationStats st;
  st.prompt_tokens = int64_t(prompt.size());
  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits = dec.append(prompt);
  st.prefill_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  const int64_t V = int64_t(logits.size());
  while (st.new_tokens < max_new_tokens) {
    const int32_t id = sampler.next(logits.data(), V);
    if (std::binary_search(stop_ids.begin(), stop_ids.end(), id)) {
      st.stopped = true;
      break;
    }
    ++st.new_tokens;
    on_token(id);
    if (st.new_tokens < max_new_tokens) logits = dec.append({id});
  }
  st.decode_s = seconds_since(t0);
  return st;
}

std::vector<int32_t> uncached_suffix(TokenDecoder& dec, const std::vector<int32_t>& full) {
  QT_ASSERT(!full.empty(), "empty conversation");
  const std::vector<int32_t>& cached = dec.tokens();
  size_t common = 0;
  while (common < cached.size() && common < full.size() && cached[common] == full[common]) ++common;
  common = std::min(common, full.size() - 1);  // the last token runs again for its logits
  dec.truncate(int64_t(common));
  return std::vector<int32_t>(full.begin() + int64_t(common), full.end());
}

}  // namespace qt
