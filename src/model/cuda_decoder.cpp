// The dense Qwen decoder on CUDA; see cuda_decoder.h for the memory plan and model/decoder.h for
// the math. Per layer, forward (x_in -> x_out) and, in the backward, recompute then backward:
//   a = rms(x_in); q_raw,k_raw,v = a W^T (+b) + LoRA; q,k = rope(qknorm(q_raw,k_raw)); o = attn(q,k,v)
//   h = x_in + (o Wo^T + LoRA); m = rms(h); act = silu(m Wg^T + L) * (m Wu^T + L); x_out = h + act Wd^T + L
#ifdef QT_HAVE_CUDA
#include "model/cuda_decoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>

#include <fmt/core.h>

#include "core/error.h"
#include "ops/cuda/init_clip.h"
#include "ops/cuda/ops.h"

namespace qt {

using cuda::bf16;
using cuda::Buffer;

namespace {

struct DeviceLayer {
  Buffer<bf16> input_norm, post_norm, q_norm, k_norm, q_b, k_b, v_b;
  Buffer<bf16> w[kNumLoraSlots];  // q k v o gate up down, (out,in)
};

// One LoRA slot: offsets of A (r,in) and B (out,r) in the flat fp32 buffers.
struct SlotRef {
  bool present = false;
  int64_t in = 0, out = 0, a_off = 0, b_off = 0;
};

// Optional per-phase timing (QT_CUDA_PROFILE=1): synchronises at each mark (distorts the total,
// not the split) and prints the sums at destruction.
struct PhaseProfile {
  bool on = std::getenv("QT_CUDA_PROFILE") != nullptr;
  std::map<std::string, double> ms;
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  void mark(cuda::Context& ctx, const char* phase) {
    if (!on) return;
    ctx.synchronize();
    auto now = std::chrono::steady_clock::now();
    ms[phase] += std::chrono::duration<double, std::milli>(now - last).count();
    last = now;
  }
  void restart(cuda::Context& ctx) {
    if (!on) return;
    ctx.synchronize();
    last = std::chrono::steady_clock::now();
  }
  ~PhaseProfile() {
    if (!on) return;
    for (auto& [k, v] : ms) fmt::print(stderr, "[profile] {:<16} {:10.1f} ms\n", k, v);
  }
};

}  // namespace

struct CudaDecoder::Impl {
  cuda::Context& ctx;
  ModelConfig cfg;
  int64_t L = 0, H = 0, V = 0, I = 0, nh = 0, nkv = 0, hd = 0, qd = 0, kvd = 0, r = 0;
  float scale = 0;
  Buffer<bf16> embed, final_norm, lm_head_own;
  const bf16* lm_head = nullptr;
  std::vector<DeviceLayer> layers;
  std::vector<std::array<SlotRef, kNumLoraSlots>> slots;
  LoraConfig lcfg;
  int64_t n_lora = 0;
  Buffer<float> lora, grad, m1, m2;
  Buffer<double> sum_sq, loss;
  Buffer<int64_t> count_dev;
  // batch
  int64_t B = 0, S = 0, N = 0, count = 0;
  bool has_seg = false;
  Buffer<int32_t> ids, labels, pos, seg;
  Buffer<float> cos, sin;
  // activations: saved layer inputs (L+1, N, H) and one layer's work buffers
  Buffer<bf16> saved, a, q_raw, k_raw, q, k, v, attn, o, h, m, g, u, act, xa, xf;
  Buffer<float> rstd1, rstd_q, rstd_k, lse, rstd2, rstdf;
  Buffer<bf16> dx, dm, da, dattn, dq, dk, dv, dq_raw, dk_raw, dact, dg, du, dxf;
  PhaseProfile prof;
  bool recomputing = false;
  const char* fwd_phase(const char* fwd, const char* re) const { return recomputing ? re : fwd; }

  Impl(cuda::Context& c, const ModelConfig& mc, const LoraConfig& lc) : ctx(c), cfg(mc), lcfg(lc) {
    for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
      if (cfg.is_moe_layer(i)) fail("cuda", "layer {} is a MoE layer: the CUDA decoder runs dense Qwen2/Qwen3 only", i);
    L = cfg.num_hidden_layers, H = cfg.hidden_size, V = cfg.vocab_size, I = cfg.intermediate_size;
    nh = cfg.num_attention_heads, nkv = cfg.num_key_value_heads, hd = cfg.head_dim;
    qd = cfg.q_dim(), kvd = cfg.kv_dim(), r = lc.r;
    scale = float(lc.scale());
    if (hd > 256) fail("cuda", "head_dim {} > 256 is not supported by the CUDA attention", hd);
    embed = Buffer<bf16>(size_t(V * H));
    final_norm = Buffer<bf16>(size_t(H));
    if (!cfg.tie_word_embeddings) lm_head_own = Buffer<bf16>(size_t(V * H));
    lm_head = cfg.tie_word_embeddings ? embed.get() : lm_head_own.get();
    layers.resize(size_t(L));
    slots.resize(size_t(L));
    for (int64_t l = 0; l < L; ++l) {
      DeviceLayer& d = layers[l];
      d.input_norm = Buffer<bf16>(size_t(H));
      d.post_norm = Buffer<bf16>(size_t(H));
      if (cfg.qk_norm) d.q_norm = Buffer<bf16>(size_t(hd)), d.k_norm = Buffer<bf16>(size_t(hd));
      if (cfg.attention_bias)
        d.q_b = Buffer<bf16>(size_t(qd)), d.k_b = Buffer<bf16>(size_t(kvd)), d.v_b = Buffer<bf16>(size_t(kvd));
      for (int s = 0; s < kNumLoraSlots; ++s) {
        LoraSlotShape sh = lora_slot_shape(cfg, l, LoraSlot(s));
        d.w[s] = Buffer<bf16>(size_t(sh.in * sh.out));
        SlotRef& ref = slots[l][s];
        ref.in = sh.in, ref.out = sh.out;
        if (!lc.targets(LoraSlot(s))) continue;
        ref.present = true;
        ref.a_off = n_lora, n_lora += r * sh.in;
        ref.b_off = n_lora, n_lora += sh.out * r;
      }
    }
    lora = Buffer<float>(size_t(n_lora)), grad = Buffer<float>(size_t(n_lora));
    m1 = Buffer<float>(size_t(n_lora)), m2 = Buffer<float>(size_t(n_lora));
    m1.fill_bytes(0), m2.fill_bytes(0), grad.fill_bytes(0);
    sum_sq = Buffer<double>(1), loss = Buffer<double>(1), count_dev = Buffer<int64_t>(1);
    loss.fill_bytes(0);
    QT_CUDA_CHECK(cudaDeviceSynchronize());  // the fills ran on the null stream; ops use ctx's own
  }

  // Every base tensor with its role, for upload / random init.
  template <typename F>
  void for_each_weight(F&& f) {
    f(embed.get(), V * H, 'w');
    if (!cfg.tie_word_embeddings) f(lm_head_own.get(), V * H, 'w');
    f(final_norm.get(), H, 'n');
    for (auto& d : layers) {
      f(d.input_norm.get(), H, 'n');
      f(d.post_norm.get(), H, 'n');
      if (cfg.qk_norm) f(d.q_norm.get(), hd, 'n'), f(d.k_norm.get(), hd, 'n');
      if (cfg.attention_bias) f(d.q_b.get(), qd, 'b'), f(d.k_b.get(), kvd, 'b'), f(d.v_b.get(), kvd, 'b');
      for (auto& w : d.w) f(w.get(), int64_t(w.size()), 'w');
    }
  }

  void alloc_batch() {
    const size_t NH = size_t(N * H), NI = size_t(N * I), Nq = size_t(N * qd), Nkv = size_t(N * kvd);
    saved = Buffer<bf16>(size_t(L + 1) * NH);
    a = Buffer<bf16>(NH), o = Buffer<bf16>(NH), h = Buffer<bf16>(NH), m = Buffer<bf16>(NH), xf = Buffer<bf16>(NH);
    q_raw = Buffer<bf16>(Nq), q = Buffer<bf16>(Nq), attn = Buffer<bf16>(Nq);
    k_raw = Buffer<bf16>(Nkv), k = Buffer<bf16>(Nkv), v = Buffer<bf16>(Nkv);
    g = Buffer<bf16>(NI), u = Buffer<bf16>(NI), act = Buffer<bf16>(NI);
    xa = Buffer<bf16>(size_t(kNumLoraSlots * N * r));
    rstd1 = Buffer<float>(size_t(N)), rstd2 = Buffer<float>(size_t(N)), rstdf = Buffer<float>(size_t(N));
    rstd_q = Buffer<float>(size_t(N * nh)), rstd_k = Buffer<float>(size_t(N * nkv)), lse = Buffer<float>(size_t(N * nh));
    dx = Buffer<bf16>(NH), dm = Buffer<bf16>(NH), da = Buffer<bf16>(NH), dxf = Buffer<bf16>(NH);
    dattn = Buffer<bf16>(Nq), dq = Buffer<bf16>(Nq), dq_raw = Buffer<bf16>(Nq);
    dk = Buffer<bf16>(Nkv), dv = Buffer<bf16>(Nkv), dk_raw = Buffer<bf16>(Nkv);
    dact = Buffer<bf16>(NI), dg = Buffer<bf16>(NI), du = Buffer<bf16>(NI);
    cos = Buffer<float>(size_t(N * hd)), sin = Buffer<float>(size_t(N * hd));
    ids = Buffer<int32_t>(size_t(N)), labels = Buffer<int32_t>(size_t(N)), pos = Buffer<int32_t>(size_t(N));
    seg = Buffer<int32_t>(size_t(N));
  }

  bf16* saved_at(int64_t l) const { return saved.get() + size_t(l) * size_t(N * H); }
  bf16* xa_of(int s) const { return xa.get() + size_t(s) * size_t(N * r); }
  void zero(Buffer<bf16>& b) { QT_CUDA_CHECK(cudaMemsetAsync(b.get(), 0, b.bytes(), ctx.stream())); }

  // y = x W^T (+ b) (+ LoRA)
  void proj_fwd(int64_t l, int s, bf16* y, const bf16* x, const bf16* bias) {
    const SlotRef& sr = slots[l][s];
    cuda::linear_forward(ctx, y, x, layers[l].w[s].get(), bias, N, sr.in, sr.out);
    if (sr.present)
      cuda::lora_forward(ctx, y, xa_of(s), x, lora.get() + sr.a_off, lora.get() + sr.b_off, scale, N, sr.in, sr.out, r);
  }
  // dx += dy W (+ LoRA); dA, dB accumulate
  void proj_bwd(int64_t l, int s, bf16* dxp, const bf16* dy, const bf16* x) {
    const SlotRef& sr = slots[l][s];
    cuda::linear_backward(ctx, dxp, dy, layers[l].w[s].get(), N, sr.in, sr.out);
    if (sr.present)
      cuda::lora_backward(ctx, dxp, grad.get() + sr.a_off, grad.get() + sr.b_off, dy, x, xa_of(s),
                          lora.get() + sr.a_off, lora.get() + sr.b_off, scale, N, sr.in, sr.out, r);
  }

  void layer_forward(int64_t l, const bf16* x_in, bf16* x_out) {
    const DeviceLayer& d = layers[l];
    const double eps = cfg.rms_norm_eps;
    cuda::rmsnorm_forward(ctx, a.get(), rstd1.get(), x_in, d.input_norm.get(), N, H, eps);
    proj_fwd(l, kLoraQ, q_raw.get(), a.get(), d.q_b.get());
    proj_fwd(l, kLoraK, k_raw.get(), a.get(), d.k_b.get());
    proj_fwd(l, kLoraV, v.get(), a.get(), d.v_b.get());
    cuda::qk_norm_rope_forward(ctx, q.get(), rstd_q.get(), q_raw.get(), d.q_norm.get(), cos.get(), sin.get(), N, nh, hd,
                               eps);
    cuda::qk_norm_rope_forward(ctx, k.get(), rstd_k.get(), k_raw.get(), d.k_norm.get(), cos.get(), sin.get(), N, nkv,
                               hd, eps);
    prof.mark(ctx, fwd_phase("fwd.qkv", "recompute.qkv"));
    cuda::attention_forward(ctx, attn.get(), lse.get(), q.get(), k.get(), v.get(), has_seg ? seg.get() : nullptr, B, S,
                            nh, nkv, hd);
    prof.mark(ctx, fwd_phase("fwd.attention", "recompute.attention"));
    proj_fwd(l, kLoraO, o.get(), attn.get(), nullptr);
    cuda::add_rmsnorm_forward(ctx, h.get(), m.get(), rstd2.get(), x_in, o.get(), d.post_norm.get(), N, H, eps);
    proj_fwd(l, kLoraGate, g.get(), m.get(), nullptr);
    proj_fwd(l, kLoraUp, u.get(), m.get(), nullptr);
    cuda::swiglu_forward(ctx, act.get(), g.get(), u.get(), N * I);
    proj_fwd(l, kLoraDown, x_out, act.get(), nullptr);
    cuda::add_inplace(ctx, x_out, h.get(), N * H);
    prof.mark(ctx, fwd_phase("fwd.o+mlp", "recompute.o+mlp"));
  }

  // dx holds d(x_out) on entry and d(x_in) on exit; the work buffers hold layer l's recompute.
  void layer_backward(int64_t l, const bf16* x_in) {
    const DeviceLayer& d = layers[l];
    zero(dact), zero(dg), zero(du), zero(dm);
    proj_bwd(l, kLoraDown, dact.get(), dx.get(), act.get());
    cuda::swiglu_backward(ctx, dg.get(), du.get(), dact.get(), g.get(), u.get(), N * I);
    proj_bwd(l, kLoraGate, dm.get(), dg.get(), m.get());
    proj_bwd(l, kLoraUp, dm.get(), du.get(), m.get());
    cuda::rmsnorm_backward(ctx, dx.get(), nullptr, dm.get(), h.get(), d.post_norm.get(), rstd2.get(), N, H);
    zero(dattn);
    proj_bwd(l, kLoraO, dattn.get(), dx.get(), attn.get());
    prof.mark(ctx, "bwd.mlp+o");
    zero(dq), zero(dk), zero(dv);
    cuda::attention_backward(ctx, dq.get(), dk.get(), dv.get(), dattn.get(), attn.get(), lse.get(), q.get(), k.get(),
                             v.get(), has_seg ? seg.get() : nullptr, B, S, nh, nkv, hd);
    prof.mark(ctx, "bwd.attention");
    zero(dq_raw), zero(dk_raw), zero(da);
    cuda::qk_norm_rope_backward(ctx, dq_raw.get(), dq.get(), q_raw.get(), d.q_norm.get(), rstd_q.get(), cos.get(),
                                sin.get(), N, nh, hd);
    cuda::qk_norm_rope_backward(ctx, dk_raw.get(), dk.get(), k_raw.get(), d.k_norm.get(), rstd_k.get(), cos.get(),
                                sin.get(), N, nkv, hd);
    proj_bwd(l, kLoraQ, da.get(), dq_raw.get(), a.get());
    proj_bwd(l, kLoraK, da.get(), dk_raw.get(), a.get());
    proj_bwd(l, kLoraV, da.get(), dv.get(), a.get());
    cuda::rmsnorm_backward(ctx, dx.get(), nullptr, da.get(), x_in, d.input_norm.get(), rstd1.get(), N, H);
    prof.mark(ctx, "bwd.qkv");
  }

  // Forward through every layer (keeping each input) and the fused head; with dh the head's
  // gradient lands in dx (d of the last layer's output).
  void run(bool backward, float grad_scale) {
    QT_ASSERT(N > 0, "no batch set");
    prof.restart(ctx);
    cuda::embedding_forward(ctx, saved_at(0), ids.get(), embed.get(), N, V, H);
    for (int64_t l = 0; l < L; ++l) layer_forward(l, saved_at(l), saved_at(l + 1));
    cuda::rmsnorm_forward(ctx, xf.get(), rstdf.get(), saved_at(L), final_norm.get(), N, H, cfg.rms_norm_eps);
    if (backward) zero(dxf);
    cuda::fused_linear_cross_entropy(ctx, loss.get(), count_dev.get(), backward ? dxf.get() : nullptr, xf.get(),
                                     lm_head, labels.get(), grad_scale, B, S, H, V);
    prof.mark(ctx, "head+loss");
    if (!backward) return;
    zero(dx);
    cuda::rmsnorm_backward(ctx, dx.get(), nullptr, dxf.get(), saved_at(L), final_norm.get(), rstdf.get(), N, H);
    QT_CUDA_CHECK(cudaMemsetAsync(grad.get(), 0, grad.bytes(), ctx.stream()));
    for (int64_t l = L - 1; l >= 0; --l) {
      prof.mark(ctx, "bwd.other");
      recomputing = true;  // x_out goes to `o` (free by then): x_{l+1} stays as saved
      layer_forward(l, saved_at(l), o.get());
      recomputing = false;
      layer_backward(l, saved_at(l));
    }
  }

  LoraAdapter download(const Buffer<float>& src) const {
    ctx.synchronize();
    std::vector<float> host = src.download();
    LoraAdapter out;
    out.cfg = lcfg;
    out.layers.resize(size_t(L));
    for (int64_t l = 0; l < L; ++l)
      for (int s = 0; s < kNumLoraSlots; ++s) {
        const SlotRef& sr = slots[l][s];
        if (!sr.present) continue;
        LoraPair& p = out.layers[l].slot[s];
        p.A = Tensor::empty({r, sr.in}, DType::F32);
        p.B = Tensor::empty({sr.out, r}, DType::F32);
        std::copy_n(host.data() + sr.a_off, r * sr.in, p.A.data<float>());
        std::copy_n(host.data() + sr.b_off, sr.out * r, p.B.data<float>());
      }
    return out;
  }
};

namespace {
void upload_as_bf16(cuda::Context& ctx, bf16* dst, const Tensor& t) {
  Tensor f = t.to(DType::F32);
  Buffer<float> tmp(size_t(f.numel()));
  tmp.upload(f.data<float>(), size_t(f.numel()));
  cuda::f32_to_bf16(ctx, dst, tmp.get(), f.numel());
  ctx.synchronize();
}
}  // namespace

CudaDecoder::CudaDecoder(cuda::Context& ctx, const ModelWeights& w, const LoraAdapter& lora)
    : p_(new Impl(ctx, w.cfg, lora.cfg)) {
  Impl& p = *p_;
  upload_as_bf16(ctx, p.embed.get(), w.embed);
  if (!w.cfg.tie_word_embeddings) upload_as_bf16(ctx, p.lm_head_own.get(), w.lm_head);
  upload_as_bf16(ctx, p.final_norm.get(), w.final_norm);
  const Tensor* wt[kNumLoraSlots];
  for (int64_t l = 0; l < p.L; ++l) {
    const LayerWeights& lw = w.layers[l];
    DeviceLayer& d = p.layers[l];
    upload_as_bf16(ctx, d.input_norm.get(), lw.input_norm);
    upload_as_bf16(ctx, d.post_norm.get(), lw.post_norm);
    if (p.cfg.qk_norm) upload_as_bf16(ctx, d.q_norm.get(), lw.attn.q_norm), upload_as_bf16(ctx, d.k_norm.get(), lw.attn.k_norm);
    if (p.cfg.attention_bias)
      upload_as_bf16(ctx, d.q_b.get(), lw.attn.q_b), upload_as_bf16(ctx, d.k_b.get(), lw.attn.k_b),
          upload_as_bf16(ctx, d.v_b.get(), lw.attn.v_b);
    wt[kLoraQ] = &lw.attn.q_w, wt[kLoraK] = &lw.attn.k_w, wt[kLoraV] = &lw.attn.v_w, wt[kLoraO] = &lw.attn.o_w;
    wt[kLoraGate] = &lw.mlp.gate, wt[kLoraUp] = &lw.mlp.up, wt[kLoraDown] = &lw.mlp.down;
    for (int s = 0; s < kNumLoraSlots; ++s) {
      upload_as_bf16(ctx, d.w[s].get(), *wt[s]);
      const SlotRef& sr = p.slots[l][s];
      const LoraPair& lp = lora.layers[l].slot[s];
      QT_ASSERT(sr.present == lp.present(), "adapter slot {} of layer {} does not match its config", s, l);
      if (!sr.present) continue;
      Tensor A = lp.A.to(DType::F32), Bm = lp.B.to(DType::F32);
      QT_CUDA_CHECK(cudaMemcpy(p.lora.get() + sr.a_off, A.data<float>(), A.numel() * sizeof(float), cudaMemcpyHostToDevice));
      QT_CUDA_CHECK(cudaMemcpy(p.lora.get() + sr.b_off, Bm.data<float>(), Bm.numel() * sizeof(float), cudaMemcpyHostToDevice));
    }
  }
}

CudaDecoder::CudaDecoder(cuda::Context& ctx, const ModelConfig& cfg, const LoraConfig& lcfg, uint64_t seed)
    : p_(new Impl(ctx, cfg, lcfg)) {
  Impl& p = *p_;
  uint64_t k = 0;
  p.for_each_weight([&](bf16* x, int64_t n, char role) {
    if (role == 'w') cuda::fill_normal(ctx, x, n, 0.f, 0.02f, seed * 1000003ull + ++k);
    else cuda::fill_constant(ctx, x, n, role == 'n' ? 1.f : 0.f);
  });
  for (int64_t l = 0; l < p.L; ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const SlotRef& sr = p.slots[l][s];
      if (!sr.present) continue;
      cuda::fill_normal(ctx, p.lora.get() + sr.a_off, p.r * sr.in, 0.f, float(1.0 / std::sqrt(double(sr.in))),
                        seed * 1000003ull + ++k);
      cuda::fill_normal(ctx, p.lora.get() + sr.b_off, sr.out * p.r, 0.f, 0.01f, seed * 1000003ull + ++k);
    }
  ctx.synchronize();
}

CudaDecoder::~CudaDecoder() { delete p_; }

void CudaDecoder::set_batch(const Batch& b) {
  Impl& p = *p_;
  b.validate(p.V);
  p.ctx.synchronize();
  if (b.B * b.S != p.N || b.B != p.B) {
    p.B = b.B, p.S = b.S, p.N = b.B * b.S;
    p.alloc_batch();
  }
  p.B = b.B, p.S = b.S;
  std::vector<int32_t> pos(size_t(p.N));
  for (int64_t i = 0; i < p.N; ++i) pos[i] = b.position_ids.empty() ? int32_t(i % p.S) : b.position_ids[i];
  p.ids.upload(b.input_ids);
  p.labels.upload(b.labels);
  p.pos.upload(pos);
  p.has_seg = !b.segment_ids.empty();
  if (p.has_seg) p.seg.upload(b.segment_ids);
  p.count = 0;  // HF shift: position s predicts labels[s+1]
  for (int64_t bi = 0; bi < p.B; ++bi)
    for (int64_t s = 1; s < p.S; ++s) p.count += b.labels[size_t(bi * p.S + s)] != -100;
  cuda::rope_table(p.ctx, p.cos.get(), p.sin.get(), p.pos.get(), p.N, p.hd, p.cfg.rope_theta);
  p.ctx.synchronize();
}

int64_t CudaDecoder::count() const { return p_->count; }

void CudaDecoder::forward_backward(double grad_scale) {
  const double gs = grad_scale > 0 ? grad_scale : (p_->count ? 1.0 / double(p_->count) : 0.0);
  p_->run(true, float(gs));
}

void CudaDecoder::forward() { p_->run(false, 0.f); }

void CudaDecoder::optimizer_step(int64_t step, double lr, double weight_decay, double max_norm, double beta1,
                                 double beta2, double eps) {
  Impl& p = *p_;
  QT_ASSERT(step >= 1, "optimizer step {} must be >= 1", step);
  if (max_norm > 0) {
    QT_CUDA_CHECK(cudaMemsetAsync(p.sum_sq.get(), 0, sizeof(double), p.ctx.stream()));
    cuda::sum_squares(p.ctx, p.sum_sq.get(), p.grad.get(), p.n_lora);
    cuda::clip_by_sum_squares(p.ctx, p.grad.get(), p.n_lora, p.sum_sq.get(), max_norm);
  }
  const double bc1 = 1.0 - std::pow(beta1, double(step)), bc2 = 1.0 - std::pow(beta2, double(step));
  cuda::adamw_step(p.ctx, p.lora.get(), p.grad.get(), p.m1.get(), p.m2.get(), p.n_lora, 1.0 - lr * weight_decay, beta1,
                   beta2, lr / bc1, std::sqrt(bc2), eps);
  p.prof.mark(p.ctx, "optimizer");
}

double CudaDecoder::loss_sum() const {
  p_->ctx.synchronize();
  return p_->loss.download()[0];
}

LoraAdapter CudaDecoder::download_grads() const { return p_->download(p_->grad); }
LoraAdapter CudaDecoder::download_lora() const { return p_->download(p_->lora); }

size_t CudaDecoder::device_bytes() const {
  const Impl& p = *p_;
  size_t n = p.embed.bytes() + p.lm_head_own.bytes() + p.final_norm.bytes() + 4 * p.lora.bytes();
  for (auto& d : p.layers) {
    n += d.input_norm.bytes() + d.post_norm.bytes() + d.q_norm.bytes() + d.k_norm.bytes() + d.q_b.bytes() +
         d.k_b.bytes() + d.v_b.bytes();
    for (auto& w : d.w) n += w.bytes();
  }
  for (const auto* b : {&p.saved, &p.a, &p.q_raw, &p.k_raw, &p.q, &p.k, &p.v, &p.attn, &p.o, &p.h, &p.m, &p.g, &p.u,
                        &p.act, &p.xa, &p.xf, &p.dx, &p.dm, &p.da, &p.dattn, &p.dq, &p.dk, &p.dv, &p.dq_raw, &p.dk_raw,
                        &p.dact, &p.dg, &p.du, &p.dxf})
    n += b->bytes();
  for (const auto* b : {&p.rstd1, &p.rstd_q, &p.rstd_k, &p.lse, &p.rstd2, &p.rstdf, &p.cos, &p.sin}) n += b->bytes();
  return n;
}

}  // namespace qt
#endif
