// Records -> token sequences with labels, truncated and optionally packed.
//
// Labels (HF convention: labels are NOT shifted; the loss at position t predicts labels[t+1]):
//   chat, default       : only the tokens of each assistant turn's body and its closing <|im_end|>
//                         (RenderedChat::assistant_spans); everything else -100
//   chat, train_on_inputs: every token
//   text                : every token; the tokenizer's eos is appended (as TRL's SFTTrainer does for
//                         language-modelling data), so the model learns where a document ends
//   In all cases labels[0] = -100: position 0 is never predicted, and marking it keeps the
//   shifted loss from crossing into a packed document.
// Token boundaries: the whole rendering is tokenized at once (exactly what HF tokenizes) and each
// token is mapped back to its byte range (byte-level BPE: decode of one token gives its bytes);
// a token is trained iff its first byte lies in a trained span. When the tokenizer's normaliser
// changes the bytes (so the decoded tokens no longer spell the text), the rendering is tokenized
// span by span instead and the pieces concatenated.
// Truncation: sequences longer than sequence_len keep their first sequence_len tokens ("truncate")
// or are dropped ("drop"); an example left with no trained token is dropped (counted).
// Packing: best-fit decreasing (examples sorted by length, longest first, each into the fullest
// pack it fits in, else a new pack), deterministic; every packed document keeps its own
// position ids (0, 1, ...) and segment id, so attention never crosses documents.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/dataset_reader.h"

namespace qt {
class Tokenizer;
}

namespace qt::data {

enum class TruncationMode { truncate, drop };

struct TokenizeOptions {
  ChatTemplateKind chat_template = ChatTemplateKind::chatml;
  bool train_on_inputs = false;
  bool append_eos = true;  // text records
  int64_t sequence_len = 2048;
  TruncationMode truncation = TruncationMode::truncate;
  bool packing = false;
  int threads = 0;  // tokenizer threads (0: all cores)
};

struct TokenizeStats {
  int64_t examples = 0;             // records tokenized
  int64_t truncated = 0;            // longer than sequence_len, cut
  int64_t dropped_too_long = 0;     // longer than sequence_len, dropped (truncation = drop)
  int64_t dropped_no_labels = 0;    // nothing left to train on
  int64_t segmented_fallback = 0;   // tokenized span by span (normaliser changed the text)
  int64_t tokens = 0;               // in all kept sequences
  int64_t trained_tokens = 0;       // labels != -100
  int64_t documents = 0;            // kept examples
};

// Flat storage of all sequences (a sequence = one example, or one pack of several documents).
struct TokenizedDataset {
  std::vector<int32_t> input_ids;        // all sequences concatenated
  std::vector<int32_t> labels;           // same length; -100 = not trained
  std::vector<int64_t> seq_offsets{0};   // (n+1) token offsets of each sequence
  std::vector<int32_t> doc_lengths;      // lengths of the documents, in sequence order
  std::vector<int64_t> seq_doc_offsets{0};  // (n+1) offsets into doc_lengths
  TokenizeStats stats;
  ReadSummary read_summary;

  int64_t size() const { return int64_t(seq_offsets.size()) - 1; }
  int64_t length(int64_t i) const { return seq_offsets[size_t(i) + 1] - seq_offsets[size_t(i)]; }
  std::span<const int32_t> ids(int64_t i) const;
  std::span<const int32_t> label_span(int64_t i) const;
  std::span<const int32_t> docs(int64_t i) const;
  // position ids (restart at 0 per document) and segment ids (0, 1, ... per document) of sequence i.
  void positions_and_segments(int64_t i, std::vector<int32_t>& pos, std::vector<int32_t>& seg) const;
};

struct LabeledTokens {
  std::vector<int32_t> ids;
  std::vector<int32_t> labels;
  bool segmented_fallback = false;
};

// Byte length of every token's decoded text (index = id), for mapping tokens to byte offsets.
std::vector<int32_t> token_byte_lengths(const Tokenizer& tok);

// One record, before truncation. `byte_lengths` from token_byte_lengths(tok).
LabeledTokens tokenize_record(const DatasetRecord& rec, const Tokenizer& tok, const TokenizeOptions& opts,
                              const std::vector<int32_t>& byte_lengths);
LabeledTokens label_rendered_chat(const RenderedChat& chat, const Tokenizer& tok, bool train_on_inputs,
                                  const std::vector<int32_t>& byte_lengths);

// All records -> sequences (labels, truncation, packing). Throws "[data] ..." when nothing is left.
TokenizedDataset tokenize_records(const std::vector<DatasetRecord>& records, const Tokenizer& tok,
                                  const TokenizeOptions& opts);

// Packs documents given by their lengths into bins of capacity `capacity` (best-fit decreasing);
// returns, per bin, the document indices in placement order.
std::vector<std::vector<int64_t>> pack_best_fit_decreasing(const std::vector<int64_t>& lengths, int64_t capacity);

}  // namespace qt::data
