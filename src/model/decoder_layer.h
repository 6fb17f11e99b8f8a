// The forward pieces of one Qwen decoder layer, shared by the training decoder (decoder.cpp, which
// keeps what its backward needs) and the KV-cache inference path (inference.cpp, which keeps
// nothing but the cache). For N tokens with residual stream x (N,H):
//   attention inputs : a = RMSNorm(x); q,k,v = a W^T (+b) (+ LoRA); [Qwen3: q,k = RMSNorm_head];
//                      q,k = RoPE(q,k, positions)
//   (the caller runs attention on q,k,v into c.attn: full causal, or against a KV cache)
//   output and MLP   : x += attn Wo^T (+ LoRA); m = RMSNorm(x); x += MLP(m)  (dense SwiGLU or MoE)
// T = float (the engine) or double (exactness checks).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "io/hf_config.h"
#include "model/lora.h"
#include "model/moe_mlp.h"
#include "model/weights.h"

namespace qt {

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

// One projection y = x W^T (+ b) (+ scale * B A dropout(x)), PEFT's LoRA with its lora_dropout.
// xa keeps dropout(x) A^T for the backward; the dropped input itself is recomputed from the mask key.
template <typename T>
struct Projection {
  const Tensor& W;
  const Tensor& b;
  const LoraPair* lora;  // null when no adapter on this module
  T scale;
  double drop_p = 0;      // LoRA dropout probability (0: none)
  uint64_t drop_key = 0;  // cpu::dropout_key of this (step, micro-batch, layer, slot)
  int64_t in() const { return W.dim(1); }
  int64_t out() const { return W.dim(0); }

  void forward(T* y, std::vector<T>& xa, const T* x, int64_t N) const;
  // dx += dy W (+ LoRA path, through the dropout mask); dlora gets dA, dB.
  void backward(T* dx, LoraPair* dlora, const T* dy, const T* x, const std::vector<T>& xa, int64_t N) const;

 private:
  const T* lora_input(std::vector<T>& buf, const T* x, int64_t N) const;  // x, or dropout(x) in buf
};

// The weights of one layer as the forward sees them: base weights, the layer's adapter (null when
// none), the LoRA scale and, in a training step, the LoRA dropout (layer = this layer's index).
template <typename T>
struct LayerParams {
  const ModelConfig& cfg;
  const LayerWeights& w;
  const LayerLora* lora;
  T scale;
  int64_t layer = 0;
  LoraDropout dropout{};
  const LoraPair* lora_of(LoraSlot s) const;  // null when the slot has no adapter
  Projection<T> proj(LoraSlot s) const;       // q/k/v/o, or gate/up/down of a dense MLP
  ExpertDropout expert_dropout() const;       // the MoE experts' gate/up/down dropout
 private:
  double drop_p() const { return lora && dropout.active() ? dropout.p : 0.0; }
  uint64_t drop_key(LoraSlot s) const;
};

// Activations of one layer. With keep_for_backward every field the backward reads is filled;
// without it, q_raw/k_raw and h stay empty and the buffers are plain scratch for the next layer.
template <typename T>
struct LayerActivations {
  std::vector<T> x;                  // (N,H) layer input (filled by the caller when it needs it)
  std::vector<T> a, rstd1;           // (N,H) normed input, (N)
  std::vector<T> q_raw, k_raw;       // (N,nh*hd), (N,nkv*hd) projections before the q/k norm
  std::vector<T> rstd_q, rstd_k;     // (N*nh), (N*nkv)
  std::vector<T> q, k, v;            // after norm + RoPE (attention inputs)
  std::vector<T> attn, lse;          // (N,nh*hd) attention output (filled by the caller), lse
  std::vector<T> xa[kNumLoraSlots];  // LoRA x A^T per dense module
  std::vector<T> h;                  // (N,H) residual after attention
  std::vector<T> m, rstd2;           // (N,H) normed, (N)
  std::vector<T> g, u, act;          // dense MLP (N,I)
};

// Fills c.a, c.rstd1, c.q, c.k, c.v (and q_raw, k_raw, rstd_q, rstd_k) from x (N,H); cos/sin
// (N,hd) are the RoPE tables of the N tokens' positions.
template <typename T>
void layer_attention_inputs(LayerActivations<T>& c, const T* x, int64_t N, const LayerParams<T>& p, const float* cos,
                            const float* sin, bool keep_for_backward);

// x (N,H) += o-projection of c.attn, then x += MLP(RMSNorm(x)). `moe` receives the MoE block's
// routing and expert activations on MoE layers.
template <typename T>
void layer_output_and_mlp(T* x, LayerActivations<T>& c, MoeMlpCache<T>& moe, int64_t N, const LayerParams<T>& p,
                          bool keep_for_backward);

}  // namespace qt
