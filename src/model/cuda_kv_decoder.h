// Decoding with a KV cache on the GPU (built only with QT_CUDA): model/inference.h's KvDecoder with
// the ops of ops/cuda/ops.h, behind the same TokenDecoder interface, so generation
// (model/generation.h) and `qwentune generate --device cuda` run either one.
//
// Weights: a CudaDecoder built for inference (model/cuda_decoder.h, training = false) holds them:
// bf16 on the device, or with an NF4 base (ModelWeights::nf4) the projections kept in NF4 and
// dequantized layer by layer into its one bf16 scratch (CudaNf4Group) right before the layer runs.
// LoRA stays unmerged, as on the CPU and in training: y = x W^T (+ b) + scale * (x A^T) B^T with the
// fp32 masters copied to bf16 per product (cuda::lora_forward; MoE experts through the grouped GEMM).
// Unmerged because (1) an NF4 base cannot hold W + scale B A without a bf16 copy of every projection
// (2 bytes per weight instead of 0.52), (2) its logits then follow the same arithmetic as the
// training forward, and (3) the extra cost is two rank-r products per projection.
//
// append(ids) runs n new tokens at positions p..p+n-1 (p = length()). Per layer l:
//   a = rms(x); q_raw, k_raw, v = a W^T (+b) (+LoRA)            (n,qd), (n,kvd), (n,kvd)
//   q, k = rope(qk_norm(q_raw), qk_norm(k_raw)) at positions p..p+n-1
//   K_l[p..p+n) = k, V_l[p..p+n) = v                              caches (cap, nkv, hd) bf16
//   o = attention_kv(q, K_l[0..p+n), V_l[0..p+n))                query i sees keys j <= p+i
//   h = x + o Wo^T (+LoRA); m = rms(h); x = h + mlp(m)            dense SwiGLU or MoE (cuda_moe_forward)
// then the final norm and lm_head on the last row (every row with all_logits), fp32 logits copied
// to the host. Activations are bf16 with fp32 accumulation (ops/cuda conventions); the caches grow
// by doubling (synchronising), work buffers to the largest n seen. truncate() only moves length():
// later tokens overwrite the cache rows. append() synchronises once (the logits' download).
#pragma once
#ifdef QT_HAVE_CUDA
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/inference.h"
#include "model/lora.h"
#include "model/weights.h"

namespace qt {

class CudaKvDecoder final : public TokenDecoder {
 public:
  // Uploads the weights (any float dtype, rounded once to bf16; NF4 with weights.nf4) and the
  // adapter (nullable) to the current device, on a stream of its own. The host weights are not
  // needed afterwards.
  CudaKvDecoder(const ModelWeights& weights, const LoraAdapter* lora);
  ~CudaKvDecoder() override;
  CudaKvDecoder(const CudaKvDecoder&) = delete;
  CudaKvDecoder& operator=(const CudaKvDecoder&) = delete;

  std::vector<float> append(const std::vector<int32_t>& ids, bool all_logits = false) override;
  int64_t length() const override;
  const std::vector<int32_t>& tokens() const override;
  void truncate(int64_t len) override;

  // "cuda (<GPU name>[, NF4 base weights on the device])", as the training engine describes itself.
  std::string describe() const;
  // Tokens the KV caches hold room for (grows on demand).
  int64_t cache_capacity() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> p_;
};

}  // namespace qt
#endif
