// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json (Qwen2/2.5/3 vocabularies),
// giving HF tokenizers' ids exactly. encode(): added/special tokens are matched first (longest
// match, with HF's lstrip/rstrip/single_word/normalized rules), the remaining text is normalised
// (NFC when the file says so) and split by the pre-tokenizer regex read from the file (PCRE2, JIT,
// Unicode), each piece is mapped to byte-level symbols and merged by BPE ranks. decode() reverses
// the byte mapping (so decode(encode(s)) == s for text in NFC). Implementation: src/tokenizer/*.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qt {

class Tokenizer {
 public:
  // `path`: a directory holding tokenizer.json (and tokenizer_config.json, optional), or the
  // tokenizer.json file itself. Throws "[tokenizer] ..." on malformed files.
  static Tokenizer load(const std::string& path);
  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  std::vector<int32_t> encode(std::string_view text) const;  // special tokens written in the text are matched
  std::vector<int32_t> encode_ordinary(std::string_view text) const;  // no special-token matching
  // Multi-threaded batch encode (threads = 0: all cores), results in input order; special = false
  // encodes like encode_ordinary.
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts, int threads = 0,
                                                 bool special = true) const;
  // Invalid UTF-8 input (HF cannot hold it): each invalid byte becomes its one-byte token and the
  // valid text around it is encoded as separate texts. decode(encode(s)) gives back s for any bytes,
  // except that each valid UTF-8 stretch comes back in NFC (when the tokenizer normalises).
  std::string decode(const std::vector<int32_t>& ids) const;  // invalid UTF-8 bytes kept as-is;
                                                              // throws on ids out of range

  int32_t token_to_id(std::string_view token) const;  // -1 when absent
  std::string id_to_token(int32_t id) const;          // "" when out of range
  int64_t vocab_size() const;                         // including added tokens
  int32_t eos_id() const;                             // from tokenizer_config.json eos_token; -1 if none
  int32_t pad_id() const;                             // pad_token; -1 if none
  const std::string& chat_template() const;           // "" when tokenizer_config.json has none

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qt
