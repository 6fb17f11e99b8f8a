// GPT-2 byte-level alphabet: every byte 0..255 is shown as one printable code point, so BPE tokens
// are strings of those code points. Bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF stand for themselves;
// the other 68 bytes (controls, space, 0x7F..0xA0, 0xAD) map, in byte order, to U+0100, U+0101, ...
// (so ' ' is U+0120 'Ġ' and '\n' is U+010A 'Ċ').
#pragma once
#include <array>
#include <cstdint>

namespace qt::tok {

inline bool byte_is_self_mapped(int b) {
  return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

// byte -> code point of its byte-level symbol.
inline const std::array<uint32_t, 256>& byte_to_codepoint() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) t[size_t(b)] = byte_is_self_mapped(b) ? uint32_t(b) : next++;
    return t;
  }();
  return table;
}

// Code point of a byte-level symbol -> its byte, or -1 when the code point is not one.
inline int codepoint_to_byte(uint32_t cp) {
  static const std::array<int16_t, 512> table = [] {
    std::array<int16_t, 512> t{};
    t.fill(-1);
    const auto& fwd = byte_to_codepoint();
    for (int b = 0; b < 256; ++b) t[fwd[size_t(b)]] = int16_t(b);
    return t;
  }();
  return cp < 512 ? table[cp] : -1;
}

}  // namespace qt::tok
