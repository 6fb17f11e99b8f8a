// libFuzzer target for the dataset reader and everything downstream that needs no tokenizer:
// arbitrary bytes as a dataset file (strict and lenient; JSONL or JSON array, any format), every
// accepted conversation rendered with every chat template, and the same bytes as a cache file.
// Any qt::Error is an accepted outcome; a crash, sanitizer report or hang is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/dataset_cache.h"
#include "data/dataset_reader.h"

using namespace qt::data;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // The first byte picks the forced format (0..4 = auto, text, messages, alpaca, sharegpt).
  const auto format = static_cast<DatasetFormat>(data[0] % 5);
  const std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  for (bool lenient : {false, true}) {
    ReadOptions opts;
    opts.format = format;
    opts.lenient = lenient;
    try {
      const DatasetReadResult r = read_dataset_bytes(bytes, "fuzz.jsonl", opts);
      if (!lenient) continue;
      for (const auto& rec : r.records) {
        if (rec.is_text) continue;
        for (auto kind : {ChatTemplateKind::chatml, ChatTemplateKind::qwen2, ChatTemplateKind::qwen2_5,
                          ChatTemplateKind::qwen3}) {
          for (bool gen : {false, true}) {
            RenderOptions ro;
            ro.add_generation_prompt = gen;
            ro.enable_thinking = false;
            const RenderedChat c = render_chat(kind, rec.conversation, ro);
            for (auto [b, e] : c.assistant_spans) QT_ASSERT(b <= e && e <= c.text.size(), "span out of range");
          }
        }
      }
    } catch (const qt::Error&) {
    }
  }
  std::string why;
  (void)parse_dataset_cache_bytes(bytes, "key", 151669, &why);
  return 0;
}
