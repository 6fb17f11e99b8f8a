// Native renderers of the Qwen chat templates (see chat_template.h). Each function follows its
// Jinja source statement by statement; comments quote the template where the behaviour is subtle.
#include "data/chat_template.h"

#include <algorithm>
#include <array>

#include "core/error.h"
#include "core/sha256.h"

namespace qt::data {
namespace {

constexpr const char* kQwen25DefaultSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
constexpr const char* kQwen2DefaultSystem = "You are a helpful assistant.";
constexpr const char* kToolsIntro =
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
constexpr const char* kToolsOutro =
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n";

// Appends text and records the trained byte range of each assistant turn.
class Builder {
 public:
  void add(std::string_view s) { out_.text.append(s); }
  void begin_assistant() { span_begin_ = out_.text.size(); }  // right after "<|im_start|>assistant\n"
  void end_assistant() {                                       // right after that turn's "<|im_end|>"
    out_.assistant_spans.emplace_back(span_begin_, out_.text.size());
  }
  RenderedChat take() { return std::move(out_); }

 private:
  RenderedChat out_;
  size_t span_begin_ = 0;
};

// Python str.strip/lstrip/rstrip with the argument '\n'.
std::string_view lstrip_nl(std::string_view s) {
  while (!s.empty() && s.front() == '\n') s.remove_prefix(1);
  return s;
}
std::string_view rstrip_nl(std::string_view s) {
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return s;
}
std::string_view strip_nl(std::string_view s) { return lstrip_nl(rstrip_nl(s)); }

// Python s.split(sep)[0] and s.split(sep)[-1].
std::string_view before_first(std::string_view s, std::string_view sep) {
  const size_t p = s.find(sep);
  return p == std::string_view::npos ? s : s.substr(0, p);
}
std::string_view after_last(std::string_view s, std::string_view sep) {
  const size_t p = s.rfind(sep);
  return p == std::string_view::npos ? s : s.substr(p + sep.size());
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

void check_roles(const Conversation& conv, ChatTemplateKind kind) {
  if (conv.messages.empty()) qt::fail("chat", "cannot render an empty conversation");
  for (size_t i = 0; i < conv.messages.size(); ++i) {
    const std::string& r = conv.messages[i].role;
    if (r != "system" && r != "user" && r != "assistant" && r != "tool")
      qt::fail("chat", "message {}: role '{}' is not one of system, user, assistant, tool ({} template)", i, r,
               chat_template_name(kind));
  }
}

void render_tools_system(Builder& b, const Conversation& conv, const char* default_system, bool blank_line_after) {
  // qwen2.5: system text (or the default) + "\n\n# Tools..."; qwen3: system text + "\n\n" only if present.
  b.add("<|im_start|>system\n");
  const bool has_system = conv.messages[0].role == "system";
  if (has_system) b.add(conv.messages[0].content);
  else if (default_system) b.add(default_system);
  if (has_system || blank_line_after) b.add("\n\n");
  b.add(kToolsIntro);
  for (const auto& tool : conv.tools) {
    b.add("\n");
    b.add(python_json_dumps(tool));
  }
  b.add(kToolsOutro);
}

void render_tool_call(Builder& b, const ToolCall& tc, bool string_arguments_verbatim) {
  b.add("<tool_call>\n{\"name\": \"");
  b.add(tc.name);
  b.add("\", \"arguments\": ");
  if (string_arguments_verbatim && tc.arguments.is_string()) b.add(tc.arguments.get_ref<const std::string&>());
  else b.add(python_json_dumps(tc.arguments));
  b.add("}\n</tool_call>");
}

// Tool messages: consecutive ones share one user turn.
void render_tool_message(Builder& b, const std::vector<ChatMessage>& m, size_t i) {
  if (i == 0 || m[i - 1].role != "tool") b.add("<|im_start|>user");
  b.add("\n<tool_response>\n");
  b.add(m[i].content);
  b.add("\n</tool_response>");
  if (i + 1 == m.size() || m[i + 1].role != "tool") b.add("<|im_end|>\n");
}

void render_plain_turn(Builder& b, const ChatMessage& msg) {
  b.add("<|im_start|>");
  b.add(msg.role);
  b.add("\n");
  if (msg.role == "assistant") b.begin_assistant();
  b.add(msg.content);
  b.add("<|im_end|>");
  if (msg.role == "assistant") b.end_assistant();
  b.add("\n");
}

RenderedChat render_chatml(const Conversation& conv, const RenderOptions& opts, const char* default_system) {
  Builder b;
  // {% if loop.first and messages[0]['role'] != 'system' %} default system {% endif %}
  if (default_system && conv.messages[0].role != "system") {
    b.add("<|im_start|>system\n");
    b.add(default_system);
    b.add("<|im_end|>\n");
  }
  for (const auto& msg : conv.messages) render_plain_turn(b, msg);
  if (opts.add_generation_prompt) b.add("<|im_start|>assistant\n");
  return b.take();
}

RenderedChat render_qwen25(const Conversation& conv, const RenderOptions& opts) {
  Builder b;
  const auto& m = conv.messages;
  if (!conv.tools.empty()) {
    render_tools_system(b, conv, kQwen25DefaultSystem, /*blank_line_after=*/true);
  } else {
    b.add("<|im_start|>system\n");
    b.add(m[0].role == "system" ? std::string_view(m[0].content) : std::string_view(kQwen25DefaultSystem));
    b.add("<|im_end|>\n");
  }
  for (size_t i = 0; i < m.size(); ++i) {
    const ChatMessage& msg = m[i];
    if (msg.role == "user" || (msg.role == "system" && i > 0) ||
        (msg.role == "assistant" && msg.tool_calls.empty())) {
      render_plain_turn(b, msg);
    } else if (msg.role == "assistant") {
      // '<|im_start|>assistant' ['\n' + content] ('\n<tool_call>...' per call) '<|im_end|>\n'; every
      // branch continues with '\n', so the trained body starts after "<|im_start|>assistant\n".
      b.add("<|im_start|>assistant\n");
      b.begin_assistant();
      bool need_newline = false;  // the '\n' already written stands for the first one
      if (!msg.content.empty()) {
        b.add(msg.content);
        need_newline = true;
      }
      for (const auto& tc : msg.tool_calls) {
        if (need_newline) b.add("\n");
        need_newline = true;
        render_tool_call(b, tc, /*string_arguments_verbatim=*/false);
      }
      b.add("<|im_end|>");
      b.end_assistant();
      b.add("\n");
    } else if (msg.role == "tool") {
      render_tool_message(b, m, i);
    }
  }
  if (opts.add_generation_prompt) b.add("<|im_start|>assistant\n");
  return b.take();
}

RenderedChat render_qwen3(const Conversation& conv, const RenderOptions& opts) {
  Builder b;
  const auto& m = conv.messages;
  if (!conv.tools.empty()) {
    render_tools_system(b, conv, nullptr, /*blank_line_after=*/false);
  } else if (m[0].role == "system") {
    b.add("<|im_start|>system\n");
    b.add(m[0].content);
    b.add("<|im_end|>\n");
  }
  // The last "real" user query: scanning backwards, the first user message that is not a
  // <tool_response>...</tool_response> wrapper. Default: the last index.
  size_t last_query = m.size() - 1;
  for (size_t k = m.size(); k-- > 0;) {
    const auto& c = m[k].content;
    if (m[k].role == "user" && !(starts_with(c, "<tool_response>") && ends_with(c, "</tool_response>"))) {
      last_query = k;
      break;
    }
  }
  for (size_t i = 0; i < m.size(); ++i) {
    const ChatMessage& msg = m[i];
    if (msg.role == "user" || (msg.role == "system" && i > 0)) {
      render_plain_turn(b, msg);
    } else if (msg.role == "assistant") {
      std::string_view content = msg.content;
      std::string_view reasoning;
      if (msg.reasoning_content) {
        reasoning = *msg.reasoning_content;
      } else if (content.find("</think>") != std::string_view::npos) {
        reasoning = lstrip_nl(after_last(rstrip_nl(before_first(content, "</think>")), "<think>"));
        content = lstrip_nl(after_last(content, "</think>"));
      }
      b.add("<|im_start|>assistant\n");
      b.begin_assistant();
      const bool last = i + 1 == m.size();
      if (i > last_query && (last || !reasoning.empty())) {
        b.add("<think>\n");
        b.add(strip_nl(reasoning));
        b.add("\n</think>\n\n");
        b.add(lstrip_nl(content));
      } else {
        b.add(content);
      }
      for (size_t t = 0; t < msg.tool_calls.size(); ++t) {
        // {%- if (loop.first and content) or (not loop.first) %}'\n'  (content before lstrip)
        if (t > 0 || !content.empty()) b.add("\n");
        render_tool_call(b, msg.tool_calls[t], /*string_arguments_verbatim=*/true);
      }
      b.add("<|im_end|>");
      b.end_assistant();
      b.add("\n");
    } else if (msg.role == "tool") {
      render_tool_message(b, m, i);
    }
  }
  if (opts.add_generation_prompt) {
    b.add("<|im_start|>assistant\n");
    if (opts.enable_thinking.has_value() && !*opts.enable_thinking) b.add("<think>\n\n</think>\n\n");
  }
  return b.take();
}

struct KnownTemplate {
  const char* sha256;  // of the normalised text
  ChatTemplateKind kind;
  const char* description;
};

// Fingerprints of the published template texts (tests/data/chat/*_tokenizer_config.json hold them).
constexpr std::array<KnownTemplate, 5> kKnown{{
    {"fcf7a096fe99a48fd9ad2b250bf9237e96e8f48bffec1c7ea4d3f225176cd40e", ChatTemplateKind::chatml, "plain ChatML"},
    {"f0206845c9ebc3abb4735d44f286eb81ce99238ad2accc710c6fc60e6cb8ccc8", ChatTemplateKind::qwen2, "Qwen2-Instruct"},
    {"96bcff2580858c0a20d51cf44f4737af1dbbf0821341574f0d6811167f2f4dae", ChatTemplateKind::qwen2_5,
     "Qwen2.5 (instruct and base)"},
    {"d6a47b6bb500b64159229454fd7400000fcc1441d1e77058b691b29f99346a40", ChatTemplateKind::qwen3,
     "Qwen3 (first release)"},
    {"014dfdff0f8aa940c245a99a23c172fc0eb2961c1702e88b5cb6ef403f7504f8", ChatTemplateKind::qwen3,
     "Qwen3 (later revision with 'is string' checks)"},
}};

std::string normalise_template(const std::string& text) {
  std::string out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string_view line(text.data() + pos, nl - pos);
    auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; };
    while (!line.empty() && is_space(line.front())) line.remove_prefix(1);
    while (!line.empty() && is_space(line.back())) line.remove_suffix(1);
    if (!line.empty()) {
      if (!out.empty()) out.push_back('\n');
      out.append(line);
    }
    pos = nl + 1;
  }
  return out;
}

}  // namespace

RenderedChat render_chat(ChatTemplateKind kind, const Conversation& conv, const RenderOptions& opts) {
  check_roles(conv, kind);
  switch (kind) {
    case ChatTemplateKind::chatml: return render_chatml(conv, opts, nullptr);
    case ChatTemplateKind::qwen2: return render_chatml(conv, opts, kQwen2DefaultSystem);
    case ChatTemplateKind::qwen2_5: return render_qwen25(conv, opts);
    case ChatTemplateKind::qwen3: return render_qwen3(conv, opts);
  }
  QT_ASSERT(false, "unknown chat template kind {}", int(kind));
}

ChatTemplateKind parse_chat_template_name(const std::string& name) {
  if (name == "chatml") return ChatTemplateKind::chatml;
  if (name == "qwen2") return ChatTemplateKind::qwen2;
  if (name == "qwen2.5" || name == "qwen2_5") return ChatTemplateKind::qwen2_5;
  if (name == "qwen3") return ChatTemplateKind::qwen3;
  qt::fail("chat", "unknown chat template '{}' (expected chatml, qwen2, qwen2.5 or qwen3)", name);
}

std::string chat_template_name(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::chatml: return "chatml";
    case ChatTemplateKind::qwen2: return "qwen2";
    case ChatTemplateKind::qwen2_5: return "qwen2.5";
    case ChatTemplateKind::qwen3: return "qwen3";
  }
  return "?";
}

std::string chat_template_fingerprint(const std::string& jinja_text) {
  return sha256_hex(normalise_template(jinja_text));
}

ChatTemplateKind detect_chat_template(const std::string& jinja_text, const std::string& origin) {
  if (jinja_text.empty())
    qt::fail("chat", "{} has no chat_template; name one explicitly (chatml, qwen2, qwen2.5, qwen3)", origin);
  const std::string fp = chat_template_fingerprint(jinja_text);
  for (const auto& k : kKnown)
    if (fp == k.sha256) return k.kind;
  // Not a known version: say what it resembles, and refuse rather than guess.
  auto has = [&](const char* s) { return jinja_text.find(s) != std::string::npos; };
  std::vector<std::string> markers;
  if (has("<|im_start|>")) markers.emplace_back("<|im_start|>");
  if (has("<think>")) markers.emplace_back("<think>");
  if (has("enable_thinking")) markers.emplace_back("enable_thinking");
  if (has("<tool_call>")) markers.emplace_back("<tool_call>");
  if (has("Alibaba Cloud")) markers.emplace_back("'created by Alibaba Cloud' default system");
  if (has("<|start_header_id|>")) markers.emplace_back("<|start_header_id|> (Llama 3)");
  if (has("[INST]")) markers.emplace_back("[INST] (Llama 2 / Mistral)");
  std::string resembles = "no Qwen template";
  if (has("<|im_start|>")) {
    if (has("<think>") || has("enable_thinking")) resembles = "qwen3";
    else if (has("Alibaba Cloud")) resembles = "qwen2.5";
    else resembles = "chatml";
  }
  std::string marker_list;
  for (const auto& s : markers) marker_list += (marker_list.empty() ? "" : ", ") + s;
  qt::fail("chat",
           "{}: unknown chat_template ({} chars, normalised sha256 {}, markers: {}; resembles {}). It is not one "
           "of the known Qwen versions, so it is not rendered by guess: name the template explicitly "
           "(chat_template: chatml | qwen2 | qwen2.5 | qwen3) if its output is the same",
           origin, jinja_text.size(), fp.substr(0, 16), marker_list.empty() ? "none" : marker_list, resembles);
}

}  // namespace qt::data
