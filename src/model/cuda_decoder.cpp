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
#include <memory>
#include <optional>
#include <utility>

#include <fmt/core.h>

#include "core/error.h"
#include "model/cuda_moe.h"
#include "model/cuda_nf4_weights.h"
#include "model/weights_4bit.h"
#include "ops/cpu/ops.h"
#include "ops/cuda/init_clip.h"
#include "ops/cuda/ops.h"

namespace qt {

using cuda::bf16;
using cuda::Buffer;

namespace {

struct DeviceLayer {
  bool moe = false;
  Buffer<bf16> input_norm, post_norm, q_norm, k_norm, q_b, k_b, v_b, router;
  // q k v o gate up down, (out,in); a MoE layer's gate/up/down are its experts (E,out,in). Empty with
  // NF4 weights, which live in `nf4` (one group per projection, E tensors for experts).
  Buffer<bf16> w[kNumLoraSlots];
  std::array<CudaNf4Group, kNumLoraSlots> nf4;
};

// Every LoRA tensor starts at a multiple of kLoraAlign floats (256 bytes) of the flat layout, and so
// of a device slot with lora_states_on_host: the kernels see the same alignment on both paths (a GEMM's
// algorithm may depend on it), so the results are the same bits. The padding holds zeros.
constexpr int64_t kLoraAlign = 64;
int64_t align_elems(int64_t n, int64_t to = kLoraAlign) { return (n + to - 1) / to * to; }

// One LoRA slot: offsets of A (r,in) and B (out,r) in the flat fp32 buffers.
struct SlotRef {
  bool present = false;
  int64_t E = 0, in = 0, out = 0, a_off = 0, b_off = 0;  // E > 0: fused experts A (E,r,in), B (E,out,r)
  int64_t copies() const { return E > 0 ? E : 1; }
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
  // embeddings_on_host (untied only): the input embedding table (V,H) in pinned, mapped host memory,
  // read by the gather kernel over the bus (N rows per forward); embed_table = where the table is.
  cuda::PinnedBuffer<bf16> embed_host;
  bf16* embed_table = nullptr;
  const bf16* lm_head = nullptr;
  std::vector<DeviceLayer> layers;
  std::vector<std::array<SlotRef, kNumLoraSlots>> slots;
  LoraConfig lcfg;
  int64_t n_lora = 0;
  Buffer<float> lora, grad, m1, m2;  // flat (n_lora); empty with lora_states_on_host
  // Layer l's LoRA elements are [layer_off[l], layer_off[l+1]) of the flat layout (layers ascending);
  // layer_sq[l] = the sum of squares of its gradient, combined in layer order into sum_sq.
  std::vector<int64_t> layer_off;
  Buffer<double> layer_sq;
  // lora_states_on_host: masters, gradients and moments in pinned host memory (flat, the same
  // layout); the device has two slots of `slot_elems` for masters (lora_ring) and two for gradients
  // (grad_ring), layer l in slot l % 2. Masters come up on `in_stream` one layer ahead; a layer's
  // gradient starts at zero (first micro-batch of a step) or comes up from the host, and goes back on
  // `out_stream` after the layer's backward. optimizer_step streams the flat state through the four
  // slots as two banks of (master, m, v, grad) chunks. ring_layer[i]: the layer whose masters slot i
  // holds (-1: none). grads_pending: zero_grads ran and no backward since (the host gradients are
  // stale and count as zero).
  bool states_on_host = false;
  int64_t slot_elems = 0;
  cuda::PinnedBuffer<float> h_lora, h_grad, h_m1, h_m2;
  Buffer<float> lora_ring, grad_ring;
  std::optional<cuda::Stream> in_stream, out_stream;
  std::array<cuda::Event, 2> lora_loaded, grad_loaded, grad_saved, bank_loaded, bank_done, bank_saved;
  std::array<int64_t, 2> ring_layer{-1, -1};
  bool grads_pending = true;
  Buffer<double> sum_sq, loss, loss_total;
  Buffer<int64_t> count_dev;
  Buffer<int> skip;
  // batch: N = B*S tokens; the activation buffers hold `cap` >= N tokens
  int64_t B = 0, S = 0, N = 0, cap = 0, count = 0, max_in = 0;
  bool has_seg = false;
  Buffer<int32_t> ids, labels, pos, seg;
  cuda::PinnedBuffer<int32_t> staging;  // ids, labels, pos, seg of the batch being uploaded
  cuda::Event staged;                   // recorded after the copies out of `staging`
  LoraDropout drop;                     // of the current forward_backward (none for forward())
  bool any_moe = false;
  CudaMoeWork moe_work;                 // shared by the MoE layers (one runs at a time)
  Buffer<bf16> xd, dxd;                 // (cap, max_in) dropout(x) and its gradient, with dropout only
  Buffer<float> cos, sin;
  // activations: saved layer inputs (L+1, N, H) and one layer's work buffers
  // layer_inputs_on_host: `saved` is two (N,H) buffers used in turn (x_l in buffer l % 2) and a
  // training forward copies x_0..x_{L-2} to `saved_host` (L-1, N, H) on `copy_stream`; the backward
  // prefetches x_{l-1} while layer l runs (x_{L-1} never leaves the device). copied[i] / loaded[i]:
  // the copy out of / into buffer i has run; `computed`: the compute stream's work so far.
  bool inputs_on_host = false;
  int64_t copy_delay_us = 0;  // QT_TEST_COPY_DELAY_US (tests): a device-side delay before each copy
  cuda::PinnedBuffer<bf16> saved_host;
  std::optional<cuda::Stream> copy_stream;
  std::array<cuda::Event, 2> copied, loaded;
  cuda::Event computed;
  Buffer<bf16> saved, a, q_raw, k_raw, q, k, v, attn, o, h, m, xa, xf;
  // the dense MLP's g, u, act (N,I) side by side in one buffer: idle during the lm_head, whose logits
  // chunks it then holds (as the MoE layers' gathered inputs do for a model without dense layers)
  Buffer<bf16> mlp_work;
  bf16 *g = nullptr, *u = nullptr, *act = nullptr;
  Buffer<float> rstd1, rstd_q, rstd_k, lse, rstd2, rstdf;
  Buffer<bf16> dx, dm, da, dattn, dq, dk, dv, dk_raw, dact;  // the MLP's dg, du overwrite g, u
  // Buffers dead at the time take two more: the gradient of the final norm's output over da (the
  // head runs between layers), dq_raw over dattn (read by the attention backward before). xf stays
  // its own: logits() reads it after the backward.
  bf16* dxf() const { return da.get(); }
  bf16* dq_raw() const { return dattn.get(); }
  // NF4 base (QLoRA): projections are dequantized into `wscratch` right before the product that
  // needs them. Two regions: [0, single) holds one attention or dense-MLP projection at a time
  // (sized for the largest); [single, ...) holds one MoE layer's experts (gate, up, down together,
  // as the grouped MoE layer needs them). woff[l][s] = slot s's offset in the scratch. A dense
  // layer's projection is dequantized for its forward, its recompute and (all but the last one
  // recomputed) its backward; the experts once for the forward and once for recompute + backward.
  bool nf4 = false;
  // nf4_expert_chunk (training): the experts' region holds gate, up and down of `expert_chunk`
  // experts, filled chunk by chunk by the MoE layer's loader (moe_weights); 0: one layer's experts.
  int64_t expert_chunk = 0;
  Buffer<bf16> wscratch;
  std::vector<std::array<int64_t, kNumLoraSlots>> woff;
  int64_t scratch_single = -1;   // l * kNumLoraSlots + s of the projection in the first region (-1: none)
  int64_t scratch_experts = -1;  // the MoE layer whose experts the second region holds (-1: none)
  // Inference only (CudaDecoderOptions::training false): one layer's projections all at once in the
  // second region (layer_view needs them together); scratch_layer = the layer it holds.
  bool layer_scratch = false;
  int64_t scratch_layer = -1;
  PhaseProfile prof;
  std::function<void(int64_t)> layer_backward_hook;
  // MoE: the router load-balancing loss (output_router_logits) and the expert-load statistics.
  bool want_aux = false, training_forward = false;
  int64_t n_moe = 0;                  // MoE layers
  Buffer<float> aux_psum, aux_f;      // (E) router probabilities summed over the batch's MoE rows; f
  Buffer<int64_t> aux_counts;         // (E) assignments per expert over the batch's MoE layers
  Buffer<int64_t> expert_load;        // (L,E) assignments of the training forwards since the last take
  Buffer<double> aux;                 // the last forward's load-balancing loss (no coefficient)
  bool recomputing = false;
  CudaMoeAux aux_grad;  // of the current backward
  const char* fwd_phase(const char* fwd, const char* re) const { return recomputing ? re : fwd; }

  Impl(cuda::Context& c, const ModelConfig& mc, const LoraConfig& lc, bool nf4_base, const CudaDecoderOptions& opt)
      : ctx(c), cfg(mc), lcfg(lc), states_on_host(opt.lora_states_on_host && opt.training),
        inputs_on_host(opt.layer_inputs_on_host && opt.training), nf4(nf4_base),
        expert_chunk(nf4_base && opt.training ? opt.nf4_expert_chunk : 0), layer_scratch(!opt.training) {
    QT_ASSERT(opt.nf4_expert_chunk >= 0, "nf4_expert_chunk {}", opt.nf4_expert_chunk);
    if (inputs_on_host) copy_stream.emplace();
    if (states_on_host) in_stream.emplace(), out_stream.emplace();
    if (const char* d = std::getenv("QT_TEST_COPY_DELAY_US")) copy_delay_us = std::atoll(d);
    const bool embeddings_on_host = opt.embeddings_on_host, training = opt.training;
    L = cfg.num_hidden_layers, H = cfg.hidden_size, V = cfg.vocab_size;
    bool any_dense = false;
    for (int64_t i = 0; i < L; ++i) any_moe = any_moe || cfg.is_moe_layer(i), any_dense = any_dense || !cfg.is_moe_layer(i);
    I = any_dense ? cfg.intermediate_size : 0;  // the dense MLP's work buffers only when a layer needs them
    want_aux = any_moe && cfg.output_router_logits;
    if (any_moe && cfg.num_experts > 256) fail("cuda", "num_experts {} > 256 is not supported by the CUDA router", cfg.num_experts);
    nh = cfg.num_attention_heads, nkv = cfg.num_key_value_heads, hd = cfg.head_dim;
    qd = cfg.q_dim(), kvd = cfg.kv_dim(), r = lc.r;
    scale = float(lc.scale());
    if (hd > 256) fail("cuda", "head_dim {} > 256 is not supported by the CUDA attention", hd);
    if (embeddings_on_host && !cfg.tie_word_embeddings) {
      embed_host = cuda::PinnedBuffer<bf16>(size_t(V * H), /*mapped=*/true);
      embed_table = embed_host.device_ptr();
    } else {
      embed = Buffer<bf16>(size_t(V * H));
      embed_table = embed.get();
    }
    final_norm = Buffer<bf16>(size_t(H));
    if (!cfg.tie_word_embeddings) lm_head_own = Buffer<bf16>(size_t(V * H));
    lm_head = cfg.tie_word_embeddings ? embed.get() : lm_head_own.get();
    layers.resize(size_t(L));
    slots.resize(size_t(L));
    woff.resize(size_t(L));
    layer_off.assign(size_t(L + 1), 0);
    int64_t single_elems = 0, expert_elems = 0;
    for (int64_t l = 0; l < L; ++l) {
      DeviceLayer& d = layers[l];
      layer_off[size_t(l)] = n_lora;
      d.input_norm = Buffer<bf16>(size_t(H));
      d.post_norm = Buffer<bf16>(size_t(H));
      if (cfg.qk_norm) d.q_norm = Buffer<bf16>(size_t(hd)), d.k_norm = Buffer<bf16>(size_t(hd));
      if (cfg.attention_bias)
        d.q_b = Buffer<bf16>(size_t(qd)), d.k_b = Buffer<bf16>(size_t(kvd)), d.v_b = Buffer<bf16>(size_t(kvd));
      d.moe = cfg.is_moe_layer(l);
      if (d.moe) d.router = Buffer<bf16>(size_t(cfg.num_experts * H));
      int64_t expert_off = 0;  // within the experts' region
      for (int s = 0; s < kNumLoraSlots; ++s) {
        LoraSlotShape sh = lora_slot_shape(cfg, l, LoraSlot(s));
        SlotRef& ref = slots[l][s];
        ref.E = sh.experts, ref.in = sh.in, ref.out = sh.out;
        const int64_t elems = ref.copies() * sh.in * sh.out;
        if (ref.E > 0 || layer_scratch) {
          woff[l][s] = expert_off, expert_off += chunked(ref.E) ? expert_chunk * sh.in * sh.out : elems;
        } else {
          woff[l][s] = 0, single_elems = std::max(single_elems, elems);
        }
        if (!nf4) d.w[s] = Buffer<bf16>(size_t(ref.copies() * sh.in * sh.out));
        if (!lc.targets(LoraSlot(s))) continue;
        ref.present = true;
        ref.a_off = align_elems(n_lora), n_lora = ref.a_off + ref.copies() * r * sh.in;
        ref.b_off = align_elems(n_lora), n_lora = ref.b_off + ref.copies() * sh.out * r;
        if (sh.experts == 0) max_in = std::max(max_in, sh.in);
      }
      expert_elems = std::max(expert_elems, expert_off);
      n_lora = align_elems(n_lora);
      layer_off[size_t(l) + 1] = n_lora;
      slot_elems = std::max(slot_elems, n_lora - layer_off[size_t(l)]);
    }
    slot_elems = align_elems(slot_elems, 2 * kLoraAlign);  // two aligned halves: one optimizer chunk's arrays
    for (int64_t l = 0; l < L; ++l)
      for (int s = 0; s < kNumLoraSlots; ++s)
        if (slots[l][s].E > 0 || layer_scratch) woff[l][s] += single_elems;
    if (nf4) wscratch = Buffer<bf16>(size_t(single_elems + expert_elems));
    if (states_on_host) {
      h_lora = cuda::PinnedBuffer<float>(size_t(n_lora)), h_grad = cuda::PinnedBuffer<float>(size_t(n_lora));
      h_m1 = cuda::PinnedBuffer<float>(size_t(n_lora)), h_m2 = cuda::PinnedBuffer<float>(size_t(n_lora));
      for (auto* b : {&h_lora, &h_m1, &h_m2}) std::fill_n(b->get(), n_lora, 0.f);  // padding included
      lora_ring = Buffer<float>(size_t(2 * slot_elems)), grad_ring = Buffer<float>(size_t(2 * slot_elems));
    } else {
      lora = Buffer<float>(size_t(n_lora));
      lora.fill_bytes(0);  // the padding between tensors stays zero
      if (training) {
        grad = Buffer<float>(size_t(n_lora)), m1 = Buffer<float>(size_t(n_lora)), m2 = Buffer<float>(size_t(n_lora));
        m1.fill_bytes(0), m2.fill_bytes(0), grad.fill_bytes(0);
      }
    }
    if (training) layer_sq = Buffer<double>(size_t(std::max<int64_t>(L, 1))), layer_sq.fill_bytes(0);
    sum_sq = Buffer<double>(1), loss = Buffer<double>(1), loss_total = Buffer<double>(1);
    count_dev = Buffer<int64_t>(1), skip = Buffer<int>(1);
    loss.fill_bytes(0), loss_total.fill_bytes(0), sum_sq.fill_bytes(0), skip.fill_bytes(0);
    if (any_moe) {
      const size_t E = size_t(cfg.num_experts);
      for (int64_t l = 0; l < L; ++l) n_moe += cfg.is_moe_layer(l);
      aux_psum = Buffer<float>(E), aux_f = Buffer<float>(E), aux_counts = Buffer<int64_t>(E);
      expert_load = Buffer<int64_t>(size_t(L) * E), aux = Buffer<double>(1);
      expert_load.fill_bytes(0), aux.fill_bytes(0);
    }
    QT_CUDA_CHECK(cudaDeviceSynchronize());  // the fills ran on the null stream; ops use ctx's own
  }

  // Every base tensor with its role, for upload / random init.
  template <typename F>
  void for_each_weight(F&& f) {
    f(embed_table, V * H, 'w');
    if (!cfg.tie_word_embeddings) f(lm_head_own.get(), V * H, 'w');
    f(final_norm.get(), H, 'n');
    for (auto& d : layers) {
      f(d.input_norm.get(), H, 'n');
      f(d.post_norm.get(), H, 'n');
      if (cfg.qk_norm) f(d.q_norm.get(), hd, 'n'), f(d.k_norm.get(), hd, 'n');
      if (cfg.attention_bias) f(d.q_b.get(), qd, 'b'), f(d.k_b.get(), kvd, 'b'), f(d.v_b.get(), kvd, 'b');
      // attention (and a dense MLP), then the router and the experts
      for (int s = 0; s < kNumLoraSlots; ++s)
        if (d.w[s].size() && !(d.moe && s >= kLoraGate)) f(d.w[s].get(), int64_t(d.w[s].size()), 'w');
      if (d.router.size()) f(d.router.get(), int64_t(d.router.size()), 'w');
      for (int s = kLoraGate; d.moe && s < kNumLoraSlots; ++s)
        if (d.w[s].size()) f(d.w[s].get(), int64_t(d.w[s].size()), 'w');
    }
  }

  // Activation buffers for up to `tokens` tokens (the previous ones must be idle).
  void alloc_batch(int64_t tokens) {
    cap = tokens;
    const int64_t N = tokens;  // sizes below are per token
    xd = Buffer<bf16>(), dxd = Buffer<bf16>();
    const size_t NH = size_t(N * H), NI = size_t(N * I), Nq = size_t(N * qd), Nkv = size_t(N * kvd);
    saved = Buffer<bf16>(size_t(inputs_on_host ? 2 : L + 1) * NH);
    if (inputs_on_host) {
      saved_host = cuda::PinnedBuffer<bf16>();  // the old one freed first
      saved_host = cuda::PinnedBuffer<bf16>(size_t(std::max<int64_t>(L - 1, 0)) * NH);
    }
    a = Buffer<bf16>(NH), o = Buffer<bf16>(NH), h = Buffer<bf16>(NH), m = Buffer<bf16>(NH), xf = Buffer<bf16>(NH);
    q_raw = Buffer<bf16>(Nq), q = Buffer<bf16>(Nq), attn = Buffer<bf16>(Nq);
    k_raw = Buffer<bf16>(Nkv), k = Buffer<bf16>(Nkv), v = Buffer<bf16>(Nkv);
    mlp_work = Buffer<bf16>(3 * NI);
    g = mlp_work.get(), u = g + NI, act = u + NI;
    xa = Buffer<bf16>(size_t(kNumLoraSlots * N * r));
    rstd1 = Buffer<float>(size_t(N)), rstd2 = Buffer<float>(size_t(N)), rstdf = Buffer<float>(size_t(N));
    rstd_q = Buffer<float>(size_t(N * nh)), rstd_k = Buffer<float>(size_t(N * nkv)), lse = Buffer<float>(size_t(N * nh));
    dx = Buffer<bf16>(NH), dm = Buffer<bf16>(NH), da = Buffer<bf16>(NH);
    dattn = Buffer<bf16>(Nq), dq = Buffer<bf16>(Nq);
    dk = Buffer<bf16>(Nkv), dv = Buffer<bf16>(Nkv), dk_raw = Buffer<bf16>(Nkv);
    dact = Buffer<bf16>(NI);
    cos = Buffer<float>(size_t(N * hd)), sin = Buffer<float>(size_t(N * hd));
    ids = Buffer<int32_t>(size_t(N)), labels = Buffer<int32_t>(size_t(N)), pos = Buffer<int32_t>(size_t(N));
    seg = Buffer<int32_t>(size_t(N));
    staging = cuda::PinnedBuffer<int32_t>(size_t(4 * N));
    if (any_moe)
      moe_work.alloc(N, H, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, r);
  }
  // The base weight of slot s of layer l: its own buffer, or its part of the NF4 scratch.
  // With NF4, dequantized into the scratch first unless it already holds it (stream ordered: the
  // products that read the previous occupant were enqueued before).
  const bf16* wt(int64_t l, int s) {
    if (!nf4) return layers[l].w[s].get();
    if (layer_scratch) {
      ensure_layer_weights(l);
    } else if (slots[l][s].E > 0) {
      if (scratch_experts != l)
        for (int e = kLoraGate; e <= kLoraDown; ++e) layers[l].nf4[e].dequantize(ctx, wscratch.get() + woff[l][e]);
      scratch_experts = l;
    } else if (scratch_single != l * kNumLoraSlots + s) {
      layers[l].nf4[s].dequantize(ctx, wscratch.get() + woff[l][s]);
      scratch_single = l * kNumLoraSlots + s;
    }
    return wscratch.get() + woff[l][s];
  }
  void ensure_layer_weights(int64_t l) {
    if (!nf4 || scratch_layer == l) return;
    for (int s = 0; s < kNumLoraSlots; ++s) layers[l].nf4[s].dequantize(ctx, wscratch.get() + woff[l][s]);
    scratch_layer = l;
  }
  // Whether a MoE layer of E experts is dequantized chunk by chunk.
  bool chunked(int64_t E) const { return expert_chunk > 0 && expert_chunk < E; }
  CudaMoeWeights moe_weights(int64_t l) {
    const bf16* router = layers[l].router.get();
    if (!chunked(slots[l][kLoraGate].E)) return {router, wt(l, kLoraGate), wt(l, kLoraUp), wt(l, kLoraDown)};
    CudaMoeWeights w;
    w.router = router, w.chunk = expert_chunk;
    w.load = [this, l, router](unsigned projections, int64_t e0, int64_t e1) {
      CudaMoeWeights c;
      c.router = router;
      const bf16** at[3] = {&c.gate, &c.up, &c.down};
      for (int i = 0; i < 3; ++i) {
        if (!(projections & (1u << i))) continue;
        bf16* dst = wscratch.get() + woff[l][kLoraGate + i];
        layers[l].nf4[kLoraGate + i].dequantize(ctx, dst, e0, e1);
        *at[i] = dst;
      }
      scratch_experts = -1;  // the region holds a chunk, not a layer
      return c;
    };
    return w;
  }
  // The expert LoRA of MoE layer l in the flat buffers, and the layer's dims and dropout.
  CudaMoeLora moe_lora(int64_t l) const {
    CudaMoeLora m;
    m.r = r, m.scale = scale;
    for (int i = 0; i < 3; ++i) {
      const SlotRef& sr = slots[l][kLoraGate + i];
      if (!sr.present) continue;
      m.A[size_t(i)] = master_at(l, sr.a_off), m.B[size_t(i)] = master_at(l, sr.b_off);
      if (layer_sq.size()) m.dA[size_t(i)] = grad_at(l, sr.a_off), m.dB[size_t(i)] = grad_at(l, sr.b_off);  // training
    }
    return m;
  }
  CudaMoeDims moe_dims() const {
    return {N, H, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob};
  }
  CudaMoeDropout moe_dropout(int64_t l) const {
    if (!drop.active()) return {};
    return {drop.p, {drop_key(l, kLoraGate), drop_key(l, kLoraUp), drop_key(l, kLoraDown)}};
  }
  void ensure_dropout_buffers() {
    if (xd.size()) return;
    xd = Buffer<bf16>(size_t(cap * max_in)), dxd = Buffer<bf16>(size_t(cap * max_in));
  }
  uint64_t drop_key(int64_t l, int s) const { return cpu::dropout_key(drop.seed, drop.step, drop.micro_batch, l, s); }

  bf16* saved_at(int64_t l) const { return saved.get() + size_t(inputs_on_host ? l % 2 : l) * size_t(N * H); }
  bf16* saved_host_at(int64_t l) const { return saved_host.get() + size_t(l) * size_t(N * H); }
  // layer_inputs_on_host: x_l between buffer l % 2 and the host on the copy stream, once the compute
  // stream's work so far has run (to the host: after x_l was written, l <= L-2; back: after the last
  // reader of x_{l+2}, which that buffer held). copied / loaded[l % 2] is recorded when it has run.
  void copy_input(int64_t l, bool to_host) {
    computed.record(ctx.stream());
    QT_CUDA_CHECK(cudaStreamWaitEvent(copy_stream->get(), computed.get(), 0));
    cuda::delay_stream(copy_stream->get(), copy_delay_us);
    bf16 *dev = saved_at(l), *host = saved_host_at(l);
    QT_CUDA_CHECK(cudaMemcpyAsync(to_host ? host : dev, to_host ? dev : host, size_t(N * H) * sizeof(bf16),
                                  to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, copy_stream->get()));
    (to_host ? copied : loaded)[size_t(l % 2)].record(copy_stream->get());
  }
  void wait_for(const cuda::Event& e) { QT_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), e.get(), 0)); }
  static void stream_wait(cudaStream_t s, const cuda::Event& e) { QT_CUDA_CHECK(cudaStreamWaitEvent(s, e.get(), 0)); }

  // Where the kernels find the masters / gradient of layer l at flat offset `off`.
  int64_t layer_elems(int64_t l) const { return layer_off[size_t(l) + 1] - layer_off[size_t(l)]; }
  float* master_at(int64_t l, int64_t off) const {
    return states_on_host ? lora_ring.get() + (l % 2) * slot_elems + (off - layer_off[size_t(l)]) : lora.get() + off;
  }
  float* grad_at(int64_t l, int64_t off) const {
    return states_on_host ? grad_ring.get() + (l % 2) * slot_elems + (off - layer_off[size_t(l)]) : grad.get() + off;
  }
  // An asynchronous copy of n floats on stream s, after QT_TEST_COPY_DELAY_US (tests).
  void copy_floats(float* dst, const float* src, int64_t n, cudaMemcpyKind kind, cudaStream_t s) const {
    if (n <= 0) return;
    cuda::delay_stream(s, copy_delay_us);
    QT_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), kind, s));
  }
  // lora_states_on_host: queues layer l's masters into slot l % 2 on in_stream, after the compute
  // stream's work so far (the slot's previous layer) — unless the slot already holds them.
  void fetch_masters(int64_t l) {
    if (!states_on_host || l < 0 || l >= L || ring_layer[size_t(l % 2)] == l) return;
    computed.record(ctx.stream());
    stream_wait(in_stream->get(), computed);
    copy_floats(master_at(l, layer_off[size_t(l)]), h_lora.get() + layer_off[size_t(l)], layer_elems(l),
                cudaMemcpyHostToDevice, in_stream->get());
    lora_loaded[size_t(l % 2)].record(in_stream->get());
    ring_layer[size_t(l % 2)] = l;
  }
  // Before layer l runs: its masters are in their slot (no-op without lora_states_on_host).
  void await_masters(int64_t l) {
    if (!states_on_host) return;
    QT_ASSERT(ring_layer[size_t(l % 2)] == l, "layer {}'s LoRA masters were not fetched", l);
    wait_for(lora_loaded[size_t(l % 2)]);
  }
  // The backward of layer l will accumulate into slot l % 2: queues the host gradient's copy up
  // (later micro-batches of a step) once the slot's previous gradient has left for the host.
  void fetch_grads(int64_t l) {
    if (!states_on_host || l < 0 || grads_pending) return;
    stream_wait(in_stream->get(), grad_saved[size_t(l % 2)]);
    copy_floats(grad_at(l, layer_off[size_t(l)]), h_grad.get() + layer_off[size_t(l)], layer_elems(l),
                cudaMemcpyHostToDevice, in_stream->get());
    grad_loaded[size_t(l % 2)].record(in_stream->get());
  }
  void await_grads(int64_t l) {
    if (!states_on_host) return;
    if (!grads_pending) return wait_for(grad_loaded[size_t(l % 2)]);
    wait_for(grad_saved[size_t(l % 2)]);  // the first micro-batch starts from zero
    QT_CUDA_CHECK(cudaMemsetAsync(grad_at(l, layer_off[size_t(l)]), 0, size_t(layer_elems(l)) * sizeof(float),
                                  ctx.stream()));
  }
  // layer_sq[l] = the sum of squares of layer l's gradient (where grad_at finds it).
  void layer_sum_squares(int64_t l) {
    QT_CUDA_CHECK(cudaMemsetAsync(layer_sq.get() + l, 0, sizeof(double), ctx.stream()));
    cuda::sum_squares(ctx, layer_sq.get() + l, grad_at(l, layer_off[size_t(l)]), layer_elems(l));
  }
  // lora_states_on_host, after layer l's backward: its gradient's sum of squares (the last
  // micro-batch's is the step's) and the gradient's copy to the host on out_stream.
  void finish_layer_grads(int64_t l) {
    if (!states_on_host) return;
    layer_sum_squares(l);
    computed.record(ctx.stream());
    stream_wait(out_stream->get(), computed);
    copy_floats(h_grad.get() + layer_off[size_t(l)], grad_at(l, layer_off[size_t(l)]), layer_elems(l),
                cudaMemcpyDeviceToHost, out_stream->get());
    grad_saved[size_t(l % 2)].record(out_stream->get());
  }
  bf16* xa_of(int s) const { return xa.get() + size_t(s) * size_t(N * r); }
  // Zeroes the first N tokens' part of a per-token buffer (every buffer holds cap tokens).
  void zero(Buffer<bf16>& b) { QT_CUDA_CHECK(cudaMemsetAsync(b.get(), 0, b.bytes() / size_t(cap) * size_t(N), ctx.stream())); }

  // lora_states_on_host: update(w, g, m, v, n) over the flat state in chunks of slot_elems / 2, bank
  // b = chunk % 2 being (master, m) in lora slot b and (gradient, v) in grad slot b: the chunk comes
  // up on in_stream once the bank's previous chunk has gone back, is updated on the compute stream,
  // and goes back (master, gradient, m, v) on out_stream. The compute stream then waits for every
  // copy back.
  // The (clipped) gradient goes back too, as the device path leaves it clipped in its buffer. A step
  // with no backward since zero_grads starts each chunk's gradient from zero on the device.
  template <typename Update>
  void stream_optimizer(Update&& update) {
    const bool zero = grads_pending;
    grads_pending = false;
    const int64_t C = slot_elems / 2;
    computed.record(ctx.stream());  // the backward's last readers of the slots
    stream_wait(in_stream->get(), computed);
    for (int64_t off = 0, i = 0; off < n_lora; off += C, ++i) {
      const size_t b = size_t(i % 2);
      const int64_t n = std::min(C, n_lora - off);
      float *w = lora_ring.get() + int64_t(b) * slot_elems, *m = w + C;
      float *g = grad_ring.get() + int64_t(b) * slot_elems, *v = g + C;
      cudaStream_t in = in_stream->get(), out = out_stream->get();
      stream_wait(in, bank_saved[b]);
      copy_floats(w, h_lora.get() + off, n, cudaMemcpyHostToDevice, in);
      if (zero) QT_CUDA_CHECK(cudaMemsetAsync(g, 0, size_t(n) * sizeof(float), in));
      else copy_floats(g, h_grad.get() + off, n, cudaMemcpyHostToDevice, in);
      copy_floats(m, h_m1.get() + off, n, cudaMemcpyHostToDevice, in);
      copy_floats(v, h_m2.get() + off, n, cudaMemcpyHostToDevice, in);
      bank_loaded[b].record(in);
      wait_for(bank_loaded[b]);
      update(w, g, m, v, n);
      bank_done[b].record(ctx.stream());
      stream_wait(out, bank_done[b]);
      copy_floats(h_lora.get() + off, w, n, cudaMemcpyDeviceToHost, out);
      copy_floats(h_grad.get() + off, g, n, cudaMemcpyDeviceToHost, out);
      copy_floats(h_m1.get() + off, m, n, cudaMemcpyDeviceToHost, out);
      copy_floats(h_m2.get() + off, v, n, cudaMemcpyDeviceToHost, out);
      bank_saved[b].record(out);
    }
    for (const cuda::Event& e : bank_saved) wait_for(e);
    ring_layer = {-1, -1};  // the slots held optimizer chunks
  }

  // y = x W^T (+ b) (+ LoRA)
  // The LoRA input of slot s: x, or dropout(x) written to xd.
  const bf16* lora_input(int64_t l, int s, const bf16* x) {
    if (!drop.active()) return x;
    ensure_dropout_buffers();
    cuda::dropout_forward(ctx, xd.get(), x, N, slots[l][s].in, drop.p, drop_key(l, s));
    return xd.get();
  }
  // y = x W^T (+ b) (+ scale B A dropout(x))
  void proj_fwd(int64_t l, int s, bf16* y, const bf16* x, const bf16* bias) {
    const SlotRef& sr = slots[l][s];
    cuda::linear_forward(ctx, y, x, wt(l, s), bias, N, sr.in, sr.out);
    if (sr.present)
      cuda::lora_forward(ctx, y, xa_of(s), lora_input(l, s, x), master_at(l, sr.a_off), master_at(l, sr.b_off), scale,
                         N, sr.in, sr.out, r);
  }
  // dx (+)= dy W (+ the LoRA path, through the dropout mask); dA, dB accumulate. accumulate false:
  // dx's old contents are ignored (the first product into a buffer: no zeroing, no staging pass).
  void proj_bwd(int64_t l, int s, bf16* dxp, const bf16* dy, const bf16* x, bool accumulate) {
    const SlotRef& sr = slots[l][s];
    cuda::linear_backward(ctx, dxp, dy, wt(l, s), N, sr.in, sr.out, accumulate);
    if (!sr.present) return;
    const bf16* xin = lora_input(l, s, x);
    bf16* dlora_x = dxp;
    if (drop.active()) {
      dlora_x = dxd.get();
      QT_CUDA_CHECK(cudaMemsetAsync(dlora_x, 0, size_t(N * sr.in) * sizeof(bf16), ctx.stream()));
    }
    cuda::lora_backward(ctx, dlora_x, grad_at(l, sr.a_off), grad_at(l, sr.b_off), dy, xin, xa_of(s),
                        master_at(l, sr.a_off), master_at(l, sr.b_off), scale, N, sr.in, sr.out, r);
    if (drop.active()) cuda::dropout_backward(ctx, dxp, dxd.get(), N, sr.in, drop.p, drop_key(l, s));
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
    if (d.moe) {  // x_out = h + moe(m)
      QT_CUDA_CHECK(cudaMemcpyAsync(x_out, h.get(), size_t(N * H) * sizeof(bf16), cudaMemcpyDeviceToDevice, ctx.stream()));
      cuda_moe_forward(ctx, moe_weights(l), moe_lora(l), moe_dims(), moe_dropout(l), moe_work, m.get(), x_out);
      if (!recomputing)  // the statistics of the routing just made (the recompute repeats it)
        cuda::moe_route_stats(ctx, aux_psum.get(), aux_counts.get(),
                              training_forward ? expert_load.get() + l * cfg.num_experts : nullptr,
                              moe_work.probs.get(), moe_work.offsets.get(), N, cfg.num_experts);
      prof.mark(ctx, fwd_phase("fwd.o+moe", "recompute.o+moe"));
      return;
    }
    proj_fwd(l, kLoraGate, g, m.get(), nullptr);
    proj_fwd(l, kLoraUp, u, m.get(), nullptr);
    cuda::swiglu_forward(ctx, act, g, u, N * I);
    proj_fwd(l, kLoraDown, x_out, act, nullptr);
    cuda::add_inplace(ctx, x_out, h.get(), N * H);
    prof.mark(ctx, fwd_phase("fwd.o+mlp", "recompute.o+mlp"));
  }

  // dx holds d(x_out) on entry and d(x_in) on exit; the work buffers hold layer l's recompute.
  void layer_backward(int64_t l, const bf16* x_in) {
    const DeviceLayer& d = layers[l];
    if (d.moe) {
      zero(dm);
      cuda_moe_backward(ctx, moe_weights(l), moe_lora(l), moe_dims(), moe_dropout(l), moe_work, m.get(), dx.get(), dm.get(),
                        aux_grad);
    } else {
      proj_bwd(l, kLoraDown, dact.get(), dx.get(), act, false);
      cuda::swiglu_backward_inplace(ctx, g, u, dact.get(), N * I);  // g <- dg, u <- du
      proj_bwd(l, kLoraGate, dm.get(), g, m.get(), false);
      proj_bwd(l, kLoraUp, dm.get(), u, m.get(), true);
    }
    cuda::rmsnorm_backward(ctx, dx.get(), nullptr, dm.get(), h.get(), d.post_norm.get(), rstd2.get(), N, H);
    proj_bwd(l, kLoraO, dattn.get(), dx.get(), attn.get(), false);
    prof.mark(ctx, "bwd.mlp+o");
    zero(dq), zero(dk), zero(dv);
    cuda::attention_backward(ctx, dq.get(), dk.get(), dv.get(), dattn.get(), attn.get(), lse.get(), q.get(), k.get(),
                             v.get(), has_seg ? seg.get() : nullptr, B, S, nh, nkv, hd);
    prof.mark(ctx, "bwd.attention");
    zero(dattn), zero(dk_raw);  // dattn becomes dq_raw
    cuda::qk_norm_rope_backward(ctx, dq_raw(), dq.get(), q_raw.get(), d.q_norm.get(), rstd_q.get(), cos.get(),
                                sin.get(), N, nh, hd);
    cuda::qk_norm_rope_backward(ctx, dk_raw.get(), dk.get(), k_raw.get(), d.k_norm.get(), rstd_k.get(), cos.get(),
                                sin.get(), N, nkv, hd);
    proj_bwd(l, kLoraQ, da.get(), dq_raw(), a.get(), false);
    proj_bwd(l, kLoraK, da.get(), dk_raw.get(), a.get(), true);
    proj_bwd(l, kLoraV, da.get(), dv.get(), a.get(), true);
    cuda::rmsnorm_backward(ctx, dx.get(), nullptr, da.get(), x_in, d.input_norm.get(), rstd1.get(), N, H);
    prof.mark(ctx, "bwd.qkv");
  }

  // The largest work buffer idle while the head runs (between the last layer's forward and the
  // first recompute): the dense MLP's, or the MoE layers' gathered inputs; it holds the logits chunks.
  std::pair<bf16*, int64_t> head_workspace() {
    const int64_t dense = int64_t(mlp_work.size()), moe = any_moe ? int64_t(moe_work.xs.size()) : 0;
    return dense >= moe ? std::pair{mlp_work.get(), dense} : std::pair{moe_work.xs.get(), moe};
  }

  // Forward through every layer (keeping each input) and the fused head; with dh the head's
  // gradient lands in dx (d of the last layer's output).
  void run(bool backward, float grad_scale) {
    QT_ASSERT(N > 0, "no batch set");
    prof.restart(ctx);
    training_forward = backward;
    if (any_moe) {
      QT_CUDA_CHECK(cudaMemsetAsync(aux_psum.get(), 0, aux_psum.bytes(), ctx.stream()));
      QT_CUDA_CHECK(cudaMemsetAsync(aux_counts.get(), 0, aux_counts.bytes(), ctx.stream()));
    }
    const bool offload = inputs_on_host && backward;
    cuda::embedding_forward(ctx, saved_at(0), ids.get(), embed_table, N, V, H);
    fetch_masters(0);
    for (int64_t l = 0; l < L; ++l) {
      if (offload && l <= L - 2) copy_input(l, /*to_host=*/true);
      if (offload && l >= 1) wait_for(copied[size_t((l + 1) % 2)]);  // x_{l-1} has left the buffer x_{l+1} goes to
      fetch_masters(l + 1);  // into the slot layer l-1 used
      await_masters(l);
      layer_forward(l, saved_at(l), saved_at(l + 1));
    }
    cuda::rmsnorm_forward(ctx, xf.get(), rstdf.get(), saved_at(L), final_norm.get(), N, H, cfg.rms_norm_eps);
    if (backward) zero(da);  // dxf
    const auto [logits_buf, logits_elems] = head_workspace();
    cuda::fused_linear_cross_entropy(ctx, loss.get(), count_dev.get(), backward ? dxf() : nullptr, xf.get(),
                                     lm_head, labels.get(), grad_scale, B, S, H, V, 0, logits_buf, logits_elems);
    prof.mark(ctx, "head+loss");
    // The load-balancing loss over R = MoE layers * N rows; in training, count * coef * aux joins the
    // step's loss total and its gradient (scale = grad_scale * count * coef * E / R) the routers'.
    const int64_t R = n_moe * N;
    const double aux_factor = want_aux ? double(count) * cfg.router_aux_loss_coef : 0.0;
    if (any_moe)
      cuda::moe_aux_loss(ctx, aux.get(), aux_f.get(), backward && want_aux ? loss_total.get() : nullptr, aux_factor,
                         aux_psum.get(), aux_counts.get(), cfg.num_experts, R);
    aux_grad = {};
    if (backward && want_aux && R > 0)
      aux_grad = {aux_f.get(), float(double(grad_scale) * aux_factor * double(cfg.num_experts) / double(R))};
    if (!backward) return;
    cuda::add_f64(ctx, loss_total.get(), loss.get());
    zero(dx);
    cuda::rmsnorm_backward(ctx, dx.get(), nullptr, dxf(), saved_at(L), final_norm.get(), rstdf.get(), N, H);
    fetch_masters(L - 1), fetch_grads(L - 1);
    for (int64_t l = L - 1; l >= 0; --l) {
      prof.mark(ctx, "bwd.other");
      if (offload && l < L - 1) wait_for(loaded[size_t(l % 2)]);
      if (offload && l >= 1) copy_input(l - 1, /*to_host=*/false);
      fetch_masters(l - 1), fetch_grads(l - 1);  // into the slots layer l+1 used
      await_masters(l);
      recomputing = true;  // x_out goes to `o` (free by then): x_{l+1} stays as saved
      layer_forward(l, saved_at(l), o.get());
      recomputing = false;
      await_grads(l);
      layer_backward(l, saved_at(l));
      finish_layer_grads(l);
      if (layer_backward_hook) layer_backward_hook(l);
    }
    if (states_on_host) {  // every gradient is on the host before anything later reads it there
      grads_pending = false;
      for (const cuda::Event& e : grad_saved) wait_for(e);
    }
  }

  // NF4: layer l's projections from the host NF4 tensors (per-expert names for MoE experts).
  void upload_nf4(int64_t l, const Nf4Base& base) {
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const SlotRef& sr = slots[l][s];
      std::vector<const Nf4Tensor*> ts;
      for (int64_t e = 0; e < sr.copies(); ++e) {
        const std::string name = projection_hub_name(l, s, sr.E > 0 ? e : -1);
        const auto it = base.tensors.find(name);
        if (it == base.tensors.end()) fail("cuda", "{}: the 4-bit base has no NF4 tensor of this name", name);
        if (it->second.shape != Shape{sr.out, sr.in})
          fail("cuda", "{}: NF4 shape {} (expected [{}, {}])", name, shape_str(it->second.shape), sr.out, sr.in);
        ts.push_back(&it->second);
      }
      layers[l].nf4[s].upload(ts, sr.E > 0 ? fmt::format("model.layers.{}.mlp.experts.*.{}.weight", l,
                                                        lora_slot_module(LoraSlot(s)))
                                          : projection_hub_name(l, s));
    }
  }
  // NF4, random weights: every projection normal(0, 0.02) in bf16 (made in the scratch), quantized on
  // the device; with expert chunks a chunk of experts at a time in the chunk's region (the values do
  // not depend on it: fill_normal hashes each element's index in the projection).
  void random_nf4(uint64_t seed) {
    uint64_t k = 0;
    for (int64_t l = 0; l < L; ++l)
      for (int s = 0; s < kNumLoraSlots; ++s) {
        const SlotRef& sr = slots[l][s];
        bf16* x = wscratch.get() + woff[l][s];
        const int64_t per = chunked(sr.E) ? expert_chunk : sr.copies(), n = sr.in * sr.out;
        const uint64_t key = seed * 7919ull + ++k;
        std::vector<Nf4Tensor> all;
        for (int64_t e0 = 0; e0 < sr.copies(); e0 += per) {
          const int64_t c = std::min(per, sr.copies() - e0);
          cuda::fill_normal(ctx, x, c * n, 0.f, 0.02f, key, uint64_t(e0 * n));
          for (Nf4Tensor& t : nf4_quantize_on_device(ctx, x, c, {sr.out, sr.in})) all.push_back(std::move(t));
        }
        std::vector<const Nf4Tensor*> ptrs;
        for (const Nf4Tensor& t : all) ptrs.push_back(&t);
        layers[l].nf4[s].upload(ptrs, "quantized on the device");
      }
    scratch_single = scratch_experts = scratch_layer = -1;
  }

  // Calls f(slot ref, A tensor, B tensor) for every present slot of an adapter of this structure.
  template <typename A, typename F>
  void for_each_slot(A& adapter, F&& f) const {
    QT_ASSERT(int64_t(adapter.layers.size()) == L, "adapter has {} layers, the model {}", adapter.layers.size(), L);
    for (int64_t l = 0; l < L; ++l)
      for (int s = 0; s < kNumLoraSlots; ++s) {
        const SlotRef& sr = slots[l][s];
        auto& p = adapter.layers[l].slot[s];
        QT_ASSERT(sr.present == p.present(), "adapter slot {} of layer {} does not match its config", s, l);
        if (sr.present) f(sr, p.A, p.B);
      }
  }
  // The flat state `which` ('w' masters, 'g' gradients, 'm' / 'v' moments): where it lives with
  // lora_states_on_host, and on the device otherwise.
  float* host_state(char which) const {
    return (which == 'w' ? h_lora : which == 'g' ? h_grad : which == 'm' ? h_m1 : h_m2).get();
  }
  Buffer<float>& device_state(char which) { return which == 'w' ? lora : which == 'g' ? grad : which == 'm' ? m1 : m2; }
  const Buffer<float>& device_state(char which) const { return const_cast<Impl*>(this)->device_state(which); }
  // The flat state `which` as an adapter.
  LoraAdapter download(char which) const {
    QT_ASSERT(which == 'w' || layer_sq.size(), "gradients or moments of an inference-only CudaDecoder");
    ctx.synchronize();
    std::vector<float> host;
    if (!states_on_host) host = device_state(which).download();
    else if (which == 'g' && grads_pending) host.assign(size_t(n_lora), 0.f);
    else host.assign(host_state(which), host_state(which) + n_lora);
    LoraAdapter out;
    out.cfg = lcfg;
    out.layers.resize(size_t(L));
    for (int64_t l = 0; l < L; ++l)
      for (int s = 0; s < kNumLoraSlots; ++s)
        if (const SlotRef& sr = slots[l][s]; sr.present) {
          out.layers[l].slot[s].A = sr.E ? Tensor::empty({sr.E, r, sr.in}, DType::F32) : Tensor::empty({r, sr.in}, DType::F32);
          out.layers[l].slot[s].B = sr.E ? Tensor::empty({sr.E, sr.out, r}, DType::F32) : Tensor::empty({sr.out, r}, DType::F32);
        }
    for_each_slot(out, [&](const SlotRef& sr, Tensor& A, Tensor& Bm) {
      std::copy_n(host.data() + sr.a_off, A.numel(), A.data<float>());
      std::copy_n(host.data() + sr.b_off, Bm.numel(), Bm.data<float>());
    });
    return out;
  }
  // Replaces the flat state `which` ('w', 'm' or 'v') with an adapter's values.
  void upload(char which, const LoraAdapter& src) {
    std::vector<float> host(static_cast<size_t>(n_lora));
    for_each_slot(src, [&](const SlotRef& sr, const Tensor& A, const Tensor& Bm) {
      const Tensor a32 = A.to(DType::F32), b32 = Bm.to(DType::F32);
      QT_ASSERT(a32.numel() == sr.copies() * r * sr.in && b32.numel() == sr.copies() * sr.out * r,
                "adapter tensor shapes differ from the config");
      std::copy_n(a32.data<float>(), a32.numel(), host.data() + sr.a_off);
      std::copy_n(b32.data<float>(), b32.numel(), host.data() + sr.b_off);
    });
    ctx.synchronize();
    if (states_on_host) {
      std::copy(host.begin(), host.end(), host_state(which));
      ring_layer = {-1, -1};
    } else {
      device_state(which).upload(host);
    }
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

CudaDecoder::CudaDecoder(cuda::Context& ctx, const ModelWeights& w, const LoraAdapter& lora,
                         const CudaDecoderOptions& opt)
    : p_(new Impl(ctx, w.cfg, lora.cfg, w.nf4 != nullptr, opt)) {
  std::unique_ptr<Impl> guard(p_);  // frees the device buffers when an upload fails (bad NF4 data)
  QT_ASSERT(w.nf4 || has_projection_floats(w), "CudaDecoder: the projections are neither float nor NF4");
  Impl& p = *p_;
  upload_as_bf16(ctx, p.embed_table, w.embed);
  if (!w.cfg.tie_word_embeddings) upload_as_bf16(ctx, p.lm_head_own.get(), w.lm_head);
  upload_as_bf16(ctx, p.final_norm.get(), w.final_norm);
  for (int64_t l = 0; l < p.L; ++l) {
    const LayerWeights& lw = w.layers[l];
    DeviceLayer& d = p.layers[l];
    upload_as_bf16(ctx, d.input_norm.get(), lw.input_norm);
    upload_as_bf16(ctx, d.post_norm.get(), lw.post_norm);
    if (p.cfg.qk_norm) upload_as_bf16(ctx, d.q_norm.get(), lw.attn.q_norm), upload_as_bf16(ctx, d.k_norm.get(), lw.attn.k_norm);
    if (p.cfg.attention_bias)
      upload_as_bf16(ctx, d.q_b.get(), lw.attn.q_b), upload_as_bf16(ctx, d.k_b.get(), lw.attn.k_b),
          upload_as_bf16(ctx, d.v_b.get(), lw.attn.v_b);
    const auto wt = projection_tensors(lw);
    for (int s = 0; s < kNumLoraSlots; ++s)
      if (d.w[s].size()) upload_as_bf16(ctx, d.w[s].get(), *wt[s]);
    if (p.nf4) p.upload_nf4(l, *w.nf4);
    if (d.moe) upload_as_bf16(ctx, d.router.get(), lw.mlp.router);
  }
  p.upload('w', lora);
  guard.release();
}

CudaDecoder::CudaDecoder(cuda::Context& ctx, const ModelConfig& cfg, const LoraConfig& lcfg, uint64_t seed,
                         bool load_in_4bit, const CudaDecoderOptions& opt)
    : p_(new Impl(ctx, cfg, lcfg, load_in_4bit, opt)) {
  QT_ASSERT(opt.training, "the random-weight CudaDecoder is for training benchmarks");
  std::unique_ptr<Impl> guard(p_);
  Impl& p = *p_;
  uint64_t k = 0;
  p.for_each_weight([&](bf16* x, int64_t n, char role) {
    if (role == 'w') cuda::fill_normal(ctx, x, n, 0.f, 0.02f, seed * 1000003ull + ++k);
    else cuda::fill_constant(ctx, x, n, role == 'n' ? 1.f : 0.f);
  });
  for (int64_t l = 0; l < p.L; ++l) {
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const SlotRef& sr = p.slots[l][s];
      if (!sr.present) continue;
      cuda::fill_normal(ctx, p.master_at(l, sr.a_off), sr.copies() * p.r * sr.in, 0.f,
                        float(1.0 / std::sqrt(double(sr.in))), seed * 1000003ull + ++k);
      cuda::fill_normal(ctx, p.master_at(l, sr.b_off), sr.copies() * sr.out * p.r, 0.f, 0.01f, seed * 1000003ull + ++k);
    }
    if (p.states_on_host && p.layer_elems(l) > 0) {  // made in the layer's slot, kept on the host
      ctx.synchronize();
      QT_CUDA_CHECK(cudaMemcpy(p.h_lora.get() + p.layer_off[size_t(l)], p.master_at(l, p.layer_off[size_t(l)]),
                               size_t(p.layer_elems(l)) * sizeof(float), cudaMemcpyDeviceToHost));
    }
  }
  if (p.nf4) p.random_nf4(seed);
  ctx.synchronize();
  guard.release();
}

CudaDecoder::~CudaDecoder() { delete p_; }

void CudaDecoder::set_batch(const Batch& b) {
  Impl& p = *p_;
  b.validate(p.V);
  const int64_t N = b.B * b.S;
  if (N > p.cap) {
    p.ctx.synchronize();  // the old buffers may still be in use
    p.alloc_batch(N);
  }
  p.B = b.B, p.S = b.S, p.N = N;
  // The previous batch's copies out of the staging area must have run before it is refilled.
  p.staged.synchronize();
  int32_t* st = p.staging.get();
  std::copy(b.input_ids.begin(), b.input_ids.end(), st);
  std::copy(b.labels.begin(), b.labels.end(), st + N);
  for (int64_t i = 0; i < N; ++i) st[2 * N + i] = b.position_ids.empty() ? int32_t(i % p.S) : b.position_ids[size_t(i)];
  p.has_seg = !b.segment_ids.empty();
  if (p.has_seg) std::copy(b.segment_ids.begin(), b.segment_ids.end(), st + 3 * N);
  const size_t bytes = size_t(N) * sizeof(int32_t);
  int32_t* dst[4] = {p.ids.get(), p.labels.get(), p.pos.get(), p.seg.get()};
  for (int i = 0; i < (p.has_seg ? 4 : 3); ++i)
    QT_CUDA_CHECK(cudaMemcpyAsync(dst[i], st + i * N, bytes, cudaMemcpyHostToDevice, p.ctx.stream()));
  p.staged.record(p.ctx.stream());
  p.count = b.predicted_tokens();
  cuda::rope_table(p.ctx, p.cos.get(), p.sin.get(), p.pos.get(), p.N, p.hd, p.cfg.rope_theta);
}

int64_t CudaDecoder::count() const { return p_->count; }

void CudaDecoder::zero_grads() {
  Impl& p = *p_;
  if (p.states_on_host) {
    p.grads_pending = true;  // the next backward starts each layer's gradient from zero
    QT_CUDA_CHECK(cudaMemsetAsync(p.layer_sq.get(), 0, p.layer_sq.bytes(), p.ctx.stream()));
  }
  if (p.grad.size()) QT_CUDA_CHECK(cudaMemsetAsync(p.grad.get(), 0, p.grad.bytes(), p.ctx.stream()));
  QT_CUDA_CHECK(cudaMemsetAsync(p.loss_total.get(), 0, sizeof(double), p.ctx.stream()));
}

void CudaDecoder::forward_backward(double grad_scale, const LoraDropout& dropout) {
  const double gs = grad_scale > 0 ? grad_scale : (p_->count ? 1.0 / double(p_->count) : 0.0);
  QT_ASSERT(dropout.p >= 0 && dropout.p < 1, "dropout probability {}", dropout.p);
  QT_ASSERT(p_->layer_sq.size(), "forward_backward on an inference-only CudaDecoder");
  QT_ASSERT(!(p_->states_on_host && p_->layer_backward_hook), "lora_states_on_host with a layer backward hook");
  p_->drop = dropout;
  p_->run(true, float(gs));
  p_->drop = {};
}

void CudaDecoder::forward() { p_->run(false, 0.f); }

void CudaDecoder::optimizer_step(int64_t step, double lr, double weight_decay, double max_norm, double beta1,
                                 double beta2, double eps) {
  Impl& p = *p_;
  QT_ASSERT(step >= 1, "optimizer step {} must be >= 1", step);
  QT_ASSERT(p.layer_sq.size(), "optimizer_step on an inference-only CudaDecoder");
  // The global sum of squares from per-layer sums in layer order (the same arithmetic on both paths;
  // with states on the host the backward formed them while each layer's gradient was on the device).
  if (!p.states_on_host)
    for (int64_t l = 0; l < p.L; ++l) p.layer_sum_squares(l);
  QT_CUDA_CHECK(cudaMemsetAsync(p.sum_sq.get(), 0, sizeof(double), p.ctx.stream()));
  cuda::sum_f64(p.ctx, p.sum_sq.get(), p.layer_sq.get(), p.L);
  cuda::step_guard(p.ctx, p.skip.get(), p.sum_sq.get(), p.loss_total.get());
  const double bc1 = 1.0 - std::pow(beta1, double(step)), bc2 = 1.0 - std::pow(beta2, double(step));
  const auto update = [&](float* w, float* g, float* m, float* v, int64_t n) {
    if (max_norm > 0) cuda::clip_by_sum_squares(p.ctx, g, n, p.sum_sq.get(), max_norm);
    cuda::adamw_step(p.ctx, w, g, m, v, n, 1.0 - lr * weight_decay, beta1, beta2, lr / bc1, std::sqrt(bc2), eps,
                     p.skip.get());
  };
  if (p.states_on_host)
    p.stream_optimizer(update);
  else
    update(p.lora.get(), p.grad.get(), p.m1.get(), p.m2.get(), p.n_lora);
  p.prof.mark(p.ctx, "optimizer");
}

CudaDecoder::StepStats CudaDecoder::read_step_stats() const {
  const Impl& p = *p_;
  p.ctx.synchronize();
  StepStats st;
  st.loss_total = p.loss_total.download()[0];
  st.grad_norm = std::sqrt(p.sum_sq.download()[0]);
  st.skipped = p.skip.download()[0] != 0;
  return st;
}

double CudaDecoder::loss_sum() const {
  p_->ctx.synchronize();
  return p_->loss.download()[0];
}

Tensor CudaDecoder::logits() const {
  const Impl& p = *p_;
  QT_ASSERT(p.N > 0, "no batch set");
  Buffer<float> out(size_t(p.N * p.V));
  cuda::gemm(p.ctx, false, true, p.N, p.V, p.H, 1.f, p.xf.get(), p.lm_head, 0.f, out.get());
  p.ctx.synchronize();
  Tensor t = Tensor::empty({p.B, p.S, p.V}, DType::F32);
  QT_CUDA_CHECK(cudaMemcpy(t.data<float>(), out.get(), out.bytes(), cudaMemcpyDeviceToHost));
  return t;
}

std::pair<LoraAdapter, LoraAdapter> CudaDecoder::download_moments() const {
  return {p_->download('m'), p_->download('v')};
}

void CudaDecoder::upload_state(const LoraAdapter& lora, const LoraAdapter& exp_avg, const LoraAdapter& exp_avg_sq) {
  p_->upload('w', lora);
  p_->upload('m', exp_avg);
  p_->upload('v', exp_avg_sq);
}

std::vector<CudaDecoder::GradRange> CudaDecoder::grad_layout() const {
  const Impl& p = *p_;
  std::vector<GradRange> out;
  for (int64_t l = 0; l < p.L; ++l)
    for (const SlotRef& sr : p.slots[l])
      if (sr.present) {
        out.push_back({sr.a_off, sr.copies() * p.r * sr.in, l});
        out.push_back({sr.b_off, sr.copies() * sr.out * p.r, l});
      }
  return out;
}
float* CudaDecoder::grad_data() {
  QT_ASSERT(!p_->states_on_host, "grad_data with the LoRA gradients in host memory");
  return p_->grad.get();
}

double CudaDecoder::aux_loss() const {
  if (!p_->any_moe) return 0.0;
  p_->ctx.synchronize();
  return p_->aux.download()[0];
}

std::vector<std::vector<int64_t>> CudaDecoder::take_expert_load() {
  Impl& p = *p_;
  if (!p.any_moe) return {};
  p.ctx.synchronize();
  const std::vector<int64_t> all = p.expert_load.download();
  QT_CUDA_CHECK(cudaMemsetAsync(p.expert_load.get(), 0, p.expert_load.bytes(), p.ctx.stream()));
  std::vector<std::vector<int64_t>> out;
  const int64_t E = p.cfg.num_experts;
  for (int64_t l = 0; l < p.L; ++l)
    if (p.cfg.is_moe_layer(l)) out.emplace_back(all.begin() + l * E, all.begin() + (l + 1) * E);
  return out;
}
double* CudaDecoder::loss_total_data() { return p_->loss_total.get(); }
void CudaDecoder::set_layer_backward_hook(std::function<void(int64_t)> hook) { p_->layer_backward_hook = std::move(hook); }

CudaDecoder::LayerView CudaDecoder::layer_view(int64_t l) {
  Impl& p = *p_;
  QT_ASSERT(l >= 0 && l < p.L, "layer {} of {}", l, p.L);
  // An NF4 layer's projections must sit in the scratch together: the inference-only layout.
  QT_ASSERT(!p.nf4 || p.layer_scratch, "layer_view needs an inference-only CudaDecoder with an NF4 base");
  QT_ASSERT(!p.states_on_host, "layer_view of a decoder whose LoRA masters live in host memory");
  const DeviceLayer& d = p.layers[size_t(l)];
  LayerView v;
  v.moe = d.moe;
  v.input_norm = d.input_norm.get(), v.post_norm = d.post_norm.get(), v.q_norm = d.q_norm.get();
  v.k_norm = d.k_norm.get(), v.q_b = d.q_b.get(), v.k_b = d.k_b.get(), v.v_b = d.v_b.get(), v.router = d.router.get();
  for (int s = 0; s < kNumLoraSlots; ++s) {
    v.w[size_t(s)] = p.wt(l, s);
    const SlotRef& sr = p.slots[size_t(l)][size_t(s)];
    if (sr.present) v.A[size_t(s)] = p.master_at(l, sr.a_off), v.B[size_t(s)] = p.master_at(l, sr.b_off);
  }
  return v;
}
const cuda::bf16* CudaDecoder::embed() const { return p_->embed_table; }
const cuda::bf16* CudaDecoder::final_norm() const { return p_->final_norm.get(); }
const cuda::bf16* CudaDecoder::lm_head() const { return p_->lm_head; }
int64_t CudaDecoder::lora_rank() const { return p_->r; }
float CudaDecoder::lora_scale() const { return p_->scale; }

LoraAdapter CudaDecoder::download_grads() const { return p_->download('g'); }
LoraAdapter CudaDecoder::download_lora() const { return p_->download('w'); }

bool CudaDecoder::embeddings_on_host() const { return p_->embed_host.size() > 0; }
bool CudaDecoder::layer_inputs_on_host() const { return p_->inputs_on_host; }
bool CudaDecoder::lora_states_on_host() const { return p_->states_on_host; }

size_t CudaDecoder::device_bytes() const {
  const Impl& p = *p_;
  size_t n = p.embed.bytes() + p.lm_head_own.bytes() + p.final_norm.bytes() + p.lora.bytes() + p.grad.bytes() +
             p.m1.bytes() + p.m2.bytes() + p.lora_ring.bytes() + p.grad_ring.bytes() + p.layer_sq.bytes();
  for (auto& d : p.layers) {
    n += d.input_norm.bytes() + d.post_norm.bytes() + d.q_norm.bytes() + d.k_norm.bytes() + d.q_b.bytes() +
         d.k_b.bytes() + d.v_b.bytes();
    for (auto& w : d.w) n += w.bytes();
    for (auto& g : d.nf4) n += g.bytes();
    n += d.router.bytes();
  }
  n += p.wscratch.bytes();
  for (const auto* b : {&p.xd, &p.dxd, &p.saved, &p.a, &p.q_raw, &p.k_raw, &p.q, &p.k, &p.v, &p.attn, &p.o, &p.h, &p.m, &p.mlp_work,
                        &p.xa, &p.xf, &p.dx, &p.dm, &p.da, &p.dattn, &p.dq, &p.dk, &p.dv, &p.dk_raw,
                        &p.dact})
    n += b->bytes();
  n += p.moe_work.bytes();
  for (const auto* b : {&p.rstd1, &p.rstd_q, &p.rstd_k, &p.lse, &p.rstd2, &p.rstdf, &p.cos, &p.sin}) n += b->bytes();
  return n;
}

}  // namespace qt
#endif
