// Tokenizer tests.
//  - Exactness: the bundled Qwen3 tokenizer against reference ids from other implementations
//    (tests/data/tokenizer/qwen3_reference.json from transformers.js, qwen3_hf_edge.json from HF
//    tokenizers on characters where the two differ), zero mismatches; decode(encode(s)) == s.
//  - NFC against CPython's unicodedata (nfc_cases.json).
//  - Invalid UTF-8 rule, encode_ordinary, batch == serial, vocabulary round trips, config fields.
//  - Small hand-made tokenizer.json files: merge order, the heap path, added-token flags
//    (single_word, lstrip, rstrip, normalized), and malformed files -> "[tokenizer] ..." errors.
//  - The `qwentune tokenize` command.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "tokenizer_round_trip.h"
#include "test_files.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using qt::Tokenizer;
using qt::testing::expected_round_trip;

namespace {

using qt::test::TempDir;

const std::string kQwenDir = std::string(QT_SOURCE_DIR) + "/data/qwen3-tokenizer";

const Tokenizer& qwen() {
  static const Tokenizer t = Tokenizer::load(kQwenDir);
  return t;
}

json read_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << path;
  std::stringstream ss;
  ss << f.rdbuf();
  return json::parse(ss.str());
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  return s + "]";
}


// Compares every case of a {"cases": [{"text", "ids"}]} fixture; returns the number of cases.
size_t check_fixture(const std::string& path) {
  json fx = read_json(path);
  const Tokenizer& t = qwen();
  size_t mismatches = 0, round_trip_failures = 0;
  for (const json& c : fx["cases"]) {
    std::string text = c["text"].get<std::string>();
    std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> got = t.encode(text);
    if (c.contains("known_diff")) {  // documented difference: must still differ (see the fixture)
      EXPECT_NE(got, want) << "known difference disappeared for " << json(text).dump() << ": "
                           << c["known_diff"].get<std::string>();
      continue;
    }
    if (got != want && ++mismatches <= 10)
      ADD_FAILURE() << "text " << json(text).dump() << "\n  want " << show(want) << "\n  got  " << show(got);
    // decode(encode(s)) == s, or NFC(s) (from the fixture's generator) for text not in NFC.
    std::string round_trip = c.contains("nfc") ? c["nfc"].get<std::string>() : text;
    if (t.decode(got) != round_trip && ++round_trip_failures <= 10)
      ADD_FAILURE() << "decode(encode(s)) != s for " << json(text).dump();
  }
  EXPECT_EQ(mismatches, 0u) << path;
  EXPECT_EQ(round_trip_failures, 0u) << path;
  return fx["cases"].size();
}

// A temporary directory removed at the end of a test.
// Byte-level symbol string of raw bytes (test-side helper built from the published mapping).
std::string sym(std::string_view raw) {
  std::string out;
  for (unsigned char b : raw) qt::tok::utf8_append(out, qt::tok::byte_to_codepoint()[b]);
  return out;
}

// A minimal byte-level BPE tokenizer.json: the 256 byte symbols (ids 0..255), then the given
// merges (each adds its merged token), then the added tokens.
json tiny_tokenizer(const std::vector<std::pair<std::string, std::string>>& merges, const json& added = json::array(),
                    const json& normalizer = nullptr, bool split_regex = true) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[sym(std::string(1, char(b)))] = b;
  json merge_list = json::array();
  int next = 256;
  for (const auto& [a, b] : merges) {
    merge_list.push_back(sym(a) + " " + sym(b));
    if (!vocab.contains(sym(a + b))) vocab[sym(a + b)] = next++;
  }
  json pre = split_regex ? json{{"type", "Sequence"},
                                {"pretokenizers",
                                 {{{"type", "Split"},
                                   {"pattern", {{"Regex", R"( ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"}}},
                                   {"behavior", "Isolated"},
                                   {"invert", false}},
                                  {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}
                         : json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}};
  return json{{"version", "1.0"},
              {"added_tokens", added},
              {"normalizer", normalizer},
              {"pre_tokenizer", pre},
              {"decoder", {{"type", "ByteLevel"}}},
              {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_list}}}};
}

Tokenizer load_json(const TempDir& dir, const json& j, const std::string& name = "tokenizer.json") {
  return Tokenizer::load(dir.write(name, j.dump()));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST(Tokenizer, ReferenceFixtureExact) {
  size_t n = check_fixture(std::string(QT_TEST_DATA) + "/tokenizer/qwen3_reference.json");
  EXPECT_GE(n, 2000u);
}

TEST(Tokenizer, HfEdgeFixtureExact) {
  std::string path = std::string(QT_TEST_DATA) + "/tokenizer/qwen3_hf_edge.json";
  ASSERT_TRUE(fs::exists(path)) << path;
  EXPECT_GE(check_fixture(path), 80u);
}

TEST(Tokenizer, HfEdgeFixturePreTokenizerPieces) {
  // HF's pre-tokenizer pieces of the normalised text against the PCRE2 splitter with the regex of
  // the bundled tokenizer.json (pins down \s, \p{L}, \p{N} and (?i:) semantics).
  json fx = read_json(std::string(QT_TEST_DATA) + "/tokenizer/qwen3_hf_edge.json");
  json tj = read_json(kQwenDir + "/tokenizer.json");
  qt::tok::RegexSplitter splitter(tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].get<std::string>());
  // Known: PCRE2 10.42 has Unicode 14 tables, so characters new in Unicode 15 are unassigned to it
  // (HF's Oniguruma knows them). Nag Mundari digits (U+1E4F0..) split as \p{N} in HF only; the ids
  // still agree (see HfEdgeFixtureExact). This must keep differing until PCRE2 is upgraded.
  const std::vector<std::string> known_unicode15 = {"\xF0\x9E\x93\x90\xF0\x9E\x93\xB0"};  // U+1E4D0 U+1E4F0
  size_t bad = 0, checked = 0;
  for (const json& c : fx["cases"]) {
    if (!c.contains("pieces")) continue;
    std::string text = qt::tok::nfc(c["text"].get<std::string>());
    if (std::find(known_unicode15.begin(), known_unicode15.end(), c["text"].get<std::string>()) != known_unicode15.end()) {
      std::vector<std::string_view> pieces;
      splitter.split(text, pieces);
      EXPECT_NE(pieces.size(), c["pieces"].size()) << "known Unicode 15 difference disappeared";
      continue;
    }
    std::vector<std::string_view> pieces;
    splitter.split(text, pieces);
    std::vector<std::string> got;
    for (auto p : pieces) got.push_back(sym(p));
    ++checked;
    if (got != c["pieces"].get<std::vector<std::string>>() && ++bad <= 10)
      ADD_FAILURE() << "pieces differ for " << json(c["text"]).dump() << "\n  want " << c["pieces"].dump()
                    << "\n  got  " << json(got).dump();
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_GE(checked, 80u);
}

TEST(Tokenizer, BundledConfig) {
  const Tokenizer& t = qwen();
  EXPECT_EQ(t.vocab_size(), 151669);
  json cfg = read_json(kQwenDir + "/tokenizer_config.json");
  EXPECT_EQ(t.eos_id(), t.token_to_id(cfg["eos_token"].get<std::string>()));
  EXPECT_EQ(t.pad_id(), t.token_to_id(cfg["pad_token"].get<std::string>()));
  EXPECT_EQ(t.eos_id(), 151645);  // <|im_end|> in added_tokens
  EXPECT_EQ(t.pad_id(), 151643);  // <|endoftext|>
  EXPECT_EQ(t.chat_template(), cfg["chat_template"].get<std::string>());
}

TEST(Tokenizer, VocabularyRoundTrips) {
  const Tokenizer& t = qwen();
  json tj = read_json(kQwenDir + "/tokenizer.json");
  for (auto it = tj["model"]["vocab"].begin(); it != tj["model"]["vocab"].end(); ++it) {
    int32_t id = it.value().get<int32_t>();
    ASSERT_EQ(t.token_to_id(it.key()), id) << it.key();
    ASSERT_EQ(t.id_to_token(id), it.key());
  }
  for (const json& a : tj["added_tokens"]) {
    EXPECT_EQ(t.token_to_id(a["content"].get<std::string>()), a["id"].get<int32_t>());
    EXPECT_EQ(t.id_to_token(a["id"].get<int32_t>()), a["content"].get<std::string>());
    EXPECT_EQ(t.decode({a["id"].get<int32_t>()}), a["content"].get<std::string>());
    // Every added token written alone encodes to itself.
    EXPECT_EQ(t.encode(a["content"].get<std::string>()), std::vector<int32_t>{a["id"].get<int32_t>()});
  }
  EXPECT_EQ(t.token_to_id("no such token \x01"), -1);
  EXPECT_EQ(t.id_to_token(-1), "");
  EXPECT_EQ(t.id_to_token(int32_t(t.vocab_size())), "");
}

TEST(Tokenizer, EveryVocabTokenDecodesToItsBytes) {
  // decode([id]) must be the token's byte-level symbols mapped back to bytes, and encoding those
  // bytes must decode to the same bytes (NFC-normalised where they are valid UTF-8).
  const Tokenizer& t = qwen();
  for (int32_t id = 0; id < 151643; id += 7) {
    std::string tok = t.id_to_token(id);
    std::string raw = t.decode({id});
    ASSERT_EQ(sym(raw), tok) << id;
    ASSERT_EQ(t.decode(t.encode_ordinary(raw)), expected_round_trip(raw)) << id;
  }
}

TEST(Tokenizer, EncodeOrdinaryIgnoresSpecialTokens) {
  const Tokenizer& t = qwen();
  std::string s = "<|im_start|>user\nhi<|im_end|>";
  std::vector<int32_t> special = t.encode(s), plain = t.encode_ordinary(s);
  EXPECT_NE(std::find(special.begin(), special.end(), 151644), special.end());
  for (int32_t id : plain) EXPECT_LT(id, 151643);
  EXPECT_EQ(t.decode(plain), s);
  EXPECT_EQ(t.decode(special), s);
}

TEST(Tokenizer, BatchEqualsSerial) {
  const Tokenizer& t = qwen();
  json fx = read_json(std::string(QT_TEST_DATA) + "/tokenizer/qwen3_reference.json");
  std::vector<std::string> texts;
  for (const json& c : fx["cases"]) texts.push_back(c["text"].get<std::string>());
  for (int threads : {1, 3, 0}) {
    auto batch = t.encode_batch(texts, threads);
    ASSERT_EQ(batch.size(), texts.size());
    for (size_t i = 0; i < texts.size(); ++i) ASSERT_EQ(batch[i], t.encode(texts[i])) << i;
  }
  auto ordinary = t.encode_batch(texts, 2, false);
  for (size_t i = 0; i < texts.size(); ++i) ASSERT_EQ(ordinary[i], t.encode_ordinary(texts[i])) << i;
  EXPECT_TRUE(t.encode_batch({}, 4).empty());
}

TEST(Tokenizer, InvalidUtf8Rule) {
  const Tokenizer& t = qwen();
  auto byte_tok = [&](unsigned char b) { return t.token_to_id(sym(std::string(1, char(b)))); };
  // Each invalid byte is its one-byte token; the valid text around it is encoded separately.
  std::string s = "abc\xff def";
  std::vector<int32_t> want = t.encode("abc");
  want.push_back(byte_tok(0xFF));
  for (int32_t id : t.encode(" def")) want.push_back(id);
  EXPECT_EQ(t.encode(s), want);
  EXPECT_EQ(t.decode(t.encode(s)), s);
  // Truncated sequence, overlong form, surrogate, beyond U+10FFFF: one token per offending byte.
  for (std::string bad : {std::string("\xE4\xB8"), std::string("\xC0\xAF"), std::string("\xED\xA0\x80"),
                          std::string("\xF4\x90\x80\x80")}) {
    std::vector<int32_t> ids = t.encode(bad);
    ASSERT_EQ(ids.size(), bad.size());
    for (size_t i = 0; i < bad.size(); ++i) EXPECT_EQ(ids[i], byte_tok(static_cast<unsigned char>(bad[i])));
  }
  // Random bytes round-trip (valid stretches come back in NFC).
  std::mt19937 rng(123);
  for (int k = 0; k < 3000; ++k) {
    std::string r(size_t(rng() % 64), '\0');
    for (char& c : r) c = char(rng() % 4 == 0 ? rng() % 256 : "ab <|>\n\xC3\xA9\xE4\xB8\xAD"[rng() % 12]);
    ASSERT_EQ(t.decode(t.encode(r)), expected_round_trip(r)) << "case " << k;
  }
}

TEST(Tokenizer, NfcMatchesCPython) {
  json fx = read_json(std::string(QT_TEST_DATA) + "/tokenizer/nfc_cases.json");
  EXPECT_EQ(fx["unicode"].get<std::string>(), qt::tok::nfc_unicode_version());
  size_t bad = 0;
  for (const json& c : fx["cases"]) {
    std::string in = c["in"].get<std::string>(), want = c["nfc"].get<std::string>();
    std::string got = qt::tok::nfc(in);
    if (got != want && ++bad <= 10) ADD_FAILURE() << "nfc(" << json(in).dump() << ") = " << json(got).dump();
    // The quick check may only say YES for text that is already NFC.
    if (qt::tok::nfc_quick_check(in) && in != want && ++bad <= 10)
      ADD_FAILURE() << "quick check YES on non-NFC " << json(in).dump();
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_GE(fx["cases"].size(), 5000u);
}

TEST(Tokenizer, NormalizesToNfcBeforeBpe) {
  const Tokenizer& t = qwen();
  EXPECT_EQ(t.encode("e\xCC\x81t\xC3\xA9"), t.encode("\xC3\xA9t\xC3\xA9"));   // é decomposed vs composed
  EXPECT_EQ(t.encode("\xE1\x84\x80\xE1\x85\xA1"), t.encode("\xEA\xB0\x80"));  // jamo ᄀ+ᅡ -> 가
}

// ---------------------------------------------------------------------------------------------
TEST(TokenizerTiny, MergeOrderFollowsRanks) {
  TempDir dir;
  // Ranks: "b c" first, then "a b", then "a bc". Leftmost-lowest-rank: "abc" -> a + bc -> abc.
  Tokenizer t = load_json(dir, tiny_tokenizer({{"b", "c"}, {"a", "b"}, {"a", "bc"}}));
  int32_t abc = t.token_to_id(sym("abc"));
  ASSERT_GE(abc, 256);
  EXPECT_EQ(t.encode("abc"), std::vector<int32_t>{abc});
  // "abab": only "a b" applies twice.
  int32_t ab = t.token_to_id(sym("ab"));
  EXPECT_EQ(t.encode("abab"), (std::vector<int32_t>{ab, ab}));
  // The heap path (pieces over 48 bytes) agrees with the pairwise definition.
  std::string long_piece;
  std::vector<int32_t> want;
  for (int i = 0; i < 40; ++i) {
    long_piece += "abc";
    want.push_back(abc);
  }
  EXPECT_EQ(t.encode(long_piece), want);
}

TEST(TokenizerTiny, WholePieceNotReachableByMergesIsNotUsed) {
  TempDir dir;
  // "abc" is a vocabulary token, but the merges ("a b" first, no "ab c") never reach it: HF's BPE
  // gives [ab, c], so the whole-piece shortcut must not return "abc".
  json j = tiny_tokenizer({{"a", "b"}, {"b", "c"}});
  j["model"]["vocab"][sym("abc")] = 400;  // present, but unreachable with these merges
  Tokenizer t = load_json(dir, j);
  std::vector<int32_t> want = {t.token_to_id(sym("ab")), t.token_to_id(sym("c"))};
  EXPECT_EQ(t.encode("abc"), want);
  EXPECT_EQ(t.encode("abc"), want);  // second time (cached check) too
  // With ignore_merges the whole-piece lookup comes first, as in HF.
  j["model"]["ignore_merges"] = true;
  Tokenizer t2 = load_json(dir, j, "t2.json");
  EXPECT_EQ(t2.encode("abc"), std::vector<int32_t>{400});
}

TEST(TokenizerTiny, AddedTokenFlags) {
  TempDir dir;
  json added = json::array();
  added.push_back({{"id", 300}, {"content", "<mask>"}, {"single_word", true}, {"lstrip", false}, {"rstrip", false},
                   {"normalized", false}, {"special", true}});
  added.push_back({{"id", 301}, {"content", "[S]"}, {"single_word", false}, {"lstrip", true}, {"rstrip", true},
                   {"normalized", false}, {"special", true}});
  added.push_back({{"id", 302}, {"content", "caf\xC3\xA9"}, {"normalized", true}, {"special", false}});
  added.push_back({{"id", 303}, {"content", "<mask>x"}, {"special", true}, {"normalized", false}});
  Tokenizer t = load_json(dir, tiny_tokenizer({}, added, json{{"type", "NFC"}}));
  auto count = [](const std::vector<int32_t>& v, int32_t id) { return std::count(v.begin(), v.end(), id); };
  // single_word: matched only with no word character on either side.
  auto ids = t.encode("<mask> My name <mask> A<mask> <mask>ony <mask>");
  EXPECT_EQ(count(ids, 300), 3);
  // Longest match first: "<mask>x" beats "<mask>".
  EXPECT_EQ(t.encode("<mask>x"), std::vector<int32_t>{303});
  // lstrip/rstrip swallow the surrounding whitespace (including Unicode spaces).
  std::vector<int32_t> want = t.encode("Hi");
  want.push_back(301);
  for (int32_t id : t.encode("there")) want.push_back(id);
  EXPECT_EQ(t.encode("Hi \t[S]\xE2\x80\x80 there"), want);
  // normalized=true: matched after NFC, so the decomposed spelling matches too.
  EXPECT_EQ(t.encode("cafe\xCC\x81"), std::vector<int32_t>{302});
  EXPECT_EQ(t.encode("caf\xC3\xA9"), std::vector<int32_t>{302});
  // Not matched by encode_ordinary.
  EXPECT_EQ(count(t.encode_ordinary("<mask> [S] caf\xC3\xA9"), 300) + count(t.encode_ordinary("[S]"), 301), 0);
  EXPECT_EQ(t.decode({300, 301, 302}), "<mask>[S]caf\xC3\xA9");
}

TEST(TokenizerTiny, MalformedFilesFail) {
  TempDir dir;
  auto expect_fail = [&](const std::string& text, const std::string& needle) {
    std::string path = dir.write("bad.json", text);
    try {
      Tokenizer::load(path);
      ADD_FAILURE() << "loaded: " << text.substr(0, 80);
    } catch (const qt::Error& e) {
      std::string msg = e.what();
      EXPECT_EQ(msg.rfind("[tokenizer] ", 0), 0u) << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    }
  };
  expect_fail("{not json", "not valid JSON");
  expect_fail("[]", "no 'model'");
  expect_fail(R"({"model": {"type": "WordPiece", "vocab": {}}})", "only BPE");
  json good = tiny_tokenizer({{"a", "b"}});
  json j = good;
  j["model"]["vocab"] = json::array();
  expect_fail(j.dump(), "vocab must be an object");
  j = good;
  j["model"]["merges"].push_back("zz qq");
  expect_fail(j.dump(), "not in the vocabulary");
  j = good;
  j["model"]["merges"].push_back("abc");
  expect_fail(j.dump(), "separated by one space");
  j = good;
  j["model"]["vocab"].erase(sym("a"));
  expect_fail(j.dump(), "byte-level symbol");
  j = good;
  j["normalizer"] = {{"type", "Lowercase"}};
  expect_fail(j.dump(), "normalizer 'Lowercase' is not supported");
  j = good;
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  expect_fail(j.dump(), "not supported by PCRE2");
  j = good;
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  expect_fail(j.dump(), "'Metaspace' is not supported");
  j = good;
  j["added_tokens"] = {{{"content", "x"}}};
  expect_fail(j.dump(), "integer 'id'");
  j = good;
  j["model"]["vocab"]["dup"] = 3;
  expect_fail(j.dump(), "used by both");
  EXPECT_THROW(Tokenizer::load((dir.path / "missing").string()), qt::Error);
  EXPECT_THROW(Tokenizer::load(dir.path.string()), qt::Error);  // directory without tokenizer.json
  // A bad tokenizer_config.json next to a good tokenizer.json.
  dir.write("tokenizer.json", good.dump());
  dir.write("tokenizer_config.json", R"({"eos_token": "<|nope|>"})");
  EXPECT_THROW(Tokenizer::load(dir.path.string()), qt::Error);
  // Decoding ids out of range fails cleanly.
  EXPECT_THROW(qwen().decode({-1}), qt::Error);
  EXPECT_THROW(qwen().decode({int32_t(qwen().vocab_size())}), qt::Error);
  Tokenizer empty;
  EXPECT_THROW(empty.encode("x"), qt::Error);
}

// ---------------------------------------------------------------------------------------------
namespace {
int run_cli(const std::string& args, std::string* err) {
  TempDir tmp;
  std::string err_path = (tmp.path / "stderr.txt").string();
  int rc = std::system((std::string(QT_BINARY) + " " + args + " 2>" + err_path).c_str());
  std::ifstream f(err_path);
  std::stringstream ss;
  ss << f.rdbuf();
  *err = ss.str();
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}
}  // namespace

TEST(TokenizeCommand, EncodesJsonArray) {
  TempDir dir;
  std::vector<std::string> texts = {"Hello world", "<|im_start|>user\n\xE4\xBD\xA0\xE5\xA5\xBD<|im_end|>", "", "  x\t"};
  std::string in = dir.write("in.json", json(texts).dump());
  std::string out = (dir.path / "out.json").string(), err;
  for (std::string threads : {"1", "0"}) {
    ASSERT_EQ(run_cli("tokenize --tokenizer " + kQwenDir + " --in " + in + " --out " + out + " --threads " + threads, &err), 0) << err;
    json got = read_json(out);
    ASSERT_EQ(got.size(), texts.size());
    for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(got[i].get<std::vector<int32_t>>(), qwen().encode(texts[i]));
  }
  ASSERT_EQ(run_cli("tokenize --no-special --tokenizer " + kQwenDir + " --in " + in + " --out " + out, &err), 0) << err;
  EXPECT_EQ(read_json(out)[1].get<std::vector<int32_t>>(), qwen().encode_ordinary(texts[1]));
}

TEST(TokenizeCommand, BadInputIsOneLineError) {
  TempDir dir;
  std::string out = (dir.path / "out.json").string();
  struct Case {
    std::string input, needle;
  };
  for (const Case& c : {Case{"{\"a\": 1}", "JSON array of strings"}, Case{"[\"ok\", 3]", "element 1 is not a string"},
                        Case{"[\"unterminated", "not valid JSON"}}) {
    std::string in = dir.write("in.json", c.input), err;
    EXPECT_EQ(run_cli("tokenize --tokenizer " + kQwenDir + " --in " + in + " --out " + out, &err), 1);
    EXPECT_EQ(err.rfind("qwentune: error: [tokenize] ", 0), 0u) << err;
    EXPECT_NE(err.find(c.needle), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
  std::string err, good_in = dir.write("good.json", "[\"x\"]");
  EXPECT_EQ(run_cli("tokenize --tokenizer " + (dir.path / "nope").string() + " --in " + good_in + " --out " + out, &err), 1);
  EXPECT_EQ(err.rfind("qwentune: error: [tokenizer] ", 0), 0u) << err;
  EXPECT_FALSE(fs::exists(out));
}
