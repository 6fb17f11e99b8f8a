// On-disk cache of a TokenizedDataset, so a second run starts at once.
//
// The file name is the first 32 hex digits of SHA-256(key material); the key material is text
// naming everything the tokens depend on (dataset bytes' SHA-256 and size, tokenizer fingerprint,
// template, format, label/truncation/packing settings, lenient) and is stored in the file too.
// Format (little-endian):
//   "QTDSET01" | u32 version=1 | u32 K | K bytes key material
//   | u32 J | J bytes read summary (JSON) | 8 x i64 TokenizeStats
//   | u64 n_seq | u64 n_docs | u64 n_tokens
//   | i64[n_seq+1] seq_offsets | i64[n_seq+1] seq_doc_offsets | i32[n_docs] doc_lengths
//   | i32[n_tokens] input_ids | i32[n_tokens] labels | 32 bytes SHA-256 of everything before
// Written atomically (temporary file, fsync, rename). On load every check (size, magic, version,
// key material, checksum, offsets, document lengths, id ranges) must pass, otherwise the file is
// ignored with the reason and the dataset is rebuilt: a cache is never trusted.
#pragma once
#include <optional>
#include <string>
#include <string_view>

#include "data/tokenized_dataset.h"

namespace qt::data {

// Writes `ds` to `path` atomically; returns false (and says why in *error) when it cannot.
bool save_dataset_cache(const std::string& path, const std::string& key_material, const TokenizedDataset& ds,
                        std::string* error);
// The dataset stored at `path` when it is complete, intact and made with `key_material`;
// otherwise nullopt with the reason in *why_not ("no cache file" when absent).
std::optional<TokenizedDataset> load_dataset_cache(const std::string& path, const std::string& key_material,
                                                   int64_t vocab_size, std::string* why_not);

// The same checks on cache bytes already in memory.
std::optional<TokenizedDataset> parse_dataset_cache_bytes(std::string_view bytes, const std::string& key_material,
                                                          int64_t vocab_size, std::string* why_not);

}  // namespace qt::data
