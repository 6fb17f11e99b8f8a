// Data parallelism: which micro-batches each rank computes, and the loss normaliser of a step.
//
// Every rank walks the same deterministic order (data::epoch_order: a pure function of seed and
// epoch) cut into micro-batches of micro_batch_size sequences, batches_per_epoch per epoch.
// An optimizer step consumes a global list of G = W * gradient_accumulation_steps consecutive
// micro-batches that never crosses an epoch end:
//   steps_per_epoch = ceil(batches_per_epoch / G)
//   step s: epoch e = s / steps_per_epoch, micro-batches [first, first + count) of epoch e with
//           first = (s mod steps_per_epoch) * G and count = min(G, batches_per_epoch - first).
// Rank r computes micro-batches first + r, first + r + W, first + r + 2W, ... (< first + count).
// Ragged tail: the last step of an epoch has count < G micro-batches; ranks then compute
// ceil((count - r) / W) of them (possibly none) but every rank still takes the step (it
// all-reduces its zero or partial gradients), so all ranks do the same number of optimizer steps,
// every micro-batch of the epoch is used exactly once, and the step equals the single-process step
// over the same micro-batches. W = 1 is exactly the single-process trainer (tail steps included).
// So N GPUs with gradient_accumulation_steps ga reproduce 1 GPU with ga * N.
//
// Loss normaliser: N = predicted tokens (labels[s] != -100 for s >= 1, HF's shift) of all count
// micro-batches of the step. Every rank computes it from the dataset and the order, without
// communication; each rank scales its gradients by 1/N so the all-reduced sum is the mean over the
// global step, as on one process.
#pragma once
#include <cstdint>
#include <vector>

#include "data/batch_iterator.h"
#include "data/tokenized_dataset.h"
#include "model/decoder.h"

namespace qt::dist {

struct ShardSpec {
  int64_t batches_per_epoch = 1;  // micro-batches per epoch (BatchIterator::batches_per_epoch())
  int64_t grad_accum = 1;         // gradient_accumulation_steps per rank
  int world_size = 1;
  int64_t global_micro_batches() const { return grad_accum * world_size; }  // G
};

// The global micro-batches of one optimizer step: [first, first + count) of epoch `epoch`.
struct StepSlice {
  int64_t epoch = 0;
  int64_t first = 0;
  int64_t count = 0;
};

void validate(const ShardSpec& spec);  // QT_ASSERT on non-positive sizes (the trainer's invariants)
int64_t steps_per_epoch(const ShardSpec& spec);
StepSlice global_step_slice(const ShardSpec& spec, int64_t step);
// The micro-batch indices (within slice.epoch) that `rank` computes, ascending; may be empty.
std::vector<int64_t> rank_micro_batches(const StepSlice& slice, int world_size, int rank);

// Predicted tokens of micro-batch `index` of an epoch whose sequence order is `order`.
int64_t micro_batch_predicted_tokens(const data::TokenizedDataset& ds, const std::vector<int64_t>& order,
                                     int64_t micro_batch_size, int64_t index);
// N of the step: the predicted tokens of all its micro-batches, on every rank alike.
int64_t step_predicted_tokens(const data::TokenizedDataset& ds, const std::vector<int64_t>& order,
                              int64_t micro_batch_size, const StepSlice& slice);

// What one rank computes in one optimizer step, ready for forward_backward.
struct RankStep {
  StepSlice slice;                   // the whole global step
  std::vector<Batch> batches;        // this rank's micro-batches (may be empty in a ragged tail)
  std::vector<int64_t> micro_index;  // each one's index within the global step (m - slice.first):
                                     // the LoraDropout micro_batch, so masks match one process
  int64_t predicted_tokens = 0;      // N of the whole global step (grad scale 1/N)
};

// Loads `rank`'s micro-batches of optimizer step `step` through `it` (seeking as needed; its
// options must be those batches_per_epoch was computed with) and counts the step's N.
RankStep load_rank_step(data::BatchIterator& it, const data::TokenizedDataset& ds, int64_t micro_batch_size,
                        const ShardSpec& spec, int rank, int64_t step);

}  // namespace qt::dist
