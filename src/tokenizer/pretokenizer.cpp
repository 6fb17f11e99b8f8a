// PCRE2-based regex splitting. See pretokenizer.h.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/pretokenizer.h"

#include <pcre2.h>

#include "core/error.h"

namespace qt::tok {

const char* const kWhiteSpaceClassItems =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}"
    "\\x{3000}";

std::string translate_hf_regex(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < p.size();) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char d = p[i + 1];
      if (d == 's') {
        out += in_class ? std::string(kWhiteSpaceClassItems) : "[" + std::string(kWhiteSpaceClassItems) + "]";
        i += 2;
        continue;
      }
      if (d == 'S' && !in_class) {  // inside a class \S keeps PCRE2's meaning (differs only at U+180E)
        out += "[^" + std::string(kWhiteSpaceClassItems) + "]";
        i += 2;
        continue;
      }
      out += c;
      out += d;
      i += 2;
      continue;
    }
    if (in_class) {
      if (c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // POSIX class [:name:]
        size_t end = p.find(":]", i + 2);
        if (end != std::string_view::npos) {
          out.append(p.substr(i, end + 2 - i));
          i = end + 2;
          continue;
        }
      }
      if (c == ']') in_class = false;
      out += c;
      ++i;
      continue;
    }
    out += c;
    ++i;
    if (c == '[') {
      in_class = true;
      if (i < p.size() && p[i] == '^') out += p[i++];
      if (i < p.size() && p[i] == ']') out += p[i++];  // a leading ']' is a literal
    }
  }
  return out;
}

namespace {
std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  int n = pcre2_get_error_message(code, buf, sizeof buf);
  return n < 0 ? "unknown PCRE2 error" : std::string(reinterpret_cast<char*>(buf), size_t(n));
}

// One match-data block per thread (pcre2_match_data must not be shared between threads).
struct ThreadMatchData {
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  ~ThreadMatchData() { pcre2_match_data_free(md); }
};
pcre2_match_data* thread_match_data() {
  thread_local ThreadMatchData tmd;
  return tmd.md;
}
}  // namespace

RegexSplitter::RegexSplitter(const std::string& pattern) : pattern_(pattern) {
  std::string translated = translate_hf_regex(pattern);
  int err = 0;
  PCRE2_SIZE err_off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
  if (!code)
    fail("tokenizer", "pre_tokenizer regex '{}' is not supported by PCRE2 (offset {} of '{}'): {}", pattern,
         err_off, translated, pcre2_message(err));
  code_ = code;
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

RegexSplitter::~RegexSplitter() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void RegexSplitter::split(std::string_view text, std::vector<std::string_view>& pieces) const {
  auto* code = static_cast<const pcre2_code*>(code_);
  pcre2_match_data* md = thread_match_data();
  if (!md) fail("tokenizer", "out of memory for PCRE2 match data");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  const size_t n = text.size();
  size_t gap_start = 0;  // start of text not yet emitted
  size_t search = 0;     // where the next search starts
  while (search < n) {
    int rc = jit_ ? pcre2_jit_match(code, subject, n, search, PCRE2_NO_UTF_CHECK, md, nullptr)
                  : pcre2_match(code, subject, n, search, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) fail("tokenizer", "regex match failed: {}", pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t s = ov[0], e = ov[1];
    if (e <= s) {  // empty match: no piece; step over one character
      search = s + 1;
      while (search < n && (static_cast<unsigned char>(text[search]) & 0xC0) == 0x80) ++search;
      continue;
    }
    if (s > gap_start) pieces.push_back(text.substr(gap_start, s - gap_start));
    pieces.push_back(text.substr(s, e - s));
    gap_start = search = e;
  }
  if (gap_start < n) pieces.push_back(text.substr(gap_start));
}

}  // namespace qt::tok
