// The Qwen decoder's forward and backward on the CPU, composed from the ops of ops/cpu/ops.h.
// See decoder.h for the math; the layer forward is decoder_layer.h's (shared with inference.cpp).
// Every intermediate the backward needs is kept per layer (the CPU
// engine favours clarity over memory; the CUDA engine recomputes instead).
#include "model/decoder.h"

#include <cmath>
#include <memory>

#include "model/decoder_layer.h"
#include "model/moe_aux_loss.h"
#include "model/moe_mlp.h"
#include "ops/cpu/ops.h"

namespace qt {

int64_t Batch::predicted_tokens() const {
  int64_t n = 0;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t s = 1; s < S; ++s) n += labels[size_t(r * S + s)] != -100;
  return n;
}

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

template <typename T>
QwenDecoder<T>::QwenDecoder(const ModelWeights& weights, const LoraAdapter* lora) : w_(weights), lora_(lora) {
  QT_ASSERT(weights.embed.dtype() == dtype_of<T>(), "weights are {}, decoder is {}", dtype_name(weights.embed.dtype()),
            dtype_name(dtype_of<T>()));
  QT_ASSERT(has_projection_floats(weights), "the CPU decoder needs the float projections (these weights were "
            "loaded for the CUDA engine: NF4 only)");
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

  auto params = [&](int64_t l) {
    return LayerParams<T>{c, w_.layers[size_t(l)], lora_ ? &lora_->layers[size_t(l)] : nullptr, scale, l, dropout};
  };

  std::vector<T> x(static_cast<size_t>(N * H));
  cpu::embedding_forward(x.data(), batch.input_ids.data(), w_.embed.data<T>(), N, H);
  std::vector<LayerActivations<T>> caches(grads ? size_t(L) : 0);
  LayerActivations<T> scratch;
  // MoE caches are kept for the backward and for the router aux loss (over all MoE layers).
  const bool want_aux = c.output_router_logits;
  std::vector<std::unique_ptr<MoeMlpCache<T>>> moe(static_cast<size_t>(L));
  std::vector<int64_t> expert_load;
  MoeMlpCache<T> moe_scratch;
  const bool keep = grads != nullptr;

  for (int64_t l = 0; l < L; ++l) {
    const LayerParams<T> p = params(l);
    LayerActivations<T>& cc = keep ? caches[l] : scratch;
    if (keep) cc.x = x;
    layer_attention_inputs(cc, x.data(), N, p, cos.data(), sin.data(), keep);
    cc.attn.resize(static_cast<size_t>(N * qd));
    cc.lse.resize(static_cast<size_t>(B * nh * S));
    cpu::attention_forward(cc.attn.data(), cc.lse.data(), cc.q.data(), cc.k.data(), cc.v.data(), seg, B, S, nh, nkv,
                           hd);
    MoeMlpCache<T>* mc = &moe_scratch;
    if (p.w.is_moe && (keep || want_aux)) {
      moe[l] = std::make_unique<MoeMlpCache<T>>();
      mc = moe[l].get();
    }
    layer_output_and_mlp(x.data(), cc, *mc, N, p, keep);
    if (p.w.is_moe) {  // the expert-load statistics
      const size_t at = expert_load.size();
      expert_load.resize(at + size_t(c.num_experts), 0);
      for (int64_t a = 0; a < N * c.num_experts_per_tok; ++a) ++expert_load[at + size_t(mc->topk_idx[size_t(a)])];
    }
  }

  // --- head and loss
  std::vector<T> xf(static_cast<size_t>(N * H)), rstdf(static_cast<size_t>(N));
  cpu::rmsnorm_forward(xf.data(), rstdf.data(), x.data(), w_.final_norm.data<T>(), N, H, c.rms_norm_eps);
  Tensor logits = Tensor::empty({B, S, V}, dtype_of<T>());
  cpu::linear_forward(logits.data<T>(), xf.data(), w_.lm_head.data<T>(), (const T*)nullptr, N, H, V);
  StepResult res;
  res.expert_load = std::move(expert_load);
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
    const LayerParams<T> p = params(l);
    LayerActivations<T>& cc = caches[l];
    // dx holds d(layer output). Residual: d(h) = dx + MLP path.
    std::vector<T> dm(static_cast<size_t>(N * H), T(0));
    if (lw.is_moe) {
      moe_mlp_backward<T>(dm.data(), &grads->layers[l], dx.data(), *moe[l], lw.mlp, lora_->layers[l], scale,
                          drouter[l].empty() ? nullptr : drouter[l].data());
      moe[l].reset();
    } else {
      const int64_t I = lw.mlp.gate.dim(0);
      const Projection<T> pg = p.proj(kLoraGate), pu = p.proj(kLoraUp), pd = p.proj(kLoraDown);
      std::vector<T> dact(static_cast<size_t>(N * I), T(0)), dg(static_cast<size_t>(N * I), T(0)), du(static_cast<size_t>(N * I), T(0));
      pd.backward(dact.data(), dlora_of(l, kLoraDown), dx.data(), cc.act.data(), cc.xa[kLoraDown], N);
      cpu::swiglu_backward(dg.data(), du.data(), dact.data(), cc.g.data(), cc.u.data(), N * I);
      pg.backward(dm.data(), dlora_of(l, kLoraGate), dg.data(), cc.m.data(), cc.xa[kLoraGate], N);
      pu.backward(dm.data(), dlora_of(l, kLoraUp), du.data(), cc.m.data(), cc.xa[kLoraUp], N);
    }
    // dx accumulates the norm's gradient: dh = dx + RMSNorm^T(dm)
    cpu::rmsnorm_backward(dx.data(), (T*)nullptr, dm.data(), cc.h.data(), lw.post_norm.data<T>(), cc.rstd2.data(), N, H);
    // Attention block: dx is now d(h) = d(layer input) through the residual + attention path.
    const Projection<T> po = p.proj(kLoraO);
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
    const Projection<T> pq = p.proj(kLoraQ), pk = p.proj(kLoraK), pv = p.proj(kLoraV);
    std::vector<T> da(static_cast<size_t>(N * H), T(0));
    pq.backward(da.data(), dlora_of(l, kLoraQ), dq.data(), cc.a.data(), cc.xa[kLoraQ], N);
    pk.backward(da.data(), dlora_of(l, kLoraK), dk.data(), cc.a.data(), cc.xa[kLoraK], N);
    pv.backward(da.data(), dlora_of(l, kLoraV), dv.data(), cc.a.data(), cc.xa[kLoraV], N);
    cpu::rmsnorm_backward(dx.data(), (T*)nullptr, da.data(), cc.x.data(), lw.input_norm.data<T>(), cc.rstd1.data(), N, H);
    cc = LayerActivations<T>();  // free this layer's activations
  }
  return res;
}

template class QwenDecoder<float>;
template class QwenDecoder<double>;

}  // namespace qt
