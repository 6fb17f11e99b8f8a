// Training data files -> records (plain text or conversations), with file:line for every problem.
//
// Files: JSONL (one JSON object per line; blank lines skipped) or a JSON array of objects (the
// first non-blank byte is '['), whatever the extension; a UTF-8 BOM is skipped.
// Record formats, detected from the first valid record of the file unless given:
//   text     {"text": "..."}
//   messages {"messages": [{"role", "content", "reasoning_content"?, "tool_calls"?}], "tools"?}
//            (OpenAI / HF style; content may be null on an assistant turn with tool_calls; a tool
//            call is {"function": {"name", "arguments"}} or {"name", "arguments"}; arguments an
//            object or a string; "tools" an array of schemas or a JSON string holding one)
//   alpaca   {"instruction", "input"?, "output", "system"?} rendered as a chat: user = instruction,
//            plus "\n\n" + input when input is non-empty; assistant = output (the Alpaca prompt
//            text "Below is an instruction..." is NOT used: the model's own chat template frames it)
//   sharegpt {"conversations": [{"from", "value"}], "system"?, "tools"?}; from: human/user -> user,
//            gpt/assistant/model/chatgpt/function_call -> assistant, system -> system,
//            tool/observation/function_response/function -> tool
// Roles must be system, user, assistant or tool.
// Problems (invalid JSON or UTF-8, missing or non-string fields, unknown roles, empty
// conversations, records of another format) throw "[data] <file>:<line>: ..."; in lenient mode the
// record is skipped and counted in the summary instead.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "data/chat_template.h"

namespace qt::data {

enum class DatasetFormat { auto_detect, text, messages, alpaca, sharegpt };

DatasetFormat parse_dataset_format(const std::string& name);  // "auto", "text", ...; throws "[data] ..."
std::string dataset_format_name(DatasetFormat f);

struct DatasetRecord {
  int64_t line = 0;      // 1-based line where the record starts
  bool is_text = false;  // text format: `text`; otherwise `conversation`
  std::string text;
  Conversation conversation;
};

struct ReadOptions {
  DatasetFormat format = DatasetFormat::auto_detect;
  bool lenient = false;  // skip bad records (counted) instead of failing on the first
};

struct ReadSummary {
  DatasetFormat format = DatasetFormat::auto_detect;  // the format used
  int64_t records_seen = 0;
  int64_t records_kept = 0;
  int64_t records_skipped = 0;
  std::map<std::string, int64_t> skipped_by_reason;  // e.g. "invalid JSON" -> 3
  std::vector<std::string> first_problems;           // up to 5 full messages ("file:line: ...")
};

struct DatasetReadResult {
  std::vector<DatasetRecord> records;
  ReadSummary summary;
};

DatasetReadResult read_dataset_file(const std::string& path, const ReadOptions& opts);
// The same from bytes in memory; `origin` names them in messages.
DatasetReadResult read_dataset_bytes(std::string_view bytes, const std::string& origin, const ReadOptions& opts);

// One record of the messages format ({"messages": [...], "tools"?}) as a Conversation; throws
// "[data] ..." on the problems listed above.
Conversation conversation_from_messages_json(const ojson& record);

// Byte offset of the first invalid UTF-8 sequence (overlong, surrogate, > U+10FFFF, truncated), or
// npos when `s` is valid.
size_t find_invalid_utf8(std::string_view s);

}  // namespace qt::data
