// The Qwen2 / Qwen3 / Qwen3-MoE decoder on CUDA (built only with QT_CUDA): the math of model/decoder.h
// with the ops of ops/cuda/ops.h, LoRA training only (base weights frozen, bf16 or NF4 on the device).
//
// Memory: bf16 base weights (QLoRA: NF4 projections, model/cuda_nf4_weights.h, dequantized into a
// bf16 scratch right before the product that needs them: one attention / dense-MLP projection at a
// time, or one MoE layer's experts together; see Impl::wt); optionally the untied input embedding
// table in pinned host memory (embeddings_on_host: only the N looked-up rows cross the bus); fp32 LoRA
// masters, their gradients and AdamW moments in four flat buffers (one clip and one AdamW launch per
// step; optionally in pinned host memory, streamed through two layers' worth of device buffers:
// lora_states_on_host). Per-layer activation checkpointing: the forward keeps only each layer's
// input x_l (N,H) bf16 (optionally in pinned host memory: layer_inputs_on_host); the backward
// recomputes layer l from x_l into one set of per-layer work buffers, then runs its backward. The lm_head and the loss are fused chunk by chunk (the (N,V)
// logits never exist; the chunks live in a layer work buffer that is idle while the head runs).
//
// A training step (zero_grads, set_batch + forward_backward per micro-batch, optimizer_step)
// enqueues everything on the context's stream and returns without synchronising; the loss, the
// gradient norm and the skip decision stay on the device until read_step_stats().
// Qwen3-MoE layers run model/cuda_moe.h (grouped expert GEMMs, device-side routing), with the router
// load-balancing loss when output_router_logits is set, and count the tokens each expert receives.
#pragma once
#ifdef QT_HAVE_CUDA
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/decoder.h"
#include "model/lora.h"
#include "model/weights.h"
#include "ops/cuda/runtime.h"

namespace qt {

struct CudaDecoderOptions {
  // false: inference only (model/cuda_kv_decoder.h): no gradient or AdamW buffers, so the training
  // calls (forward_backward, optimizer_step, download_grads/moments) are not available; an NF4
  // layer's projections are dequantized together (layer_view).
  bool training = true;
  // The input embedding table in pinned host memory (see the top of the file); ignored when the
  // embeddings are tied to lm_head.
  bool embeddings_on_host = false;
  // The saved layer inputs x_0..x_{L-2} of a training forward in pinned host memory: written there
  // on a copy stream while the next layer runs and prefetched back one layer ahead of the backward,
  // so the device holds two (N,H) buffers instead of L+1 (same results bit for bit). Tests set
  // QT_TEST_COPY_DELAY_US to delay every copy on the device (a missing wait then shows).
  bool layer_inputs_on_host = false;
  // The LoRA training state (fp32 masters, gradients and AdamW moments, 16 bytes per parameter) in
  // pinned host memory: the device holds two layers' masters and gradients (slots used in turn),
  // fetched one layer ahead of the forward and the backward on a copy stream; each layer's gradient
  // goes back to the host after its backward (and comes up again for the next micro-batch's), and
  // optimizer_step streams the state through the same slots in chunks (clip + AdamW on the device,
  // the same arithmetic). Same results bit for bit; for LoRA on every expert of a large MoE model
  // (Qwen3-30B-A3B r=16: 12.6 GiB of state). Not with a layer_backward_hook (data parallelism).
  bool lora_states_on_host = false;
  // NF4 base, training: a MoE layer's experts are dequantized this many at a time (0: the whole layer
  // together), each chunk right before its products (model/cuda_moe.h chunks), so the bf16 scratch
  // holds 3 x chunk experts instead of 3 x E (Qwen3-30B-A3B: 1.13 GiB for 128 experts, 0.14 GiB for
  // 16). The products' outputs are the same row by row; the LoRA weight gradients are summed in
  // another order (fp32). Every projection of a chunk is dequantized again for the backward.
  int64_t nf4_expert_chunk = 0;
};

class CudaDecoder {
 public:
  // Weights uploaded from a host model (any float dtype; rounded once to bf16) and an adapter
  // (copied as fp32 masters). With w.nf4 (QLoRA) the projections are uploaded as NF4 instead of bf16.
  CudaDecoder(cuda::Context& ctx, const ModelWeights& w, const LoraAdapter& lora, const CudaDecoderOptions& opt = {});
  // Random weights of cfg's shape made on the device (normal(0, 0.02), norms 1, biases 0) and an
  // adapter with A ~ normal(0, 1/sqrt(in)) and B ~ normal(0, 0.01) (benchmarks: every LoRA path live).
  // load_in_4bit: the projections are quantized to NF4 on the device and kept so.
  // opt.training must be true.
  CudaDecoder(cuda::Context& ctx, const ModelConfig& cfg, const LoraConfig& lcfg, uint64_t seed,
              bool load_in_4bit = false, const CudaDecoderOptions& opt = {});
  ~CudaDecoder();
  CudaDecoder(const CudaDecoder&) = delete;
  CudaDecoder& operator=(const CudaDecoder&) = delete;

  // Validates a batch and queues its upload (pinned staging, stream ordered: it may be called
  // while the previous batch's work is still running). A batch larger than any before reallocates
  // the activation buffers (synchronising); smaller ones reuse them.
  void set_batch(const Batch& b);
  // Predicted tokens of the current batch (known on the host from the labels).
  int64_t count() const;

  // The start of an optimizer step: zero the LoRA gradients and the step's loss total.
  void zero_grads();
  // Forward + backward of the current batch: ADDS the gradient of grad_scale * loss_sum to the LoRA
  // gradients (grad_scale <= 0: 1/count) and the batch's loss sum to the step's total. `dropout`
  // as QwenDecoder's (the masks are the CPU's, bit for bit). No host synchronisation.
  void forward_backward(double grad_scale = 0, const LoraDropout& dropout = {});
  // Forward only (loss of the batch; loss_sum() reads it), no gradients.
  void forward();
  // The end of an optimizer step, all on the device: the gradients' sum of squares, a guard that
  // skips the update when it or the step's loss total is not finite, clipping to max_norm (<= 0: no
  // clip), and AdamW (step counted from 1; a skipped update changes nothing).
  void optimizer_step(int64_t step, double lr, double weight_decay, double max_norm, double beta1 = 0.9,
                      double beta2 = 0.999, double eps = 1e-8);
  struct StepStats {
    double loss_total = 0;  // sum over the step's micro-batches of loss_sum
    double grad_norm = 0;   // before clipping (NaN/inf when not finite)
    bool skipped = false;   // the guard skipped the update
  };
  // Synchronises and reads the last optimizer_step's statistics.
  StepStats read_step_stats() const;

  // Reads (synchronising) the loss sum of the last forward.
  double loss_sum() const;
  // MoE models: the last forward's router load-balancing loss (HF's load_balancing_loss_func over
  // every MoE layer, without router_aux_loss_coef; 0 for dense models). With output_router_logits,
  // forward_backward adds count * coef * aux to the step's loss total and its gradient to the routers'.
  double aux_loss() const;
  // MoE models: per MoE layer, the (token, expert) assignments per expert (E) of the training
  // forwards since the last call; then zeroed. Empty for dense models.
  std::vector<std::vector<int64_t>> take_expert_load();
  // Logits (B,S,V) fp32 of the last forward (the lm_head product of the final hidden states;
  // debugging and golden checks: the training path never forms them).
  Tensor logits() const;
  // The LoRA gradients / masters as host fp32 adapters of the same structure.
  LoraAdapter download_grads() const;
  LoraAdapter download_lora() const;
  // AdamW's moments (exp_avg, exp_avg_sq) in the adapter's structure, and their replacement with
  // the masters (resume from a checkpoint).
  std::pair<LoraAdapter, LoraAdapter> download_moments() const;
  void upload_state(const LoraAdapter& lora, const LoraAdapter& exp_avg, const LoraAdapter& exp_avg_sq);
  // Bytes of device memory owned by the decoder (weights, adapter, states, activations).
  size_t device_bytes() const;
  // Whether the input embedding table is in host memory (embeddings_on_host and untied).
  bool embeddings_on_host() const;
  // Whether the training forward keeps the saved layer inputs in host memory.
  bool layer_inputs_on_host() const;
  // Whether the LoRA masters, gradients and moments live in host memory.
  bool lora_states_on_host() const;

  // Data parallelism (train/train_engine_cuda.cpp): the flat fp32 gradient buffer on the device,
  // one range per LoRA matrix in buffer order (layers ascending), the step's loss total (one double
  // on the device, summed by forward_backward, read by optimizer_step's guard), and a hook that
  // forward_backward calls on the host right after it has enqueued the backward of each layer
  // (last layer first): the all-reduce of that layer's gradients can be enqueued there.
  struct GradRange {
    int64_t offset = 0, size = 0;  // elements of grad_data()
    int64_t layer = 0;
  };
  std::vector<GradRange> grad_layout() const;
  float* grad_data();  // not with lora_states_on_host
  double* loss_total_data();
  void set_layer_backward_hook(std::function<void(int64_t layer)> hook);  // empty: none

  // The device weights, for inference with a KV cache (model/cuda_kv_decoder.h). layer_view(l) first
  // queues the dequantization of layer l's projections with an NF4 base (into the scratch shared by
  // all layers, so the pointers are valid for work queued before the next layer_view of another layer).
  struct LayerView {
    bool moe = false;
    // (H) norms, (hd) q/k head norms, (qd / kvd) biases, (E,H) router; null when the model has none
    const cuda::bf16 *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
    const cuda::bf16 *q_b = nullptr, *k_b = nullptr, *v_b = nullptr, *router = nullptr;
    std::array<const cuda::bf16*, kNumLoraSlots> w{};   // (out,in); MoE experts (E,out,in)
    std::array<const float*, kNumLoraSlots> A{}, B{};   // fp32 LoRA masters; null without an adapter
  };
  LayerView layer_view(int64_t l);
  const cuda::bf16* embed() const;       // (V,H)
  const cuda::bf16* final_norm() const;  // (H)
  const cuda::bf16* lm_head() const;     // (V,H) (the embedding when tied)
  int64_t lora_rank() const;
  float lora_scale() const;

  struct Impl;

 private:
  Impl* p_;
};

}  // namespace qt
#endif
