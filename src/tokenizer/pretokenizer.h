// Regex pre-tokenisation (HF `Split` with behavior "Isolated", and ByteLevel's GPT-2 regex) with
// PCRE2: UTF + UCP mode, JIT-compiled. Every match is a piece, and so is every stretch of text
// between matches; empty matches make no piece.
//
// HF tokenizers runs these patterns with Oniguruma, whose \s is the Unicode White_Space property.
// PCRE2's UCP \s differs (it adds U+180E), so \s and \S are rewritten into an explicit White_Space
// class before compiling (translate_hf_regex). \p{L}, \p{N}, (?i:...), lookahead need no change.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace qt::tok {

// The White_Space code points, as items of a PCRE2 character class.
extern const char* const kWhiteSpaceClassItems;
// Oniguruma/HF regex syntax -> PCRE2 syntax with the same meaning (see above).
std::string translate_hf_regex(std::string_view pattern);

class RegexSplitter {
 public:
  // `pattern` is in HF/Oniguruma syntax; fails with "[tokenizer] ..." if PCRE2 rejects it.
  explicit RegexSplitter(const std::string& pattern);
  ~RegexSplitter();
  RegexSplitter(const RegexSplitter&) = delete;
  RegexSplitter& operator=(const RegexSplitter&) = delete;

  // Appends the pieces of `text` (valid UTF-8) to `pieces`, in order; they cover `text` exactly.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

}  // namespace qt::tok
