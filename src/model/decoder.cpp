// The Qwen decoder's forward and backward on the CPU, composed from the ops of ops/cpu/ops.h.
// See decoder.h for the math. Every intermediate the backward needs is kept per layer (the CPU
// engine favours clarity over memory; the CUDA engine recomputes instead).
#include "model/decoder.h"

#include <cmath>
#include <memory>

#include "model/moe_aux_loss.h"
#include "model/moe_mlp.h"
#include "ops/cpu/ops.h"

namespace qt {

void Batch::validate(int64_t vocab_size) const {
  if (B <= 0 || S <= 0) fail("batch", "empty batch ({} x {})", B, S);
  size_t n = size_t(B * S);
  if (input_ids.size() != n) fail("batch", "input_ids has {} values, expected {} x {}", input_ids.size(), B, S);
  if (labels.size() != n) fail("batch", "labels has {} values, expected {} x {}", labels.size(), B, S);
  if (!position_ids.empty() && position_ids.size() != n) fail("batch", "position_ids has {} values", position_ids.size());
  if (!segment_ids.empty() && segment_ids.size() != n) fail("batch", "segment_ids has {} values", segment_ids.size());
  for (size_t i = 0; i < n; ++i) {
    if (input_ids[i] < 0 || input_ids[i] >= vocab_size)
      fail("batch", "input_ids[{}][{}] = {} is outside the vocabulary (size {})", i / S, i % S, input_ids[i], vocab_size);
    if (labels[i] != -100 && (labels[i] < 0 || labels[i] >= vocab_size))
      fail("batch", "labels[{}][{}] = {} is neither -100 nor a token id", i / S, i % S, labels[i]);
    if (!position_ids.empty() && position_ids[i] < 0) fail("batch", "negative position id at {}", i);
  }
}

namespace {

const Tensor kNoBias;

template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

// One projection y = x W^T (+ b) (+ LoRA on dropout(x)). xa keeps dropout(x) A^T for the backward;
// the dropped input itself is recomputed from the mask key when needed.
template <typename T>
struct Projection {
  const Tensor& W;
  const Tensor& b;
  const LoraPair* lora;  // null when no adapter on this module
  T scale;
  double drop_p;         // LoRA dropout probability (0: none)
  uint64_t drop_key;     // cpu::dropout_key of this (step, micro-batch, layer, slot)
  int64_t in() const { return W.dim(1); }
  int64_t out() const { return W.dim(0); }

  // x itself, or dropout(x) written to buf.
  const T* lora_input(std::vector<T>& buf, const T* x, int64_t N) const {
    if (drop_p <= 0) return x;
    buf.resize(static_cast<size_t>(N * in()));
    cpu::dropout_apply<T>(buf.data(), x, N, in(), drop_p, drop_key, nullptr);
    return buf.data();
  }
  void forward(T* y, std::vector<T>& xa, const T* x, int64_t N) const {
    cpu::linear_forward(y, x, W.data<T>(), ptr<T>(b), N, in(), out());
    if (lora) {
      int64_t r = lora->A.dim(0);
      xa.resize(static_cast<size_t>(N * r));
      std::vector<T> xd;
      cpu::lora_forward(y, xa.data(), lora_input(xd, x, N), lora->A.data<T>(), lora->B.data<T>(), scale, N, in(),
                        out(), r);
    }
  }
  // dx += dy W (+ LoRA path, through the dropout mask); dlora gets dA, dB.
  void backward(T* dx, LoraPair* dlora, const T* dy, const T* x, const std::vector<T>& xa, int64_t N) const {
    cpu::linear_backward(dx, (T*)nullptr, (T*)nullptr, dy, x, W.data<T>(), N, in(), out());
    if (!lora) return;
    const int64_t r = lora->A.dim(0);
    std::vector<T> xd, dxd(drop_p > 0 ? static_cast<size_t>(N * in()) : 0, T(0));
    cpu::lora_backward(drop_p > 0 ? dxd.data() : dx, dlora->A.data<T>(), dlora->B.data<T>(), dy,
                       lora_input(xd, x, N), xa.data(), lora->A.data<T>(), lora->B.data<T>(), scale, N, in(), out(),
                       r);
    if (drop_p > 0) {
      cpu::dropout_apply<T>(dxd.data(), dxd.data(), N, in(), drop_p, drop_key, nullptr);  // d dropout(x) / dx
      cpu::add_inplace(dx, dxd.data(), N * in());
    }
  }
};

// What the backward of one layer needs.
template <typename T>
struct LayerCache {
  std::vector<T> x;                  // (N,H) layer input
  std::vector<T> a, rstd1;           // (N,H) normed input, (N)
  std::vector<T> q_raw, k_raw;       // (N,nh*hd), (N,nkv*hd) projections before the q/k norm
  std::vector<T> rstd_q, rstd_k;     // (N*nh), (N*nkv)
  std::vector<T> q, k, v;            // after norm + RoPE (attention inputs)
  std::vector<T> attn, lse;          // (N,nh*hd), (B,nh,S)
  std::vector<T> xa[kNumLoraSlots];  // LoRA x A^T per dense module
  std::vector<T> h;                  // (N,H) residual after attention
  std::vector<T> m, rstd2;           // (N,H) normed, (N)
  std::vector<T> g, u, act;          // dense MLP (N,I)
};

}  // namespace

template <typename T>
QwenDecoder<T>::QwenDecoder(const ModelWeights& weights, const LoraAdapter* lora) : w_(weights), lora_(lora) {
  QT_ASSERT(weights.embed.dtype() == dtype_of<T>(), "weights are {}, decoder is {}", dtype_name(weights.embed.dtype()),
            dtype_name(dtype_of<T>()));
  if (lora) QT_ASSERT(lora->layers.size() == weights.layers.size(), "adapter has {} layers, model {}",
                      lora->layers.size(), weights.layers.size());
}

template <typename T>
StepResult QwenDecoder<T>::forward_backward(const Batch& batch, LoraAdapter* grads, bool keep_logits,
                                            double grad_scale, const LoraDropout& dropout) {
  const ModelConfig& c = w_.cfg;
  batch.validate(c.vocab_size);
  const int64_t B = batch.B, S = batch.S, N = B * S, H = c.hidden_size, V = c.vocab_size;
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, hd = c.head_dim;
  const int64_t qd = nh * hd, kvd = nkv * hd, L = int64_t(w_.layers.size());
  const T scale = lora_ ? T(lora_->cfg.scale()) : T(0);
  if (grads) QT_ASSERT(lora_ != nullptr, "gradients requested without an adapter");

  // Positions and the RoPE table (N, hd), shared by all layers.
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) pos[i] = batch.position_ids.empty() ? int32_t(i % S) : batch.position_ids[i];
  std::vector<float> cos(static_cast<size_t>(N * hd)), sin(static_cast<size_t>(N * hd));
  cpu::rope_table(cos.data(), sin.data(), pos.data(), N, hd, c.rope_theta);
  const int32_t* seg = batch.segment_ids.empty() ? nullptr : batch.segment_ids.data();

  auto lora_of = [&](int64_t l, LoraSlot s) -> const LoraPair* {
    if (!lora_) return nullptr;
    const LoraPair& p = lora_->layers[l].slot[s];
    return p.present() ? &p : nullptr;
  };
  const double drop_p = lora_ && dropout.active() ? dropout.p : 0.0;
  auto drop_key = [&](int64_t l, LoraSlot s) {
    return cpu::dropout_key(dropout.seed, dropout.step, dropout.micro_batch, l, s);
  };
  auto proj = [&](int64_t l, const Tensor& W, const Tensor& b, LoraSlot s) {
    return Projection<T>{W, b, lora_of(l, s), scale, drop_p, drop_key(l, s)};
  };
  auto expert_dropout = [&](int64_t l) {
    return ExpertDropout{drop_p, {drop_key(l, kLoraGate), drop_key(l, kLoraUp), drop_key(l, kLoraDown)}};
  };

  std::vector<T> x(static_cast<size_t>(N * H));
  cpu::embedding_forward(x.data(), batch.input_ids.data(), w_.embed.data<T>(), N, H);
  std::vector<LayerCache<T>> caches(grads ? size_t(L) : 0);
  LayerCache<T> scratch;
  // MoE caches are kept for the backward and for the router aux loss (over all MoE layers).
  const bool want_aux = c.output_router_logits;
  std::vector<std::unique_ptr<MoeMlpCache<T>>> moe(static_cast<size_t>(L));
  MoeMlpCache<T> moe_scratch;

  for (int64_t l = 0; l < L; ++l) {
    const LayerWeights& lw = w_.layers[l];
    LayerCache<T>& cc = grads ? caches[l] : scratch;
    cc.x = x;
    // --- attention block
    cc.a.resize(static_cast<size_t>(N * H));
    cc.rstd1.resize(static_cast<size_t>(N));
    cpu::rmsnorm_forward(cc.a.data(), cc.rstd1.data(), x.data(), lw.input_norm.data<T>(), N, H, c.rms_norm_eps);
    const Projection<T> pq = proj(l, lw.attn.q_w, lw.attn.q_b, kLoraQ);
    const Projection<T> pk = proj(l, lw.attn.k_w, lw.attn.k_b, kLoraK);
    const Projection<T> pv = proj(l, lw.attn.v_w, lw.attn.v_b, kLoraV);
    cc.q.resize(static_cast<size_t>(N * qd));
    cc.k.resize(static_cast<size_t>(N * kvd));
    cc.v.resize(static_cast<size_t>(N * kvd));
    pq.forward(cc.q.data(), cc.xa[kLoraQ], cc.a.data(), N);
    pk.forward(cc.k.data(), cc.xa[kLoraK], cc.a.data(), N);
    pv.forward(cc.v.data(), cc.xa[kLoraV], cc.a.data(), N);
    if (c.qk_norm) {
      cc.q_raw = cc.q;
      cc.k_raw = cc.k;
      cc.rstd_q.resize(static_cast<size_t>(N * nh));
      cc.rstd_k.resize(static_cast<size_t>(N * nkv));
      cpu::rmsnorm_forward(cc.q.data(), cc.rstd_q.data(), cc.q_raw.data(), lw.attn.q_norm.data<T>(), N * nh, hd,
                           c.rms_norm_eps);
      cpu::rmsnorm_forward(cc.k.data(), cc.rstd_k.data(), cc.k_raw.data(), lw.attn.k_norm.data<T>(), N * nkv, hd,
                           c.rms_norm_eps);
    }
    cpu::rope_forward(cc.q.data(), cos.data(), sin.data(), N, nh, hd);
    cpu::rope_forward(cc.k.data(), cos.data(), sin.data(), N, nkv, hd);
    cc.attn.resize(static_cast<size_t>(N * qd));
    cc.lse.resize(static_cast<size_t>(B * nh * S));
    cpu::attention_forward(cc.attn.data(), cc.lse.data(), cc.q.data(), cc.k.data(), cc.v.data(), seg, B, S, nh, nkv,
                           hd);
    const Projection<T> po = proj(l, lw.attn.o_w, kNoBias, kLoraO);
    std::vector<T> o(static_cast<size_t>(N * H));
    po.forward(o.data(), cc.xa[kLoraO], cc.attn.data(), N);
    cpu::add_inplace(x.data(), o.data(), N * H);
    cc.h = x;
    // --- MLP block
    cc.m.resize(static_cast<size_t>(N * H));
    cc.rstd2.resize(static_cast<size_t>(N));
    cpu::rmsnorm_forward(cc.m.data(), cc.rstd2.data(), x.data(), lw.post_norm.data<T>(), N, H, c.rms_norm_eps);
    std::vector<T> y(static_cast<size_t>(N * H));
    if (lw.is_moe) {
      static const LayerLora kNoLora{};
      MoeMlpCache<T>* mc = &moe_scratch;
      if (grads || want_aux) {
        moe[l] = std::make_unique<MoeMlpCache<T>>();
        mc = moe[l].get();
      }
      moe_mlp_forward<T>(y.data(), *mc, cc.m.data(), N, lw.mlp, lora_ ? lora_->layers[l] : kNoLora, scale,
                         c.num_experts_per_tok, c.norm_topk_prob, expert_dropout(l));
    } else {
      const int64_t I = lw.mlp.gate.dim(0);
      const Projection<T> pg = proj(l, lw.mlp.gate, kNoBias, kLoraGate);
      const Projection<T> pu = proj(l, lw.mlp.up, kNoBias, kLoraUp);
      const Projection<T> pd = proj(l, lw.mlp.down, kNoBias, kLoraDown);
      cc.g.resize(static_cast<size_t>(N * I));
      cc.u.resize(static_cast<size_t>(N * I));
      cc.act.resize(static_cast<size_t>(N * I));
      pg.forward(cc.g.data(), cc.xa[kLoraGate], cc.m.data(), N);
      pu.forward(cc.u.data(), cc.xa[kLoraUp], cc.m.data(), N);
      cpu::swiglu_forward(cc.act.data(), cc.g.data(), cc.u.data(), N * I);
      pd.forward(y.data(), cc.xa[kLoraDown], cc.act.data(), N);
    }
    cpu::add_inplace(x.data(), y.data(), N * H);
  }

  // --- head and loss
  std::vector<T> xf(static_cast<size_t>(N * H)), rstdf(static_cast<size_t>(N));
  cpu::rmsnorm_forward(xf.data(), rstdf.data(), x.data(), w_.final_norm.data<T>(), N, H, c.rms_norm_eps);
  Tensor logits = Tensor::empty({B, S, V}, dtype_of<T>());
  cpu::linear_forward(logits.data<T>(), xf.data(), w_.lm_head.data<T>(), (const T*)nullptr, N, H, V);
  StepResult res;
  res.loss_sum = cpu::cross_entropy_forward(logits.data<T>(), batch.labels.data(), B, S, V, &res.count);
  std::vector<const MoeMlpCache<T>*> moe_layers;
  for (auto& m : moe)
    if (m) moe_layers.push_back(m.get());
  if (want_aux && !moe_layers.empty()) {
    res.aux_loss = moe_load_balancing_loss<T>(moe_layers);
    res.aux_coef = c.router_aux_loss_coef;
  }
  if (keep_logits) res.logits = logits;
  if (!grads) return res;

  // ================= backward =================
  const T gscale = grad_scale > 0 ? T(grad_scale) : (res.count ? T(1.0 / double(res.count)) : T(0));
  std::vector<T> dlogits(static_cast<size_t>(N * V), T(0));
  cpu::cross_entropy_backward(dlogits.data(), logits.data<T>(), batch.labels.data(), gscale, B, S, V);
  if (!keep_logits) logits = Tensor();
  std::vector<T> dxf(static_cast<size_t>(N * H), T(0)), dx(static_cast<size_t>(N * H), T(0));
  cpu::linear_backward(dxf.data(), (T*)nullptr, (T*)nullptr, dlogits.data(), xf.data(), w_.lm_head.data<T>(), N, H, V);
  dlogits = {};
  cpu::rmsnorm_backward(dx.data(), (T*)nullptr, dxf.data(), x.data(), w_.final_norm.data<T>(), rstdf.data(), N, H);

  // Router aux loss: total = grad_scale * (loss_sum + count * coef * aux), i.e. coef * aux per token
  // of the mean loss, as HF adds coef * aux to the mean cross-entropy.
  std::vector<std::vector<T>> drouter(static_cast<size_t>(L));
  if (res.aux_coef != 0) {
    std::vector<T*> ptrs;
    for (int64_t l = 0; l < L; ++l)
      if (moe[l]) {
        drouter[l].assign(static_cast<size_t>(N * c.num_experts), T(0));
        ptrs.push_back(drouter[l].data());
      }
    moe_load_balancing_loss_backward<T>(ptrs, moe_layers, res.aux_coef * double(gscale) * double(res.count));
  }

  auto dlora_of = [&](int64_t l, LoraSlot s) -> LoraPair* {
    LoraPair& p = grads->layers[l].slot[s];
    return p.present() ? &p : nullptr;
  };

  for (int64_t l = L - 1; l >= 0; --l) {
    const LayerWeights& lw = w_.layers[l];
    LayerCache<T>& cc = caches[l];
    // dx holds d(layer output). Residual: d(h) = dx + MLP path.
    std::vector<T> dm(static_cast<size_t>(N * H), T(0));
    if (lw.is_moe) {
      moe_mlp_backward<T>(dm.data(), &grads->layers[l], dx.data(), *moe[l], lw.mlp, lora_->layers[l], scale,
                          drouter[l].empty() ? nullptr : drouter[l].data());
      moe[l].reset();
    } else {
      const int64_t I = lw.mlp.gate.dim(0);
      const Projection<T> pg = proj(l, lw.mlp.gate, kNoBias, kLoraGate);
      const Projection<T> pu = proj(l, lw.mlp.up, kNoBias, kLoraUp);
      const Projection<T> pd = proj(l, lw.mlp.down, kNoBias, kLoraDown);
      std::vector<T> dact(static_cast<size_t>(N * I), T(0)), dg(static_cast<size_t>(N * I), T(0)), du(static_cast<size_t>(N * I), T(0));
      pd.backward(dact.data(), dlora_of(l, kLoraDown), dx.data(), cc.act.data(), cc.xa[kLoraDown], N);
      cpu::swiglu_backward(dg.data(), du.data(), dact.data(), cc.g.data(), cc.u.data(), N * I);
      pg.backward(dm.data(), dlora_of(l, kLoraGate), dg.data(), cc.m.data(), cc.xa[kLoraGate], N);
      pu.backward(dm.data(), dlora_of(l, kLoraUp), du.data(), cc.m.data(), cc.xa[kLoraUp], N);
    }
    // dx accumulates the norm's gradient: dh = dx + RMSNorm^T(dm)
    cpu::rmsnorm_backward(dx.data(), (T*)nullptr, dm.data(), cc.h.data(), lw.post_norm.data<T>(), cc.rstd2.data(), N, H);
    // Attention block: dx is now d(h) = d(layer input) through the residual + attention path.
    const Projection<T> po = proj(l, lw.attn.o_w, kNoBias, kLoraO);
    std::vector<T> dattn(static_cast<size_t>(N * qd), T(0));
    po.backward(dattn.data(), dlora_of(l, kLoraO), dx.data(), cc.attn.data(), cc.xa[kLoraO], N);
    std::vector<T> dq(static_cast<size_t>(N * qd), T(0)), dk(static_cast<size_t>(N * kvd), T(0)), dv(static_cast<size_t>(N * kvd), T(0));
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), dattn.data(), cc.attn.data(), cc.lse.data(), cc.q.data(),
                            cc.k.data(), cc.v.data(), seg, B, S, nh, nkv, hd);
    cpu::rope_backward(dq.data(), cos.data(), sin.data(), N, nh, hd);
    cpu::rope_backward(dk.data(), cos.data(), sin.data(), N, nkv, hd);
    if (c.qk_norm) {
      std::vector<T> dq_raw(static_cast<size_t>(N * qd), T(0)), dk_raw(static_cast<size_t>(N * kvd), T(0));
      cpu::rmsnorm_backward(dq_raw.data(), (T*)nullptr, dq.data(), cc.q_raw.data(), lw.attn.q_norm.data<T>(),
                            cc.rstd_q.data(), N * nh, hd);
      cpu::rmsnorm_backward(dk_raw.data(), (T*)nullptr, dk.data(), cc.k_raw.data(), lw.attn.k_norm.data<T>(),
                            cc.rstd_k.data(), N * nkv, hd);
      dq.swap(dq_raw);
      dk.swap(dk_raw);
    }
    const Projection<T> pq = proj(l, lw.attn.q_w, lw.attn.q_b, kLoraQ);
    const Projection<T> pk = proj(l, lw.attn.k_w, lw.attn.k_b, kLoraK);
    const Projection<T> pv = proj(l, lw.attn.v_w, lw.attn.v_b, kLoraV);
    std::vector<T> da(static_cast<size_t>(N * H), T(0));
    pq.backward(da.data(), dlora_of(l, kLoraQ), dq.data(), cc.a.data(), cc.xa[kLoraQ], N);
    pk.backward(da.data(), dlora_of(l, kLoraK), dk.data(), cc.a.data(), cc.xa[kLoraK], N);
    pv.backward(da.data(), dlora_of(l, kLoraV), dv.data(), cc.a.data(), cc.xa[kLoraV], N);
    cpu::rmsnorm_backward(dx.data(), (T*)nullptr, da.data(), cc.x.data(), lw.input_norm.data<T>(), cc.rstd1.data(), N, H);
    cc = LayerCache<T>();  // free this layer's activations
  }
  return res;
}

template class QwenDecoder<float>;
template class QwenDecoder<double>;

}  // namespace qt
