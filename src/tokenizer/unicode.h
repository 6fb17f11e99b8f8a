// UTF-8 helpers and Unicode NFC normalisation (UAX #15) for the tokenizer.
//
// UTF-8 validity is strict (as Rust's str): no overlong forms, no surrogates (U+D800..DFFF), nothing
// above U+10FFFF. NFC = canonical decomposition, canonical ordering by combining class, canonical
// composition (Hangul algorithmically). Tables come from nfc_data.inc (generated from Python's
// unicodedata; see tools/tokenizer_ref/gen_nfc_tables.py). A quick check (NFC_QC derived from the
// same tables) skips the work for text already in NFC, which is nearly all text.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace qt::tok {

// Decodes the code point at s[0..n): returns its byte length (1..4), or 0 when the bytes there are
// not valid UTF-8 (then *cp is unspecified).
int utf8_decode(const unsigned char* s, size_t n, uint32_t* cp);
void utf8_append(std::string& out, uint32_t cp);
// Length in bytes of the longest valid UTF-8 prefix of s.
size_t utf8_valid_prefix(std::string_view s);

// True when s (valid UTF-8) is certainly in NFC (quick check answered YES).
bool nfc_quick_check(std::string_view s);
// NFC of s (valid UTF-8).
std::string nfc(std::string_view s);
// The Unicode version of the normalisation tables.
const char* nfc_unicode_version();

}  // namespace qt::tok
