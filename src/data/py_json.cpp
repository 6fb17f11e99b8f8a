// Python-compatible JSON writer (see py_json.h).
#include "data/py_json.h"

#include <charconv>
#include <cmath>
#include <fmt/format.h>

namespace qt::data {
namespace {

void append_string(std::string& out, const std::string& s) {
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else {
          out.push_back(char(c));
        }
    }
  }
  out.push_back('"');
}

void append_value(std::string& out, const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::null: out += "null"; break;
    case ojson::value_t::boolean: out += v.get<bool>() ? "true" : "false"; break;
    case ojson::value_t::number_integer: out += std::to_string(v.get<int64_t>()); break;
    case ojson::value_t::number_unsigned: out += std::to_string(v.get<uint64_t>()); break;
    case ojson::value_t::number_float: out += python_float_repr(v.get<double>()); break;
    case ojson::value_t::string: append_string(out, v.get_ref<const std::string&>()); break;
    case ojson::value_t::array: {
      out.push_back('[');
      bool first = true;
      for (const auto& e : v) {
        if (!first) out += ", ";
        first = false;
        append_value(out, e);
      }
      out.push_back(']');
      break;
    }
    case ojson::value_t::object: {
      out.push_back('{');
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (!first) out += ", ";
        first = false;
        append_string(out, it.key());
        out += ": ";
        append_value(out, it.value());
      }
      out.push_back('}');
      break;
    }
    case ojson::value_t::binary:
    case ojson::value_t::discarded: out += "null"; break;
  }
}

}  // namespace

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  // Shortest round-trip digits in scientific form: "-d.ddde+XX" or "de-XX".
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  const size_t epos = sci.find('e');
  std::string mant = sci.substr(0, epos);
  const int exp10 = std::stoi(sci.substr(epos + 1));
  const bool neg = !mant.empty() && mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits.push_back(c);
  std::string out = neg ? "-" : "";
  if (exp10 >= -4 && exp10 < 16) {
    // Fixed notation: the decimal point goes after digit exp10 (0-based from the first digit).
    const int point = exp10 + 1;  // number of digits before the point
    if (point <= 0) {
      out += "0.";
      out.append(size_t(-point), '0');
      out += digits;
    } else if (size_t(point) >= digits.size()) {
      out += digits;
      out.append(size_t(point) - digits.size(), '0');
      out += ".0";
    } else {
      out += digits.substr(0, size_t(point));
      out.push_back('.');
      out += digits.substr(size_t(point));
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) {
      out.push_back('.');
      out += digits.substr(1);
    }
    out += fmt::format("e{}{:02d}", exp10 < 0 ? '-' : '+', std::abs(exp10));
  }
  return out;
}

std::string python_json_dumps(const ojson& value) {
  std::string out;
  append_value(out, value);
  return out;
}

}  // namespace qt::data
