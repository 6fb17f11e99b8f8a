// JSON text exactly as Python's json.dumps(x, ensure_ascii=False) writes it, which is what the
// `tojson` filter of transformers' chat templates produces:
//   separators ", " and ": ", object keys in insertion order, non-ASCII kept as UTF-8,
//   escapes \" \\ \n \r \t \b \f and \u00XX (lowercase hex) for the other bytes < 0x20,
//   floats as Python repr(): shortest round-trip digits, fixed notation for 1e-4 <= |x| < 1e16
//   (with ".0" when integral), otherwise "d.ddde+XX" (exponent at least two digits).
// Integers beyond 64 bits are parsed by nlohmann as doubles, so they print as floats (Python would
// keep the exact integer); such values do not occur in tool-call arguments in practice.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace qt::data {

using ojson = nlohmann::ordered_json;  // keeps object keys in file order, as Python dicts do

std::string python_json_dumps(const ojson& value);
std::string python_float_repr(double v);

}  // namespace qt::data
