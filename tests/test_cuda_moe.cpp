// Op-parity harness, part 3: the MoE routing ops on the GPU against cpu::moe_* (float on the same
// bf16 inputs): router forward (probs, exact top-k indices, weights) and backward, the stable
// sort (bitwise equal perm and offsets), gather / combine and their backward. Shapes include
// E = 1, odd E, k = 1 and k = E, and Qwen3-MoE's E = 128, k = 8. Tolerances: cuda_parity.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "cuda_parity.h"
#include "ops/cpu/ops.h"

namespace qt::testing {
namespace {

struct Case { int64_t N, E, k, H; bool norm; };
const Case kCases[] = {{1, 1, 1, 3, false}, {5, 3, 3, 17, true}, {17, 7, 2, 64, false},
                       {33, 60, 4, 127, true}, {300, 128, 8, 256, true}, {129, 256, 8, 96, false}};

TEST(CudaMoe, RouterMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(21);
  for (const Case& c : kCases) {
    const std::string shape = "[N" + std::to_string(c.N) + " E" + std::to_string(c.E) + " k" + std::to_string(c.k) +
                              (c.norm ? " norm]" : "]");
    auto logits = randn_bf16(size_t(c.N * c.E), rng, 2.0f);
    auto dw = randn_f32(size_t(c.N * c.k), rng), dl0 = randn_bf16(size_t(c.N * c.E), rng, 0.1f);
    std::vector<int32_t> idx(size_t(c.N * c.k));
    std::vector<float> w(idx.size()), probs(size_t(c.N * c.E)), dl = dl0;
    cpu::moe_router_forward(idx.data(), w.data(), probs.data(), logits.data(), c.N, c.E, c.k, c.norm);
    cpu::moe_router_backward(dl.data(), dw.data(), probs.data(), idx.data(), c.N, c.E, c.k, c.norm);

    auto l_d = dev_bf16(logits), dl_d = dev_bf16(dl0);
    auto dw_d = cuda::to_device(dw);
    Buffer<int32_t> idx_d(idx.size());
    auto w_d = dev_poison_f32(w.size()), p_d = dev_poison_f32(probs.size());
    cuda::moe_router_forward(ctx, idx_d.get(), w_d.get(), p_d.get(), l_d.get(), c.N, c.E, c.k, c.norm);
    cuda::moe_router_backward(ctx, dl_d.get(), dw_d.get(), p_d.get(), idx_d.get(), c.N, c.E, c.k, c.norm);
    ctx.synchronize();
    EXPECT_EQ(idx_d.download(), idx) << "top-k indices " << shape;
    expect_close("moe_router_forward probs " + shape, host_f32(p_d), probs, 0, 1e-6);
    expect_close("moe_router_forward topk_w " + shape, host_f32(w_d), w, 0, 1e-6);
    expect_close("moe_router_backward dlogits " + shape, host_f32(dl_d), dl, kBf16Rtol, kAtolReduction);
  }
}

TEST(CudaMoe, SortGatherCombineMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(22);
  for (const Case& c : kCases) {
    const std::string shape = "[N" + std::to_string(c.N) + " E" + std::to_string(c.E) + " k" + std::to_string(c.k) +
                              " H" + std::to_string(c.H) + "]";
    const int64_t Nk = c.N * c.k;
    // Distinct experts per token (as a top-k gives), skewed so some experts get none.
    std::vector<int32_t> idx(static_cast<size_t>(Nk));
    for (int64_t n = 0; n < c.N; ++n) {
      std::vector<int32_t> all(size_t(c.E));
      for (int64_t e = 0; e < c.E; ++e) all[size_t(e)] = int32_t(e);
      std::shuffle(all.begin(), all.begin() + std::min<int64_t>(c.E, c.k + 2), rng);
      for (int64_t j = 0; j < c.k; ++j) idx[size_t(n * c.k + j)] = all[size_t(j)];
    }
    std::vector<int32_t> perm(static_cast<size_t>(Nk));
    std::vector<int64_t> offsets(size_t(c.E + 1));
    cpu::moe_sort(perm.data(), offsets.data(), idx.data(), c.N, c.k, c.E);
    auto idx_d = cuda::to_device(idx);
    Buffer<int32_t> perm_d(perm.size());
    Buffer<int64_t> off_d(offsets.size());
    cuda::moe_sort(ctx, perm_d.get(), off_d.get(), idx_d.get(), c.N, c.k, c.E);
    ctx.synchronize();
    EXPECT_EQ(perm_d.download(), perm) << "perm " << shape;
    EXPECT_EQ(off_d.download(), offsets) << "offsets " << shape;

    auto x = randn_bf16(size_t(c.N * c.H), rng), ys = randn_bf16(size_t(Nk * c.H), rng),
         dout = randn_bf16(size_t(c.N * c.H), rng), out0 = randn_bf16(size_t(c.N * c.H), rng),
         dx0 = randn_bf16(size_t(c.N * c.H), rng), dys0 = randn_bf16(size_t(Nk * c.H), rng);
    auto w = randn_f32(size_t(Nk), rng), dw0 = randn_f32(size_t(Nk), rng);
    std::vector<float> xs(size_t(Nk * c.H)), out = out0, dx = dx0, dys = dys0, dw = dw0;
    cpu::moe_gather(xs.data(), x.data(), perm.data(), Nk, c.k, c.H);
    cpu::moe_gather_backward(dx.data(), ys.data(), perm.data(), Nk, c.k, c.H);
    cpu::moe_combine(out.data(), ys.data(), w.data(), perm.data(), Nk, c.k, c.H);
    cpu::moe_combine_backward(dys.data(), dw.data(), dout.data(), ys.data(), w.data(), perm.data(), Nk, c.k, c.H);

    auto x_d = dev_bf16(x), ys_d = dev_bf16(ys), dout_d = dev_bf16(dout), out_d = dev_bf16(out0),
         dx_d = dev_bf16(dx0), dys_d = dev_bf16(dys0);
    auto w_d = cuda::to_device(w), dw_d = cuda::to_device(dw0);
    auto xs_d = dev_poison_bf16(xs.size());
    cuda::moe_gather(ctx, xs_d.get(), x_d.get(), perm_d.get(), Nk, c.k, c.H);
    cuda::moe_gather_backward(ctx, dx_d.get(), ys_d.get(), perm_d.get(), Nk, c.k, c.H);
    cuda::moe_combine(ctx, out_d.get(), ys_d.get(), w_d.get(), perm_d.get(), Nk, c.k, c.H);
    cuda::moe_combine_backward(ctx, dys_d.get(), dw_d.get(), dout_d.get(), ys_d.get(), w_d.get(), perm_d.get(), Nk,
                               c.k, c.H);
    expect_close("moe_gather " + shape, host_f32(xs_d), xs, 0, 0);  // a copy: exact
    expect_close("moe_gather_backward " + shape, host_f32(dx_d), dx, kBf16Rtol, kAtolElementwise);
    expect_close("moe_combine " + shape, host_f32(out_d), out, kBf16Rtol, kAtolElementwise);
    expect_close("moe_combine_backward dys " + shape, host_f32(dys_d), dys, kBf16Rtol, kAtolElementwise);
    expect_close("moe_combine_backward dtopk_w (fp32) " + shape, host_f32(dw_d), dw, 0, 1e-5);
  }
}

}  // namespace
}  // namespace qt::testing
