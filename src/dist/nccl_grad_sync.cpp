// Bucketed gradient all-reduce on a communication stream, ordered after the backward by events
// (see nccl_grad_sync.h).
#include "dist/nccl_grad_sync.h"

#include <climits>
#include <utility>

namespace qt::dist {

GradAllReducer::GradAllReducer(NcclComm& comm, float* grads, std::vector<GradBucket> plan)
    : comm_(comm), grads_(grads), plan_(std::move(plan)) {
  for (size_t k = 1; k < plan_.size(); ++k)
    QT_CUDA_ASSERT(plan_[k].ready_layer <= plan_[k - 1].ready_layer &&
                       plan_[k].offset + plan_[k].size == plan_[k - 1].offset,
                   "gradient buckets must come from plan_grad_buckets (reverse layer order, contiguous)");
  for (size_t k = 0; k <= plan_.size(); ++k) ready_.push_back(std::make_unique<cuda::Event>());
}

void GradAllReducer::launch_until(int layer, cudaStream_t compute) {
  if (next_ >= plan_.size() || plan_[next_].ready_layer < layer) return;  // nothing released by this layer
  QT_CUDA_ASSERT(events_used_ < ready_.size(), "more bucket launches than buckets in one step");
  cuda::Event& ev = *ready_[events_used_++];
  ev.record(compute);
  QT_CUDA_CHECK(cudaStreamWaitEvent(stream_.get(), ev.get(), 0));
  for (; next_ < plan_.size() && plan_[next_].ready_layer >= layer; ++next_)
    comm_.all_reduce_sum(grads_ + plan_[next_].offset, size_t(plan_[next_].size), stream_.get());
}

void GradAllReducer::layer_done(int layer, cudaStream_t compute) { launch_until(layer, compute); }

void GradAllReducer::flush(cudaStream_t compute) { launch_until(INT_MIN, compute); }

void GradAllReducer::finish(cudaStream_t compute) {
  flush(compute);
  done_.record(stream_.get());
  QT_CUDA_CHECK(cudaStreamWaitEvent(compute, done_.get(), 0));
  next_ = 0;
  events_used_ = 0;
}

}  // namespace qt::dist
