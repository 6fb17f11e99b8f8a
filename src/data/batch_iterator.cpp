// Deterministic shuffling and padding into Batch (see batch_iterator.h).
#include "data/batch_iterator.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace qt::data {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, bound) by rejection (no modulo bias).
uint64_t bounded(uint64_t& state, uint64_t bound) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  uint64_t x;
  do x = splitmix64(state);
  while (x >= limit);
  return x % bound;
}

}  // namespace

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(size_t(std::max<int64_t>(n, 0)));
  std::iota(order.begin(), order.end(), 0);
  if (!shuffle) return order;
  uint64_t state = seed ^ (0xD1B54A32D192ED03ull * uint64_t(epoch + 1));
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[size_t(bounded(state, i))]);
  return order;
}

BatchIterator::BatchIterator(const TokenizedDataset& ds, const BatchOptions& opts) : ds_(ds), opts_(opts) {
  if (opts_.micro_batch_size < 1) qt::fail("data", "micro_batch_size must be at least 1, got {}", opts_.micro_batch_size);
  if (opts_.pad_to_multiple < 1) qt::fail("data", "pad_to_multiple must be at least 1, got {}", opts_.pad_to_multiple);
  if (ds_.size() < 1) qt::fail("data", "the dataset has no sequences");
  if (opts_.drop_last && ds_.size() < opts_.micro_batch_size)
    qt::fail("data", "{} sequences are fewer than one micro batch of {} (drop_last)", ds_.size(), opts_.micro_batch_size);
  make_order();
}

int64_t BatchIterator::batches_per_epoch() const {
  const int64_t n = ds_.size(), b = opts_.micro_batch_size;
  return opts_.drop_last ? n / b : (n + b - 1) / b;
}

void BatchIterator::make_order() { order_ = epoch_order(ds_.size(), opts_.seed, epoch_, opts_.shuffle); }

void BatchIterator::seek(int64_t epoch, int64_t step) {
  if (epoch < 0 || step < 0 || step >= batches_per_epoch())
    qt::fail("data", "cannot seek to epoch {} step {} ({} batches per epoch)", epoch, step, batches_per_epoch());
  step_ = step;
  if (epoch != epoch_) {  // order_ is always the order of epoch_: a seek within the epoch keeps it
    epoch_ = epoch;
    make_order();
  }
}

void BatchIterator::next(Batch& out) {
  if (step_ >= batches_per_epoch()) {
    ++epoch_;
    step_ = 0;
    make_order();
  }
  const int64_t first = step_ * opts_.micro_batch_size;
  const int64_t rows = std::min(opts_.micro_batch_size, ds_.size() - first);
  int64_t width = 0;
  for (int64_t r = 0; r < rows; ++r) width = std::max(width, ds_.length(order_[size_t(first + r)]));
  width = (width + opts_.pad_to_multiple - 1) / opts_.pad_to_multiple * opts_.pad_to_multiple;

  out.B = rows;
  out.S = width;
  out.input_ids.assign(size_t(rows * width), opts_.pad_id);
  out.labels.assign(size_t(rows * width), -100);
  out.position_ids.assign(size_t(rows * width), 0);
  out.segment_ids.assign(size_t(rows * width), 0);
  std::vector<int32_t> pos, seg;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = order_[size_t(first + r)];
    const auto ids = ds_.ids(s);
    const auto labels = ds_.label_span(s);
    ds_.positions_and_segments(s, pos, seg);
    const size_t row = size_t(r * width);
    std::copy(ids.begin(), ids.end(), out.input_ids.begin() + ptrdiff_t(row));
    std::copy(labels.begin(), labels.end(), out.labels.begin() + ptrdiff_t(row));
    std::copy(pos.begin(), pos.end(), out.position_ids.begin() + ptrdiff_t(row));
    std::copy(seg.begin(), seg.end(), out.segment_ids.begin() + ptrdiff_t(row));
    const int32_t pad_segment = seg.empty() ? 0 : seg.back() + 1;
    for (int64_t t = int64_t(ids.size()); t < width; ++t) {
      out.position_ids[row + size_t(t)] = int32_t(t - int64_t(ids.size()));
      out.segment_ids[row + size_t(t)] = pad_segment;
    }
  }
  ++step_;
}

}  // namespace qt::data
