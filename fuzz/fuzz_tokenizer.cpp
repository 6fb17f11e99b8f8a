// libFuzzer target for the tokenizer (bundled Qwen3 tokenizer, loaded once).
// Input bytes are used twice:
//  1. as text (any bytes, invalid UTF-8 included): encode and encode_ordinary must not crash, and
//     decode(encode_ordinary(s)) must equal s with each valid UTF-8 stretch in NFC (the documented
//     rule); decode(encode(s)) must equal it up to normalisation (NFC runs between special tokens);
//  2. as little-endian int32 ids (any values): decode either succeeds or throws qt::Error.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "../tests/tokenizer_round_trip.h"

using qt::testing::expected_round_trip;

namespace {
const qt::Tokenizer& tokenizer() {
  static const qt::Tokenizer t = qt::Tokenizer::load(std::string(QT_SOURCE_DIR) + "/data/qwen3-tokenizer");
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const qt::Tokenizer& t = tokenizer();
  std::string text(reinterpret_cast<const char*>(data), size);

  std::vector<int32_t> ids = t.encode(text);
  std::vector<int32_t> plain = t.encode_ordinary(text);
  for (int32_t id : ids)
    if (id < 0 || id >= t.vocab_size()) std::abort();
  std::string want = expected_round_trip(text);
  if (t.decode(plain) != want) std::abort();
  // With special tokens, NFC runs between them, so the text can differ from `want` only by
  // normalisation: normalising it once more must give `want`.
  if (expected_round_trip(t.decode(ids)) != want) std::abort();

  std::vector<int32_t> random_ids(size / 4);
  if (!random_ids.empty()) std::memcpy(random_ids.data(), data, random_ids.size() * 4);
  try {
    (void)t.decode(random_ids);
  } catch (const qt::Error&) {
  }
  return 0;
}
