// The dense Qwen2 / Qwen3 decoder on CUDA (built only with QT_CUDA): the math of model/decoder.h
// with the ops of ops/cuda/ops.h, LoRA training only (base weights frozen, bf16 on the device).
//
// Memory: bf16 base weights; fp32 LoRA masters, their gradients and AdamW moments in four flat
// buffers (one sum of squares, one clip and one AdamW launch per step). Per-layer activation
// checkpointing: the forward keeps only each layer's input x_l (N,H) bf16; the backward recomputes
// layer l from x_l into one set of per-layer work buffers, then runs its backward. The lm_head and
// the loss are fused chunk by chunk (the (N,V) logits never exist).
//
// A training step (train_step) enqueues forward + backward + clip + AdamW on the context's stream
// and returns without synchronising; the loss stays on the device (loss_sum()/count() read it).
// MoE layers are refused ("[cuda] ...").
#pragma once
#ifdef QT_HAVE_CUDA
#include <cstdint>
#include <string>
#include <vector>

#include "model/decoder.h"
#include "model/lora.h"
#include "model/weights.h"
#include "ops/cuda/runtime.h"

namespace qt {

class CudaDecoder {
 public:
  // Weights uploaded from a host model (any float dtype; rounded once to bf16) and an adapter
  // (copied as fp32 masters).
  CudaDecoder(cuda::Context& ctx, const ModelWeights& w, const LoraAdapter& lora);
  // Random weights of cfg's shape made on the device (normal(0, 0.02), norms 1, biases 0) and an
  // adapter with A ~ normal(0, 1/sqrt(in)) and B ~ normal(0, 0.01) (benchmarks: every LoRA path live).
  CudaDecoder(cuda::Context& ctx, const ModelConfig& cfg, const LoraConfig& lcfg, uint64_t seed);
  ~CudaDecoder();
  CudaDecoder(const CudaDecoder&) = delete;
  CudaDecoder& operator=(const CudaDecoder&) = delete;

  // Validates and uploads a batch (synchronous host copies; outside the step).
  void set_batch(const Batch& b);
  // Predicted tokens of the current batch (known on the host from the labels).
  int64_t count() const;

  // Forward + backward of the current batch: the LoRA gradients are overwritten with the gradient
  // of grad_scale * loss_sum (grad_scale <= 0: 1/count). No host synchronisation.
  void forward_backward(double grad_scale = 0);
  // Forward only (loss), no gradients.
  void forward();
  // Clip the gradients to max_norm (<= 0: no clip) and one AdamW step (step counted from 1).
  void optimizer_step(int64_t step, double lr, double weight_decay, double max_norm, double beta1 = 0.9,
                      double beta2 = 0.999, double eps = 1e-8);

  // Reads (synchronising) the loss sum of the last forward.
  double loss_sum() const;
  // The LoRA gradients / masters as host fp32 adapters of the same structure (tests).
  LoraAdapter download_grads() const;
  LoraAdapter download_lora() const;
  // Bytes of device memory owned by the decoder (weights, adapter, states, activations).
  size_t device_bytes() const;

  struct Impl;

 private:
  Impl* p_;
};

}  // namespace qt
#endif
