// Tokenized-dataset cache files (format in dataset_cache.h).
#include "data/dataset_cache.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "io/atomic_file.h"

namespace qt::data {
namespace {

constexpr char kMagic[8] = {'Q', 'T', 'D', 'S', 'E', 'T', '0', '1'};
constexpr uint32_t kVersion = 1;
constexpr int kStatsCount = 8;

void put_bytes(std::string& out, const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }
template <typename T>
void put(std::string& out, T v) {
  put_bytes(out, &v, sizeof(T));
}
template <typename T>
void put_vec(std::string& out, const std::vector<T>& v) {
  put_bytes(out, v.data(), v.size() * sizeof(T));
}

// Bounds-checked reader over the file bytes.
class Reader {
 public:
  explicit Reader(std::string_view data) : data_(data) {}
  bool bytes(void* dst, size_t n) {
    if (n > data_.size() - pos_) return false;
    std::memcpy(dst, data_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  template <typename T>
  bool get(T& v) {
    return bytes(&v, sizeof(T));
  }
  template <typename T>
  bool get_vec(std::vector<T>& v, uint64_t count) {
    if (count > (data_.size() - pos_) / sizeof(T)) return false;
    v.resize(size_t(count));
    return bytes(v.data(), size_t(count) * sizeof(T));
  }
  bool str(std::string& s, uint32_t n) {
    if (n > data_.size() - pos_) return false;
    s.assign(data_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  size_t pos() const { return pos_; }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

std::string summary_to_json(const ReadSummary& s) {
  nlohmann::json j;
  j["format"] = dataset_format_name(s.format);
  j["seen"] = s.records_seen;
  j["kept"] = s.records_kept;
  j["skipped"] = s.records_skipped;
  j["by_reason"] = s.skipped_by_reason;
  j["first_problems"] = s.first_problems;
  return j.dump();
}

ReadSummary summary_from_json(const std::string& text) {
  const auto j = nlohmann::json::parse(text);  // throws on damage; the caller treats that as a bad cache
  ReadSummary s;
  s.format = parse_dataset_format(j.at("format").get<std::string>());
  s.records_seen = j.at("seen").get<int64_t>();
  s.records_kept = j.at("kept").get<int64_t>();
  s.records_skipped = j.at("skipped").get<int64_t>();
  s.skipped_by_reason = j.at("by_reason").get<std::map<std::string, int64_t>>();
  s.first_problems = j.at("first_problems").get<std::vector<std::string>>();
  return s;
}

int64_t* stats_fields(TokenizeStats& st, int k) {
  int64_t* f[kStatsCount] = {&st.examples, &st.truncated, &st.dropped_too_long, &st.dropped_no_labels,
                             &st.segmented_fallback, &st.tokens, &st.trained_tokens, &st.documents};
  return f[k];
}

std::optional<TokenizedDataset> parse_cache(std::string_view data, const std::string& key_material, int64_t vocab,
                                            std::string* why) {
  auto no = [&](const char* reason) -> std::optional<TokenizedDataset> {
    *why = reason;
    return std::nullopt;
  };
  if (data.size() < sizeof(kMagic) + 32) return no("file too short");
  {
    Sha256 h;
    h.update(data.data(), data.size() - 32);
    const auto d = h.digest();
    if (std::memcmp(d.data(), data.data() + data.size() - 32, 32) != 0) return no("checksum mismatch (damaged file)");
  }
  Reader r(data.substr(0, data.size() - 32));
  char magic[8];
  uint32_t version = 0, k = 0, j = 0;
  if (!r.bytes(magic, 8) || std::memcmp(magic, kMagic, 8) != 0) return no("not a qwentune dataset cache");
  if (!r.get(version) || version != kVersion) return no("unsupported cache version");
  std::string material, summary;
  if (!r.get(k) || !r.str(material, k)) return no("truncated header");
  if (material != key_material) return no("made with other settings");
  if (!r.get(j) || !r.str(summary, j)) return no("truncated header");
  TokenizedDataset ds;
  try {
    ds.read_summary = summary_from_json(summary);
  } catch (const std::exception&) {
    return no("damaged read summary");
  }
  for (int s = 0; s < kStatsCount; ++s)
    if (!r.get(*stats_fields(ds.stats, s))) return no("truncated stats");
  uint64_t n_seq = 0, n_docs = 0, n_tokens = 0;
  if (!r.get(n_seq) || !r.get(n_docs) || !r.get(n_tokens)) return no("truncated sizes");
  if (n_seq >= (uint64_t(1) << 40) || !r.get_vec(ds.seq_offsets, n_seq + 1) || !r.get_vec(ds.seq_doc_offsets, n_seq + 1) ||
      !r.get_vec(ds.doc_lengths, n_docs) || !r.get_vec(ds.input_ids, n_tokens) || !r.get_vec(ds.labels, n_tokens))
    return no("truncated arrays");
  if (r.pos() != data.size() - 32) return no("trailing bytes");
  // Structure: monotone offsets that end at the array sizes, documents that fill each sequence.
  if (ds.seq_offsets[0] != 0 || ds.seq_doc_offsets[0] != 0) return no("bad offsets");
  for (uint64_t i = 0; i < n_seq; ++i) {
    const int64_t t0 = ds.seq_offsets[i], t1 = ds.seq_offsets[i + 1];
    const int64_t d0 = ds.seq_doc_offsets[i], d1 = ds.seq_doc_offsets[i + 1];
    if (t1 <= t0 || d1 <= d0 || t1 > int64_t(n_tokens) || d1 > int64_t(n_docs)) return no("bad offsets");
    int64_t sum = 0;
    for (int64_t d = d0; d < d1; ++d) {
      if (ds.doc_lengths[size_t(d)] <= 0) return no("bad document length");
      sum += ds.doc_lengths[size_t(d)];
    }
    if (sum != t1 - t0) return no("document lengths do not fill their sequence");
  }
  if (ds.seq_offsets[n_seq] != int64_t(n_tokens) || ds.seq_doc_offsets[n_seq] != int64_t(n_docs))
    return no("bad offsets");
  for (uint64_t t = 0; t < n_tokens; ++t) {
    if (ds.input_ids[t] < 0 || ds.input_ids[t] >= vocab) return no("token id out of range");
    if (ds.labels[t] != -100 && (ds.labels[t] < 0 || ds.labels[t] >= vocab)) return no("label out of range");
  }
  return ds;
}

}  // namespace

bool save_dataset_cache(const std::string& path, const std::string& key_material, const TokenizedDataset& ds,
                        std::string* error) {
  std::string out;
  out.reserve(64 + key_material.size() + 8 * (ds.seq_offsets.size() * 2) + 4 * (ds.input_ids.size() * 2));
  put_bytes(out, kMagic, sizeof(kMagic));
  put<uint32_t>(out, kVersion);
  put<uint32_t>(out, uint32_t(key_material.size()));
  out += key_material;
  const std::string summary = summary_to_json(ds.read_summary);
  put<uint32_t>(out, uint32_t(summary.size()));
  out += summary;
  TokenizeStats st = ds.stats;
  for (int s = 0; s < kStatsCount; ++s) put<int64_t>(out, *stats_fields(st, s));
  put<uint64_t>(out, uint64_t(ds.size()));
  put<uint64_t>(out, uint64_t(ds.doc_lengths.size()));
  put<uint64_t>(out, uint64_t(ds.input_ids.size()));
  put_vec(out, ds.seq_offsets);
  put_vec(out, ds.seq_doc_offsets);
  put_vec(out, ds.doc_lengths);
  put_vec(out, ds.input_ids);
  put_vec(out, ds.labels);
  Sha256 h;
  h.update(out);
  const auto d = h.digest();
  put_bytes(out, d.data(), d.size());

  try {
    write_file_atomically(path, out, "dataset cache");
  } catch (const Error& e) {
    *error = e.what();
    return false;
  }
  return true;
}

std::optional<TokenizedDataset> load_dataset_cache(const std::string& path, const std::string& key_material,
                                                   int64_t vocab_size, std::string* why_not) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    *why_not = "no cache file";
    return std::nullopt;
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) {
    *why_not = "read error";
    return std::nullopt;
  }
  const std::string data = ss.str();
  return parse_cache(data, key_material, vocab_size, why_not);
}

std::optional<TokenizedDataset> parse_dataset_cache_bytes(std::string_view bytes, const std::string& key_material,
                                                          int64_t vocab_size, std::string* why_not) {
  return parse_cache(bytes, key_material, vocab_size, why_not);
}

}  // namespace qt::data
