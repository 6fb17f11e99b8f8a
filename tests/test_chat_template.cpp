// Chat templates: native renderings must equal transformers' apply_chat_template(tokenize=False)
// byte for byte (goldens from tools/make_chat_golden.py), assistant spans must cover exactly each
// assistant body + <|im_end|>, and template detection must accept the published versions only.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/dataset_reader.h"
#include "data/py_json.h"

using namespace qt::data;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << path;
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

ojson load_json(const std::string& path) { return ojson::parse(read_file(path)); }

std::string chat_dir() { return std::string(QT_TEST_DATA) + "/chat/"; }

Conversation conversation_of(const ojson& c) {
  ojson rec = ojson::object();
  rec["messages"] = c["messages"];
  if (c.contains("tools")) rec["tools"] = c["tools"];
  return conversation_from_messages_json(rec);
}

RenderOptions options_of(const ojson& c) {
  RenderOptions o;
  o.add_generation_prompt = c["add_generation_prompt"].get<bool>();
  if (c.contains("enable_thinking")) o.enable_thinking = c["enable_thinking"].get<bool>();
  return o;
}

// Runs every golden case of one file; returns how many were compared.
int check_golden(const std::string& golden_name, ChatTemplateKind kind) {
  const ojson g = load_json(chat_dir() + "golden_" + golden_name + ".json");
  int compared = 0;
  for (const auto& c : g["cases"]) {
    const std::string name = c["name"].get<std::string>();
    if (c.contains("error")) continue;  // the Jinja template itself fails on this input
    const RenderedChat r = render_chat(kind, conversation_of(c), options_of(c));
    EXPECT_EQ(r.text, c["expected"].get<std::string>()) << golden_name << " case " << name;
    // Each span: right after "<|im_start|>assistant\n", ends with "<|im_end|>" followed by "\n".
    size_t n_assistant = 0;
    for (const auto& m : c["messages"]) n_assistant += m["role"] == "assistant";
    EXPECT_EQ(r.assistant_spans.size(), n_assistant) << name;
    for (auto [b, e] : r.assistant_spans) {
      const std::string head = "<|im_start|>assistant\n";
      if (b < head.size() || e < b + 10) {
        ADD_FAILURE() << name << ": span out of place";
        continue;
      }
      EXPECT_EQ(r.text.substr(b - head.size(), head.size()), head) << name;
      EXPECT_EQ(r.text.substr(e - 10, 10), "<|im_end|>") << name;
      EXPECT_EQ(r.text.substr(e, 1), "\n") << name;
      EXPECT_EQ(r.text.substr(b, e - b).find("<|im_start|>"), std::string::npos) << name;
    }
    ++compared;
  }
  return compared;
}

}  // namespace

TEST(ChatTemplate, GoldenQwen3) { EXPECT_GE(check_golden("qwen3", ChatTemplateKind::qwen3), 30); }
TEST(ChatTemplate, GoldenQwen3LaterRevision) { EXPECT_GE(check_golden("qwen3_v2", ChatTemplateKind::qwen3), 30); }
TEST(ChatTemplate, GoldenQwen25) { EXPECT_GE(check_golden("qwen2.5", ChatTemplateKind::qwen2_5), 30); }
TEST(ChatTemplate, GoldenQwen2) { EXPECT_GE(check_golden("qwen2", ChatTemplateKind::qwen2), 30); }
TEST(ChatTemplate, GoldenChatml) { EXPECT_GE(check_golden("chatml", ChatTemplateKind::chatml), 30); }

TEST(ChatTemplate, GoldensCoverTheRequiredFeatures) {
  const ojson g = load_json(chat_dir() + "golden_qwen3.json");
  bool tools = false, tool_calls = false, tool_run = false, reasoning = false, think_inline = false,
       thinking_off = false, gen = false, no_gen = false, unicode = false;
  for (const auto& c : g["cases"]) {
    tools |= c.contains("tools");
    gen |= c["add_generation_prompt"].get<bool>();
    no_gen |= !c["add_generation_prompt"].get<bool>();
    thinking_off |= c.contains("enable_thinking") && !c["enable_thinking"].get<bool>();
    const auto& ms = c["messages"];
    for (size_t i = 0; i < ms.size(); ++i) {
      tool_calls |= ms[i].contains("tool_calls");
      reasoning |= ms[i].contains("reasoning_content");
      if (ms[i]["content"].is_string()) {
        const auto s = ms[i]["content"].get<std::string>();
        think_inline |= s.find("</think>") != std::string::npos;
        for (unsigned char ch : s) unicode |= ch >= 0x80;
      }
      tool_run |= i > 0 && ms[i]["role"] == "tool" && ms[i - 1]["role"] == "tool";
    }
  }
  EXPECT_TRUE(tools && tool_calls && tool_run && reasoning && think_inline && thinking_off && gen && no_gen && unicode);
}

// A null assistant content next to tool calls: the first Qwen3 template fails on it in Jinja; the
// later revision (and this renderer) treat it as "".
TEST(ChatTemplate, NullContentRendersLikeLaterQwen3Revision) {
  const ojson g = load_json(chat_dir() + "golden_qwen3_v2.json");
  for (const auto& c : g["cases"]) {
    if (c["name"] != "tool_call_null_content") continue;
    ASSERT_FALSE(c.contains("error"));
    EXPECT_EQ(render_chat(ChatTemplateKind::qwen3, conversation_of(c), options_of(c)).text,
              c["expected"].get<std::string>());
    return;
  }
  FAIL() << "case tool_call_null_content missing";
}

TEST(ChatTemplate, DetectsPublishedTemplates) {
  const std::pair<const char*, ChatTemplateKind> files[] = {
      {"qwen3_tokenizer_config.json", ChatTemplateKind::qwen3},
      {"qwen3_v2_tokenizer_config.json", ChatTemplateKind::qwen3},
      {"qwen2.5_tokenizer_config.json", ChatTemplateKind::qwen2_5},
      {"qwen2_tokenizer_config.json", ChatTemplateKind::qwen2},
      {"chatml_tokenizer_config.json", ChatTemplateKind::chatml},
  };
  for (auto [file, kind] : files) {
    const std::string tmpl = load_json(chat_dir() + file)["chat_template"].get<std::string>();
    EXPECT_EQ(detect_chat_template(tmpl, file), kind) << file;
    // Re-indentation, CRLF line ends and a trailing newline do not change the verdict.
    std::string crlf;
    for (char ch : tmpl) {
      if (ch == '\n') crlf += "\r\n  ";
      else crlf.push_back(ch);
    }
    EXPECT_EQ(detect_chat_template(crlf + "\n", file), kind) << file;
  }
}

TEST(ChatTemplate, RefusesUnknownOrEditedTemplates) {
  std::string tmpl = load_json(chat_dir() + "qwen3_tokenizer_config.json")["chat_template"].get<std::string>();
  const size_t p = tmpl.find("<think>\\n\\n</think>\\n\\n");
  ASSERT_NE(p, std::string::npos);
  tmpl.replace(p, 7, "<thinking>");  // an edited generation prompt must not be rendered as qwen3
  try {
    detect_chat_template(tmpl, "model/tokenizer_config.json");
    FAIL() << "edited template accepted";
  } catch (const qt::Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("[chat] model/tokenizer_config.json: unknown chat_template", 0), 0u) << msg;
    EXPECT_NE(msg.find("resembles qwen3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("<|im_start|>"), std::string::npos) << msg;
  }
  const std::string llama = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{% endfor %}";
  try {
    detect_chat_template(llama, "x.json");
    FAIL();
  } catch (const qt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("resembles no Qwen template"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("Llama 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(detect_chat_template("", "y.json"), qt::Error);
}

TEST(ChatTemplate, NamesAndErrors) {
  EXPECT_EQ(parse_chat_template_name("qwen2.5"), ChatTemplateKind::qwen2_5);
  EXPECT_EQ(parse_chat_template_name("qwen3"), ChatTemplateKind::qwen3);
  EXPECT_EQ(parse_chat_template_name("chatml"), ChatTemplateKind::chatml);
  EXPECT_THROW(parse_chat_template_name("llama3"), qt::Error);
  Conversation empty;
  EXPECT_THROW(render_chat(ChatTemplateKind::qwen3, empty), qt::Error);
  Conversation odd;
  odd.messages.push_back({"narrator", "x", {}, {}});
  try {
    render_chat(ChatTemplateKind::qwen2_5, odd);
    FAIL();
  } catch (const qt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("role 'narrator'"), std::string::npos);
  }
}

// Hand-checked spans on a small conversation.
TEST(ChatTemplate, AssistantSpansByHand) {
  Conversation c;
  c.messages = {{"user", "Hi", {}, {}}, {"assistant", "Hello", {}, {}}, {"user", "Bye", {}, {}}, {"assistant", "Ciao", {}, {}}};
  const RenderedChat r = render_chat(ChatTemplateKind::chatml, c);
  EXPECT_EQ(r.text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n");
  ASSERT_EQ(r.assistant_spans.size(), 2u);
  EXPECT_EQ(r.text.substr(r.assistant_spans[0].first, r.assistant_spans[0].second - r.assistant_spans[0].first),
            "Hello<|im_end|>");
  EXPECT_EQ(r.text.substr(r.assistant_spans[1].first, r.assistant_spans[1].second - r.assistant_spans[1].first),
            "Ciao<|im_end|>");
  const RenderedChat q3 = render_chat(ChatTemplateKind::qwen3, c);
  EXPECT_EQ(q3.text.substr(q3.assistant_spans[1].first),
            "<think>\n\n</think>\n\nCiao<|im_end|>\n");  // the last turn gets the empty think block
}

TEST(PyJson, MatchesPythonJsonDumps) {
  // Expected strings are what CPython 3 json.dumps(x, ensure_ascii=False) prints.
  EXPECT_EQ(python_json_dumps(ojson::parse(R"({"b": 1, "a": [true, null, "x"]})")), R"({"b": 1, "a": [true, null, "x"]})");
  EXPECT_EQ(python_json_dumps(ojson::parse(R"("tab\t nl\n q\" bs\\ \u0001 \u007f é")")),
            "\"tab\\t nl\\n q\\\" bs\\\\ \\u0001 \x7f é\"");
  EXPECT_EQ(python_float_repr(1.5), "1.5");
  EXPECT_EQ(python_float_repr(2.0), "2.0");
  EXPECT_EQ(python_float_repr(1e20), "1e+20");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1e15), "1000000000000000.0");
  EXPECT_EQ(python_float_repr(1e-7), "1e-07");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(0.00012345), "0.00012345");
  EXPECT_EQ(python_float_repr(-0.25), "-0.25");
  EXPECT_EQ(python_float_repr(-0.0), "-0.0");
  EXPECT_EQ(python_float_repr(0.1 + 0.2), "0.30000000000000004");
  EXPECT_EQ(python_float_repr(123456789012345680.0), "1.2345678901234568e+17");
  EXPECT_EQ(python_float_repr(1.7976931348623157e308), "1.7976931348623157e+308");
  EXPECT_EQ(python_float_repr(5e-324), "5e-324");
}
