// Overlapping the all-reduce of LoRA gradient buckets with the backward (CUDA + NCCL; part of
// qwentune_cuda). See docs/distributed.md section 4 and dist/grad_buckets.h for the plan.
//
// Usage per optimizer step, on every rank, during the backward of the step's last micro-batch:
//   after the backward of layer j on the compute stream:  sync.layer_done(j, compute);
//   (a rank with no micro-batch this step calls sync.flush(compute) instead)
//   before clipping / AdamW:                               sync.finish(compute);
// layer_done records an event on `compute`, makes the communication stream wait for it and enqueues
// the all-reduce (sum) of every bucket not yet launched whose ready_layer >= j, in plan order, so
// layers without LoRA tensors can be skipped. finish() launches whatever is left (none in a full
// backward), then makes `compute` wait for the communication stream and resets for the next step.
// Every rank launches the same buckets in the same order (NCCL matches collectives by order).
// Not thread safe; one per communicator.
#pragma once
#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "dist/grad_buckets.h"
#include "dist/nccl_comm.h"
#include "ops/cuda/runtime.h"

namespace qt::dist {

class GradAllReducer {
 public:
  // grads: the flat fp32 gradient buffer the plan was made for (device memory of comm's GPU).
  GradAllReducer(NcclComm& comm, float* grads, std::vector<GradBucket> plan);
  GradAllReducer(const GradAllReducer&) = delete;
  GradAllReducer& operator=(const GradAllReducer&) = delete;

  void layer_done(int layer, cudaStream_t compute);
  void flush(cudaStream_t compute);   // launch every remaining bucket after compute's work so far
  void finish(cudaStream_t compute);  // compute waits for all buckets; ready for the next step
  cudaStream_t stream() const { return stream_.get(); }
  const std::vector<GradBucket>& plan() const { return plan_; }
  size_t launched() const { return next_; }

 private:
  void launch_until(int layer, cudaStream_t compute);
  NcclComm& comm_;
  float* grads_;
  std::vector<GradBucket> plan_;
  cuda::Stream stream_;
  std::vector<std::unique_ptr<cuda::Event>> ready_;  // one per call of a step (at most plan size + 1)
  size_t events_used_ = 0;
  cuda::Event done_;
  size_t next_ = 0;  // the next bucket to launch
};

}  // namespace qt::dist
