// Streaming detokenisation: tokens arrive one by one, text leaves as soon as it is whole UTF-8.
// A byte-level token may end in the middle of a multi-byte character (CJK, emoji split across
// tokens); push() returns only complete characters and holds the trailing bytes of an unfinished
// one until the next token completes it. Bytes that cannot start or continue a valid sequence are
// passed through as they are (decode() keeps invalid bytes too); finish() returns what is held.
// The concatenation of every push() and finish() equals tokenizer.decode(all tokens).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace qt {

class Tokenizer;

// Length of the longest prefix of `s` that does not end inside an unfinished (so far valid)
// multi-byte UTF-8 sequence.
size_t utf8_complete_prefix(std::string_view s);

class TokenStreamer {
 public:
  explicit TokenStreamer(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int32_t id);
  std::string finish();

 private:
  const Tokenizer& tok_;
  std::string pending_;
};

}  // namespace qt
