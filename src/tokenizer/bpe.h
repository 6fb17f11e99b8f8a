// Byte-level BPE model: vocabulary (byte-level token string -> id) and merge ranks.
//
// encode_piece(raw bytes of one pre-token) -> ids, exactly as HF tokenizers' BPE: start from one
// symbol per byte, repeatedly merge the adjacent pair with the lowest merge rank (leftmost first on
// ties) until no pair has a rank. The work is done on token ids (a pair table (id_a, id_b) ->
// (rank, id_ab)), never on strings. Fast paths: a whole piece that is itself a vocabulary token
// returns that token (checked once per token against the merge result, unless ignore_merges says
// the file wants the vocabulary lookup first anyway); short pieces merge in small arrays
// (O(n^2), n <= 48), long ones with a binary heap over a linked list (O(n log n)). A per-thread,
// direct-mapped cache of recently merged pieces (<= 48 bytes, <= 14 ids) skips repeated merges.
#pragma once
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qt::tok {

uint64_t hash_bytes(const void* data, size_t n);

// Open-addressing map from byte strings to ids. A slot is 32 bytes (two per cache line) and holds
// keys of up to 22 bytes inline, so a lookup usually touches one cache line; longer keys live in
// an arena.
class StringIdMap {
 public:
  void build(const std::vector<std::pair<std::string_view, int32_t>>& entries);
  int32_t find(std::string_view key) const { return find(key, hash_bytes(key.data(), key.size())); }
  int32_t find(std::string_view key, uint64_t hash) const;  // hash = hash_bytes(key)
  size_t size() const { return count_; }

 private:
  static constexpr size_t kInline = 22;
  struct alignas(32) Slot {
    uint32_t hash = 0;
    int32_t id = -1;  // -1: empty
    uint16_t len = 0;
    char key[kInline];  // the key when len <= kInline, else its arena offset (uint32)
  };
  static_assert(sizeof(Slot) == 32);
  bool equal(const Slot& s, std::string_view key) const;
  std::string arena_;
  std::vector<Slot> slots_;
  uint64_t mask_ = 0;
  size_t count_ = 0;
};

class BpeModel {
 public:
  struct Merge {
    std::string left, right;
  };
  // vocab: byte-level token strings and ids (ids may have gaps); merges in rank order.
  void build(std::vector<std::pair<std::string, int32_t>> vocab, const std::vector<Merge>& merges,
             bool ignore_merges);

  // Appends the ids of one pre-token given as raw bytes.
  void encode_piece(std::string_view raw, std::vector<int32_t>& out) const;

  int32_t token_to_id(std::string_view token) const { return by_token_.find(token); }
  int32_t id_for_bytes(std::string_view raw) const { return by_bytes_.find(raw); }
  bool has_id(int32_t id) const { return id >= 0 && size_t(id) < tokens_.size() && !tokens_[size_t(id)].empty(); }
  const std::string& token(int32_t id) const { return tokens_[size_t(id)]; }  // byte-level form
  // Raw bytes of a token (its byte-level symbols mapped back); the token string itself when it
  // contains a code point that is no byte-level symbol.
  std::string_view token_bytes(int32_t id) const {
    return std::string_view(bytes_arena_).substr(bytes_offset_[size_t(id)],
                                                 bytes_offset_[size_t(id) + 1] - bytes_offset_[size_t(id)]);
  }
  int32_t byte_token(unsigned char b) const { return byte_id_[b]; }
  int32_t max_id() const { return int32_t(tokens_.size()) - 1; }
  size_t num_merges() const { return merge_count_; }

 private:
  struct PairInfo {
    uint32_t rank;
    int32_t merged;
  };
  static constexpr uint32_t kNoRank = 0xFFFFFFFFu;
  PairInfo find_pair(int32_t a, int32_t b) const;
  void merge_small(const unsigned char* p, size_t n, std::vector<int32_t>& out) const;
  void merge_heap(const unsigned char* p, size_t n, std::vector<int32_t>& out) const;
  void merge_any(std::string_view raw, std::vector<int32_t>& out) const;

  std::vector<std::string> tokens_;    // id -> byte-level string ("" for unused ids)
  std::string bytes_arena_;            // raw bytes of every token, by id
  std::vector<uint32_t> bytes_offset_;  // size tokens_.size() + 1
  StringIdMap by_token_;               // byte-level string -> id
  StringIdMap by_bytes_;               // raw bytes -> id (only tokens made of byte-level symbols)
  std::array<int32_t, 256> byte_id_{};  // id of the one-byte token of each byte
  // Pair table: open addressing on (a << 32 | b).
  struct PairSlot {
    uint64_t key;
    PairInfo info;
  };
  std::vector<PairSlot> pairs_;
  uint64_t pair_mask_ = 0;
  size_t merge_count_ = 0;
  bool trust_whole_piece_ = false;
  uint64_t instance_id_ = 0;  // tells the per-thread piece caches of different models apart
  // Per token: 0 = not checked yet, 1 = BPE of its bytes gives the token itself, 2 = it does not.
  std::unique_ptr<std::atomic<uint8_t>[]> whole_piece_ok_;
};

}  // namespace qt::tok
