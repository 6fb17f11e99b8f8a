// AdamW over the LoRA parameters, as torch.optim.AdamW (amsgrad off, maximize off), plus the global
// gradient norm, clipping as torch.nn.utils.clip_grad_norm_, and a finite check.
//
// One step t (t = 1, 2, ...) with learning rate lr for every parameter p with gradient g:
//   p  <- p * (1 - lr * weight_decay)                 (decoupled weight decay, before the update)
//   m  <- beta1 * m + (1 - beta1) * g                 (torch: m.lerp_(g, 1 - beta1))
//   v  <- beta2 * v + (1 - beta2) * g^2
//   p  <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Every LoRA A and B is decayed (HF's Trainer exempts only biases and norm weights, which LoRA has
// none of). The arithmetic is done in double per element; m and v are stored as F32 (F64 when the
// parameters are F64, for exactness checks). Parameters and gradients: F32 or F64.
//
// Clipping (torch.nn.utils.clip_grad_norm_, norm_type 2):
//   norm = sqrt(sum over all grads of g^2)    (double accumulation, fixed block order: deterministic)
//   coef = min(1, max_norm / (norm + 1e-6)); every g <- g * coef (coef rounded to the grad dtype).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "model/lora.h"

namespace qt {

struct AdamWConfig {  // torch.optim.AdamW defaults
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  // Throws "[optimizer] ..." unless 0 <= beta < 1, eps >= 0, weight_decay >= 0 (all finite).
  void validate() const;
};

// Optimizer state for checkpoints: named tensors ("layers.L.self_attn.q_proj.lora_A.exp_avg",
// "... .exp_avg_sq", for every present A and B) and the number of steps taken.
struct OptimizerState {
  std::vector<std::pair<std::string, Tensor>> tensors;
  int64_t step = 0;
};

class AdamW {
 public:
  // States (zeros) shaped like the present tensors of `params`.
  AdamW(const LoraAdapter& params, const AdamWConfig& cfg);

  // One update with learning rate `lr`; `grads` has the structure of `params` (as built by
  // LoraAdapter::zeros_like). Callers skip the step when the gradients are not finite.
  void step(LoraAdapter& params, const LoraAdapter& grads, double lr);

  int64_t step_count() const { return step_; }
  const AdamWConfig& config() const { return cfg_; }

  // Copies of the states, and their restoration. load_state throws "[optimizer] <origin>: ..."
  // when a name is missing or unexpected, a shape differs, a tensor is not float, or step < 0.
  OptimizerState state() const;
  void load_state(const OptimizerState& st, const std::string& origin);

  // The moments as adapters of the parameters' structure (exp_avg, exp_avg_sq: copies), and their
  // replacement with the step count: for engines that keep the states elsewhere (the GPU) and meet
  // this object only at checkpoints. set_moments asserts the structure matches.
  std::pair<LoraAdapter, LoraAdapter> moments(const LoraAdapter& params) const;
  void set_moments(const LoraAdapter& exp_avg, const LoraAdapter& exp_avg_sq, int64_t step);

 private:
  struct Slot {  // one parameter tensor (an A or a B) and its moments
    std::string name;
    size_t layer;
    int slot;
    bool is_b;
    Tensor exp_avg, exp_avg_sq;
  };
  AdamWConfig cfg_;
  int64_t step_ = 0;
  std::vector<Slot> slots_;
};

// Global L2 norm of every present gradient tensor (double accumulation, deterministic for any thread
// count). NaN or inf when a gradient is not finite.
double grad_global_norm(const LoraAdapter& grads);
// True when every gradient element is finite.
bool grads_all_finite(const LoraAdapter& grads);
// torch.nn.utils.clip_grad_norm_(max_norm): returns the norm before clipping. A non-finite norm
// leaves the gradients untouched (the trainer skips that step). max_norm must be > 0.
double clip_grad_norm(LoraAdapter& grads, double max_norm);

}  // namespace qt
