// A token batch as JSON: {"input_ids": [[...], ...], "labels": [[...], ...]} with rows of equal
// length; labels may hold -100; optional "position_ids" and "segment_ids" of the same shape.
#pragma once
#include <string>

#include "model/decoder.h"

namespace qt {

Batch parse_batch_json(const std::string& text, const std::string& origin);
Batch load_batch_json(const std::string& path);

}  // namespace qt
