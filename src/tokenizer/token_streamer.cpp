// Streaming detokenisation (see token_streamer.h).
#include "tokenizer/token_streamer.h"

#include "tokenizer/tokenizer.h"

namespace qt {

namespace {
// Bytes of the sequence a lead byte starts (0: not a lead byte).
int sequence_length(unsigned char b) {
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b >= 0xE0 && b <= 0xEF) return 3;
  if (b >= 0xF0 && b <= 0xF4) return 4;
  return 0;
}
}  // namespace

size_t utf8_complete_prefix(std::string_view s) {
  // Look back at most 3 bytes for the lead byte of an unfinished sequence.
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char b = static_cast<unsigned char>(s[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // a continuation byte: keep looking for its lead
    const int len = sequence_length(b);
    return len > int(back) ? n - back : n;  // unfinished only when its lead asks for more bytes
  }
  return n;
}

std::string TokenStreamer::push(int32_t id) {
  pending_ += tok_.decode({id});
  const size_t k = utf8_complete_prefix(pending_);
  std::string out = pending_.substr(0, k);
  pending_.erase(0, k);
  return out;
}

std::string TokenStreamer::finish() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace qt
