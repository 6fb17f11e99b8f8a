// Times the CUDA ops that dominate a training step, at Qwen3-8B-like shapes, on random bf16 data:
// cuBLASLt GEMM, flash-style attention forward and backward, fused lm_head + cross-entropy.
// Median of 10 runs after 3 warm-ups, timed with CUDA events. Prints one line per op with the
// achieved TFLOP/s (useful FLOPs: causal attention counts the visible half of S x S).
// Usage: cuda_ops_bench   (needs a GPU; prints nothing useful without one)
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "core/dtype.h"
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

}  // namespace

int main() {
  if (device_count() == 0) {
    std::printf("no CUDA device\n");
    return 0;
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
