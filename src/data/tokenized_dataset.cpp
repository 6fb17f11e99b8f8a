// Labels, truncation and packing (see tokenized_dataset.h).
#include "data/tokenized_dataset.h"

#include <algorithm>
#include <map>
#include <numeric>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace qt::data {
namespace {

constexpr int32_t kIgnore = -100;
constexpr size_t kChunk = 512;  // records rendered and tokenized together

bool in_spans(size_t byte, const std::vector<std::pair<size_t, size_t>>& spans, size_t& cursor) {
  while (cursor < spans.size() && spans[cursor].second <= byte) ++cursor;
  return cursor < spans.size() && spans[cursor].first <= byte;
}

// Fills labels from byte offsets; false when the decoded tokens do not spell `text`.
bool label_by_offsets(const std::string& text, const std::vector<int32_t>& ids, const Tokenizer& tok,
                      const std::vector<std::pair<size_t, size_t>>& spans, const std::vector<int32_t>& byte_lengths,
                      std::vector<int32_t>& labels) {
  size_t total = 0;
  for (int32_t id : ids) {
    if (id < 0 || size_t(id) >= byte_lengths.size()) return false;
    total += size_t(byte_lengths[size_t(id)]);
  }
  if (total != text.size() || tok.decode(ids) != text) return false;
  labels.assign(ids.size(), kIgnore);
  size_t offset = 0, cursor = 0;
  for (size_t t = 0; t < ids.size(); ++t) {
    if (in_spans(offset, spans, cursor)) labels[t] = ids[t];
    offset += size_t(byte_lengths[size_t(ids[t])]);
  }
  return true;
}

}  // namespace

std::span<const int32_t> TokenizedDataset::ids(int64_t i) const {
  return {input_ids.data() + seq_offsets[size_t(i)], size_t(length(i))};
}
std::span<const int32_t> TokenizedDataset::label_span(int64_t i) const {
  return {labels.data() + seq_offsets[size_t(i)], size_t(length(i))};
}
std::span<const int32_t> TokenizedDataset::docs(int64_t i) const {
  const int64_t b = seq_doc_offsets[size_t(i)], e = seq_doc_offsets[size_t(i) + 1];
  return {doc_lengths.data() + b, size_t(e - b)};
}

void TokenizedDataset::positions_and_segments(int64_t i, std::vector<int32_t>& pos, std::vector<int32_t>& seg) const {
  pos.clear();
  seg.clear();
  int32_t segment = 0;
  for (int32_t len : docs(i)) {
    for (int32_t p = 0; p < len; ++p) {
      pos.push_back(p);
      seg.push_back(segment);
    }
    ++segment;
  }
  QT_ASSERT(int64_t(pos.size()) == length(i), "documents of sequence {} sum to {} != {}", i, pos.size(), length(i));
}

std::vector<int32_t> token_byte_lengths(const Tokenizer& tok) {
  const int64_t n = tok.vocab_size();
  std::vector<int32_t> out(size_t(std::max<int64_t>(n, 0)), 0);
  for (int64_t id = 0; id < n; ++id) out[size_t(id)] = int32_t(tok.decode({int32_t(id)}).size());
  return out;
}

namespace {

// Labels for an already-encoded record (`ids` = tok.encode of the text or of chat.text).
LabeledTokens label_encoded(const DatasetRecord& rec, const RenderedChat& chat, std::vector<int32_t> ids,
                            const Tokenizer& tok, const TokenizeOptions& opts, const std::vector<int32_t>& byte_lengths) {
  LabeledTokens out;
  if (rec.is_text) {
    out.ids = std::move(ids);
    const int32_t eos = tok.eos_id();
    if (opts.append_eos && eos >= 0 && (out.ids.empty() || out.ids.back() != eos)) out.ids.push_back(eos);
    out.labels = out.ids;
  } else if (opts.train_on_inputs) {
    out.ids = std::move(ids);
    out.labels = out.ids;
  } else {
    out.ids = std::move(ids);
    if (!label_by_offsets(chat.text, out.ids, tok, chat.assistant_spans, byte_lengths, out.labels)) {
      // The normaliser changed the text: tokenize each piece (outside / inside the spans) on its own.
      out.segmented_fallback = true;
      out.ids.clear();
      out.labels.clear();
      size_t pos = 0;
      auto add_piece = [&](size_t b, size_t e, bool trained) {
        if (e <= b) return;
        const std::vector<int32_t> piece = tok.encode(std::string_view(chat.text).substr(b, e - b));
        out.ids.insert(out.ids.end(), piece.begin(), piece.end());
        if (trained) out.labels.insert(out.labels.end(), piece.begin(), piece.end());
        else out.labels.insert(out.labels.end(), piece.size(), kIgnore);
      };
      for (auto [b, e] : chat.assistant_spans) {
        add_piece(pos, b, false);
        add_piece(b, e, true);
        pos = e;
      }
      add_piece(pos, chat.text.size(), false);
    }
  }
  if (!out.labels.empty()) out.labels[0] = kIgnore;
  return out;
}

}  // namespace

LabeledTokens label_rendered_chat(const RenderedChat& chat, const Tokenizer& tok, bool train_on_inputs,
                                  const std::vector<int32_t>& byte_lengths) {
  DatasetRecord rec;  // a conversation record; only its kind matters here
  TokenizeOptions opts;
  opts.train_on_inputs = train_on_inputs;
  return label_encoded(rec, chat, tok.encode(chat.text), tok, opts, byte_lengths);
}

LabeledTokens tokenize_record(const DatasetRecord& rec, const Tokenizer& tok, const TokenizeOptions& opts,
                              const std::vector<int32_t>& byte_lengths) {
  if (rec.is_text) return label_encoded(rec, {}, tok.encode(rec.text), tok, opts, byte_lengths);
  const RenderedChat chat = render_chat(opts.chat_template, rec.conversation);
  return label_encoded(rec, chat, tok.encode(chat.text), tok, opts, byte_lengths);
}

std::vector<std::vector<int64_t>> pack_best_fit_decreasing(const std::vector<int64_t>& lengths, int64_t capacity) {
  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[size_t(a)] > lengths[size_t(b)]; });
  std::vector<std::vector<int64_t>> bins;
  std::multimap<int64_t, size_t> by_room;  // remaining room -> bin (ties: the earliest bin first)
  for (int64_t doc : order) {
    const int64_t len = lengths[size_t(doc)];
    QT_ASSERT(len > 0 && len <= capacity, "document length {} outside (0, {}]", len, capacity);
    auto it = by_room.lower_bound(len);  // the fullest bin that still fits
    if (it == by_room.end()) {
      bins.push_back({doc});
      if (capacity - len > 0) by_room.emplace(capacity - len, bins.size() - 1);
    } else {
      const size_t bin = it->second;
      const int64_t room = it->first - len;
      by_room.erase(it);
      bins[bin].push_back(doc);
      if (room > 0) by_room.emplace(room, bin);
    }
  }
  return bins;
}

TokenizedDataset tokenize_records(const std::vector<DatasetRecord>& records, const Tokenizer& tok,
                                  const TokenizeOptions& opts) {
  if (opts.sequence_len < 2) qt::fail("data", "sequence_len must be at least 2, got {}", opts.sequence_len);
  const std::vector<int32_t> byte_lengths = token_byte_lengths(tok);
  TokenizedDataset ds;
  TokenizeStats& st = ds.stats;
  std::vector<LabeledTokens> kept;

  // Render and tokenize in chunks; encode_batch spreads the BPE work over threads.
  for (size_t c0 = 0; c0 < records.size(); c0 += kChunk) {
    const size_t c1 = std::min(records.size(), c0 + kChunk);
    std::vector<std::string> texts;
    std::vector<RenderedChat> chats(c1 - c0);
    for (size_t r = c0; r < c1; ++r) {
      if (records[r].is_text) {
        texts.push_back(records[r].text);
      } else {
        chats[r - c0] = render_chat(opts.chat_template, records[r].conversation);
        texts.push_back(chats[r - c0].text);
      }
    }
    const std::vector<std::vector<int32_t>> encoded = tok.encode_batch(texts, opts.threads);
    for (size_t r = c0; r < c1; ++r) {
      ++st.examples;
      LabeledTokens lt = label_encoded(records[r], chats[r - c0], encoded[r - c0], tok, opts, byte_lengths);
      st.segmented_fallback += lt.segmented_fallback;
      if (int64_t(lt.ids.size()) > opts.sequence_len) {
        if (opts.truncation == TruncationMode::drop) {
          ++st.dropped_too_long;
          continue;
        }
        ++st.truncated;
        lt.ids.resize(size_t(opts.sequence_len));
        lt.labels.resize(size_t(opts.sequence_len));
      }
      if (std::all_of(lt.labels.begin(), lt.labels.end(), [](int32_t l) { return l == kIgnore; })) {
        ++st.dropped_no_labels;
        continue;
      }
      kept.push_back(std::move(lt));
    }
  }
  if (kept.empty())
    qt::fail("data", "no example left to train on ({} tokenized: {} too long, {} without trained tokens)", st.examples,
             st.dropped_too_long, st.dropped_no_labels);

  auto append_doc = [&](const LabeledTokens& lt) {
    ds.input_ids.insert(ds.input_ids.end(), lt.ids.begin(), lt.ids.end());
    ds.labels.insert(ds.labels.end(), lt.labels.begin(), lt.labels.end());
    ds.doc_lengths.push_back(int32_t(lt.ids.size()));
  };
  auto close_sequence = [&] {
    ds.seq_offsets.push_back(int64_t(ds.input_ids.size()));
    ds.seq_doc_offsets.push_back(int64_t(ds.doc_lengths.size()));
  };
  if (opts.packing) {
    std::vector<int64_t> lengths;
    for (const auto& lt : kept) lengths.push_back(int64_t(lt.ids.size()));
    for (const auto& bin : pack_best_fit_decreasing(lengths, opts.sequence_len)) {
      for (int64_t doc : bin) append_doc(kept[size_t(doc)]);
      close_sequence();
    }
  } else {
    for (const auto& lt : kept) {
      append_doc(lt);
      close_sequence();
    }
  }
  st.documents = int64_t(kept.size());
  st.tokens = int64_t(ds.input_ids.size());
  st.trained_tokens = std::count_if(ds.labels.begin(), ds.labels.end(), [](int32_t l) { return l != kIgnore; });
  return ds;
}

}  // namespace qt::data
