// What decode(encode(s)) must give, shared by tests/test_tokenizer.cpp and fuzz/fuzz_tokenizer.cpp:
// the normaliser turns each valid UTF-8 stretch into NFC; invalid bytes come back as they were.
#pragma once
#include <string>
#include <string_view>

#include "tokenizer/unicode.h"

namespace qt::testing {

inline std::string expected_round_trip(std::string_view s) {
  std::string out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t valid = qt::tok::utf8_valid_prefix(s.substr(pos));
    out += qt::tok::nfc(s.substr(pos, valid));
    pos += valid;
    if (pos < s.size()) out += s[pos++];
  }
  return out;
}

}  // namespace qt::testing
