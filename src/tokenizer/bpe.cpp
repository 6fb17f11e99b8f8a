// Byte-level BPE merges on token ids. See bpe.h.
#include "tokenizer/bpe.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/unicode.h"

namespace qt::tok {

uint64_t hash_bytes(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t(n) * 0xFF51AFD7ED558CCDull);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  std::memcpy(&w, p, n);
  h = (h ^ w) * 0x94D049BB133111EBull;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return h;
}

namespace {
uint64_t table_size_for(size_t n) {  // load factor <= 0.625
  uint64_t cap = 16;
  while (cap * 5 < n * 8) cap <<= 1;
  return cap;
}
uint64_t mix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xFF51AFD7ED558CCDull;
  k ^= k >> 33;
  return k;
}
constexpr size_t kSmallPiece = 48;  // bytes; longer pieces use the heap merge

// Per-thread direct-mapped cache: piece bytes -> ids, for one model at a time.
struct PieceCache {
  static constexpr size_t kEntries = 4096, kMaxKey = kSmallPiece, kMaxIds = 14;
  struct Entry {
    uint64_t hash = 0;
    uint8_t len = 0xFF;  // 0xFF: empty
    uint8_t n_ids = 0;
    char key[kMaxKey];
    int32_t ids[kMaxIds];
  };
  uint64_t owner = 0;
  std::vector<Entry> entries = std::vector<Entry>(kEntries);
};

PieceCache& thread_cache(uint64_t owner) {
  thread_local PieceCache cache;
  if (cache.owner != owner) {
    for (auto& e : cache.entries) e.len = 0xFF;
    cache.owner = owner;
  }
  return cache;
}

std::atomic<uint64_t> g_next_instance{1};
}  // namespace

// ---------------------------------------------------------------------------------------------
void StringIdMap::build(const std::vector<std::pair<std::string_view, int32_t>>& entries) {
  arena_.clear();
  uint64_t cap = 16;
  while (cap * 5 < entries.size() * 8) cap <<= 1;  // load factor <= 0.625
  slots_.assign(cap, Slot{});
  mask_ = cap - 1;
  count_ = 0;
  for (const auto& [key, id] : entries) {
    if (key.size() > 0xFFFF) fail("tokenizer", "token of {} bytes is too long", key.size());
    uint64_t h = hash_bytes(key.data(), key.size());
    uint64_t i = h & mask_;
    while (slots_[i].id >= 0 && !(slots_[i].hash == uint32_t(h >> 32) && equal(slots_[i], key))) i = (i + 1) & mask_;
    Slot& s = slots_[i];
    if (s.id >= 0) {  // a later duplicate wins
      s.id = id;
      continue;
    }
    s.hash = uint32_t(h >> 32);
    s.id = id;
    s.len = uint16_t(key.size());
    if (key.size() <= kInline) {
      std::memcpy(s.key, key.data(), key.size());
    } else {
      auto off = uint32_t(arena_.size());
      std::memcpy(s.key, &off, sizeof off);
      arena_.append(key);
    }
    ++count_;
  }
}

bool StringIdMap::equal(const Slot& s, std::string_view key) const {
  if (s.len != key.size()) return false;
  if (key.size() <= kInline) {
    for (size_t i = 0; i < key.size(); ++i)
      if (s.key[i] != key[i]) return false;
    return true;
  }
  uint32_t off;
  std::memcpy(&off, s.key, sizeof off);
  return std::memcmp(arena_.data() + off, key.data(), key.size()) == 0;
}

int32_t StringIdMap::find(std::string_view key, uint64_t h) const {
  if (slots_.empty()) return -1;
  for (uint64_t i = h & mask_;; i = (i + 1) & mask_) {
    const Slot& s = slots_[i];
    if (s.id < 0) return -1;
    if (s.hash == uint32_t(h >> 32) && equal(s, key)) return s.id;
  }
}

// ---------------------------------------------------------------------------------------------
void BpeModel::build(std::vector<std::pair<std::string, int32_t>> vocab, const std::vector<Merge>& merges,
                     bool ignore_merges) {
  int32_t max_id = -1;
  for (const auto& [tok, id] : vocab) {
    if (id < 0) fail("tokenizer", "model.vocab: token '{}' has negative id {}", tok, id);
    if (id > 50'000'000) fail("tokenizer", "model.vocab: token '{}' has id {} (too large)", tok, id);
    max_id = std::max(max_id, id);
  }
  tokens_.assign(size_t(max_id + 1), std::string());
  for (auto& [tok, id] : vocab) {
    if (tok.empty()) fail("tokenizer", "model.vocab: empty token string (id {})", id);
    if (!tokens_[size_t(id)].empty())
      fail("tokenizer", "model.vocab: id {} is used by both '{}' and '{}'", id, tokens_[size_t(id)], tok);
    tokens_[size_t(id)] = std::move(tok);
  }
  vocab.clear();

  // Raw bytes of each token: map its byte-level symbols back to bytes.
  bytes_arena_.clear();
  bytes_offset_.assign(tokens_.size() + 1, 0);
  std::vector<bool> byte_level(tokens_.size(), false);
  for (size_t id = 0; id < tokens_.size(); ++id) {
    bytes_offset_[id] = uint32_t(bytes_arena_.size());
    const std::string& t = tokens_[id];
    if (t.empty()) continue;
    std::string raw;
    bool ok = utf8_valid_prefix(t) == t.size();
    const auto* p = reinterpret_cast<const unsigned char*>(t.data());
    for (size_t i = 0; ok && i < t.size();) {
      uint32_t cp = 0;
      int len = utf8_decode(p + i, t.size() - i, &cp);
      int b = codepoint_to_byte(cp);
      if (b < 0) ok = false;
      raw.push_back(char(b));
      i += size_t(len);
    }
    byte_level[id] = ok;
    bytes_arena_ += ok ? raw : t;
  }
  bytes_offset_[tokens_.size()] = uint32_t(bytes_arena_.size());

  std::vector<std::pair<std::string_view, int32_t>> entries;
  entries.reserve(tokens_.size());
  for (size_t id = 0; id < tokens_.size(); ++id)
    if (!tokens_[id].empty()) entries.emplace_back(tokens_[id], int32_t(id));
  by_token_.build(entries);
  entries.clear();
  for (size_t id = 0; id < tokens_.size(); ++id)
    if (byte_level[id]) entries.emplace_back(token_bytes(int32_t(id)), int32_t(id));
  by_bytes_.build(entries);

  for (int b = 0; b < 256; ++b) {
    char c = char(b);
    byte_id_[size_t(b)] = by_bytes_.find(std::string_view(&c, 1));
    if (byte_id_[size_t(b)] < 0) {
      std::string sym;
      utf8_append(sym, byte_to_codepoint()[size_t(b)]);
      fail("tokenizer", "model.vocab lacks the byte-level symbol '{}' of byte 0x{:02X}; only byte-level BPE "
           "vocabularies (all 256 byte symbols) are supported", sym, b);
    }
  }

  // Pair table. HF keeps the last rank when a pair is listed twice; so do we.
  uint64_t cap = table_size_for(merges.size());
  pairs_.assign(cap, PairSlot{~0ull, PairInfo{kNoRank, -1}});
  pair_mask_ = cap - 1;
  merge_count_ = merges.size();
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const Merge& m = merges[rank];
    int32_t a = by_token_.find(m.left), b = by_token_.find(m.right);
    if (a < 0 || b < 0)
      fail("tokenizer", "model.merges[{}] '{} {}': '{}' is not in the vocabulary", rank, m.left, m.right,
           a < 0 ? m.left : m.right);
    int32_t ab = by_token_.find(m.left + m.right);
    if (ab < 0)
      fail("tokenizer", "model.merges[{}] '{} {}': the merged token '{}' is not in the vocabulary", rank,
           m.left, m.right, m.left + m.right);
    uint64_t key = (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
    uint64_t i = mix64(key) & pair_mask_;
    while (pairs_[i].key != ~0ull && pairs_[i].key != key) i = (i + 1) & pair_mask_;
    pairs_[i] = PairSlot{key, PairInfo{uint32_t(rank), ab}};
  }

  trust_whole_piece_ = ignore_merges;
  instance_id_ = g_next_instance.fetch_add(1);
  whole_piece_ok_ = std::make_unique<std::atomic<uint8_t>[]>(tokens_.size());
  for (size_t i = 0; i < tokens_.size(); ++i) whole_piece_ok_[i].store(0, std::memory_order_relaxed);
}

BpeModel::PairInfo BpeModel::find_pair(int32_t a, int32_t b) const {
  uint64_t key = (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
  for (uint64_t i = mix64(key) & pair_mask_;; i = (i + 1) & pair_mask_) {
    const PairSlot& s = pairs_[i];
    if (s.key == key) return s.info;
    if (s.key == ~0ull) return PairInfo{kNoRank, -1};
  }
}

// Short pieces: arrays, linear scan for the lowest rank, shift on merge.
void BpeModel::merge_small(const unsigned char* p, size_t n, std::vector<int32_t>& out) const {
  int32_t ids[kSmallPiece];
  PairInfo pr[kSmallPiece];
  for (size_t i = 0; i < n; ++i) ids[i] = byte_id_[p[i]];
  for (size_t i = 0; i + 1 < n; ++i) pr[i] = find_pair(ids[i], ids[i + 1]);
  size_t m = n;
  while (m > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < m; ++i)
      if (pr[i].rank < pr[best].rank) best = i;
    if (pr[best].rank == kNoRank) break;
    ids[best] = pr[best].merged;
    for (size_t i = best + 1; i + 1 < m; ++i) ids[i] = ids[i + 1];
    for (size_t i = best + 1; i + 2 < m; ++i) pr[i] = pr[i + 1];
    --m;
    if (best > 0) pr[best - 1] = find_pair(ids[best - 1], ids[best]);
    if (best + 1 < m) pr[best] = find_pair(ids[best], ids[best + 1]);
  }
  out.insert(out.end(), ids, ids + m);
}

// Long pieces: symbols in a doubly linked list, candidate pairs in a min-heap keyed by
// (rank << 32 | position); stale entries are skipped when popped.
void BpeModel::merge_heap(const unsigned char* p, size_t n, std::vector<int32_t>& out) const {
  struct Sym {
    int32_t id, prev, next;
  };
  std::vector<Sym> sym(n);
  for (size_t i = 0; i < n; ++i) sym[i] = Sym{byte_id_[p[i]], int32_t(i) - 1, i + 1 < n ? int32_t(i + 1) : -1};
  std::vector<uint64_t> heap;
  heap.reserve(n);
  auto push = [&](int32_t pos) {
    int32_t nx = sym[size_t(pos)].next;
    if (nx < 0) return;
    PairInfo info = find_pair(sym[size_t(pos)].id, sym[size_t(nx)].id);
    if (info.rank == kNoRank) return;
    heap.push_back((uint64_t(info.rank) << 32) | uint32_t(pos));
    std::push_heap(heap.begin(), heap.end(), std::greater<uint64_t>());
  };
  for (size_t i = 0; i + 1 < n; ++i) push(int32_t(i));
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<uint64_t>());
    uint64_t top = heap.back();
    heap.pop_back();
    auto rank = uint32_t(top >> 32);
    auto pos = int32_t(top & 0xFFFFFFFFu);
    Sym& s = sym[size_t(pos)];
    if (s.id < 0 || s.next < 0) continue;
    Sym& r = sym[size_t(s.next)];
    PairInfo info = find_pair(s.id, r.id);
    if (info.rank != rank) continue;  // the pair at pos changed since this entry was pushed
    s.id = info.merged;
    int32_t after = r.next;
    r.id = -1;
    s.next = after;
    if (after >= 0) sym[size_t(after)].prev = pos;
    if (s.prev >= 0) push(s.prev);
    push(pos);
  }
  for (int32_t i = 0; i >= 0; i = sym[size_t(i)].next) out.push_back(sym[size_t(i)].id);
}

void BpeModel::merge_any(std::string_view raw, std::vector<int32_t>& out) const {
  const auto* p = reinterpret_cast<const unsigned char*>(raw.data());
  if (raw.size() <= kSmallPiece)
    merge_small(p, raw.size(), out);
  else
    merge_heap(p, raw.size(), out);
}

void BpeModel::encode_piece(std::string_view raw, std::vector<int32_t>& out) const {
  const size_t n = raw.size();
  if (n == 0) return;
  if (n == 1) {
    out.push_back(byte_id_[static_cast<unsigned char>(raw[0])]);
    return;
  }
  uint64_t h = hash_bytes(raw.data(), n);
  int32_t whole = by_bytes_.find(raw, h);
  if (whole >= 0) {
    if (trust_whole_piece_) {
      out.push_back(whole);
      return;
    }
    std::atomic<uint8_t>& flag = whole_piece_ok_[size_t(whole)];
    uint8_t state = flag.load(std::memory_order_relaxed);
    if (state == 1) {
      out.push_back(whole);
      return;
    }
    if (state == 0) {  // first time: does BPE reach this token? (idempotent, so races are harmless)
      size_t before = out.size();
      merge_any(raw, out);
      bool ok = out.size() == before + 1 && out.back() == whole;
      flag.store(ok ? 1 : 2, std::memory_order_relaxed);
      return;
    }
  }
  // Not a (reachable) vocabulary token: merge, through the per-thread cache for short pieces.
  if (n > PieceCache::kMaxKey) {
    merge_any(raw, out);
    return;
  }
  PieceCache& cache = thread_cache(instance_id_);
  PieceCache::Entry& e = cache.entries[h & (PieceCache::kEntries - 1)];
  if (e.hash == h && e.len == n && std::memcmp(e.key, raw.data(), n) == 0) {
    out.insert(out.end(), e.ids, e.ids + e.n_ids);
    return;
  }
  size_t before = out.size();
  merge_any(raw, out);
  size_t count = out.size() - before;
  if (count <= PieceCache::kMaxIds) {
    e.hash = h;
    e.len = uint8_t(n);
    e.n_ids = uint8_t(count);
    std::memcpy(e.key, raw.data(), n);
    std::copy(out.begin() + long(before), out.end(), e.ids);
  }
}

}  // namespace qt::tok
