// UTF-8 decoding and NFC normalisation. See unicode.h.
#include "tokenizer/unicode.h"

#include <algorithm>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qt::tok {
namespace {

#include "tokenizer/nfc_data.inc"

// Hangul syllable arithmetic (Unicode ch. 3.12).
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28;
constexpr uint32_t kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

// Per code point: low 8 bits = canonical combining class, plus quick-check flags.
constexpr uint16_t kQcNo = 0x100;     // never appears in NFC text
constexpr uint16_t kQcMaybe = 0x200;  // may combine with a preceding character

struct NfcTables {
  // Two-stage lookup: stage1[cp >> 8] selects a 256-entry block of `blocks`.
  std::vector<uint16_t> stage1;
  std::vector<uint16_t> blocks;
  std::unordered_map<uint32_t, std::pair<uint32_t, uint32_t>> decomp;  // cp -> (first, second or 0)
  std::unordered_map<uint64_t, uint32_t> compose;                     // (first << 32 | second) -> cp

  NfcTables() {
    std::vector<uint16_t> props(0x110000, 0);
    for (const auto& r : kCombiningClassRanges)
      for (uint32_t cp = r[0]; cp <= r[1]; ++cp) props[cp] = static_cast<uint16_t>(r[2]);
    for (const auto& d : kCanonicalDecomp) decomp.emplace(d[0], std::make_pair(d[1], d[2]));
    std::vector<bool> is_composite(0x110000, false);
    for (uint32_t c : kPrimaryComposites) {
      is_composite[c] = true;
      const auto& [a, b] = decomp.at(c);
      compose.emplace((uint64_t(a) << 32) | b, c);
      props[b] |= kQcMaybe;
    }
    for (const auto& d : kCanonicalDecomp)
      if (!is_composite[d[0]]) props[d[0]] |= kQcNo;
    for (uint32_t v = kVBase; v < kVBase + kVCount; ++v) props[v] |= kQcMaybe;
    for (uint32_t t = kTBase + 1; t < kTBase + kTCount; ++t) props[t] |= kQcMaybe;

    stage1.resize(0x110000 >> 8);
    std::unordered_map<std::string, uint16_t> seen;  // dedupe identical blocks
    for (uint32_t b = 0; b < stage1.size(); ++b) {
      std::string key(reinterpret_cast<const char*>(&props[b << 8]), 256 * sizeof(uint16_t));
      auto it = seen.find(key);
      if (it == seen.end()) {
        uint16_t idx = static_cast<uint16_t>(blocks.size() / 256);
        blocks.insert(blocks.end(), props.begin() + (b << 8), props.begin() + ((b + 1) << 8));
        it = seen.emplace(std::move(key), idx).first;
      }
      stage1[b] = it->second;
    }
  }
  uint16_t props(uint32_t cp) const { return blocks[(size_t(stage1[cp >> 8]) << 8) | (cp & 0xFF)]; }
  uint8_t ccc(uint32_t cp) const { return static_cast<uint8_t>(props(cp) & 0xFF); }
};

const NfcTables& tables() {
  static const NfcTables t;
  return t;
}

void decompose(const NfcTables& t, uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  auto it = t.decomp.find(cp);
  if (it == t.decomp.end()) {
    out.push_back(cp);
    return;
  }
  decompose(t, it->second.first, out);
  if (it->second.second != 0) decompose(t, it->second.second, out);
}

// The primary composite of (a, b), or 0.
uint32_t compose_pair(const NfcTables& t, uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  auto it = t.compose.find((uint64_t(a) << 32) | b);
  return it == t.compose.end() ? 0 : it->second;
}

}  // namespace

int utf8_decode(const unsigned char* s, size_t n, uint32_t* cp) {
  if (n == 0) return 0;
  unsigned char c = s[0];
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  int len;
  uint32_t v, min;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2, v = c & 0x1F, min = 0x80;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3, v = c & 0x0F, min = 0x800;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4, v = c & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (n < size_t(len)) return 0;
  for (int i = 1; i < len; ++i) {
    if ((s[i] & 0xC0) != 0x80) return 0;
    v = (v << 6) | (s[i] & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return len;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t utf8_valid_prefix(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, n = s.size();
  while (i < n) {
    // ASCII fast path: 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::copy(p + i, p + i + 8, reinterpret_cast<unsigned char*>(&w));
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    uint32_t cp;
    int len = utf8_decode(p + i, n - i, &cp);
    if (len == 0) return i;
    i += size_t(len);
  }
  return n;
}

bool nfc_quick_check(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, n = s.size();
  uint8_t last_ccc = 0;
  const NfcTables* t = nullptr;
  while (i < n) {
    if (i + 8 <= n) {  // eight ASCII bytes at a time
      uint64_t w;
      std::copy(p + i, p + i + 8, reinterpret_cast<unsigned char*>(&w));
      if (!(w & 0x8080808080808080ull)) {
        last_ccc = 0;
        i += 8;
        continue;
      }
    }
    if (p[i] < 0xCC) {  // below U+0300: combining class 0, quick check YES
      last_ccc = 0;
      i += p[i] < 0x80 ? 1 : 2;
      continue;
    }
    uint32_t cp;
    int len = utf8_decode(p + i, n - i, &cp);
    if (len == 0) return false;  // not valid UTF-8: let the caller's slow path decide
    i += size_t(len);
    if (!t) t = &tables();
    uint16_t pr = t->props(cp);
    uint8_t ccc = static_cast<uint8_t>(pr & 0xFF);
    if (ccc != 0 && last_ccc > ccc) return false;
    if (pr & (kQcNo | kQcMaybe)) return false;
    last_ccc = ccc;
  }
  return true;
}

std::string nfc(std::string_view s) {
  const NfcTables& t = tables();
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  std::vector<uint32_t> cps;
  cps.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    uint32_t cp;
    int len = utf8_decode(p + i, s.size() - i, &cp);
    if (len == 0) {  // callers pass valid UTF-8; keep going defensively with U+FFFD
      cp = 0xFFFD;
      len = 1;
    }
    i += size_t(len);
    decompose(t, cp, cps);
  }
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < cps.size();) {
    if (t.ccc(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && t.ccc(cps[j]) != 0) ++j;
    std::stable_sort(cps.begin() + long(i), cps.begin() + long(j),
                     [&](uint32_t a, uint32_t b) { return t.ccc(a) < t.ccc(b); });
    i = j;
  }
  // Canonical composition.
  std::vector<uint32_t> out;
  out.reserve(cps.size());
  size_t starter = 0;
  int last_class = -1;  // -1: no character yet
  for (uint32_t cp : cps) {
    int cls = t.ccc(cp);
    if (last_class == -1) {
      out.push_back(cp);
      last_class = cls == 0 ? 0 : 256;  // a leading non-starter blocks composition
      continue;
    }
    if (last_class < cls || last_class == 0) {
      uint32_t c = compose_pair(t, out[starter], cp);
      if (c != 0 && (last_class < cls || (last_class == 0 && out.size() - 1 == starter))) {
        out[starter] = c;
        continue;
      }
    }
    if (cls == 0) starter = out.size();
    last_class = cls;
    out.push_back(cp);
  }
  std::string result;
  result.reserve(s.size() + 8);
  for (uint32_t cp : out) utf8_append(result, cp);
  return result;
}

const char* nfc_unicode_version() { return QT_NFC_UNICODE_VERSION; }

}  // namespace qt::tok
