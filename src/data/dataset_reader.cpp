// Dataset files -> records (see dataset_reader.h). The file is split into raw records first (lines,
// or the elements of a top-level JSON array found by a string-aware bracket scan, so each element
// keeps its own line number and a bad one can be skipped), then each record is checked (UTF-8,
// nesting depth, JSON syntax, fields) and converted.
#include "data/dataset_reader.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace qt::data {
namespace {

constexpr int kMaxNesting = 64;  // deeper records are refused (keeps every walk over them shallow)

struct BadRecord {
  std::string reason;  // short category for the summary
  std::string detail;  // full message after "file:line: "
};

[[noreturn]] void bad(std::string reason, std::string detail) { throw BadRecord{std::move(reason), std::move(detail)}; }

struct RawRecord {
  int64_t line = 0;
  std::string_view bytes;
  std::string structural_error;  // set when the array scan could not delimit the element
};

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

std::vector<RawRecord> split_jsonl(std::string_view data) {
  std::vector<RawRecord> out;
  int64_t line = 1;
  size_t pos = 0;
  while (pos < data.size()) {
    size_t nl = data.find('\n', pos);
    if (nl == std::string_view::npos) nl = data.size();
    std::string_view text = data.substr(pos, nl - pos);
    bool blank = true;
    for (char c : text) blank = blank && is_ws(c);
    if (!blank) out.push_back({line, text, {}});
    ++line;
    pos = nl + 1;
  }
  return out;
}

// `data` starts (after whitespace) with '['.
std::vector<RawRecord> split_json_array(std::string_view data) {
  std::vector<RawRecord> out;
  int64_t line = 1;
  size_t pos = 0;
  auto skip_ws = [&] {
    while (pos < data.size() && is_ws(data[pos])) {
      if (data[pos] == '\n') ++line;
      ++pos;
    }
  };
  skip_ws();
  ++pos;  // '['
  bool expect_more = false;  // after a ','
  while (true) {
    skip_ws();
    if (pos >= data.size()) {
      out.push_back({line, {}, "unterminated JSON array (no closing ']')"});
      return out;
    }
    if (data[pos] == ']') {
      if (expect_more) out.push_back({line, {}, "trailing ',' before ']'"});
      ++pos;
      skip_ws();
      if (pos < data.size()) out.push_back({line, {}, "unexpected data after the closing ']' of the JSON array"});
      return out;
    }
    const size_t start = pos;
    const int64_t start_line = line;
    int depth = 0;
    bool in_string = false, escaped = false;
    for (; pos < data.size(); ++pos) {
      const char c = data[pos];
      if (c == '\n') ++line;
      if (in_string) {
        if (escaped) escaped = false;
        else if (c == '\\') escaped = true;
        else if (c == '"') in_string = false;
        continue;
      }
      if (c == '"') in_string = true;
      else if (c == '{' || c == '[') ++depth;
      else if (depth <= 0 && (c == ',' || c == ']')) break;
      else if (c == '}' || c == ']') --depth;
    }
    size_t end = pos;
    while (end > start && is_ws(data[end - 1])) --end;
    out.push_back({start_line, data.substr(start, end - start), {}});
    if (pos >= data.size()) {
      out.push_back({line, {}, "unterminated JSON array (no closing ']')"});
      return out;
    }
    expect_more = data[pos] == ',';
    if (expect_more) ++pos;
  }
}

int max_nesting(std::string_view s) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return deepest;
}

std::string type_name(const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::null: return "null";
    case ojson::value_t::boolean: return "a boolean";
    case ojson::value_t::string: return "a string";
    case ojson::value_t::array: return "an array";
    case ojson::value_t::object: return "an object";
    default: return "a number";
  }
}

// obj[key] as a string. Missing: error when required, else "". null: allowed only when nullable.
std::string get_string(const ojson& obj, const std::string& key, const std::string& where, bool required,
                       bool nullable = false) {
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (required) bad("missing field", fmt::format("{}: missing field '{}'", where, key));
    return "";
  }
  if (it->is_null() && nullable) return "";
  if (!it->is_string())
    bad("wrong field type", fmt::format("{}: field '{}' must be a string, got {}", where, key, type_name(*it)));
  return it->get<std::string>();
}

ojson get_tools(const ojson& rec) {
  auto it = rec.find("tools");
  if (it == rec.end() || it->is_null()) return ojson::array();
  ojson tools = *it;
  if (tools.is_string()) {  // some datasets store the schema list as a JSON string
    const std::string& text = it->get_ref<const std::string&>();
    if (max_nesting(text) > kMaxNesting) bad("wrong field type", "field 'tools' is a string holding too deep JSON");
    try {
      tools = ojson::parse(text);
    } catch (const ojson::exception&) {
      bad("wrong field type", "field 'tools' is a string that does not hold valid JSON");
    }
  }
  if (!tools.is_array()) bad("wrong field type", fmt::format("field 'tools' must be an array, got {}", type_name(tools)));
  for (size_t i = 0; i < tools.size(); ++i)
    if (!tools[i].is_object())
      bad("wrong field type", fmt::format("tools[{}] must be an object, got {}", i, type_name(tools[i])));
  return tools;
}

ToolCall parse_tool_call(const ojson& tc, const std::string& where) {
  if (!tc.is_object()) bad("wrong field type", fmt::format("{} must be an object, got {}", where, type_name(tc)));
  const ojson* fn = &tc;
  std::string fn_where = where;
  auto it = tc.find("function");
  if (it != tc.end()) {
    if (!it->is_object() || it->empty())
      bad("wrong field type", fmt::format("{}.function must be a non-empty object", where));
    fn = &*it;
    fn_where = where + ".function";
  }
  ToolCall out;
  out.name = get_string(*fn, "name", fn_where, true);
  auto args = fn->find("arguments");
  if (args == fn->end() || args->is_null()) bad("missing field", fmt::format("{}: missing field 'arguments'", fn_where));
  out.arguments = *args;
  return out;
}

void check_role(const std::string& role, const std::string& where) {
  if (role != "system" && role != "user" && role != "assistant" && role != "tool")
    bad("unknown role", fmt::format("{}: role '{}' is not one of system, user, assistant, tool", where, role));
}

Conversation convert_messages(const ojson& rec) {
  auto it = rec.find("messages");
  if (it == rec.end()) bad("format mismatch", "record has no 'messages' field (the file is in messages format)");
  if (!it->is_array()) bad("wrong field type", fmt::format("field 'messages' must be an array, got {}", type_name(*it)));
  if (it->empty()) bad("empty conversation", "'messages' is empty");
  Conversation conv;
  conv.tools = get_tools(rec);
  for (size_t i = 0; i < it->size(); ++i) {
    const ojson& m = (*it)[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!m.is_object()) bad("wrong field type", fmt::format("{} must be an object, got {}", where, type_name(m)));
    ChatMessage msg;
    msg.role = get_string(m, "role", where, true);
    check_role(msg.role, where);
    auto calls = m.find("tool_calls");
    if (calls != m.end() && !calls->is_null()) {
      if (msg.role != "assistant") bad("wrong field type", fmt::format("{}: only assistant messages have tool_calls", where));
      if (!calls->is_array())
        bad("wrong field type", fmt::format("{}: field 'tool_calls' must be an array, got {}", where, type_name(*calls)));
      for (size_t t = 0; t < calls->size(); ++t)
        msg.tool_calls.push_back(parse_tool_call((*calls)[t], fmt::format("{}.tool_calls[{}]", where, t)));
    }
    // Content may be null (or absent) only on an assistant turn that calls tools.
    msg.content = get_string(m, "content", where, msg.tool_calls.empty(), !msg.tool_calls.empty());
    auto rc = m.find("reasoning_content");
    if (rc != m.end() && !rc->is_null()) {
      if (!rc->is_string())
        bad("wrong field type", fmt::format("{}: field 'reasoning_content' must be a string, got {}", where, type_name(*rc)));
      if (msg.role == "assistant") msg.reasoning_content = rc->get<std::string>();
    }
    conv.messages.push_back(std::move(msg));
  }
  return conv;
}

Conversation convert_alpaca(const ojson& rec) {
  if (!rec.contains("instruction") || !rec.contains("output"))
    bad("format mismatch", "record lacks 'instruction' or 'output' (the file is in alpaca format)");
  const std::string instruction = get_string(rec, "instruction", "record", true);
  const std::string input = get_string(rec, "input", "record", false, true);
  const std::string output = get_string(rec, "output", "record", true);
  const std::string system = get_string(rec, "system", "record", false, true);
  Conversation conv;
  if (!system.empty()) conv.messages.push_back({"system", system, {}, {}});
  conv.messages.push_back({"user", input.empty() ? instruction : instruction + "\n\n" + input, {}, {}});
  conv.messages.push_back({"assistant", output, {}, {}});
  return conv;
}

std::string sharegpt_role(const std::string& from, const std::string& where) {
  if (from == "human" || from == "user") return "user";
  if (from == "gpt" || from == "assistant" || from == "model" || from == "chatgpt" || from == "function_call")
    return "assistant";
  if (from == "system") return "system";
  if (from == "tool" || from == "observation" || from == "function_response" || from == "function") return "tool";
  bad("unknown role", fmt::format("{}: 'from' value '{}' is not a known role (human, user, gpt, assistant, model, "
                                  "system, tool, observation, function_call, function_response)",
                                  where, from));
}

Conversation convert_sharegpt(const ojson& rec) {
  auto it = rec.find("conversations");
  if (it == rec.end()) bad("format mismatch", "record has no 'conversations' field (the file is in sharegpt format)");
  if (!it->is_array())
    bad("wrong field type", fmt::format("field 'conversations' must be an array, got {}", type_name(*it)));
  if (it->empty()) bad("empty conversation", "'conversations' is empty");
  Conversation conv;
  conv.tools = get_tools(rec);
  const std::string system = get_string(rec, "system", "record", false, true);
  if (!system.empty()) conv.messages.push_back({"system", system, {}, {}});
  for (size_t i = 0; i < it->size(); ++i) {
    const ojson& m = (*it)[i];
    const std::string where = fmt::format("conversations[{}]", i);
    if (!m.is_object()) bad("wrong field type", fmt::format("{} must be an object, got {}", where, type_name(m)));
    ChatMessage msg;
    msg.role = sharegpt_role(get_string(m, "from", where, true), where);
    msg.content = get_string(m, "value", where, true);
    conv.messages.push_back(std::move(msg));
  }
  return conv;
}

DatasetFormat detect_format(const ojson& rec) {
  if (rec.contains("messages")) return DatasetFormat::messages;
  if (rec.contains("conversations")) return DatasetFormat::sharegpt;
  if (rec.contains("instruction") && rec.contains("output")) return DatasetFormat::alpaca;
  if (rec.contains("text")) return DatasetFormat::text;
  std::string keys;
  for (auto it = rec.begin(); it != rec.end() && keys.size() < 200; ++it) keys += (keys.empty() ? "" : ", ") + it.key();
  bad("unknown format",
      fmt::format("cannot tell the dataset format from the keys [{}]; expected 'text', 'messages', 'conversations' "
                  "or 'instruction'+'output' (or name the format)",
                  keys));
}

DatasetRecord convert(const ojson& rec, DatasetFormat format) {
  DatasetRecord out;
  switch (format) {
    case DatasetFormat::text: {
      if (!rec.contains("text")) bad("format mismatch", "record has no 'text' field (the file is in text format)");
      out.is_text = true;
      out.text = get_string(rec, "text", "record", true);
      if (out.text.empty()) bad("empty text", "field 'text' is empty");
      break;
    }
    case DatasetFormat::messages: out.conversation = convert_messages(rec); break;
    case DatasetFormat::alpaca: out.conversation = convert_alpaca(rec); break;
    case DatasetFormat::sharegpt: out.conversation = convert_sharegpt(rec); break;
    case DatasetFormat::auto_detect: QT_ASSERT(false, "format must be resolved before convert");
  }
  return out;
}

// nlohmann's message without "[json.exception.parse_error.101] parse error at line 1, column 5: ".
std::string json_error_text(const std::string& what) {
  std::string s = what;
  size_t p = s.find("] ");
  if (p != std::string::npos) s = s.substr(p + 2);
  if (s.rfind("parse error", 0) == 0 && (p = s.find(": ")) != std::string::npos) s = s.substr(p + 2);
  return s;
}

}  // namespace

DatasetFormat parse_dataset_format(const std::string& name) {
  if (name == "auto" || name.empty()) return DatasetFormat::auto_detect;
  if (name == "text" || name == "completion") return DatasetFormat::text;
  if (name == "messages" || name == "chat" || name == "openai") return DatasetFormat::messages;
  if (name == "alpaca") return DatasetFormat::alpaca;
  if (name == "sharegpt") return DatasetFormat::sharegpt;
  qt::fail("data", "unknown dataset format '{}' (expected auto, text, messages, alpaca or sharegpt)", name);
}

std::string dataset_format_name(DatasetFormat f) {
  switch (f) {
    case DatasetFormat::auto_detect: return "auto";
    case DatasetFormat::text: return "text";
    case DatasetFormat::messages: return "messages";
    case DatasetFormat::alpaca: return "alpaca";
    case DatasetFormat::sharegpt: return "sharegpt";
  }
  return "?";
}

Conversation conversation_from_messages_json(const ojson& record) {
  try {
    return convert_messages(record);
  } catch (const BadRecord& e) {
    qt::fail("data", "{}", e.detail);
  }
}

size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    else return i;
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return i;
    i += len;
  }
  return std::string_view::npos;
}

DatasetReadResult read_dataset_bytes(std::string_view data, const std::string& origin, const ReadOptions& opts) {
  if (data.substr(0, 3) == "\xEF\xBB\xBF") data.remove_prefix(3);
  size_t first = 0;
  while (first < data.size() && is_ws(data[first])) ++first;
  const bool is_array = first < data.size() && data[first] == '[';
  const std::vector<RawRecord> raws = is_array ? split_json_array(data) : split_jsonl(data);

  DatasetReadResult result;
  ReadSummary& sum = result.summary;
  DatasetFormat format = opts.format;
  for (const RawRecord& raw : raws) {
    ++sum.records_seen;
    int64_t line = raw.line;  // where the problem is (moved to the failing line for JSON syntax errors)
    try {
      if (!raw.structural_error.empty()) bad("invalid JSON", raw.structural_error);
      const size_t bad_byte = find_invalid_utf8(raw.bytes);
      if (bad_byte != std::string_view::npos)
        bad("invalid UTF-8", fmt::format("invalid UTF-8 at byte {} of the record", bad_byte));
      if (max_nesting(raw.bytes) > kMaxNesting)
        bad("invalid JSON", fmt::format("JSON nested deeper than {} levels", kMaxNesting));
      ojson rec;
      try {
        rec = ojson::parse(raw.bytes);
      } catch (const ojson::parse_error& e) {
        // Point file:line at the error itself (a JSON-array element may span lines).
        const size_t at = std::min(raw.bytes.size(), e.byte > 0 ? size_t(e.byte - 1) : size_t(0));
        const std::string_view before = raw.bytes.substr(0, at);
        line += int64_t(std::count(before.begin(), before.end(), '\n'));
        const size_t nl = before.rfind('\n');
        const size_t column = at - (nl == std::string_view::npos ? 0 : nl + 1) + 1;
        bad("invalid JSON", fmt::format("invalid JSON (column {}): {}", column, json_error_text(e.what())));
      } catch (const ojson::exception& e) {
        bad("invalid JSON", "invalid JSON: " + json_error_text(e.what()));
      }
      if (!rec.is_object()) bad("not an object", fmt::format("record must be a JSON object, got {}", type_name(rec)));
      if (format == DatasetFormat::auto_detect) format = detect_format(rec);
      DatasetRecord out = convert(rec, format);
      out.line = raw.line;
      result.records.push_back(std::move(out));
      ++sum.records_kept;
    } catch (const BadRecord& e) {
      const std::string msg = fmt::format("{}:{}: {}", origin, line, e.detail);
      if (!opts.lenient) qt::fail("data", "{}", msg);
      ++sum.records_skipped;
      ++sum.skipped_by_reason[e.reason];
      if (sum.first_problems.size() < 5) sum.first_problems.push_back(msg);
    }
  }
  sum.format = format;
  if (result.records.empty()) {
    if (sum.records_seen == 0) qt::fail("data", "{}: no records (the file is empty)", origin);
    qt::fail("data", "{}: no usable records ({} seen, all skipped; first problem: {})", origin, sum.records_seen,
             sum.first_problems.empty() ? "?" : sum.first_problems.front());
  }
  return result;
}

DatasetReadResult read_dataset_file(const std::string& path, const ReadOptions& opts) {
  std::ifstream f(path, std::ios::binary);
  if (!f) qt::fail("data", "{}: cannot open the dataset file", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) qt::fail("data", "{}: read error", path);
  const std::string bytes = ss.str();
  return read_dataset_bytes(bytes, path, opts);
}

}  // namespace qt::data
