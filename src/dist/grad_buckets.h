// Buckets for the all-reduce of LoRA gradients, overlapped with the backward pass.
//
// The CUDA engine keeps every LoRA gradient in one flat fp32 buffer, one (offset, size) per A/B
// matrix, layers in order (layer 0 first). The backward runs from the last layer to the first, so
// the gradients at the end of the buffer are final first. The plan cuts the tensors, taken in
// reverse order (highest offset first), into buckets of about `bucket_bytes`: a bucket is closed
// once it holds at least bucket_bytes (a tensor is never split, so one larger tensor is a bucket
// of its own). The buckets tile [first tensor's offset, last tensor's end) of the buffer in
// contiguous ranges (gaps between tensors, such as alignment padding, are summed along: harmless).
//
// Readiness: bucket k holds tensors of layers ready_layer..max_layer and is final as soon as the
// backward of ready_layer (its lowest layer) has finished on this rank's last micro-batch of the
// step. Buckets come in launch order: bucket 0 covers the end of the buffer and is ready first;
// ready_layer never increases with k. A trainer records an event after the backward of layer j,
// and the comm stream waits on it, then all-reduces buckets_ready_after(plan, j) in order.
// Every rank issues the same buckets in the same order (NCCL matches collectives by order); a rank
// without micro-batches in a ragged tail step all-reduces its zero gradients in that order too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace qt::dist {

struct GradTensor {
  int64_t offset = 0;  // in elements of the flat buffer
  int64_t size = 0;    // elements, > 0
  int layer = 0;       // decoder layer, >= 0
};

struct GradBucket {
  int64_t offset = 0;   // elements
  int64_t size = 0;     // elements; [offset, offset + size) is contiguous
  int ready_layer = 0;  // lowest layer in the bucket: ready when its backward has finished
  int max_layer = 0;    // highest layer in the bucket
  int64_t tensors = 0;  // how many tensors it holds
};

// Tensors must not overlap and their layers must not decrease with the offset (the buffer holds
// layers in order); both are engine invariants (QT_ASSERT). bucket_bytes >= 1; elem_bytes = 4 (fp32).
std::vector<GradBucket> plan_grad_buckets(std::vector<GradTensor> tensors, int64_t bucket_bytes,
                                          int64_t elem_bytes = 4);

// [begin, end) of the buckets that become ready when the backward of `layer` finishes (each bucket
// belongs to exactly one layer: its ready_layer); empty when none.
std::pair<size_t, size_t> buckets_ready_after(const std::vector<GradBucket>& plan, int layer);

}  // namespace qt::dist
