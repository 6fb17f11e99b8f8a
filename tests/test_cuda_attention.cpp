// Op-parity harness, part 2: flash-style causal GQA attention (forward, backward) against
// cpu::attention_forward/backward in float on the same bf16 inputs, with and without packed
// segments, over odd sequence lengths (not multiples of the tiles), GQA groups and head dims
// 8..256. Both kernels: the public op (tensor cores for head_dim 64 and 128) and the fp32 SIMT
// kernels (every head dim). Tolerances: see cuda_parity.h (outputs rounded to bf16 once; softmax
// sums in fp32 in another order; the tensor-core kernels also round P and dS to bf16 before their
// products: kAtolBf16Intermediate). QT_CUDA_PARITY_QUICK=1 keeps the small cases.
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>

#include "cuda_parity.h"
#include "ops/cpu/ops.h"

namespace qt::testing {
namespace {

struct Case { int64_t B, S, nh, nkv, hd; bool segments; };

std::vector<Case> cases() {
  std::vector<Case> c = {{1, 1, 1, 1, 8, false},   {1, 3, 2, 1, 16, true},    {2, 17, 4, 2, 64, true},
                         {1, 33, 3, 3, 40, false}, {1, 47, 6, 2, 128, true},  {1, 1, 2, 1, 64, false},
                         {1, 1, 1, 1, 128, true},  {1, 17, 7, 1, 128, false}, {2, 127, 14, 2, 64, true}};
  const char* q = std::getenv("QT_CUDA_PARITY_QUICK");
  if (!(q && std::string(q) == "1"))
    c.insert(c.end(), {{2, 127, 8, 2, 128, true},
                       {1, 300, 4, 1, 128, false},
                       {1, 130, 2, 2, 256, true},
                       {1, 517, 16, 8, 128, true},
                       {3, 64, 4, 4, 96, false},
                       {1, 300, 14, 2, 64, true},
                       {1, 300, 4, 4, 64, false},
                       {1, 200, 28, 4, 128, true},
                       {1, 130, 4, 1, 64, false}});
  return c;
}

using ForwardFn = decltype(&cuda::attention_forward);
using BackwardFn = decltype(&cuda::attention_backward);

// Runs every case through fwd/bwd and compares with the CPU; public_op: the dispatching op
// (tensor cores where the head dim allows).
void check_against_cpu(ForwardFn fwd, BackwardFn bwd, bool public_op) {
  cuda::Context ctx;
  std::mt19937_64 rng(11);
  for (const Case& c : cases()) {
    const size_t nq = size_t(c.B * c.S * c.nh * c.hd), nk = size_t(c.B * c.S * c.nkv * c.hd);
    // Scores of a few units (as after the q/k norms) so the softmax is neither flat nor one-hot.
    auto q = randn_bf16(nq, rng, 1.5f), k = randn_bf16(nk, rng, 1.5f), v = randn_bf16(nk, rng),
         dout = randn_bf16(nq, rng), dq0 = randn_bf16(nq, rng, 0.1f), dk0 = randn_bf16(nk, rng, 0.1f),
         dv0 = randn_bf16(nk, rng, 0.1f);
    std::vector<int32_t> seg(size_t(c.B * c.S));
    for (int64_t b = 0; b < c.B; ++b) {  // packed documents of random lengths 1..20
      int32_t id = 0;
      int64_t left = 0;
      for (int64_t i = 0; i < c.S; ++i) {
        if (left == 0) {
          ++id;
          left = 1 + int64_t(rng() % 20);
        }
        seg[size_t(b * c.S + i)] = id;
        --left;
      }
    }
    const int32_t* segp = c.segments ? seg.data() : nullptr;
    std::vector<float> out(nq), lse(size_t(c.B * c.nh * c.S)), dq = dq0, dk = dk0, dv = dv0;
    cpu::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), segp, c.B, c.S, c.nh, c.nkv, c.hd);
    // The backward takes the GPU's bf16 output (what training would hold); the CPU uses the same.
    auto q_d = dev_bf16(q), k_d = dev_bf16(k), v_d = dev_bf16(v), do_d = dev_bf16(dout);
    auto seg_d = cuda::to_device(seg);
    auto out_d = dev_poison_bf16(nq);
    auto lse_d = dev_poison_f32(lse.size());
    const int32_t* segd = c.segments ? seg_d.get() : nullptr;
    fwd(ctx, out_d.get(), lse_d.get(), q_d.get(), k_d.get(), v_d.get(), segd, c.B, c.S, c.nh, c.nkv, c.hd);
    const auto out_gpu = host_f32(out_d), lse_gpu = host_f32(lse_d);
    const bool tc = public_op && (c.hd == 64 || c.hd == 128);
    const double atol = tc ? kAtolBf16Intermediate : kAtolReduction;
    const std::string shape = std::string(tc ? "tc " : (public_op ? "" : "simt ")) + "[B" + std::to_string(c.B) + " S" +
                              std::to_string(c.S) + " nh" + std::to_string(c.nh) + " nkv" + std::to_string(c.nkv) +
                              " hd" + std::to_string(c.hd) + (c.segments ? " seg]" : "]");
    expect_close("attention_forward out " + shape, out_gpu, out, kBf16Rtol, atol);
    expect_close("attention_forward lse " + shape, lse_gpu, lse, 0, 1e-5);

    auto dq_d = dev_bf16(dq0), dk_d = dev_bf16(dk0), dv_d = dev_bf16(dv0);
    bwd(ctx, dq_d.get(), dk_d.get(), dv_d.get(), do_d.get(), out_d.get(), lse_d.get(), q_d.get(), k_d.get(), v_d.get(),
        segd, c.B, c.S, c.nh, c.nkv, c.hd);
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out_gpu.data(), lse_gpu.data(), q.data(),
                            k.data(), v.data(), segp, c.B, c.S, c.nh, c.nkv, c.hd);
    expect_close("attention_backward dq " + shape, host_f32(dq_d), dq, kBf16Rtol, atol);
    expect_close("attention_backward dk " + shape, host_f32(dk_d), dk, kBf16Rtol, atol);
    expect_close("attention_backward dv " + shape, host_f32(dv_d), dv, kBf16Rtol, atol);
  }
}

TEST(CudaAttention, ForwardBackwardMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  check_against_cpu(&cuda::attention_forward, &cuda::attention_backward, true);
}

TEST(CudaAttention, SimtKernelsMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  check_against_cpu(&cuda::attention_forward_simt, &cuda::attention_backward_simt, false);
}

// Null gradients are skipped and the others still accumulate (dk only here), in both kernels.
TEST(CudaAttention, NullGradientsSkipped) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(12);
  const int64_t B = 1, S = 19, nh = 2, nkv = 1;
  for (const int64_t hd : {int64_t(32), int64_t(128)}) {  // SIMT and tensor-core kernels
    const size_t nq = size_t(B * S * nh * hd), nk = size_t(B * S * nkv * hd);
    auto q = randn_bf16(nq, rng), k = randn_bf16(nk, rng), v = randn_bf16(nk, rng), dout = randn_bf16(nq, rng);
    auto q_d = dev_bf16(q), k_d = dev_bf16(k), v_d = dev_bf16(v), do_d = dev_bf16(dout);
    auto out_d = dev_poison_bf16(nq);
    auto lse_d = dev_poison_f32(size_t(B * nh * S));
    cuda::attention_forward(ctx, out_d.get(), lse_d.get(), q_d.get(), k_d.get(), v_d.get(), nullptr, B, S, nh, nkv, hd);
    auto dk_d = dev_bf16(std::vector<float>(nk, 0.0f));
    cuda::attention_backward(ctx, nullptr, dk_d.get(), nullptr, do_d.get(), out_d.get(), lse_d.get(), q_d.get(),
                             k_d.get(), v_d.get(), nullptr, B, S, nh, nkv, hd);
    const auto out = host_f32(out_d), lse = host_f32(lse_d);
    std::vector<float> dk(nk, 0.0f);
    cpu::attention_backward((float*)nullptr, dk.data(), (float*)nullptr, dout.data(), out.data(), lse.data(), q.data(),
                            k.data(), v.data(), nullptr, B, S, nh, nkv, hd);
    expect_close("attention_backward dk only hd" + std::to_string(hd), host_f32(dk_d), dk, kBf16Rtol,
                 hd == 128 ? kAtolBf16Intermediate : kAtolReduction);
  }
}

}  // namespace
}  // namespace qt::testing
