// Chat templates of the Qwen family, rendered natively (no Jinja), byte-for-byte equal to
// transformers' apply_chat_template(tokenize=False) with the template of tokenizer_config.json.
//
//   chatml : <|im_start|>{role}\n{content}<|im_end|>\n for every message
//   qwen2  : chatml, with "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" first when
//            the conversation has no system message (Qwen2-Instruct)
//   qwen2.5: default system "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
//            tools listed in the system prompt, <tool_call> JSON in assistant turns (arguments always
//            through tojson), tool responses merged into one user turn of <tool_response> blocks
//   qwen3  : no default system; tools as qwen2.5; <think>\n{reasoning}\n</think>\n\n{content} only on
//            assistant turns after the last real user query (earlier turns lose their reasoning);
//            string tool-call arguments verbatim; enable_thinking=false adds "<think>\n\n</think>\n\n"
//            to the generation prompt
// Generation prompt (all): "<|im_start|>assistant\n".
//
// Labels: every assistant turn renders as "<|im_start|>assistant\n" + BODY + "<|im_end|>" + "\n";
// RenderedChat::assistant_spans holds the byte range of BODY + "<|im_end|>" of each turn (the part
// trained by default, REFERENCE.md section 6).
//
// Which template a tokenizer_config.json holds is decided by the SHA-256 of its normalised text
// (CRLF -> LF, each line stripped, empty lines dropped) against the known published versions;
// anything else is refused with "[chat] ..." naming what was found, unless the user names the
// template explicitly.
#pragma once
#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "data/py_json.h"

namespace qt::data {

enum class ChatTemplateKind { chatml, qwen2, qwen2_5, qwen3 };

struct ToolCall {
  std::string name;
  ojson arguments;  // an object (rendered with tojson) or a string
};

struct ChatMessage {
  std::string role;                              // system | user | assistant | tool
  std::string content;                           // null content is held as ""
  std::optional<std::string> reasoning_content;  // assistant only (qwen3 renders it)
  std::vector<ToolCall> tool_calls;              // assistant only
};

struct Conversation {
  std::vector<ChatMessage> messages;
  ojson tools = ojson::array();  // function schemas, rendered into the system prompt (qwen2.5, qwen3)
};

struct RenderOptions {
  bool add_generation_prompt = false;
  std::optional<bool> enable_thinking;  // qwen3: false adds the empty think block to the prompt
};

struct RenderedChat {
  std::string text;
  std::vector<std::pair<size_t, size_t>> assistant_spans;  // [begin, end) byte ranges in text
};

// Throws "[chat] ..." for an empty conversation or a role the template does not know.
RenderedChat render_chat(ChatTemplateKind kind, const Conversation& conv, const RenderOptions& opts = {});

// "chatml", "qwen2", "qwen2.5", "qwen3" (also "qwen2_5"); throws "[chat] ..." otherwise.
ChatTemplateKind parse_chat_template_name(const std::string& name);
std::string chat_template_name(ChatTemplateKind kind);

// Identifies the Jinja text of a tokenizer_config.json chat_template; throws "[chat] ..." naming what
// was found when it is empty or not a known version. `origin` names the file in messages.
ChatTemplateKind detect_chat_template(const std::string& jinja_text, const std::string& origin);
// The hex SHA-256 of the normalised template text (what detect_chat_template compares).
std::string chat_template_fingerprint(const std::string& jinja_text);

}  // namespace qt::data
