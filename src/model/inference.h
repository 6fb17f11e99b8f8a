// Decoding with a KV cache on the CPU: the same per-layer forward as training (decoder_layer.h),
// with keys and values of every position kept per layer so each new token costs one row of work.
//
// append(ids) runs n new tokens at positions p..p+n-1 (p = length()): per layer, the attention
// inputs of the n rows are computed, their k/v appended to the cache (p+n, nkv, hd), and the queries
// attend to all p+n cached keys (cpu::attention_kv_forward: query i sees keys j <= p+i); then the
// o-projection and MLP (dense or MoE routing) as in the decoder. LoRA, when given, is applied
// unmerged (y = x W^T + scale * (x A^T) B^T). Nothing but the cache is kept between calls.
// Prefill = append(prompt); decode = append({token}). Logits equal QwenDecoder's full forward on
// the whole sequence up to floating-point summation order in the matrix products.
#pragma once
#include <cstdint>
#include <vector>

#include "model/lora.h"
#include "model/weights.h"

namespace qt {

template <typename T>
class KvDecoder {
 public:
  // Weights (and the adapter, nullable) must be of dtype T and outlive this.
  KvDecoder(const ModelWeights& weights, const LoraAdapter* lora);

  // Runs `ids` (n >= 1) after the cached tokens. Returns the logits (n,V) of every new token when
  // all_logits, else (V) of the last one. Throws "[generate] ..." on ids outside the vocabulary.
  std::vector<T> append(const std::vector<int32_t>& ids, bool all_logits = false);

  int64_t length() const { return len_; }      // tokens in the cache
  const std::vector<int32_t>& tokens() const { return tokens_; }
  void truncate(int64_t len);                  // forget positions >= len (0: empty the cache)

 private:
  const ModelWeights& w_;
  const LoraAdapter* lora_;
  int64_t len_ = 0;
  std::vector<int32_t> tokens_;       // (len) the cached tokens
  std::vector<std::vector<T>> k_, v_;  // per layer (len, nkv, hd), after q/k norm and RoPE
};

}  // namespace qt
