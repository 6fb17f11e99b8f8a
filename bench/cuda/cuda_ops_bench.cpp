// Times the CUDA ops that dominate a training step, at Qwen3-8B-like shapes, on random bf16 data:
// cuBLASLt GEMM, flash-style attention forward and backward, fused lm_head + cross-entropy.
// Median of 10 runs after 3 warm-ups, timed with CUDA events. Prints one line per op with the
// achieved TFLOP/s (useful FLOPs: causal attention counts the visible half of S x S).
// Usage: cuda_ops_bench   (needs a GPU; prints nothing useful without one)
//        cuda_ops_bench grouped [T ...]   the grouped expert GEMMs (ops/cuda/grouped_gemm.h) at
//        Qwen3-30B-A3B's expert shapes (E 128, H 2048, I 768, top-8 of T tokens; T = 2048 8192 16384
//        unless given): one JSON line per case with the median ms, TFLOP/s (2 rows N K, the dense-
//        equivalent count of /work/shared/bench/gemm_limits.py) and GB/s (bytes each operand
//        moves once). Routing as gemm_limits.py: top-8 of normal(0, 1) logits per token (seeded);
//        "skewed" adds a normal(0, 0.3) bias per expert (busiest expert ~3.5x the average, the least
//        busy ~0.1x; max_rows is printed). gate_up, down and their dx run once per row tile
//        (QT_GROUPED_GEMM_TILE auto/big/short/wide); dense_equiv_* is one cuBLASLt GEMM of the same
//        size (the ceiling).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <utility>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "ops/cuda/grouped_gemm.h"
#include "ops/cuda/init_clip.h"
#include "ops/cuda/ops.h"

using namespace qt::cuda;

namespace {

Buffer<bf16> random_bf16(size_t n, std::mt19937_64& rng, float sd) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<uint16_t> bits(n);
  for (auto& b : bits) b = qt::f32_to_bf16(d(rng));
  Buffer<bf16> buf(n);
  QT_CUDA_CHECK(cudaMemcpy(buf.get(), bits.data(), n * 2, cudaMemcpyHostToDevice));
  return buf;
}

double median_ms(Context& ctx, const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms;
  for (int i = 0; i < 10; ++i) {
    Event a, b;
    a.record(ctx.stream());
    fn();
    b.record(ctx.stream());
    b.synchronize();
    ms.push_back(b.elapsed_since(a));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void report(const char* what, double ms, double flops) {
  std::printf("%-72s %9.3f ms %8.1f TFLOP/s\n", what, ms, flops / (ms * 1e-3) / 1e12);
}

// Expert offsets (E+1) of T tokens routed to their top-k of normal logits (+ a per-expert bias).
std::vector<int64_t> route_offsets(int64_t T, int64_t E, int64_t k, double bias_sd, std::mt19937_64& rng) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> bias(static_cast<size_t>(E), 0.0), logit(static_cast<size_t>(E));
  for (auto& b : bias) b = bias_sd * d(rng);
  std::vector<int64_t> count(static_cast<size_t>(E), 0), order(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) logit[size_t(e)] = d(rng) + bias[size_t(e)];
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return logit[size_t(a)] > logit[size_t(b)]; });
    for (int64_t j = 0; j < k; ++j) ++count[size_t(order[size_t(j)])];
  }
  std::vector<int64_t> off(size_t(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] = off[size_t(e)] + count[size_t(e)];
  return off;
}

int grouped_bench(const std::vector<int64_t>& Ts) {
  Context ctx;
  std::mt19937_64 rng(7);
  const int64_t E = 128, H = 2048, I = 768, topk = 8, r = 16;
  for (const int64_t T : Ts) {
    for (const double bias_sd : {0.0, 0.3}) {
      const auto off = route_offsets(T, E, topk, bias_sd, rng);
      const int64_t rows = T * topk;
      int64_t max_rows = 0;
      for (int64_t e = 0; e < E; ++e) max_rows = std::max(max_rows, off[size_t(e + 1)] - off[size_t(e)]);
      auto off_d = to_device(off);
      uint64_t seed = rng();
      const auto dev_normal = [&](int64_t n, float sd) {  // filled on the device (GiBs of operands)
        Buffer<bf16> b(static_cast<size_t>(n));
        fill_normal(ctx, b.get(), n, 0.0f, sd, seed++);
        return b;
      };
      auto x = dev_normal(rows * H, 1), h = dev_normal(rows * I, 1), gu = dev_normal(rows * 2 * I, 1),
           y = dev_normal(rows * H, 1), xa = dev_normal(rows * r, 1);
      auto Wgu = dev_normal(E * 2 * I * H, 0.02f), Wd = dev_normal(E * H * I, 0.02f);
      auto A = dev_normal(E * r * H, 0.02f), B = dev_normal(E * 2 * I * r, 0.02f);
      Buffer<float> dA(size_t(E * r * H)), dB(size_t(E * 2 * I * r));
      dA.fill_bytes(0);
      dB.fill_bytes(0);
      const char* routing = bias_sd > 0 ? "skewed" : "topk-randn";
      // name, FLOPs (2 rows N K of the dense-equivalent product), bytes moved once, the call
      struct Op { const char* name; double flops, bytes; std::function<void()> fn; };
      const double b2 = 2.0;
      const auto fl = [&](int64_t N, int64_t K) { return 2.0 * double(rows) * double(N) * double(K); };
      const std::vector<Op> ops = {
          {"gate_up", fl(2 * I, H), b2 * (rows * H + E * 2 * I * H + rows * 2 * I),
           [&] { grouped_gemm_nt(ctx, gu.get(), x.get(), Wgu.get(), off_d.get(), rows, E, 2 * I, H, 1.0f, false); }},
          {"down", fl(H, I), b2 * (rows * I + E * H * I + rows * H),
           [&] { grouped_gemm_nt(ctx, y.get(), h.get(), Wd.get(), off_d.get(), rows, E, H, I, 1.0f, false); }},
          {"dx_gate_up", fl(H, 2 * I), b2 * (rows * 2 * I + E * 2 * I * H + 2 * rows * H),
           [&] { grouped_gemm_nn(ctx, x.get(), gu.get(), Wgu.get(), off_d.get(), rows, E, 2 * I, H, 1.0f, true); }},
          {"dx_down", fl(I, H), b2 * (rows * H + E * H * I + 2 * rows * I),
           [&] { grouped_gemm_nn(ctx, h.get(), y.get(), Wd.get(), off_d.get(), rows, E, H, I, 1.0f, true); }},
          {"lora_xa_r16", fl(r, H), b2 * (rows * H + E * r * H + rows * r),
           [&] { grouped_gemm_nt(ctx, xa.get(), x.get(), A.get(), off_d.get(), rows, E, r, H, 1.0f, false); }},
          {"lora_y_r16", fl(2 * I, r), b2 * (rows * r + E * 2 * I * r + 2 * rows * 2 * I),
           [&] { grouped_gemm_nt(ctx, gu.get(), xa.get(), B.get(), off_d.get(), rows, E, 2 * I, r, 2.0f, true); }},
          {"lora_t_r16", fl(r, 2 * I), b2 * (rows * 2 * I + E * 2 * I * r + rows * r),
           [&] { grouped_gemm_nn(ctx, xa.get(), gu.get(), B.get(), off_d.get(), rows, E, 2 * I, r, 1.0f, false); }},
          {"lora_dx_r16", fl(H, r), b2 * (rows * r + E * r * H + 2 * rows * H),
           [&] { grouped_gemm_nn(ctx, x.get(), xa.get(), A.get(), off_d.get(), rows, E, r, H, 2.0f, true); }},
          {"lora_dA_r16", fl(r, H), b2 * (rows * r + rows * H) + 8.0 * E * r * H,
           [&] { grouped_gemm_tn_kgrouped(ctx, dA.get(), xa.get(), x.get(), off_d.get(), rows, E, r, H, 2.0f); }},
          {"lora_dB_r16", fl(2 * I, r), b2 * (rows * 2 * I + rows * r) + 8.0 * E * 2 * I * r,
           [&] { grouped_gemm_tn_kgrouped(ctx, dB.get(), gu.get(), xa.get(), off_d.get(), rows, E, 2 * I, r, 2.0f); }},
          // the base products with the LoRA term fused (one pass over the output instead of two)
          {"gate_up+lora_r16", fl(2 * I, H + r), b2 * (rows * (H + r) + E * 2 * I * (H + r) + rows * 2 * I),
           [&] {
             grouped_gemm_nt(ctx, gu.get(), x.get(), Wgu.get(), off_d.get(), rows, E, 2 * I, H, 1.0f, false,
                             SecondProduct{xa.get(), B.get(), r});
           }},
          {"dx_gate_up+lora_r16", fl(H, 2 * I + r), b2 * (rows * (2 * I + r) + E * (2 * I + r) * H + 2 * rows * H),
           [&] {
             grouped_gemm_nn(ctx, x.get(), gu.get(), Wgu.get(), off_d.get(), rows, E, 2 * I, H, 1.0f, true,
                             SecondProduct{xa.get(), A.get(), r});
           }},
          // the ceiling: one dense cuBLASLt GEMM of the same rows x N x K (expert 0's weights for all rows)
          {"dense_equiv_gate_up", fl(2 * I, H), b2 * (rows * H + 2 * I * H + rows * 2 * I),
           [&] { gemm(ctx, false, true, rows, 2 * I, H, 1.0f, x.get(), Wgu.get(), 0.0f, gu.get()); }},
          {"dense_equiv_down", fl(H, I), b2 * (rows * I + H * I + rows * H),
           [&] { gemm(ctx, false, true, rows, H, I, 1.0f, h.get(), Wd.get(), 0.0f, y.get()); }},
      };
      for (const Op& op : ops) {
        const bool base = std::strcmp(op.name, "gate_up") == 0 || std::strcmp(op.name, "down") == 0 ||
                          std::strncmp(op.name, "dx_", 3) == 0;
        if (bias_sd > 0 && !base) continue;
        // The base products once per row tile (QT_GROUPED_GEMM_TILE forces an mma.sync tile; "auto" =
        // the library's choice; "wgmma:V" a variant of the Hopper kernel, QT_GROUPED_GEMM_WGMMA_BN = V).
        for (const char* tile : {"auto", "wgmma:256", "wgmma:128tma", "big", "short", "wide"}) {
          if (!base && std::strcmp(tile, "auto") != 0) break;
          unsetenv("QT_GROUPED_GEMM_TILE");
          unsetenv("QT_GROUPED_GEMM_WGMMA_BN");
          if (std::strncmp(tile, "wgmma:", 6) == 0) setenv("QT_GROUPED_GEMM_WGMMA_BN", tile + 6, 1);
          else if (std::strcmp(tile, "auto") != 0) setenv("QT_GROUPED_GEMM_TILE", tile, 1);
          const double ms = median_ms(ctx, op.fn);
          std::printf("{\"op\":\"%s\",\"tile\":\"%s\",\"T\":%ld,\"rows\":%ld,\"E\":%ld,\"routing\":\"%s\","
                      "\"max_rows\":%ld,\"ms\":%.4f,\"tflops\":%.1f,\"gbps\":%.0f}\n",
                      op.name, tile, long(T), long(rows), long(E), routing, long(max_rows), ms,
                      op.flops / (ms * 1e-3) / 1e12, op.bytes / (ms * 1e-3) / 1e9);
          std::fflush(stdout);
        }
        unsetenv("QT_GROUPED_GEMM_TILE");
        unsetenv("QT_GROUPED_GEMM_WGMMA_BN");
      }
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (device_count() == 0) {
    std::printf("no CUDA device\n");
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "grouped") == 0) {
    std::vector<int64_t> Ts;
    for (int i = 2; i < argc; ++i) Ts.push_back(std::stoll(argv[i]));
    if (Ts.empty()) Ts = {2048, 8192, 16384};
    return grouped_bench(Ts);
  }
  Context ctx;
  std::mt19937_64 rng(1);
  {
    const int64_t M = 8192, N = 4096, K = 4096;
    auto A = random_bf16(size_t(M * K), rng, 1), B = random_bf16(size_t(N * K), rng, 1), C = random_bf16(size_t(M * N), rng, 1);
    report("gemm bf16 8192x4096x4096 (x W^T, beta 0)",
           median_ms(ctx, [&] { gemm(ctx, false, true, M, N, K, 1.0f, A.get(), B.get(), 0.0f, C.get()); }), 2.0 * M * N * K);
    report("gemm bf16 8192x4096x4096 (dy W, beta 1: fp32 staging)",
           median_ms(ctx, [&] { gemm(ctx, false, false, M, N, K, 1.0f, A.get(), B.get(), 1.0f, C.get()); }),
           2.0 * M * N * K);
  }
  // The linear + LoRA pieces of one projection at Qwen2.5-0.5B's MLP shapes (N = 8 x 2048 tokens,
  // r = 16): where a LoRA projection's time goes beside its base GEMM.
  for (const auto& [in, out] : {std::pair<int64_t, int64_t>{896, 4864}, std::pair<int64_t, int64_t>{4864, 896}}) {
    const int64_t N = 16384, r = 16;
    auto x = random_bf16(size_t(N * in), rng, 1), W = random_bf16(size_t(out * in), rng, 0.02f);
    auto y = random_bf16(size_t(N * out), rng, 1), dy = random_bf16(size_t(N * out), rng, 1);
    auto dx = random_bf16(size_t(N * in), rng, 0), xa = random_bf16(size_t(N * r), rng, 1);
    auto t = random_bf16(size_t(N * r), rng, 1), A16 = random_bf16(size_t(r * in), rng, 0.02f);
    auto B16 = random_bf16(size_t(out * r), rng, 0.02f);
    Buffer<float> A(size_t(r * in)), Bm(size_t(out * r)), dA(size_t(r * in)), dB(size_t(out * r));
    A.fill_bytes(0), Bm.fill_bytes(0), dA.fill_bytes(0), dB.fill_bytes(0);
    char name[160];
    auto line = [&](const char* what, double flops, const std::function<void()>& fn) {
      std::snprintf(name, sizeof name, "%s N%ld in%ld out%ld r%ld", what, long(N), long(in), long(out), long(r));
      report(name, median_ms(ctx, fn), flops);
    };
    const double base = 2.0 * N * in * out;
    line("linear fwd (y = x W^T)", base, [&] { linear_forward(ctx, y.get(), x.get(), W.get(), nullptr, N, in, out); });
    line("linear bwd overwrite (dx = dy W)", base,
         [&] { linear_backward(ctx, dx.get(), dy.get(), W.get(), N, in, out, false); });
    line("linear bwd accumulate (dx += dy W, staged)", base,
         [&] { linear_backward(ctx, dx.get(), dy.get(), W.get(), N, in, out, true); });
    line("lora fwd (xa = x A^T; y += s xa B^T)", 2.0 * N * r * (in + out),
         [&] { lora_forward(ctx, y.get(), xa.get(), x.get(), A.get(), Bm.get(), 2.f, N, in, out, r); });
    line("  lora fwd piece: xa = x A16^T (cuBLASLt)", 2.0 * N * r * in,
         [&] { gemm(ctx, false, true, N, r, in, 1.f, x.get(), A16.get(), 0.f, xa.get()); });
    line("  lora fwd piece: y += s xa B16^T (rank_update_fused)", 2.0 * N * r * out,
         [&] { rank_update_fused(ctx, y.get(), xa.get(), B16.get(), true, N, out, r, 2.f); });
    line("  same through cuBLASLt + staging (rank_update_via_gemm)", 2.0 * N * r * out,
         [&] { rank_update_via_gemm(ctx, y.get(), xa.get(), B16.get(), true, N, out, r, 2.f); });
    line("lora bwd (t, dx, dA, dB)", 2.0 * N * r * (2 * in + 2 * out), [&] {
      lora_backward(ctx, dx.get(), dA.get(), dB.get(), dy.get(), x.get(), xa.get(), A.get(), Bm.get(), 2.f, N, in, out, r);
    });
    line("  lora bwd piece: t = dy B16 (cuBLASLt)", 2.0 * N * r * out,
         [&] { gemm(ctx, false, false, N, r, out, 1.f, dy.get(), B16.get(), 0.f, t.get()); });
    line("  lora bwd piece: dx += s t A16 (rank_update_fused)", 2.0 * N * r * in,
         [&] { rank_update_fused(ctx, dx.get(), t.get(), A16.get(), false, N, in, r, 2.f); });
    line("  lora bwd piece: dA += s t^T x (cuBLASLt, fp32, K = N)", 2.0 * N * r * in,
         [&] { gemm(ctx, true, false, r, in, N, 2.f, t.get(), x.get(), 1.f, dA.get()); });
    line("  lora bwd piece: dB += s dy^T xa (cuBLASLt, fp32, K = N)", 2.0 * N * r * out,
         [&] { gemm(ctx, true, false, out, r, N, 2.f, dy.get(), xa.get(), 1.f, dB.get()); });
  }
  struct AttnCase { int64_t B, S, nh, nkv, hd, doc; const char* model; };  // doc: packed document length (0: one)
  for (const AttnCase& c : {AttnCase{8, 2048, 14, 2, 64, 0, "Qwen2.5-0.5B"},
                            AttnCase{1, 2048, 28, 4, 128, 0, "Qwen2.5-7B"}, AttnCase{1, 2048, 32, 8, 128, 0, ""}, AttnCase{1, 4096, 32, 8, 128, 0, ""},
                            AttnCase{1, 4096, 32, 8, 128, 512, ""}}) {
    const int64_t B = c.B, S = c.S, nh = c.nh, nkv = c.nkv, hd = c.hd;
    const size_t nq = size_t(B * S * nh * hd), nk = size_t(B * S * nkv * hd);
    auto q = random_bf16(nq, rng, 1), k = random_bf16(nk, rng, 1), v = random_bf16(nk, rng, 1), dO = random_bf16(nq, rng, 1);
    auto out = random_bf16(nq, rng, 1), dq = random_bf16(nq, rng, 0), dk = random_bf16(nk, rng, 0), dv = random_bf16(nk, rng, 0);
    Buffer<float> lse(size_t(B * nh * S));
    std::vector<int32_t> seg(static_cast<size_t>(B * S));
    for (int64_t i = 0; i < B * S; ++i) seg[size_t(i)] = c.doc ? int32_t((i % S) / c.doc) : 0;
    auto seg_d = to_device(seg);
    const int32_t* segp = c.doc ? seg_d.get() : nullptr;
    // QK^T and PV over the visible (causal, same-document) half blocks
    const double span = c.doc ? double(c.doc) : double(S);
    const double fwd_flops = 2.0 * 2.0 * double(S) * span / 2.0 * hd * nh * B;
    for (const bool simt : {false, true}) {  // the public op (tensor cores for hd 64/128), then the SIMT kernels
      const auto fwd = simt ? &attention_forward_simt : &attention_forward;
      const auto bwd = simt ? &attention_backward_simt : &attention_backward;
      char name[160], docs[32] = "";
      if (c.doc) std::snprintf(docs, sizeof docs, " docs %ld", long(c.doc));
      const char* kind = simt ? "simt" : "tc";
      for (const bool backward : {false, true}) {
        std::snprintf(name, sizeof name, "attention %s %s B%ld S%ld nh%ld nkv%ld hd%ld causal%s%s%s", kind,
                      backward ? "bwd" : "fwd", long(B), long(S), long(nh), long(nkv), long(hd),
                      docs, *c.model ? " " : "", c.model);
        report(name, median_ms(ctx, [&] {
                 if (backward)
                   bwd(ctx, dq.get(), dk.get(), dv.get(), dO.get(), out.get(), lse.get(), q.get(), k.get(), v.get(),
                       segp, B, S, nh, nkv, hd);
                 else
                   fwd(ctx, out.get(), lse.get(), q.get(), k.get(), v.get(), segp, B, S, nh, nkv, hd);
               }), backward ? 2.5 * fwd_flops : fwd_flops);
      }
    }
  }
  {
    const int64_t N = 4096, H = 4096, V = 151936;
    auto h = random_bf16(size_t(N * H), rng, 1), W = random_bf16(size_t(V * H), rng, 0.02f), dh = random_bf16(size_t(N * H), rng, 0);
    std::vector<int32_t> labels(static_cast<size_t>(N));
    for (auto& y : labels) y = int32_t(rng() % V);
    auto lab = to_device(labels);
    Buffer<double> sum(1);
    Buffer<int64_t> count(1);
    report("fused lm_head + CE fwd+bwd N4096 H4096 V151936",
           median_ms(ctx, [&] {
             fused_linear_cross_entropy(ctx, sum.get(), count.get(), dh.get(), h.get(), W.get(), lab.get(), 1.0f / N, 1,
                                        N, H, V);
           }), 2.0 * 2.0 * N * H * V);
  }
  return 0;
}
