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
  std::printf("%-58s %9.3f ms %8.1f TFLOP/s\n", what, ms, flops / (ms * 1e-3) / 1e12);
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
  for (int64_t S : {2048, 4096, -4096}) {  // -4096: 4096 tokens packed as 8 documents of 512
    const bool packed = S < 0;
    S = packed ? -S : S;
    const int64_t Bt = 1, nh = 32, nkv = 8, hd = 128;
    const size_t nq = size_t(Bt * S * nh * hd), nk = size_t(Bt * S * nkv * hd);
    auto q = random_bf16(nq, rng, 1), k = random_bf16(nk, rng, 1), v = random_bf16(nk, rng, 1), dO = random_bf16(nq, rng, 1);
    auto out = random_bf16(nq, rng, 1), dq = random_bf16(nq, rng, 0), dk = random_bf16(nk, rng, 0), dv = random_bf16(nk, rng, 0);
    Buffer<float> lse(size_t(Bt * nh * S));
    std::vector<int32_t> seg(static_cast<size_t>(S));
    for (int64_t i = 0; i < S; ++i) seg[size_t(i)] = int32_t(i / 512);
    auto seg_d = to_device(seg);
    const int32_t* segp = packed ? seg_d.get() : nullptr;
    // QK^T and PV over the visible (causal, same-document) half blocks
    const double span = packed ? 512.0 : double(S);
    const double fwd_flops = 2.0 * 2.0 * double(S) * span / 2.0 * hd * nh * Bt;
    char name[128];
    std::snprintf(name, sizeof name, "attention fwd B1 S%ld nh32 nkv8 hd128 causal%s", long(S), packed ? " docs 512" : "");
    report(name, median_ms(ctx, [&] {
             attention_forward(ctx, out.get(), lse.get(), q.get(), k.get(), v.get(), segp, Bt, S, nh, nkv, hd);
           }), fwd_flops);
    std::snprintf(name, sizeof name, "attention bwd B1 S%ld nh32 nkv8 hd128 causal%s", long(S), packed ? " docs 512" : "");
    report(name, median_ms(ctx, [&] {
             attention_backward(ctx, dq.get(), dk.get(), dv.get(), dO.get(), out.get(), lse.get(), q.get(), k.get(),
                                v.get(), segp, Bt, S, nh, nkv, hd);
           }), 2.5 * fwd_flops);
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
