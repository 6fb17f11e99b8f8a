// The data pipeline in one call: read a dataset file, render and tokenize it with labels, truncate,
// pack, and keep the result in an on-disk cache so the next run with the same inputs starts at once.
//   file --read_dataset_file--> records --tokenize_records--> TokenizedDataset --BatchIterator--> Batch
#pragma once
#include <string>

#include "data/dataset_cache.h"
#include "data/dataset_reader.h"
#include "data/tokenized_dataset.h"

namespace qt {
class Tokenizer;
}

namespace qt::data {

struct DatasetOptions {
  std::string path;            // JSONL or JSON-array file
  ReadOptions read;            // format (auto), lenient
  TokenizeOptions tokenize;    // template, labels, sequence_len, truncation, packing
  std::string cache_dir;       // "" = no cache
};

struct LoadedDataset {
  TokenizedDataset data;
  bool from_cache = false;
  std::string cache_file;         // "" when no cache dir
  std::string cache_note;         // why a cache file was not used or not written ("" when fine)
};

// "auto" (or "") -> the template of the tokenizer's tokenizer_config.json (refused when unknown);
// otherwise the named template. `origin` names the tokenizer in messages.
ChatTemplateKind resolve_chat_template(const std::string& name, const Tokenizer& tok, const std::string& origin);

// SHA-256 over tokenizer.json and tokenizer_config.json (when present) of a tokenizer directory
// (or of the tokenizer.json file given directly).
std::string tokenizer_fingerprint(const std::string& tokenizer_path);

// Everything the tokens depend on, as text (the cache key material).
std::string dataset_cache_material(const DatasetOptions& opts, const std::string& data_sha256, uint64_t data_size,
                                   const std::string& tokenizer_fp);

LoadedDataset load_dataset(const DatasetOptions& opts, const Tokenizer& tok, const std::string& tokenizer_fp);

// Human-readable summary lines: records read/skipped (by reason), examples, tokens, truncation.
std::string describe_dataset(const TokenizedDataset& ds);

}  // namespace qt::data
