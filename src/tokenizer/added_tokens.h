// Added (special and non-special) tokens, matched in the text before BPE, as HF tokenizers does:
// leftmost-longest, non-overlapping matches of the token contents (a byte trie walked at each
// position whose byte can start a token). A match is then
//   - dropped when the token is single_word and a word character (Unicode \w) touches either side;
//   - widened over the whitespace on its left (lstrip; never into the previous match) and on its
//     right (rstrip).
// Tokens with normalized=false are matched in the raw text; those with normalized=true are matched
// (by their normalised content) in the normalised text between the first kind of matches.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qt::tok {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

struct TextSpan {
  size_t begin = 0, end = 0;
  int32_t id = -1;  // the added token's id, or -1 for plain text
};

class AddedTokenMatcher {
 public:
  // `patterns[i]` is what token `tokens[i]` matches (its content, normalised where it applies).
  void build(const std::vector<const AddedToken*>& tokens, const std::vector<std::string>& patterns);
  bool empty() const { return tokens_.empty(); }
  // Splits `text` into spans covering it in order; plain spans are never empty.
  void split(std::string_view text, std::vector<TextSpan>& spans) const;

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;  // byte -> child node
    int32_t token = -1;                                   // index into tokens_ when a token ends here
  };
  int32_t child(int32_t node, unsigned char b) const;
  std::vector<Node> nodes_;
  std::vector<const AddedToken*> tokens_;
  bool can_start_[256] = {};
};

// Unicode classes used by the flags above (Rust regex semantics: \w, \s).
bool is_word_char(uint32_t cp);
bool is_white_space(uint32_t cp);

}  // namespace qt::tok
