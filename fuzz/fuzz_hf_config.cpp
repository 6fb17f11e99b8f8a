// libFuzzer target: HF config.json parsing on arbitrary text. A qt::Error is a correct answer; any
// other exception, a crash or a sanitizer report is a bug.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "io/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const qt::ModelConfig c = qt::parse_hf_config_json(text, "fuzz");
    volatile int64_t sink = c.q_dim() + c.kv_dim();
    for (int64_t i = 0; i < std::min<int64_t>(c.num_hidden_layers, 256); ++i) sink = sink + c.is_moe_layer(i);
    (void)sink;
  } catch (const qt::Error&) {
  }
  return 0;
}
