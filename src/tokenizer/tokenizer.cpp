// Tokenizer: loads a Hugging Face tokenizer.json (byte-level BPE) and runs the HF encode pipeline:
//   text -> [invalid UTF-8 bytes cut out] -> added tokens (normalized=false) matched in the raw text
//        -> each plain stretch normalised (NFC) -> added tokens (normalized=true) matched
//        -> regex pre-tokenisation (PCRE2) -> BPE per piece (bpe.h).
// Invalid UTF-8 (which HF cannot hold) is our own rule: each invalid byte is cut out and encoded as
// its one-byte token; the valid stretches around it are encoded as separate texts. So
// decode(encode(s)) == s for every byte string s.
// Supported tokenizer.json parts: model BPE (vocab, merges "a b" or [a, b], ignore_merges), normalizer
// null | NFC | Sequence of NFC, pre_tokenizer Split(Regex|String, Isolated) | ByteLevel(add_prefix_space
// false) | Sequence of those, decoder null | ByteLevel; anything else fails with a clear message.
// The post_processor is not applied: special tokens appear only where written in the text.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/unicode.h"

namespace qt {

using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The regex HF's ByteLevel pre-tokenizer applies when use_regex is true (GPT-2's).
const char* const kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("tokenizer", "{}: cannot open", path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json_file(const fs::path& path) {
  std::string text = read_text_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail("tokenizer", "{}: not valid JSON: {}", path.string(), e.what());
  }
}

std::string type_of(const json& j, const std::string& where) {
  if (!j.is_object()) fail("tokenizer", "{} must be an object", where);
  auto it = j.find("type");
  if (it == j.end() || !it->is_string()) fail("tokenizer", "{} has no string field 'type'", where);
  return it->get<std::string>();
}

bool get_bool(const json& obj, const char* key, bool dflt, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) fail("tokenizer", "{}.{} must be true or false", where, key);
  return it->get<bool>();
}

// A string field that must be absent, null or "".
void require_empty_string(const json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return;
  if (!it->is_string() || !it->get<std::string>().empty())
    fail("tokenizer", "{}.{} = {} is not supported (byte-level BPE needs it empty)", where, key, it->dump());
}

// Escapes a literal for PCRE2.
std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}/-#").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

// tokenizer_config.json token fields are a string, {"content": string, ...} or null.
std::string config_token(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  fail("tokenizer", "tokenizer_config.json: {} must be a string or {{\"content\": ...}}", key);
}

}  // namespace

struct Tokenizer::Impl {
  tok::BpeModel bpe;
  std::vector<std::unique_ptr<tok::RegexSplitter>> splitters;
  bool nfc = false;
  std::vector<tok::AddedToken> added;
  std::vector<int32_t> added_index_by_id;  // id -> index into `added`, or -1
  std::unordered_map<std::string, int32_t> added_by_content;
  tok::AddedTokenMatcher raw_matcher, normalized_matcher;
  int64_t vocab_size = 0;
  int32_t eos = -1, pad = -1;
  std::string chat_template;

  void load_model(const json& m);
  void load_normalizer(const json& n);
  void load_pre_tokenizer(const json& p, const std::string& where);
  void load_decoder(const json& d, const std::string& where);
  void load_added_tokens(const json& a);
  void load_config(const fs::path& dir);

  int32_t token_to_id(std::string_view t) const {
    auto it = added_by_content.find(std::string(t));
    return it != added_by_content.end() ? it->second : bpe.token_to_id(t);
  }
  void encode(std::string_view text, bool match_added, std::vector<int32_t>& out) const;
  void encode_valid(std::string_view text, bool match_added, std::vector<int32_t>& out) const;
  void encode_plain(std::string_view text, bool match_added, std::vector<int32_t>& out) const;
  void encode_pretokenized(std::string_view text, std::vector<int32_t>& out) const;
};

// ---------------------------------------------------------------------------------------------
// Loading

void Tokenizer::Impl::load_model(const json& m) {
  if (!m.is_object()) fail("tokenizer", "tokenizer.json: 'model' must be an object");
  if (m.contains("type") && !(m["type"].is_string() && m["type"] == "BPE"))
    fail("tokenizer", "tokenizer.json: model.type {} is not supported (only BPE)", m["type"].dump());
  const std::string where = "tokenizer.json: model";
  auto vit = m.find("vocab");
  if (vit == m.end() || !vit->is_object()) fail("tokenizer", "{}.vocab must be an object of token -> id", where);
  std::vector<std::pair<std::string, int32_t>> vocab;
  vocab.reserve(vit->size());
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer())
      fail("tokenizer", "{}.vocab['{}'] must be an integer id", where, it.key());
    int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > INT32_MAX) fail("tokenizer", "{}.vocab['{}'] = {} is out of range", where, it.key(), id);
    vocab.emplace_back(it.key(), int32_t(id));
  }
  auto mit = m.find("merges");
  if (mit == m.end() || !mit->is_array()) fail("tokenizer", "{}.merges must be an array", where);
  std::vector<tok::BpeModel::Merge> merges;
  merges.reserve(mit->size());
  for (size_t i = 0; i < mit->size(); ++i) {
    const json& e = (*mit)[i];
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() || s.find(' ', sp + 1) != std::string::npos)
        fail("tokenizer", "{}.merges[{}] = '{}' is not two tokens separated by one space", where, i, s);
      merges.push_back({s.substr(0, sp), s.substr(sp + 1)});
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      merges.push_back({e[0].get<std::string>(), e[1].get<std::string>()});
    } else {
      fail("tokenizer", "{}.merges[{}] must be \"a b\" or [\"a\", \"b\"]", where, i);
    }
  }
  if (auto d = m.find("dropout"); d != m.end() && !d->is_null()) {
    if (!d->is_number()) fail("tokenizer", "{}.dropout must be a number or null", where);
    if (d->get<double>() > 0) fail("tokenizer", "{}.dropout = {} is not supported (inference-style BPE only)", where, d->get<double>());
  }
  require_empty_string(m, "continuing_subword_prefix", where);
  require_empty_string(m, "end_of_word_suffix", where);
  bpe.build(std::move(vocab), merges, get_bool(m, "ignore_merges", false, where));
}

void Tokenizer::Impl::load_normalizer(const json& n) {
  if (n.is_null()) return;
  std::string type = type_of(n, "tokenizer.json: normalizer");
  if (type == "NFC") {
    nfc = true;
  } else if (type == "Sequence") {
    auto it = n.find("normalizers");
    if (it == n.end() || !it->is_array()) fail("tokenizer", "tokenizer.json: normalizer Sequence needs 'normalizers'");
    for (const json& sub : *it) load_normalizer(sub);
  } else {
    fail("tokenizer", "tokenizer.json: normalizer '{}' is not supported (supported: NFC, Sequence of NFC)", type);
  }
}

void Tokenizer::Impl::load_pre_tokenizer(const json& p, const std::string& where) {
  if (p.is_null()) return;
  std::string type = type_of(p, where);
  if (type == "Sequence") {
    auto it = p.find("pretokenizers");
    if (it == p.end() || !it->is_array()) fail("tokenizer", "{}: Sequence needs 'pretokenizers'", where);
    for (size_t i = 0; i < it->size(); ++i) load_pre_tokenizer((*it)[i], where + ".pretokenizers[" + std::to_string(i) + "]");
  } else if (type == "Split") {
    auto pat = p.find("pattern");
    if (pat == p.end() || !pat->is_object()) fail("tokenizer", "{}: Split needs a 'pattern' object", where);
    std::string regex;
    if (pat->contains("Regex") && (*pat)["Regex"].is_string())
      regex = (*pat)["Regex"].get<std::string>();
    else if (pat->contains("String") && (*pat)["String"].is_string())
      regex = regex_escape((*pat)["String"].get<std::string>());
    else
      fail("tokenizer", "{}: Split pattern must be {{\"Regex\": ...}} or {{\"String\": ...}}", where);
    std::string behavior = p.contains("behavior") && p["behavior"].is_string() ? p["behavior"].get<std::string>() : "";
    if (behavior != "Isolated")
      fail("tokenizer", "{}: Split behavior '{}' is not supported (only Isolated)", where, behavior);
    if (get_bool(p, "invert", false, where)) fail("tokenizer", "{}: Split with invert=true is not supported", where);
    splitters.push_back(std::make_unique<tok::RegexSplitter>(regex));
  } else if (type == "ByteLevel") {
    if (get_bool(p, "add_prefix_space", false, where))
      fail("tokenizer", "{}: ByteLevel add_prefix_space=true is not supported", where);
    if (get_bool(p, "use_regex", true, where)) splitters.push_back(std::make_unique<tok::RegexSplitter>(kGpt2Regex));
  } else {
    fail("tokenizer", "{}: pre-tokenizer '{}' is not supported (supported: Split, ByteLevel, Sequence)", where, type);
  }
}

void Tokenizer::Impl::load_decoder(const json& d, const std::string& where) {
  if (d.is_null()) return;
  std::string type = type_of(d, where);
  if (type == "ByteLevel") return;
  if (type == "Sequence" && d.contains("decoders") && d["decoders"].is_array()) {
    for (const json& sub : d["decoders"]) load_decoder(sub, where);
    return;
  }
  fail("tokenizer", "{}: decoder '{}' is not supported (only ByteLevel)", where, type);
}

void Tokenizer::Impl::load_added_tokens(const json& a) {
  if (a.is_null()) return;
  if (!a.is_array()) fail("tokenizer", "tokenizer.json: added_tokens must be an array");
  for (size_t i = 0; i < a.size(); ++i) {
    const json& e = a[i];
    std::string where = "tokenizer.json: added_tokens[" + std::to_string(i) + "]";
    if (!e.is_object() || !e.contains("id") || !e["id"].is_number_integer() || !e.contains("content") ||
        !e["content"].is_string())
      fail("tokenizer", "{} needs an integer 'id' and a string 'content'", where);
    tok::AddedToken t;
    int64_t id = e["id"].get<int64_t>();
    if (id < 0 || id > 50'000'000) fail("tokenizer", "{}: id {} is out of range", where, id);
    t.id = int32_t(id);
    t.content = e["content"].get<std::string>();
    if (tok::utf8_valid_prefix(t.content) != t.content.size()) fail("tokenizer", "{}: content is not UTF-8", where);
    t.special = get_bool(e, "special", false, where);
    t.lstrip = get_bool(e, "lstrip", false, where);
    t.rstrip = get_bool(e, "rstrip", false, where);
    t.single_word = get_bool(e, "single_word", false, where);
    t.normalized = get_bool(e, "normalized", !t.special, where);
    added.push_back(std::move(t));
  }
  std::vector<const tok::AddedToken*> raw, norm;
  std::vector<std::string> raw_pat, norm_pat;
  for (const auto& t : added) {
    added_by_content.emplace(t.content, t.id);
    if (t.normalized) {
      norm.push_back(&t);
      norm_pat.push_back(nfc ? tok::nfc(t.content) : t.content);
    } else {
      raw.push_back(&t);
      raw_pat.push_back(t.content);
    }
  }
  raw_matcher.build(raw, raw_pat);
  normalized_matcher.build(norm, norm_pat);
}

void Tokenizer::Impl::load_config(const fs::path& dir) {
  fs::path cfg_path = dir / "tokenizer_config.json";
  std::error_code ec;
  if (fs::exists(cfg_path, ec)) {
    json cfg = parse_json_file(cfg_path);
    if (!cfg.is_object()) fail("tokenizer", "{}: must be a JSON object", cfg_path.string());
    auto lookup = [&](const char* key) -> int32_t {
      std::string t = config_token(cfg, key);
      if (t.empty()) return -1;
      int32_t id = token_to_id(t);
      if (id < 0) fail("tokenizer", "{}: {} '{}' is not in the vocabulary", cfg_path.string(), key, t);
      return id;
    };
    eos = lookup("eos_token");
    pad = lookup("pad_token");
    if (auto it = cfg.find("chat_template"); it != cfg.end() && !it->is_null()) {
      if (it->is_string()) {
        chat_template = it->get<std::string>();
      } else if (it->is_array()) {  // [{"name": ..., "template": ...}]: "default", else the first
        for (const json& e : *it) {
          if (!e.is_object() || !e.contains("template") || !e["template"].is_string())
            fail("tokenizer", "{}: chat_template entries need a string 'template'", cfg_path.string());
          bool is_default = e.contains("name") && e["name"] == "default";
          if (chat_template.empty() || is_default) chat_template = e["template"].get<std::string>();
          if (is_default) break;
        }
      } else {
        fail("tokenizer", "{}: chat_template must be a string", cfg_path.string());
      }
    }
  }
  fs::path jinja = dir / "chat_template.jinja";
  if (chat_template.empty() && fs::exists(jinja, ec)) chat_template = read_text_file(jinja);
}

Tokenizer Tokenizer::load(const std::string& path) {
  fs::path p(path);
  std::error_code ec;
  fs::path json_path = fs::is_directory(p, ec) ? p / "tokenizer.json" : p;
  if (!fs::is_regular_file(json_path, ec)) fail("tokenizer", "{}: no such file", json_path.string());
  json j = parse_json_file(json_path);
  if (!j.is_object() || !j.contains("model"))
    fail("tokenizer", "{}: not a tokenizer.json (no 'model')", json_path.string());
  Tokenizer t;
  t.impl_ = std::make_unique<Impl>();
  Impl& im = *t.impl_;
  im.load_model(j["model"]);
  im.load_normalizer(j.value("normalizer", json()));
  im.load_pre_tokenizer(j.value("pre_tokenizer", json()), "tokenizer.json: pre_tokenizer");
  im.load_decoder(j.value("decoder", json()), "tokenizer.json: decoder");
  im.load_added_tokens(j.value("added_tokens", json()));
  int64_t max_id = im.bpe.max_id();
  for (const auto& a : im.added) max_id = std::max<int64_t>(max_id, a.id);
  im.vocab_size = max_id + 1;
  im.added_index_by_id.assign(size_t(im.vocab_size), -1);
  for (size_t i = 0; i < im.added.size(); ++i) im.added_index_by_id[size_t(im.added[i].id)] = int32_t(i);
  im.load_config(json_path.has_parent_path() ? json_path.parent_path() : fs::path("."));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Encoding

void Tokenizer::Impl::encode_pretokenized(std::string_view text, std::vector<int32_t>& out) const {
  if (splitters.empty()) {
    bpe.encode_piece(text, out);
    return;
  }
  thread_local std::vector<std::string_view> pieces, next;
  pieces.clear();
  splitters[0]->split(text, pieces);
  for (size_t s = 1; s < splitters.size(); ++s) {
    next.clear();
    for (std::string_view piece : pieces) splitters[s]->split(piece, next);
    pieces.swap(next);
  }
  for (std::string_view piece : pieces) bpe.encode_piece(piece, out);
}

void Tokenizer::Impl::encode_plain(std::string_view text, bool match_added, std::vector<int32_t>& out) const {
  std::string normalized;
  if (nfc && !tok::nfc_quick_check(text)) {
    normalized = tok::nfc(text);
    text = normalized;
  }
  if (!match_added || normalized_matcher.empty()) {
    encode_pretokenized(text, out);
    return;
  }
  std::vector<tok::TextSpan> spans;
  normalized_matcher.split(text, spans);
  for (const auto& s : spans) {
    if (s.id >= 0)
      out.push_back(s.id);
    else
      encode_pretokenized(text.substr(s.begin, s.end - s.begin), out);
  }
}

void Tokenizer::Impl::encode_valid(std::string_view text, bool match_added, std::vector<int32_t>& out) const {
  if (!match_added || raw_matcher.empty()) {
    encode_plain(text, match_added, out);
    return;
  }
  std::vector<tok::TextSpan> spans;
  raw_matcher.split(text, spans);
  for (const auto& s : spans) {
    if (s.id >= 0)
      out.push_back(s.id);
    else
      encode_plain(text.substr(s.begin, s.end - s.begin), match_added, out);
  }
}

void Tokenizer::Impl::encode(std::string_view text, bool match_added, std::vector<int32_t>& out) const {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t valid = tok::utf8_valid_prefix(text.substr(pos));
    if (valid > 0) encode_valid(text.substr(pos, valid), match_added, out);
    pos += valid;
    if (pos < text.size()) out.push_back(bpe.byte_token(static_cast<unsigned char>(text[pos++])));
  }
}

// ---------------------------------------------------------------------------------------------
// Public API

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

namespace {
template <typename Ptr>
const auto& need(const Ptr& impl) {
  if (!impl) fail("tokenizer", "no tokenizer loaded");
  return *impl;
}
}  // namespace

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  need(impl_).encode(text, true, out);
  return out;
}

std::vector<int32_t> Tokenizer::encode_ordinary(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  need(impl_).encode(text, false, out);
  return out;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts, int threads,
                                                          bool special) const {
  const auto& im = need(impl_);
  std::vector<std::vector<int32_t>> out(texts.size());
  size_t n_threads = threads > 0 ? size_t(threads) : std::max(1u, std::thread::hardware_concurrency());
  n_threads = std::min(n_threads, std::max<size_t>(1, texts.size()));
  constexpr size_t kChunk = 16;  // strings taken per grab
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto worker = [&] {
    try {
      for (;;) {
        size_t begin = next.fetch_add(kChunk);
        if (begin >= texts.size() || failed.load()) return;
        size_t end = std::min(texts.size(), begin + kChunk);
        for (size_t i = begin; i < end; ++i) {
          out[i].reserve(texts[i].size() / 3 + 4);
          im.encode(texts[i], special, out[i]);
        }
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  if (n_threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(n_threads - 1);
    for (size_t t = 0; t + 1 < n_threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
  }
  if (error) std::rethrow_exception(error);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const auto& im = need(impl_);
  std::string out;
  out.reserve(ids.size() * 4);
  for (int32_t id : ids) {
    if (id < 0 || int64_t(id) >= im.vocab_size) fail("tokenizer", "decode: id {} is out of range [0, {})", id, im.vocab_size);
    int32_t a = im.added_index_by_id[size_t(id)];
    if (a >= 0)
      out += im.added[size_t(a)].content;
    else if (im.bpe.has_id(id))
      out += im.bpe.token_bytes(id);
    else
      fail("tokenizer", "decode: id {} has no token", id);
  }
  return out;
}

int32_t Tokenizer::token_to_id(std::string_view token) const { return need(impl_).token_to_id(token); }

std::string Tokenizer::id_to_token(int32_t id) const {
  const auto& im = need(impl_);
  if (id < 0 || int64_t(id) >= im.vocab_size) return "";
  int32_t a = im.added_index_by_id[size_t(id)];
  if (a >= 0) return im.added[size_t(a)].content;
  return im.bpe.has_id(id) ? im.bpe.token(id) : std::string();
}

int64_t Tokenizer::vocab_size() const { return need(impl_).vocab_size; }
int32_t Tokenizer::eos_id() const { return need(impl_).eos; }
int32_t Tokenizer::pad_id() const { return need(impl_).pad; }
const std::string& Tokenizer::chat_template() const { return need(impl_).chat_template; }

}  // namespace qt
