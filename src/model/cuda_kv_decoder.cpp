// KV-cache decoding on the GPU (see cuda_kv_decoder.h for the math and the memory plan).
#ifdef QT_HAVE_CUDA
#include "model/cuda_kv_decoder.h"

#include <algorithm>

#include "core/error.h"
#include "model/cuda_decoder.h"
#include "model/cuda_moe.h"
#include "ops/cuda/ops.h"

namespace qt {

using cuda::bf16;
using cuda::Buffer;

namespace {

// The adapter to upload: the caller's, or one with no slot (every projection without LoRA).
LoraAdapter no_adapter(const ModelConfig& cfg) {
  LoraAdapter none;
  none.layers.resize(size_t(cfg.num_hidden_layers));
  return none;
}

}  // namespace

struct CudaKvDecoder::Impl {
  cuda::Context ctx;  // declared first: `base` uploads on it
  ModelConfig cfg;
  CudaDecoder base;   // the weights (bf16 or NF4) and the LoRA masters
  bool nf4 = false;
  int64_t L = 0, H = 0, V = 0, I = 0, nh = 0, nkv = 0, hd = 0, qd = 0, kvd = 0, r = 0;
  float scale = 0;
  int64_t len = 0;
  std::vector<int32_t> toks;
  // per layer (cache_cap, nkv, hd): keys after q/k norm and RoPE, values
  int64_t cache_cap = 0;
  std::vector<Buffer<bf16>> kc, vc;
  // work buffers for up to work_cap tokens
  int64_t work_cap = 0;
  Buffer<int32_t> ids, pos;
  Buffer<float> cos, sin, rstd1, rstd2, rstd_q, rstd_k, rstdf;
  Buffer<bf16> x, a, q_raw, k_raw, q, attn, o, h, m, g, u, act, xa, xf;
  CudaMoeWork moe_work;
  Buffer<float> logits;  // (rows, V)

  Impl(const ModelWeights& w, const LoraAdapter* lora)
      : cfg(w.cfg), base(ctx, w, lora ? *lora : no_adapter(w.cfg), {.training = false}), nf4(w.nf4 != nullptr) {
    L = cfg.num_hidden_layers, H = cfg.hidden_size, V = cfg.vocab_size;
    nh = cfg.num_attention_heads, nkv = cfg.num_key_value_heads, hd = cfg.head_dim;
    qd = cfg.q_dim(), kvd = cfg.kv_dim();
    r = base.lora_rank(), scale = base.lora_scale();
    for (int64_t l = 0; l < L; ++l)
      if (!cfg.is_moe_layer(l)) I = cfg.intermediate_size;  // the dense MLP's buffers only when a layer needs them
    kc.resize(size_t(L)), vc.resize(size_t(L));
  }

  // Room for `need` cached tokens: doubling, the cached rows copied over.
  void ensure_cache(int64_t need) {
    if (need <= cache_cap) return;
    const int64_t cap = std::max({need, 2 * cache_cap, int64_t(64)});
    std::vector<Buffer<bf16>> grown;  // kc[0], vc[0], kc[1], ...
    for (int64_t l = 0; l < L; ++l)
      for (const auto* c : {&kc[size_t(l)], &vc[size_t(l)]}) {
        grown.emplace_back(size_t(cap * kvd));
        if (len > 0)
          QT_CUDA_CHECK(cudaMemcpyAsync(grown.back().get(), c->get(), size_t(len * kvd) * sizeof(bf16),
                                        cudaMemcpyDeviceToDevice, ctx.stream()));
      }
    ctx.synchronize();  // the copies (and any queued reader) are done before the old buffers are freed
    for (int64_t l = 0; l < L; ++l)
      kc[size_t(l)] = std::move(grown[size_t(2 * l)]), vc[size_t(l)] = std::move(grown[size_t(2 * l + 1)]);
    cache_cap = cap;
  }

  // Work buffers for n tokens (the old ones are idle: append ends with a synchronisation).
  void ensure_work(int64_t n) {
    if (n <= work_cap) return;
    ctx.synchronize();
    const size_t N = size_t(n), NH = N * size_t(H), Nq = N * size_t(qd), Nkv = N * size_t(kvd), NI = N * size_t(I);
    ids = Buffer<int32_t>(N), pos = Buffer<int32_t>(N);
    cos = Buffer<float>(N * size_t(hd)), sin = Buffer<float>(N * size_t(hd));
    rstd1 = Buffer<float>(N), rstd2 = Buffer<float>(N), rstdf = Buffer<float>(N);
    rstd_q = Buffer<float>(N * size_t(nh)), rstd_k = Buffer<float>(N * size_t(nkv));
    x = Buffer<bf16>(NH), a = Buffer<bf16>(NH), o = Buffer<bf16>(NH), h = Buffer<bf16>(NH), m = Buffer<bf16>(NH);
    xf = Buffer<bf16>(NH);
    q_raw = Buffer<bf16>(Nq), q = Buffer<bf16>(Nq), attn = Buffer<bf16>(Nq), k_raw = Buffer<bf16>(Nkv);
    g = Buffer<bf16>(NI), u = Buffer<bf16>(NI), act = Buffer<bf16>(NI);
    xa = Buffer<bf16>(N * size_t(r));
    for (int64_t l = 0; l < L; ++l)
      if (cfg.is_moe_layer(l)) {
        moe_work.alloc(n, H, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, r);
        break;
      }
    work_cap = n;
  }

  // y (n,out) = x W^T (+ b) (+ scale (x A^T) B^T) for projection s of a layer.
  void proj(const CudaDecoder::LayerView& w, int64_t l, int s, bf16* y, const bf16* xin, const bf16* bias, int64_t n) {
    const LoraSlotShape sh = lora_slot_shape(cfg, l, LoraSlot(s));
    cuda::linear_forward(ctx, y, xin, w.w[size_t(s)], bias, n, sh.in, sh.out);
    if (w.A[size_t(s)])
      cuda::lora_forward(ctx, y, xa.get(), xin, w.A[size_t(s)], w.B[size_t(s)], scale, n, sh.in, sh.out, r);
  }

  // x (n,H) <- layer l's output for the n new tokens; their k/v land in the caches at rows len..len+n-1.
  void layer(int64_t l, int64_t n) {
    const CudaDecoder::LayerView w = base.layer_view(l);  // NF4: queues this layer's dequantization
    const double eps = cfg.rms_norm_eps;
    bf16* kcache = kc[size_t(l)].get();
    bf16* vcache = vc[size_t(l)].get();
    cuda::rmsnorm_forward(ctx, a.get(), rstd1.get(), x.get(), w.input_norm, n, H, eps);
    proj(w, l, kLoraQ, q_raw.get(), a.get(), w.q_b, n);
    proj(w, l, kLoraK, k_raw.get(), a.get(), w.k_b, n);
    proj(w, l, kLoraV, vcache + len * kvd, a.get(), w.v_b, n);
    cuda::qk_norm_rope_forward(ctx, q.get(), rstd_q.get(), q_raw.get(), w.q_norm, cos.get(), sin.get(), n, nh, hd, eps);
    cuda::qk_norm_rope_forward(ctx, kcache + len * kvd, rstd_k.get(), k_raw.get(), w.k_norm, cos.get(), sin.get(), n,
                               nkv, hd, eps);
    cuda::attention_kv_forward(ctx, attn.get(), q.get(), kcache, vcache, n, len, nh, nkv, hd);
    proj(w, l, kLoraO, o.get(), attn.get(), nullptr, n);
    cuda::add_rmsnorm_forward(ctx, h.get(), m.get(), rstd2.get(), x.get(), o.get(), w.post_norm, n, H, eps);
    if (w.moe) {  // x = h + moe(m)
      QT_CUDA_CHECK(cudaMemcpyAsync(x.get(), h.get(), size_t(n * H) * sizeof(bf16), cudaMemcpyDeviceToDevice,
                                    ctx.stream()));
      CudaMoeLora ml;
      ml.r = r, ml.scale = scale;
      for (int i = 0; i < 3; ++i) ml.A[size_t(i)] = w.A[size_t(kLoraGate + i)], ml.B[size_t(i)] = w.B[size_t(kLoraGate + i)];
      const CudaMoeWeights mw{w.router, w.w[kLoraGate], w.w[kLoraUp], w.w[kLoraDown]};
      const CudaMoeDims d{n, H, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob};
      cuda_moe_forward(ctx, mw, ml, d, CudaMoeDropout{}, moe_work, m.get(), x.get());
      return;
    }
    proj(w, l, kLoraGate, g.get(), m.get(), nullptr, n);
    proj(w, l, kLoraUp, u.get(), m.get(), nullptr, n);
    cuda::swiglu_forward(ctx, act.get(), g.get(), u.get(), n * I);
    proj(w, l, kLoraDown, x.get(), act.get(), nullptr, n);  // x is free: h holds the residual
    cuda::add_inplace(ctx, x.get(), h.get(), n * H);
  }

  std::vector<float> append(const std::vector<int32_t>& in, bool all_logits) {
    const int64_t n = int64_t(in.size());
    QT_ASSERT(n >= 1, "append of no tokens");
    for (int32_t id : in)
      if (id < 0 || id >= V) fail("generate", "token id {} is outside the vocabulary (size {})", id, V);
    ensure_cache(len + n);
    ensure_work(n);
    std::vector<int32_t> positions(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) positions[size_t(i)] = int32_t(len + i);
    // Pageable host -> device on the stream: staged before the call returns, ordered with the kernels.
    QT_CUDA_CHECK(cudaMemcpyAsync(ids.get(), in.data(), size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice,
                                  ctx.stream()));
    QT_CUDA_CHECK(cudaMemcpyAsync(pos.get(), positions.data(), size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice,
                                  ctx.stream()));
    cuda::rope_table(ctx, cos.get(), sin.get(), pos.get(), n, hd, cfg.rope_theta);
    cuda::embedding_forward(ctx, x.get(), ids.get(), base.embed(), n, V, H);
    for (int64_t l = 0; l < L; ++l) layer(l, n);

    // Head: only the rows whose logits are wanted.
    const int64_t rows = all_logits ? n : 1;
    if (logits.size() < size_t(rows * V)) {
      ctx.synchronize();
      logits = Buffer<float>(size_t(rows * V));
    }
    cuda::rmsnorm_forward(ctx, xf.get(), rstdf.get(), x.get() + (n - rows) * H, base.final_norm(), rows, H,
                          cfg.rms_norm_eps);
    cuda::gemm(ctx, false, true, rows, V, H, 1.f, xf.get(), base.lm_head(), 0.f, logits.get());
    std::vector<float> out(static_cast<size_t>(rows * V));
    ctx.synchronize();
    QT_CUDA_CHECK(cudaMemcpy(out.data(), logits.get(), out.size() * sizeof(float), cudaMemcpyDeviceToHost));
    len += n;
    toks.insert(toks.end(), in.begin(), in.end());
    return out;
  }
};

CudaKvDecoder::CudaKvDecoder(const ModelWeights& weights, const LoraAdapter* lora)
    : p_(std::make_unique<Impl>(weights, lora)) {}

CudaKvDecoder::~CudaKvDecoder() = default;

std::vector<float> CudaKvDecoder::append(const std::vector<int32_t>& ids, bool all_logits) {
  return p_->append(ids, all_logits);
}
int64_t CudaKvDecoder::length() const { return p_->len; }
const std::vector<int32_t>& CudaKvDecoder::tokens() const { return p_->toks; }
void CudaKvDecoder::truncate(int64_t len) {
  QT_ASSERT(len >= 0, "truncate to {}", len);
  if (len >= p_->len) return;
  p_->len = len;
  p_->toks.resize(size_t(len));
}
std::string CudaKvDecoder::describe() const {
  return "cuda (" + cuda::current_device_name() + (p_->nf4 ? ", NF4 base weights on the device" : "") + ")";
}
int64_t CudaKvDecoder::cache_capacity() const { return p_->cache_cap; }

}  // namespace qt
#endif
