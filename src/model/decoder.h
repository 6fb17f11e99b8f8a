// One Qwen decoder for Qwen2, Qwen3 and Qwen3-MoE on the CPU: forward to logits and loss, and the
// hand-written backward to the gradient of every LoRA A and B (base weights frozen).
//
// Per layer (x: residual stream (N,H), N = B*S tokens):
//   a  = RMSNorm(x) ; q,k,v = a Wq^T (+bq) + LoRA, ... ; [Qwen3: q,k = RMSNorm_head(q,k)]
//   q,k = RoPE(q,k, position) ; o = CausalGQA(q,k,v | segments) ; x = x + o Wo^T + LoRA
//   m  = RMSNorm(x) ; x = x + MLP(m)    MLP = down(silu(gate m) * up m)  or the MoE block
// logits = RMSNorm(x) lm_head^T ; loss = mean CE over predicted tokens (HF shift, ignore -100).
// T = float (the engine) or double (exactness checks).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "model/lora.h"
#include "model/weights.h"

namespace qt {

// A batch of B rows of S tokens. position_ids restart at 0 for each packed document; empty means
// 0..S-1 in every row. segment_ids mark packed documents (attention never crosses them); empty means
// one document per row. labels == -100 are not trained on.
struct Batch {
  int64_t B = 0, S = 0;
  std::vector<int32_t> input_ids;     // (B,S)
  std::vector<int32_t> labels;        // (B,S)
  std::vector<int32_t> position_ids;  // (B,S) or empty
  std::vector<int32_t> segment_ids;   // (B,S) or empty
  void validate(int64_t vocab_size) const;  // throws "[batch] ..." on bad shapes or ids
  // Tokens the loss is taken over: labels[r, s] != -100 for s >= 1 (HF's shift).
  int64_t predicted_tokens() const;
};

struct StepResult {
  double loss_sum = 0;   // sum of per-token losses
  int64_t count = 0;     // predicted (unmasked) tokens
  double aux_loss = 0;   // MoE load-balancing loss (only when config.output_router_logits)
  double aux_coef = 0;   // router_aux_loss_coef when aux_loss is part of the loss, else 0
  std::vector<int64_t> expert_load;  // MoE models: (MoE layers, E) (token, expert) assignments per expert
  // HF's loss: mean cross-entropy (+ coef * aux when output_router_logits).
  double loss() const { return (count ? loss_sum / double(count) : 0.0) + aux_coef * aux_loss; }
  Tensor logits;         // (B,S,V) when requested
};

template <typename T>
class QwenDecoder {
 public:
  // `lora` may be null (base model only). Weights and adapter must be of dtype T and outlive this.
  QwenDecoder(const ModelWeights& weights, const LoraAdapter* lora);

  // Forward pass; when `grads` is non-null also the backward pass, ACCUMULATING the gradient of
  // grad_scale * loss_sum into *grads (same structure as the adapter). grad_scale <= 0 means
  // 1/count, the gradient of the mean loss. The router aux loss, when on, is weighted as
  // grad_scale * count * coef * aux (its HF weight relative to the mean).
  // `dropout`: the LoRA dropout of a training step (see LoraDropout); the default is none (eval).
  StepResult forward_backward(const Batch& batch, LoraAdapter* grads, bool keep_logits, double grad_scale = 0,
                              const LoraDropout& dropout = {});

 private:
  const ModelWeights& w_;
  const LoraAdapter* lora_;
};

}  // namespace qt
