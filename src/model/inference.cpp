// KV-cache decoding (see inference.h).
#include "model/inference.h"

#include <omp.h>

#include "core/error.h"
#include "model/decoder_layer.h"
#include "ops/cpu/ops.h"

namespace qt {

namespace {

// Few-token steps (decoding, short prompts) run the OpenMP ops on one thread: their work per call
// (one norm row, a few attention heads) is far smaller than an OpenMP fork/join, and OpenMP threads
// spinning next to OpenBLAS's own threads on a small machine made 2-thread decoding ~70x slower
// (2 vs 150 tokens/s on the 2-core development machine). Matrix products keep their BLAS threads.
class FewTokenThreads {
 public:
  explicit FewTokenThreads(int64_t n) : saved_(omp_get_max_threads()) {
    if (n < kMinTokensForThreads) omp_set_num_threads(1);
  }
  ~FewTokenThreads() { omp_set_num_threads(saved_); }

 private:
  static constexpr int64_t kMinTokensForThreads = 64;
  int saved_;
};

}  // namespace

template <typename T>
KvDecoder<T>::KvDecoder(const ModelWeights& weights, const LoraAdapter* lora)
    : w_(weights), lora_(lora), k_(weights.layers.size()), v_(weights.layers.size()) {
  QT_ASSERT(weights.embed.dtype() == dtype_of<T>(), "weights are {}, decoder is {}", dtype_name(weights.embed.dtype()),
            dtype_name(dtype_of<T>()));
  QT_ASSERT(has_projection_floats(weights), "the CPU decoder needs the float projections (these weights were "
            "loaded for the CUDA engine: NF4 only)");
  if (lora) QT_ASSERT(lora->layers.size() == weights.layers.size(), "adapter has {} layers, model {}",
                      lora->layers.size(), weights.layers.size());
}

template <typename T>
void KvDecoder<T>::truncate(int64_t len) {
  QT_ASSERT(len >= 0, "truncate to {}", len);
  if (len >= len_) return;
  const size_t kvd = size_t(w_.cfg.kv_dim());
  for (size_t l = 0; l < k_.size(); ++l) {
    k_[l].resize(size_t(len) * kvd);
    v_[l].resize(size_t(len) * kvd);
  }
  tokens_.resize(size_t(len));
  len_ = len;
}

template <typename T>
std::vector<T> KvDecoder<T>::append(const std::vector<int32_t>& ids, bool all_logits) {
  const ModelConfig& c = w_.cfg;
  const int64_t n = int64_t(ids.size()), H = c.hidden_size, V = c.vocab_size, hd = c.head_dim;
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, kvd = c.kv_dim();
  QT_ASSERT(n >= 1, "append of no tokens");
  for (int32_t id : ids)
    if (id < 0 || id >= V) fail("generate", "token id {} is outside the vocabulary (size {})", id, V);
  const T scale = lora_ ? T(lora_->cfg.scale()) : T(0);
  const FewTokenThreads threads(n);

  std::vector<int32_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(len_ + i);
  std::vector<float> cos(static_cast<size_t>(n * hd)), sin(static_cast<size_t>(n * hd));
  cpu::rope_table(cos.data(), sin.data(), pos.data(), n, hd, c.rope_theta);

  std::vector<T> x(static_cast<size_t>(n * H));
  cpu::embedding_forward(x.data(), ids.data(), w_.embed.data<T>(), n, H);
  LayerActivations<T> scratch;  // reused by every layer: nothing is kept for a backward
  MoeMlpCache<T> moe_scratch;
  for (size_t l = 0; l < w_.layers.size(); ++l) {
    const LayerParams<T> p{c, w_.layers[l], lora_ ? &lora_->layers[l] : nullptr, scale};
    layer_attention_inputs(scratch, x.data(), n, p, cos.data(), sin.data(), false);
    k_[l].insert(k_[l].end(), scratch.k.begin(), scratch.k.end());
    v_[l].insert(v_[l].end(), scratch.v.begin(), scratch.v.end());
    QT_ASSERT(int64_t(k_[l].size()) == (len_ + n) * kvd, "kv cache of layer {} out of step", l);
    scratch.attn.resize(static_cast<size_t>(n * nh * hd));
    cpu::attention_kv_forward(scratch.attn.data(), (T*)nullptr, scratch.q.data(), k_[l].data(), v_[l].data(), 1, n,
                              len_, nh, nkv, hd);
    layer_output_and_mlp(x.data(), scratch, moe_scratch, n, p, false);
  }
  len_ += n;
  tokens_.insert(tokens_.end(), ids.begin(), ids.end());

  // Head: only the rows whose logits are wanted.
  const int64_t rows = all_logits ? n : 1;
  const T* xr = x.data() + (n - rows) * H;
  std::vector<T> xf(static_cast<size_t>(rows * H)), rstd(static_cast<size_t>(rows));
  cpu::rmsnorm_forward(xf.data(), rstd.data(), xr, w_.final_norm.data<T>(), rows, H, c.rms_norm_eps);
  std::vector<T> logits(static_cast<size_t>(rows * V));
  cpu::linear_forward(logits.data(), xf.data(), w_.lm_head.data<T>(), (const T*)nullptr, rows, H, V);
  return logits;
}

template class KvDecoder<float>;
template class KvDecoder<double>;

}  // namespace qt
