// Test helpers for model folders: writing weights as a checkpoint folder (Hub names, one dtype) with
// another folder's config.json, and bit-exact tensor comparison.
#pragma once
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.h"
#include "model/weights.h"

namespace qt::test {

inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Writes w (Hub names, `dtype`) with config_from's config.json as a model folder.
inline void write_model(const std::string& out, const ModelWeights& w, const std::string& config_from, DType dtype) {
  std::filesystem::create_directories(out);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [n, t] : hub_named_tensors(w)) ts.emplace_back(n, t.to(dtype));
  write_safetensors(out + "/model.safetensors", ts);
  std::filesystem::copy_file(config_from + "/config.json", out + "/config.json",
                             std::filesystem::copy_options::overwrite_existing);
}

}  // namespace qt::test
