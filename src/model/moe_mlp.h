// The Qwen3-MoE sparse MLP block on the CPU (HF transformers Qwen3MoeSparseMoeBlock), forward and
// hand-written backward, built from the ops of ops/cpu/ops.h. T = float (engine) or double (tests).
//
// For N tokens x (N,H), E experts of width I, top-k routing:
//   router_logits (N,E) = x W_r^T                        W_r = w.router (E,H)
//   probs, topk_idx, topk_w = moe_router(router_logits)   (softmax over E, top-k, optional renorm)
//   y[n] = sum_j topk_w[n,j] * expert_e(x[n]),  e = topk_idx[n,j]
//   expert_e(v) = down_e(silu(gate_e v) * up_e v),  proj_e(v) = W_e v + scale * B_e (A_e v)
// with the fused expert weights w.gate, w.up (E,I,H), w.down (E,H,I) and, when present, the fused
// expert LoRA of lora.slot[kLoraGate|kLoraUp|kLoraDown]: A (E,r,in), B (E,out,r).
//
// Execution: the N*k (token, slot) assignments are sorted by expert (moe_sort), the token rows
// gathered into expert order xs (N*k,H), each expert runs its matrices over its contiguous rows
// [offsets[e], offsets[e+1]), and moe_combine scatters the weighted outputs back to tokens.
//
// Backward: base weights (router included) are frozen; the gradient reaches x through the experts
// AND through the routing weights (router -> softmax -> top-k values -> renorm), and reaches every
// present expert LoRA A and B.
// LoRA dropout (training): each expert projection's LoRA reads dropout(its input) (PEFT's per-expert
// modules each own an nn.Dropout), the mask of row = assignment id n*k+j from ExpertDropout's key.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "model/lora.h"
#include "model/weights.h"

namespace qt {

// LoRA dropout of the expert projections: probability p (0: none) and the mask keys of the gate,
// up and down adapters (cpu::dropout_key). Rows are assignment ids, so the mask does not depend on
// the expert sort order.
struct ExpertDropout {
  double p = 0;
  std::array<uint64_t, 3> key{};
};

// Everything the backward pass needs, filled by moe_mlp_forward. Buffers are reused across calls.
template <typename T>
struct MoeMlpCache {
  int64_t N = 0, E = 0, H = 0, I = 0, k = 0;
  bool norm_topk_prob = false;
  ExpertDropout dropout;          // as given to the forward
  std::vector<T> router_logits;   // (N,E) x W_r^T, for users (aux loss, routing analysis)
  std::vector<T> probs;           // (N,E) softmax of the logits
  std::vector<int32_t> topk_idx;  // (N,k) chosen experts, descending prob
  std::vector<T> topk_w;          // (N,k) routing weights (renormalised when norm_topk_prob)
  std::vector<int32_t> perm;      // (N*k) assignments n*k+j in expert order
  std::vector<int64_t> offsets;   // (E+1) expert e owns rows [offsets[e], offsets[e+1]) of xs, g, u, h, ys
  std::vector<T> xs;              // (N*k,H) input rows in expert order
  std::vector<T> g, u;            // (N*k,I) gate and up projections (LoRA included)
  std::vector<T> h;               // (N*k,I) silu(g) * u
  std::vector<T> ys;              // (N*k,H) expert outputs before the routing weight
  // LoRA dropout(x) A^T of the gate, up and down projections (index = slot - kLoraGate): (N*k, r), empty when
  // the slot has no adapter.
  std::array<std::vector<T>, 3> xa;

  int64_t assignments() const { return N * k; }
  int64_t tokens_of_expert(int64_t e) const { return offsets[size_t(e + 1)] - offsets[size_t(e)]; }
};

// y (N,H) = MoE(x (N,H)), overwritten; fills `cache`. Weight and LoRA tensors must be of dtype T.
// Throws "[moe_mlp] ..." on mis-shaped weights or adapters, or top_k outside [1, E].
template <typename T>
void moe_mlp_forward(T* y, MoeMlpCache<T>& cache, const T* x, int64_t N, const MlpWeights& w,
                     const LayerLora& lora, T lora_scale, int64_t top_k, bool norm_topk_prob,
                     const ExpertDropout& dropout = {});

// Backward of the block for dy (N,H). ACCUMULATES (+=): dx (N,H) and, when dlora is non-null, the
// gradients of every present expert adapter into dlora->slot[s].A / .B (same shapes as lora's).
// dx may be null (only LoRA gradients). drouter_logits (N,E), nullable: an extra gradient on the
// router logits (e.g. from the load-balancing loss), sent to dx through the frozen router.
template <typename T>
void moe_mlp_backward(T* dx, LayerLora* dlora, const T* dy, const MoeMlpCache<T>& cache, const MlpWeights& w,
                      const LayerLora& lora, T lora_scale, const T* drouter_logits = nullptr);

}  // namespace qt
