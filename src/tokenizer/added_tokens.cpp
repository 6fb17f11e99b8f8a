// Added-token matching. See added_tokens.h.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/added_tokens.h"

#include <pcre2.h>

#include <algorithm>

#include "tokenizer/unicode.h"

namespace qt::tok {
namespace {

// Rust's Unicode \w: Alphabetic, marks, decimal digits, connector punctuation, joiners. Compiled
// once; an older PCRE2 without \p{Alphabetic} falls back to letters and letter numbers.
class WordClass {
 public:
  WordClass() {
    const char* patterns[] = {"^[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]",
                              "^[\\p{L}\\p{Nl}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]"};
    for (const char* p : patterns) {
      int err = 0;
      PCRE2_SIZE off = 0;
      code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err,
                            &off, nullptr);
      if (code_) break;
    }
  }
  ~WordClass() { pcre2_code_free(code_); }
  bool matches(uint32_t cp) const {
    if (!code_) return false;
    std::string s;
    utf8_append(s, cp);
    pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
    int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0, 0, md, nullptr);
    pcre2_match_data_free(md);
    return rc >= 0;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// Last / first code point of a valid UTF-8 string (0 when empty).
uint32_t last_codepoint(std::string_view s) {
  if (s.empty()) return 0;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  uint32_t cp = 0;
  if (utf8_decode(reinterpret_cast<const unsigned char*>(s.data()) + i, s.size() - i, &cp) == 0) return 0;
  return cp;
}
uint32_t first_codepoint(std::string_view s, int* len) {
  uint32_t cp = 0;
  *len = utf8_decode(reinterpret_cast<const unsigned char*>(s.data()), s.size(), &cp);
  return *len == 0 ? 0 : cp;
}

}  // namespace

bool is_white_space(uint32_t cp) {
  return (cp >= 0x9 && cp <= 0xD) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

bool is_word_char(uint32_t cp) {
  if (cp < 0x80) return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
  static const WordClass word_class;
  return word_class.matches(cp);
}

void AddedTokenMatcher::build(const std::vector<const AddedToken*>& tokens, const std::vector<std::string>& patterns) {
  nodes_.assign(1, Node{});
  tokens_.clear();
  std::fill(std::begin(can_start_), std::end(can_start_), false);
  for (size_t t = 0; t < tokens.size(); ++t) {
    const std::string& pat = patterns[t];
    if (pat.empty()) continue;  // HF ignores empty tokens
    int32_t node = 0;
    for (unsigned char b : pat) {
      int32_t c = child(node, b);
      if (c < 0) {
        c = int32_t(nodes_.size());
        nodes_[size_t(node)].next.emplace_back(b, c);
        nodes_.emplace_back();
      }
      node = c;
    }
    if (nodes_[size_t(node)].token < 0) {  // the first token with a given content wins
      nodes_[size_t(node)].token = int32_t(tokens_.size());
      tokens_.push_back(tokens[t]);
    }
    can_start_[static_cast<unsigned char>(pat[0])] = true;
  }
}

int32_t AddedTokenMatcher::child(int32_t node, unsigned char b) const {
  for (const auto& [byte, c] : nodes_[size_t(node)].next)
    if (byte == b) return c;
  return -1;
}

void AddedTokenMatcher::split(std::string_view text, std::vector<TextSpan>& spans) const {
  size_t emitted = 0;  // text before this offset is covered by spans
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    if (!can_start_[static_cast<unsigned char>(text[i])]) {
      ++i;
      continue;
    }
    // Longest token starting at i.
    int32_t node = 0, best = -1;
    size_t best_end = 0;
    for (size_t j = i; j < n; ++j) {
      node = child(node, static_cast<unsigned char>(text[j]));
      if (node < 0) break;
      if (nodes_[size_t(node)].token >= 0) {
        best = nodes_[size_t(node)].token;
        best_end = j + 1;
      }
    }
    if (best < 0) {
      ++i;
      continue;
    }
    const AddedToken& tok = *tokens_[size_t(best)];
    size_t start = i, stop = best_end;
    i = best_end;  // matches never overlap, even when this one is dropped below
    if (tok.single_word) {
      int len = 0;
      bool word_before = start > 0 && is_word_char(last_codepoint(text.substr(0, start)));
      bool word_after = stop < n && is_word_char(first_codepoint(text.substr(stop), &len));
      if (word_before || word_after) continue;
    }
    if (tok.lstrip) {
      size_t s = start;
      while (s > emitted) {
        size_t k = s - 1;
        while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        if (!is_white_space(last_codepoint(text.substr(0, s)))) break;
        s = k;
      }
      start = std::max(s, emitted);
    }
    if (tok.rstrip) {
      while (stop < n) {
        int len = 0;
        uint32_t cp = first_codepoint(text.substr(stop), &len);
        if (len == 0 || !is_white_space(cp)) break;
        stop += size_t(len);
      }
    }
    if (start < emitted) continue;  // cannot happen for sane tokens; never emit overlapping spans
    if (start > emitted) spans.push_back(TextSpan{emitted, start, -1});
    spans.push_back(TextSpan{start, stop, tok.id});
    emitted = stop;
    i = std::max(i, stop);
  }
  if (emitted < n) spans.push_back(TextSpan{emitted, n, -1});
}

}  // namespace qt::tok
