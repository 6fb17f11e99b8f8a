// Step slices, rank shards and the step's loss normaliser (see sharding.h).
#include "dist/sharding.h"

#include <algorithm>

#include "core/error.h"

namespace qt::dist {

void validate(const ShardSpec& spec) {
  QT_ASSERT(spec.batches_per_epoch >= 1 && spec.grad_accum >= 1 && spec.world_size >= 1,
            "shard spec: {} batches per epoch, grad_accum {}, world {}", spec.batches_per_epoch, spec.grad_accum,
            spec.world_size);
}

int64_t steps_per_epoch(const ShardSpec& spec) {
  validate(spec);
  const int64_t g = spec.global_micro_batches();
  return (spec.batches_per_epoch + g - 1) / g;
}

StepSlice global_step_slice(const ShardSpec& spec, int64_t step) {
  QT_ASSERT(step >= 0, "step {}", step);
  const int64_t per = steps_per_epoch(spec), g = spec.global_micro_batches();
  StepSlice s;
  s.epoch = step / per;
  s.first = (step % per) * g;
  s.count = std::min(g, spec.batches_per_epoch - s.first);
  return s;
}

std::vector<int64_t> rank_micro_batches(const StepSlice& slice, int world_size, int rank) {
  QT_ASSERT(world_size >= 1 && rank >= 0 && rank < world_size, "rank {} of {}", rank, world_size);
  std::vector<int64_t> mine;
  for (int64_t i = rank; i < slice.count; i += world_size) mine.push_back(slice.first + i);
  return mine;
}

int64_t micro_batch_predicted_tokens(const data::TokenizedDataset& ds, const std::vector<int64_t>& order,
                                     int64_t micro_batch_size, int64_t index) {
  QT_ASSERT(micro_batch_size >= 1 && index >= 0, "micro batch {} of size {}", index, micro_batch_size);
  const int64_t n = int64_t(order.size());
  const int64_t begin = index * micro_batch_size, end = std::min(n, begin + micro_batch_size);
  QT_ASSERT(begin < n, "micro batch {} starts past the {} sequences", index, n);
  int64_t count = 0;
  for (int64_t i = begin; i < end; ++i) {
    const auto labels = ds.label_span(order[size_t(i)]);
    for (size_t s = 1; s < labels.size(); ++s) count += labels[s] != -100;
  }
  return count;
}

int64_t step_predicted_tokens(const data::TokenizedDataset& ds, const std::vector<int64_t>& order,
                              int64_t micro_batch_size, const StepSlice& slice) {
  int64_t n = 0;
  for (int64_t i = slice.first; i < slice.first + slice.count; ++i)
    n += micro_batch_predicted_tokens(ds, order, micro_batch_size, i);
  return n;
}

RankStep load_rank_step(data::BatchIterator& it, const data::TokenizedDataset& ds, int64_t micro_batch_size,
                        const ShardSpec& spec, int rank, int64_t step) {
  QT_ASSERT(it.batches_per_epoch() == spec.batches_per_epoch, "iterator of {} batches per epoch, spec {}",
            it.batches_per_epoch(), spec.batches_per_epoch);
  RankStep out;
  out.slice = global_step_slice(spec, step);
  it.seek(out.slice.epoch, out.slice.first);  // also makes it.order() the order of this epoch
  out.predicted_tokens = step_predicted_tokens(ds, it.order(), micro_batch_size, out.slice);
  for (int64_t m : rank_micro_batches(out.slice, spec.world_size, rank)) {
    if (it.step() != m) it.seek(out.slice.epoch, m);
    it.next(out.batches.emplace_back());
    out.micro_index.push_back(m - out.slice.first);
  }
  return out;
}

}  // namespace qt::dist
