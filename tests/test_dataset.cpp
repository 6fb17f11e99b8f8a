// Dataset pipeline: formats, labels (hand-checked ids), segment-vs-whole tokenization, truncation,
// packing boundaries, the on-disk cache (hit, corrupted -> rebuilt), bad data with file:line,
// lenient counts, and the batch iterator.
// Token ids in the hand-checked tests come from the Qwen3 tokenizer.json vocabulary:
//   <|im_start|> 151644, <|im_end|> 151645, <|endoftext|> 151643, <think> 151667, </think> 151668,
//   "user" 872, "assistant" 77091, "system" 8948, "\n" 198, "\n\n" 271, "Hi" 13048, "Hello" 9707.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "core/error.h"
#include "data/batch_iterator.h"
#include "data/dataset.h"
#include "data/py_json.h"
#include "core/sha256.h"
#include "tokenizer/tokenizer.h"

using namespace qt::data;
using qt::sha256_hex;
namespace fs = std::filesystem;

namespace {

constexpr int32_t I = -100;
constexpr int32_t kImStart = 151644, kImEnd = 151645, kThink = 151667, kEndThink = 151668, kUser = 872,
                  kAssistant = 77091, kNl = 198, kNlNl = 271, kHi = 13048, kHello = 9707;

std::string data_dir() { return std::string(QT_TEST_DATA) + "/datasets/"; }

const qt::Tokenizer& qwen3() {
  static const qt::Tokenizer tok = [] {
    for (const std::string& dir : {std::string(QT_SOURCE_DIR) + "/data/qwen3-tokenizer",
                                  std::string(QT_SOURCE_DIR) + "/../shared/data/qwen3-tokenizer"}) {
      if (fs::exists(dir + "/tokenizer.json")) return qt::Tokenizer::load(dir);
    }
    throw std::runtime_error("Qwen3 tokenizer not found under data/qwen3-tokenizer");
  }();
  return tok;
}
std::string qwen3_dir() {
  const std::string a = std::string(QT_SOURCE_DIR) + "/data/qwen3-tokenizer";
  return fs::exists(a + "/tokenizer.json") ? a : std::string(QT_SOURCE_DIR) + "/../shared/data/qwen3-tokenizer";
}
const std::vector<int32_t>& byte_lengths() {
  static const std::vector<int32_t> b = token_byte_lengths(qwen3());
  return b;
}

std::string temp_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("qt_test_dataset_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::string write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f << bytes;
  return path;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const qt::Error& e) {
    return e.what();
  }
  return "(no error)";
}

DatasetRecord chat(std::vector<ChatMessage> msgs) {
  DatasetRecord r;
  r.conversation.messages = std::move(msgs);
  return r;
}

}  // namespace

// ---------------------------------------------------------------- labels by hand

TEST(Labels, ChatmlAssistantOnly) {
  TokenizeOptions o;
  o.chat_template = ChatTemplateKind::chatml;
  const auto lt = tokenize_record(chat({{"user", "Hi", {}, {}}, {"assistant", "Hello", {}, {}}}), qwen3(), o, byte_lengths());
  const std::vector<int32_t> ids = {kImStart, kUser, kNl, kHi, kImEnd, kNl, kImStart, kAssistant, kNl, kHello, kImEnd, kNl};
  EXPECT_EQ(lt.ids, ids);
  EXPECT_EQ(lt.labels, (std::vector<int32_t>{I, I, I, I, I, I, I, I, I, kHello, kImEnd, I}));
  EXPECT_FALSE(lt.segmented_fallback);
}

TEST(Labels, TrainOnInputs) {
  TokenizeOptions o;
  o.chat_template = ChatTemplateKind::chatml;
  o.train_on_inputs = true;
  const auto lt = tokenize_record(chat({{"user", "Hi", {}, {}}, {"assistant", "Hello", {}, {}}}), qwen3(), o, byte_lengths());
  std::vector<int32_t> want = lt.ids;
  want[0] = I;  // position 0 is never predicted
  EXPECT_EQ(lt.labels, want);
}

TEST(Labels, Qwen3ThinkBlockIsTrainedAndSystemDefaultOfQwen25IsNot) {
  TokenizeOptions o;
  o.chat_template = ChatTemplateKind::qwen3;
  const auto lt = tokenize_record(chat({{"user", "Hi", {}, {}}, {"assistant", "Hello", {}, {}}}), qwen3(), o, byte_lengths());
  EXPECT_EQ(lt.ids, (std::vector<int32_t>{kImStart, kUser, kNl, kHi, kImEnd, kNl, kImStart, kAssistant, kNl, kThink, kNlNl,
                                          kEndThink, kNlNl, kHello, kImEnd, kNl}));
  EXPECT_EQ(lt.labels, (std::vector<int32_t>{I, I, I, I, I, I, I, I, I, kThink, kNlNl, kEndThink, kNlNl, kHello, kImEnd, I}));

  o.chat_template = ChatTemplateKind::qwen2_5;
  const auto q25 = tokenize_record(chat({{"user", "Hi", {}, {}}, {"assistant", "Hello", {}, {}}}), qwen3(), o, byte_lengths());
  int trained = 0;
  for (int32_t l : q25.labels) trained += l != I;
  EXPECT_EQ(trained, 2);  // "Hello" and <|im_end|>; the default system prompt is masked
  EXPECT_EQ(q25.labels[q25.labels.size() - 3], kHello);
  EXPECT_EQ(q25.labels[q25.labels.size() - 2], kImEnd);
}

TEST(Labels, TextAppendsEos) {
  TokenizeOptions o;
  DatasetRecord r;
  r.is_text = true;
  r.text = "Hello";
  const auto lt = tokenize_record(r, qwen3(), o, byte_lengths());
  EXPECT_EQ(lt.ids, (std::vector<int32_t>{kHello, kImEnd}));  // eos of this tokenizer_config: <|im_end|>
  EXPECT_EQ(lt.labels, (std::vector<int32_t>{I, kImEnd}));
  o.append_eos = false;
  EXPECT_EQ(tokenize_record(r, qwen3(), o, byte_lengths()).ids, (std::vector<int32_t>{kHello}));
}

// The whole-text tokenization with offset labels equals the span-by-span tokenization on every
// golden conversation, except where a trained span starts with '\n' right after "assistant\n"
// (the two newlines merge into one masked token), and where NFC changes the text (then the
// pipeline itself tokenizes span by span).
TEST(Labels, WholeTextMatchesSegmentsOnGoldens) {
  for (const char* golden : {"golden_qwen3.json", "golden_qwen2.5.json"}) {
    std::ifstream f(std::string(QT_TEST_DATA) + "/chat/" + golden);
    std::stringstream ss;
    ss << f.rdbuf();
    const ojson g = ojson::parse(ss.str());
    const auto kind = std::string(golden) == "golden_qwen3.json" ? ChatTemplateKind::qwen3 : ChatTemplateKind::qwen2_5;
    int compared = 0, with_hf_ids = 0;
    for (const auto& c : g["cases"]) {
      if (c.contains("error")) continue;
      ojson rec = {{"messages", c["messages"]}};
      if (c.contains("tools")) rec["tools"] = c["tools"];
      RenderOptions ro;
      ro.add_generation_prompt = c["add_generation_prompt"].get<bool>();
      if (c.contains("enable_thinking")) ro.enable_thinking = c["enable_thinking"].get<bool>();
      const RenderedChat r = render_chat(kind, conversation_from_messages_json(rec), ro);
      const LabeledTokens whole = label_rendered_chat(r, qwen3(), false, byte_lengths());
      // Span by span.
      std::vector<int32_t> ids, labels;
      size_t pos = 0;
      bool newline_start = false;
      auto piece = [&](size_t b, size_t e, bool trained) {
        const auto t = qwen3().encode(std::string_view(r.text).substr(b, e - b));
        ids.insert(ids.end(), t.begin(), t.end());
        for (int32_t id : t) labels.push_back(trained ? id : I);
      };
      for (auto [b, e] : r.assistant_spans) {
        newline_start |= r.text[b] == '\n';
        piece(pos, b, false);
        piece(b, e, true);
        pos = e;
      }
      piece(pos, r.text.size(), false);
      if (!labels.empty()) labels[0] = I;
      if (!newline_start) {
        EXPECT_EQ(whole.ids, ids) << golden << " " << c["name"];
        EXPECT_EQ(whole.labels, labels) << golden << " " << c["name"];
      }
      // HF token ids of the same text (when the goldens carry them).
      if (c.contains("ids")) {
        EXPECT_EQ(qwen3().encode(r.text), c["ids"].get<std::vector<int32_t>>()) << c["name"];
        ++with_hf_ids;
      }
      if (c["name"] == "unicode") {
        EXPECT_TRUE(whole.segmented_fallback);  // "e\u0301" is not NFC
      }
      ++compared;
    }
    EXPECT_GE(compared, 30) << golden;
    if (kind == ChatTemplateKind::qwen3) {
      EXPECT_EQ(with_hf_ids, compared);
    }
  }
}

// A span starting with '\n' after "assistant\n": "\n\n" is one token that starts in the prompt.
TEST(Labels, NewlineMergeAtSpanStartIsMasked) {
  TokenizeOptions o;
  o.chat_template = ChatTemplateKind::chatml;
  const auto lt = tokenize_record(chat({{"user", "Hi", {}, {}}, {"assistant", "\nHello", {}, {}}}), qwen3(), o, byte_lengths());
  EXPECT_EQ(lt.ids, (std::vector<int32_t>{kImStart, kUser, kNl, kHi, kImEnd, kNl, kImStart, kAssistant, kNlNl, kHello, kImEnd, kNl}));
  EXPECT_EQ(lt.labels, (std::vector<int32_t>{I, I, I, I, I, I, I, I, I, kHello, kImEnd, I}));
}

// ---------------------------------------------------------------- formats

TEST(Formats, AutoDetectAndConvert) {
  ReadOptions ro;
  auto m = read_dataset_file(data_dir() + "messages.jsonl", ro);
  EXPECT_EQ(m.summary.format, DatasetFormat::messages);
  ASSERT_EQ(m.records.size(), 3u);
  EXPECT_EQ(m.records[2].line, 3);
  EXPECT_EQ(m.records[2].conversation.messages[1].tool_calls.at(0).name, "get_weather");
  EXPECT_EQ(m.records[1].conversation.messages[2].reasoning_content.value_or(""), "two plus two");

  auto a = read_dataset_file(data_dir() + "alpaca.json", ro);
  EXPECT_EQ(a.summary.format, DatasetFormat::alpaca);
  ASSERT_EQ(a.records.size(), 3u);
  EXPECT_EQ(a.records[0].line, 2);
  EXPECT_EQ(a.records[1].line, 7);
  const auto& c0 = a.records[0].conversation.messages;
  ASSERT_EQ(c0.size(), 2u);
  EXPECT_EQ(c0[0].role, "user");
  EXPECT_EQ(c0[0].content, "Translate to French.\n\nGood morning");
  EXPECT_EQ(c0[1].content, "Bonjour");
  EXPECT_EQ(a.records[1].conversation.messages[0].content, "Name a prime number.");  // empty input: no "\n\n"
  EXPECT_EQ(a.records[2].conversation.messages[0].role, "system");

  auto s = read_dataset_file(data_dir() + "sharegpt.jsonl", ro);
  EXPECT_EQ(s.summary.format, DatasetFormat::sharegpt);
  const auto& s0 = s.records[0].conversation.messages;
  EXPECT_EQ(s0[0].role, "system");
  EXPECT_EQ(s0[1].role, "user");
  EXPECT_EQ(s0[2].role, "assistant");
  EXPECT_EQ(s.records[1].conversation.messages[0].content, "Top-level system.");
  EXPECT_EQ(s.records[1].conversation.messages.size(), 5u);

  auto t = read_dataset_file(data_dir() + "text.jsonl", ro);
  EXPECT_EQ(t.summary.format, DatasetFormat::text);
  EXPECT_TRUE(t.records[0].is_text);
}

TEST(Formats, AlpacaRendersAsChat) {
  auto a = read_dataset_file(data_dir() + "alpaca.json", {});
  EXPECT_EQ(render_chat(ChatTemplateKind::qwen2_5, a.records[0].conversation).text,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>\n"
            "<|im_start|>assistant\nBonjour<|im_end|>\n");
}

TEST(Formats, OverrideMismatchNamesLine) {
  ReadOptions ro;
  ro.format = DatasetFormat::sharegpt;
  const std::string path = data_dir() + "messages.jsonl";
  EXPECT_EQ(error_of([&] { read_dataset_file(path, ro); }),
            "[data] " + path + ":1: record has no 'conversations' field (the file is in sharegpt format)");
  EXPECT_THROW(parse_dataset_format("csv"), qt::Error);
}

// ---------------------------------------------------------------- bad data

TEST(BadData, EachErrorNamesFileAndLine) {
  struct Case {
    std::string bytes, expected;
  };
  const std::string ok = R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})";
  const std::vector<Case> cases = {
      {ok + "\n{\"messages\": [\n", "x.jsonl:2: invalid JSON (column 15): syntax error while parsing value - unexpected end of input"},
      {ok + "\n\n" + R"({"messages": [{"role": "user"}]})", "x.jsonl:3: messages[0]: missing field 'content'"},
      {R"({"messages": [{"role": "user", "content": ["a"]}]})",
       "x.jsonl:1: messages[0]: field 'content' must be a string, got an array"},
      {R"({"messages": [{"role": 7, "content": "a"}]})", "x.jsonl:1: messages[0]: field 'role' must be a string, got a number"},
      {R"({"messages": [{"role": "bot", "content": "a"}]})",
       "x.jsonl:1: messages[0]: role 'bot' is not one of system, user, assistant, tool"},
      {R"({"messages": []})", "x.jsonl:1: 'messages' is empty"},
      {R"({"conversations": []})", "x.jsonl:1: 'conversations' is empty"},
      {R"({"conversations": [{"from": "narrator", "value": "a"}]})",
       "x.jsonl:1: conversations[0]: 'from' value 'narrator' is not a known role"},
      {ok + "\n{\"messages\": [{\"role\": \"user\", \"content\": \"\xc3\x28\"}]}", "x.jsonl:2: invalid UTF-8 at byte 43 of the record"},
      {R"({"text": ""})", "x.jsonl:1: field 'text' is empty"},
      {R"({"text": 3})", "x.jsonl:1: record: field 'text' must be a string, got a number"},
      {R"(["text"])", "x.jsonl:1: record must be a JSON object, got a string"},  // a JSON array file
      {ok + "\n[1]", "x.jsonl:2: record must be a JSON object, got an array"},
      {R"({"prompt": "a"})", "x.jsonl:1: cannot tell the dataset format from the keys [prompt]"},
      {R"({"instruction": "a", "output": 1})", "x.jsonl:1: record: field 'output' must be a string, got a number"},
      {R"({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]}]})",
       "x.jsonl:1: messages[0].tool_calls[0].function: missing field 'arguments'"},
      {"[\n" + ok + ",\n  {\"text\": \n]", "x.jsonl:4: invalid JSON (column 1): syntax error while parsing value - unexpected ']'"},
      {"[\n" + ok + ",\n" + ok + "\n", "x.jsonl:4: unterminated JSON array (no closing ']')"},
      {std::string(100, '[') + std::string(100, ']'), "x.jsonl:1: JSON nested deeper than 64 levels"},
  };
  for (const auto& c : cases) {
    const std::string err = error_of([&] { read_dataset_bytes(c.bytes, "x.jsonl", {}); });
    EXPECT_EQ(err.rfind("[data] " + c.expected, 0), 0u) << "got: " << err << "\nwanted prefix: " << c.expected;
  }
  // Empty files and whole files of bad records.
  EXPECT_EQ(error_of([&] { read_dataset_bytes("\n\n", "e.jsonl", {}); }), "[data] e.jsonl: no records (the file is empty)");
  EXPECT_EQ(error_of([&] { read_dataset_file(data_dir() + "missing.jsonl", {}); }),
            "[data] " + data_dir() + "missing.jsonl: cannot open the dataset file");
}

TEST(BadData, StrictStopsAtFirstBadLine) {
  const std::string path = data_dir() + "bad_mixed.jsonl";
  EXPECT_EQ(error_of([&] { read_dataset_file(path, {}); }).rfind("[data] " + path + ":2: invalid JSON", 0), 0u);
}

TEST(BadData, LenientSkipsAndCounts) {
  ReadOptions ro;
  ro.lenient = true;
  const auto r = read_dataset_file(data_dir() + "bad_mixed.jsonl", ro);
  ASSERT_EQ(r.records.size(), 4u);
  EXPECT_EQ(r.records[0].line, 1);
  EXPECT_EQ(r.records[1].line, 8);
  EXPECT_EQ(r.records[2].line, 11);
  EXPECT_EQ(r.records[3].line, 12);
  EXPECT_EQ(r.summary.records_seen, 11);  // the blank line 4 is not a record
  EXPECT_EQ(r.summary.records_kept, 4);
  EXPECT_EQ(r.summary.records_skipped, 7);
  const std::map<std::string, int64_t> want = {{"invalid JSON", 1}, {"missing field", 1}, {"wrong field type", 1},
                                               {"unknown role", 1}, {"empty conversation", 1}, {"invalid UTF-8", 1},
                                               {"format mismatch", 1}};
  EXPECT_EQ(r.summary.skipped_by_reason, want);
  ASSERT_EQ(r.summary.first_problems.size(), 5u);
  EXPECT_NE(r.summary.first_problems[2].find("bad_mixed.jsonl:5: "), std::string::npos);
  ReadOptions all_bad = ro;
  EXPECT_NE(error_of([&] { read_dataset_bytes("{\"x\": 1}\n[]\n", "b.jsonl", all_bad); }).find("no usable records"),
            std::string::npos);
}

// ---------------------------------------------------------------- truncation and packing

TEST(Packing, BestFitDecreasingByHand) {
  // Capacity 10: sorted 7(0) 6(3) 5(1) 4(4) 3(2) 2(5) -> bins {7,3} {6,4} {5,2}.
  const auto bins = pack_best_fit_decreasing({7, 5, 3, 6, 4, 2}, 10);
  ASSERT_EQ(bins.size(), 3u);
  EXPECT_EQ(bins[0], (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(bins[1], (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(bins[2], (std::vector<int64_t>{1, 5}));
}

TEST(Packing, DocumentsKeepPositionsSegmentsAndLabels) {
  std::vector<DatasetRecord> recs;
  for (const char* t : {"one two three four five six seven", "alpha beta", "x", "the quick brown fox jumps", "z y x w v u"}) {
    DatasetRecord r;
    r.is_text = true;
    r.text = t;
    recs.push_back(r);
  }
  TokenizeOptions o;
  o.sequence_len = 12;
  const TokenizedDataset plain = tokenize_records(recs, qwen3(), o);
  o.packing = true;
  const TokenizedDataset packed = tokenize_records(recs, qwen3(), o);
  ASSERT_EQ(plain.size(), 5);
  EXPECT_LT(packed.size(), plain.size());
  EXPECT_EQ(packed.stats.tokens, plain.stats.tokens);
  EXPECT_EQ(packed.stats.trained_tokens, plain.stats.trained_tokens);
  // Every unpacked example appears exactly once as a document of some pack, with its labels.
  std::multiset<std::vector<int32_t>> want, got;
  for (int64_t i = 0; i < plain.size(); ++i) want.insert({plain.ids(i).begin(), plain.ids(i).end()});
  std::vector<int32_t> pos, seg;
  for (int64_t i = 0; i < packed.size(); ++i) {
    EXPECT_LE(packed.length(i), 12);
    packed.positions_and_segments(i, pos, seg);
    const auto ids = packed.ids(i);
    const auto labels = packed.label_span(i);
    int64_t start = 0;
    int32_t segment = 0;
    for (int32_t len : packed.docs(i)) {
      got.insert({ids.begin() + start, ids.begin() + start + len});
      EXPECT_EQ(labels[size_t(start)], I) << "first token of a document is never a target";
      for (int32_t p = 0; p < len; ++p) {
        EXPECT_EQ(pos[size_t(start + p)], p);
        EXPECT_EQ(seg[size_t(start + p)], segment);
        if (p > 0) {
          EXPECT_EQ(labels[size_t(start + p)], ids[size_t(start + p)]);
        }
      }
      start += len;
      ++segment;
    }
    EXPECT_EQ(start, packed.length(i));
  }
  EXPECT_EQ(got, want);
}

TEST(Truncation, TruncateOrDrop) {
  DatasetRecord longer;
  longer.is_text = true;
  longer.text = "a b c d e f g h i j k l m n o p";
  DatasetRecord shorter = longer;
  shorter.text = "a b";
  TokenizeOptions o;
  o.sequence_len = 5;
  const TokenizedDataset t = tokenize_records({longer, shorter}, qwen3(), o);
  EXPECT_EQ(t.stats.truncated, 1);
  EXPECT_EQ(t.length(0), 5);
  const std::vector<int32_t> full = qwen3().encode(longer.text);
  EXPECT_EQ(std::vector<int32_t>(t.ids(0).begin(), t.ids(0).end()), std::vector<int32_t>(full.begin(), full.begin() + 5));
  o.truncation = TruncationMode::drop;
  const TokenizedDataset d = tokenize_records({longer, shorter}, qwen3(), o);
  EXPECT_EQ(d.stats.dropped_too_long, 1);
  EXPECT_EQ(d.size(), 1);
  // A chat whose assistant turn is cut off entirely has nothing to train and is dropped.
  TokenizeOptions c;
  c.chat_template = ChatTemplateKind::chatml;
  c.sequence_len = 6;
  const auto conv = chat({{"user", "Hi", {}, {}}, {"assistant", "Hello", {}, {}}});
  EXPECT_NE(error_of([&] { tokenize_records({conv}, qwen3(), c); }).find("1 without trained tokens"), std::string::npos);
}

// ---------------------------------------------------------------- cache

TEST(Cache, HitCorruptionAndSettings) {
  const std::string dir = temp_dir("cache");
  DatasetOptions o;
  o.path = data_dir() + "messages.jsonl";
  o.tokenize.chat_template = ChatTemplateKind::qwen3;
  o.tokenize.sequence_len = 256;
  o.cache_dir = dir;
  const std::string fp = tokenizer_fingerprint(qwen3_dir());
  const LoadedDataset first = load_dataset(o, qwen3(), fp);
  EXPECT_FALSE(first.from_cache);
  EXPECT_EQ(first.cache_note, "");
  ASSERT_TRUE(fs::exists(first.cache_file));
  const LoadedDataset second = load_dataset(o, qwen3(), fp);
  EXPECT_TRUE(second.from_cache);
  EXPECT_EQ(second.data.input_ids, first.data.input_ids);
  EXPECT_EQ(second.data.labels, first.data.labels);
  EXPECT_EQ(second.data.seq_offsets, first.data.seq_offsets);
  EXPECT_EQ(second.data.doc_lengths, first.data.doc_lengths);
  EXPECT_EQ(second.data.stats.trained_tokens, first.data.stats.trained_tokens);
  EXPECT_EQ(second.data.read_summary.records_kept, 3);
  EXPECT_EQ(describe_dataset(second.data).rfind("records: 3 read (messages format), 3 kept, 0 skipped\nexamples: 3 tokenized, "
                                                "3 kept, 0 truncated, 0 dropped as too long, 0 dropped with nothing to train\n"
                                                "sequences: 3 (", 0),
            0u)
      << describe_dataset(second.data);

  // One flipped byte in the token area: ignored, rebuilt, rewritten.
  std::string bytes;
  {
    std::ifstream f(first.cache_file, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    bytes = ss.str();
  }
  std::string flipped = bytes;
  flipped[flipped.size() - 40] ^= 0x01;
  write_file(first.cache_file, flipped);
  const LoadedDataset third = load_dataset(o, qwen3(), fp);
  EXPECT_FALSE(third.from_cache);
  EXPECT_NE(third.cache_note.find("checksum mismatch"), std::string::npos) << third.cache_note;
  EXPECT_EQ(third.data.input_ids, first.data.input_ids);
  EXPECT_TRUE(load_dataset(o, qwen3(), fp).from_cache);  // the rebuilt file is good again

  // Truncated file and garbage: rebuilt.
  write_file(first.cache_file, bytes.substr(0, bytes.size() / 2));
  EXPECT_FALSE(load_dataset(o, qwen3(), fp).from_cache);
  write_file(first.cache_file, "garbage");
  EXPECT_NE(load_dataset(o, qwen3(), fp).cache_note.find("file too short"), std::string::npos);

  // Other settings use another file; a valid file of other settings put in its place is refused.
  DatasetOptions other = o;
  other.tokenize.train_on_inputs = true;
  const LoadedDataset o1 = load_dataset(other, qwen3(), fp);
  EXPECT_NE(o1.cache_file, first.cache_file);
  EXPECT_FALSE(o1.from_cache);
  fs::copy_file(first.cache_file, o1.cache_file, fs::copy_options::overwrite_existing);
  const LoadedDataset o2 = load_dataset(other, qwen3(), fp);
  EXPECT_FALSE(o2.from_cache);
  EXPECT_NE(o2.cache_note.find("made with other settings"), std::string::npos) << o2.cache_note;
  EXPECT_GT(o2.data.stats.trained_tokens, first.data.stats.trained_tokens);

  // A changed dataset file changes the key.
  const std::string copy = write_file(dir + "/copy.jsonl", "{\"text\": \"hello\"}\n");
  DatasetOptions t = o;
  t.path = copy;
  const LoadedDataset a = load_dataset(t, qwen3(), fp);
  write_file(copy, "{\"text\": \"hello there\"}\n");
  const LoadedDataset b = load_dataset(t, qwen3(), fp);
  EXPECT_NE(a.cache_file, b.cache_file);
  EXPECT_FALSE(b.from_cache);
  fs::remove_all(dir);
}

TEST(Cache, Sha256KnownVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// ---------------------------------------------------------------- batches

TEST(Batches, DeterministicShuffleAndPadding) {
  const auto read = read_dataset_file(data_dir() + "text.jsonl", {});
  TokenizeOptions o;
  o.sequence_len = 64;
  const TokenizedDataset ds = tokenize_records(read.records, qwen3(), o);
  ASSERT_EQ(ds.size(), 4);
  BatchOptions bo;
  bo.micro_batch_size = 3;
  bo.seed = 1234;
  bo.pad_id = 151643;
  bo.pad_to_multiple = 8;
  BatchIterator it(ds, bo), again(ds, bo);
  EXPECT_EQ(it.batches_per_epoch(), 2);
  // Same seed -> same order; the order is a permutation; another epoch -> (here) another order.
  const auto e0 = epoch_order(4, 1234, 0, true), e1 = epoch_order(4, 1234, 1, true);
  EXPECT_EQ(std::set<int64_t>(e0.begin(), e0.end()), (std::set<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(epoch_order(4, 1234, 0, false), (std::vector<int64_t>{0, 1, 2, 3}));
  qt::Batch b, c;
  it.next(b);
  again.next(c);
  EXPECT_EQ(b.input_ids, c.input_ids);
  EXPECT_EQ(b.B, 3);
  EXPECT_EQ(b.S % 8, 0);
  for (int64_t r = 0; r < b.B; ++r) {
    const int64_t s = e0[size_t(r)];
    const int64_t len = ds.length(s);
    for (int64_t t = 0; t < b.S; ++t) {
      const size_t k = size_t(r * b.S + t);
      if (t < len) {
        EXPECT_EQ(b.input_ids[k], ds.ids(s)[size_t(t)]);
        EXPECT_EQ(b.labels[k], ds.label_span(s)[size_t(t)]);
        EXPECT_EQ(b.position_ids[k], t);
        EXPECT_EQ(b.segment_ids[k], 0);
      } else {
        EXPECT_EQ(b.input_ids[k], 151643);
        EXPECT_EQ(b.labels[k], I);
        EXPECT_EQ(b.segment_ids[k], 1);
      }
    }
  }
  it.next(b);
  EXPECT_EQ(b.B, 1);  // the last, smaller batch
  it.next(b);         // wraps to epoch 1
  EXPECT_EQ(it.epoch(), 1);
  EXPECT_EQ(it.order(), e1);
  // seek() reproduces a position.
  BatchIterator resumed(ds, bo);
  resumed.seek(1, 0);
  resumed.next(c);
  EXPECT_EQ(b.input_ids, c.input_ids);
  bo.micro_batch_size = 0;
  EXPECT_THROW(BatchIterator(ds, bo), qt::Error);
}

// ---------------------------------------------------------------- CLI

TEST(Cli, DataPreviewMarksTrainedSpans) {
  const std::string cmd = std::string(QT_BINARY) + " data preview --tokenizer " + qwen3_dir() + " --data " + data_dir() +
                          "messages.jsonl --index 0 --chat-template chatml 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  EXPECT_EQ(::pclose(p), 0) << out;
  EXPECT_NE(out.find("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>]]\n"), std::string::npos) << out;
  EXPECT_NE(out.find("tokens: 12, trained: 2, masked: 10"), std::string::npos) << out;
  EXPECT_NE(out.find("line 1"), std::string::npos) << out;

  const std::string bad = std::string(QT_BINARY) + " data preview --tokenizer " + qwen3_dir() + " --data " + data_dir() +
                          "bad_mixed.jsonl 2>&1";
  p = ::popen(bad.c_str(), "r");
  ASSERT_NE(p, nullptr);
  out.clear();
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  EXPECT_NE(::pclose(p), 0);
  EXPECT_NE(out.find("bad_mixed.jsonl:2: invalid JSON"), std::string::npos) << out;
}
