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
//
// TokenDecoder is what generation (model/generation.h) needs from a decoder with a KV cache; the CPU
// KvDecoder<float> and the GPU CudaKvDecoder (model/cuda_kv_decoder.h) implement it.
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

#include "model/lora.h"
#include "model/weights.h"

namespace qt {

class TokenDecoder {
 public:
  virtual ~TokenDecoder() = default;
  // Runs `ids` (n >= 1) after the cached tokens at positions length()..length()+n-1 and keeps their
  // keys and values. Returns fp32 logits on the host: (n,V) row-major when all_logits, else (V) of
  // the last token. Throws "[generate] ..." on ids outside the vocabulary.
  virtual std::vector<float> append(const std::vector<int32_t>& ids, bool all_logits = false) = 0;
  virtual int64_t length() const = 0;                     // tokens in the cache
  virtual const std::vector<int32_t>& tokens() const = 0;  // (length) the cached tokens
  virtual void truncate(int64_t len) = 0;                 // forget positions >= len (0: empty the cache)
};

namespace detail {
struct NotATokenDecoder {};
}  // namespace detail

// KvDecoder<float> is a TokenDecoder; KvDecoder<double> (float64 checks) has the same members with
// double logits.
template <typename T>
class KvDecoder : public std::conditional_t<std::is_same_v<T, float>, TokenDecoder, detail::NotATokenDecoder> {
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
