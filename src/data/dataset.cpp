// load_dataset: cache lookup, else read + tokenize + save (see dataset.h).
#include "data/dataset.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "tokenizer/tokenizer.h"

namespace qt::data {

ChatTemplateKind resolve_chat_template(const std::string& name, const Tokenizer& tok, const std::string& origin) {
  if (name.empty() || name == "auto") return detect_chat_template(tok.chat_template(), origin);
  return parse_chat_template_name(name);
}

std::string tokenizer_fingerprint(const std::string& tokenizer_path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const bool is_dir = fs::is_directory(tokenizer_path, ec);
  const std::string json = is_dir ? (fs::path(tokenizer_path) / "tokenizer.json").string() : tokenizer_path;
  const std::string config = (fs::path(json).parent_path() / "tokenizer_config.json").string();
  std::string fp = "tokenizer.json:" + sha256_file_hex(json);
  if (fs::exists(config, ec)) fp += " tokenizer_config.json:" + sha256_file_hex(config);
  return sha256_hex(fp);
}

std::string dataset_cache_material(const DatasetOptions& o, const std::string& data_sha256, uint64_t data_size,
                                   const std::string& tokenizer_fp) {
  const TokenizeOptions& t = o.tokenize;
  return fmt::format(
      "qwentune tokenized dataset v1\ndata_sha256={}\ndata_size={}\ntokenizer={}\nformat={}\nlenient={}\n"
      "chat_template={}\ntrain_on_inputs={}\nappend_eos={}\nsequence_len={}\ntruncation={}\npacking={}\n",
      data_sha256, data_size, tokenizer_fp, dataset_format_name(o.read.format), int(o.read.lenient),
      chat_template_name(t.chat_template), int(t.train_on_inputs), int(t.append_eos), t.sequence_len,
      t.truncation == TruncationMode::drop ? "drop" : "truncate", int(t.packing));
}

LoadedDataset load_dataset(const DatasetOptions& opts, const Tokenizer& tok, const std::string& tokenizer_fp) {
  namespace fs = std::filesystem;
  LoadedDataset out;
  std::string material;
  if (!opts.cache_dir.empty()) {
    std::error_code ec;
    const uint64_t size = fs::file_size(opts.path, ec);
    if (ec) qt::fail("data", "{}: cannot open the dataset file", opts.path);
    material = dataset_cache_material(opts, sha256_file_hex(opts.path), size, tokenizer_fp);
    out.cache_file = (fs::path(opts.cache_dir) / (sha256_hex(material).substr(0, 32) + ".qtds")).string();
    std::string why;
    if (auto cached = load_dataset_cache(out.cache_file, material, tok.vocab_size(), &why)) {
      out.data = std::move(*cached);
      out.from_cache = true;
      return out;
    }
    if (why != "no cache file") out.cache_note = fmt::format("cache {} ignored ({}); rebuilt", out.cache_file, why);
  }
  const DatasetReadResult read = read_dataset_file(opts.path, opts.read);
  out.data = tokenize_records(read.records, tok, opts.tokenize);
  out.data.read_summary = read.summary;
  if (!opts.cache_dir.empty()) {
    std::error_code ec;
    fs::create_directories(opts.cache_dir, ec);
    std::string error;
    if (ec || !save_dataset_cache(out.cache_file, material, out.data, &error)) {
      const std::string why = ec ? fmt::format("cannot create {}: {}", opts.cache_dir, ec.message()) : error;
      out.cache_note += (out.cache_note.empty() ? "" : "; ") + fmt::format("cache not written ({})", why);
    }
  }
  return out;
}

std::string describe_dataset(const TokenizedDataset& ds) {
  const ReadSummary& r = ds.read_summary;
  const TokenizeStats& s = ds.stats;
  std::string out = fmt::format("records: {} read ({} format), {} kept, {} skipped", r.records_seen,
                                dataset_format_name(r.format), r.records_kept, r.records_skipped);
  if (r.records_skipped > 0) {
    std::string reasons;
    for (const auto& [reason, n] : r.skipped_by_reason) reasons += fmt::format("{}{}: {}", reasons.empty() ? "" : ", ", reason, n);
    out += " (" + reasons + ")";
    for (const auto& p : r.first_problems) out += "\n  skipped " + p;
  }
  out += fmt::format("\nexamples: {} tokenized, {} kept, {} truncated, {} dropped as too long, {} dropped with nothing to train",
                     s.examples, s.documents, s.truncated, s.dropped_too_long, s.dropped_no_labels);
  out += fmt::format("\nsequences: {} ({} tokens, {} trained = {:.1f}%)", ds.size(), s.tokens, s.trained_tokens,
                     s.tokens ? 100.0 * double(s.trained_tokens) / double(s.tokens) : 0.0);
  return out;
}

}  // namespace qt::data
