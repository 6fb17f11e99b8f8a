// Micro-batches over a TokenizedDataset, deterministic for a given seed.
//
// Epoch e visits every sequence once, in file/pack order or (shuffle) in the order of a
// Fisher-Yates permutation driven by SplitMix64(seed, e) with unbiased bounded draws, so the order
// is the same on every platform and can be resumed from (epoch, step).
// Rows are right-padded to the longest row of the batch (rounded up to pad_to_multiple) with
// pad_id; padding has label -100, its own segment id (one past the row's last document) and
// positions 0, 1, ..., so no real token attends to it. The last, smaller batch is kept unless
// drop_last.
#pragma once
#include <cstdint>
#include <vector>

#include "data/tokenized_dataset.h"
#include "model/decoder.h"

namespace qt::data {

struct BatchOptions {
  int64_t micro_batch_size = 1;
  bool shuffle = true;
  uint64_t seed = 0;
  bool drop_last = false;
  int64_t pad_to_multiple = 1;
  int32_t pad_id = 0;
};

class BatchIterator {
 public:
  BatchIterator(const TokenizedDataset& ds, const BatchOptions& opts);  // starts at epoch 0, step 0
  int64_t batches_per_epoch() const;
  void seek(int64_t epoch, int64_t step);   // the next batch is batch `step` of `epoch`
  // Fills `out` with the next batch; at the end of an epoch moves on to the next epoch.
  void next(Batch& out);
  int64_t epoch() const { return epoch_; }
  int64_t step() const { return step_; }
  const std::vector<int64_t>& order() const { return order_; }  // of the current epoch

 private:
  void make_order();
  const TokenizedDataset& ds_;
  BatchOptions opts_;
  int64_t epoch_ = 0, step_ = 0;
  std::vector<int64_t> order_;
};

// The sequence order of epoch `epoch` (a permutation of 0..n-1), as BatchIterator uses it.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

}  // namespace qt::data
