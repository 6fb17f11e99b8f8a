// Reverse-layer gradient buckets over a flat buffer (see grad_buckets.h).
#include "dist/grad_buckets.h"

#include <algorithm>

#include "core/error.h"

namespace qt::dist {

std::vector<GradBucket> plan_grad_buckets(std::vector<GradTensor> tensors, int64_t bucket_bytes, int64_t elem_bytes) {
  QT_ASSERT(bucket_bytes >= 1 && elem_bytes >= 1, "bucket_bytes {}, elem_bytes {}", bucket_bytes, elem_bytes);
  std::sort(tensors.begin(), tensors.end(), [](const GradTensor& a, const GradTensor& b) { return a.offset < b.offset; });
  for (size_t i = 0; i < tensors.size(); ++i) {
    const GradTensor& t = tensors[i];
    QT_ASSERT(t.offset >= 0 && t.size > 0 && t.layer >= 0, "gradient tensor at {} size {} layer {}", t.offset, t.size,
              t.layer);
    if (i > 0) {
      const GradTensor& p = tensors[i - 1];
      QT_ASSERT(p.offset + p.size <= t.offset, "gradient tensors overlap: [{}, {}) and [{}, {})", p.offset,
                p.offset + p.size, t.offset, t.offset + t.size);
      QT_ASSERT(p.layer <= t.layer, "layer {} at offset {} follows layer {}: the buffer must hold layers in order",
                t.layer, t.offset, p.layer);
    }
  }
  std::vector<GradBucket> plan;
  GradBucket cur;
  int64_t end = 0;  // one past the current bucket's last element
  for (auto it = tensors.rbegin(); it != tensors.rend(); ++it) {
    if (cur.tensors == 0) {  // a new bucket ends where the previous one began (gaps included)
      end = plan.empty() ? it->offset + it->size : plan.back().offset;
      cur.max_layer = it->layer;
    }
    cur.offset = it->offset;
    cur.size = end - it->offset;
    cur.ready_layer = it->layer;
    ++cur.tensors;
    if (cur.size * elem_bytes >= bucket_bytes) {
      plan.push_back(cur);
      cur = GradBucket{};
    }
  }
  if (cur.tensors) plan.push_back(cur);
  return plan;
}

std::pair<size_t, size_t> buckets_ready_after(const std::vector<GradBucket>& plan, int layer) {
  // ready_layer is non-increasing along the plan: the buckets of one layer are adjacent.
  size_t b = 0;
  while (b < plan.size() && plan[b].ready_layer > layer) ++b;
  size_t e = b;
  while (e < plan.size() && plan[e].ready_layer == layer) ++e;
  return {b, e};
}

}  // namespace qt::dist
