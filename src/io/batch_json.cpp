#include "io/batch_json.h"

#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace qt {

namespace {

// Reads a rectangular array of integer rows; sets rows/cols, or checks them when already set.
std::vector<int32_t> read_rows(const nlohmann::json& j, const char* key, const std::string& origin, int64_t* rows,
                               int64_t* cols) {
  if (!j.contains(key)) fail("batch", "{}: missing \"{}\"", origin, key);
  const auto& a = j[key];
  if (!a.is_array() || a.empty()) fail("batch", "{}: \"{}\" must be a non-empty array of rows", origin, key);
  if (*rows >= 0 && int64_t(a.size()) != *rows)
    fail("batch", "{}: \"{}\" has {} rows, input_ids has {}", origin, key, a.size(), *rows);
  *rows = int64_t(a.size());
  std::vector<int32_t> out;
  for (size_t r = 0; r < a.size(); ++r) {
    const auto& row = a[r];
    if (!row.is_array() || row.empty()) fail("batch", "{}: {}[{}] must be a non-empty array", origin, key, r);
    if (*cols >= 0 && int64_t(row.size()) != *cols)
      fail("batch", "{}: {}[{}] has {} values, expected {} (rows must have equal length)", origin, key, r, row.size(),
           *cols);
    *cols = int64_t(row.size());
    for (size_t c = 0; c < row.size(); ++c) {
      const auto& v = row[c];
      if (!v.is_number_integer()) fail("batch", "{}: {}[{}][{}] is not an integer", origin, key, r, c);
      int64_t x = v.get<int64_t>();
      if (x < std::numeric_limits<int32_t>::min() || x > std::numeric_limits<int32_t>::max())
        fail("batch", "{}: {}[{}][{}] = {} is out of range", origin, key, r, c, x);
      out.push_back(int32_t(x));
    }
  }
  return out;
}

}  // namespace

Batch parse_batch_json(const std::string& text, const std::string& origin) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail("batch", "{}: invalid JSON: {}", origin, e.what());
  }
  if (!j.is_object()) fail("batch", "{}: expected a JSON object", origin);
  Batch b;
  int64_t rows = -1, cols = -1;
  b.input_ids = read_rows(j, "input_ids", origin, &rows, &cols);
  b.labels = read_rows(j, "labels", origin, &rows, &cols);
  if (j.contains("position_ids")) b.position_ids = read_rows(j, "position_ids", origin, &rows, &cols);
  if (j.contains("segment_ids")) b.segment_ids = read_rows(j, "segment_ids", origin, &rows, &cols);
  b.B = rows;
  b.S = cols;
  return b;
}

Batch load_batch_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("batch", "cannot open {}", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_batch_json(ss.str(), path);
}

}  // namespace qt
