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

// The load-balancing loss's pieces: route statistics accumulated over two "layers" (probs column
// sums, counts from moe_sort's offsets), the loss and f from them, and the router backward with the
// aux term, against cpu::moe_route_stats / cpu::moe_aux_router_backward and the loss formula.
TEST(CudaMoe, LoadBalancingLossMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(23);
  for (const Case& c : kCases) {
    const std::string shape = "[N" + std::to_string(c.N) + " E" + std::to_string(c.E) + " k" + std::to_string(c.k) + "]";
    std::vector<double> psum(size_t(c.E), 0.0), counts(size_t(c.E), 0.0);
    Buffer<float> psum_d(size_t(c.E)), f_d(size_t(c.E));
    Buffer<int64_t> counts_d(size_t(c.E)), layer_d(size_t(c.E));
    psum_d.fill_bytes(0), counts_d.fill_bytes(0), layer_d.fill_bytes(0);
    std::vector<std::vector<float>> probs_l;
    std::vector<std::vector<int32_t>> idx_l;
    std::vector<Buffer<float>> probs_dl;
    for (int layer = 0; layer < 2; ++layer) {
      auto logits = randn_bf16(size_t(c.N * c.E), rng, 2.0f);
      std::vector<int32_t> idx(size_t(c.N * c.k));
      std::vector<float> w(idx.size()), probs(size_t(c.N * c.E));
      cpu::moe_router_forward(idx.data(), w.data(), probs.data(), logits.data(), c.N, c.E, c.k, c.norm);
      cpu::moe_route_stats(psum.data(), counts.data(), probs.data(), idx.data(), c.N, c.E, c.k);
      auto l_d = dev_bf16(logits);
      Buffer<int32_t> idx_d(idx.size()), perm_d(idx.size());
      Buffer<int64_t> off_d(size_t(c.E + 1));
      Buffer<float> w_d(w.size()), p_d(probs.size());
      cuda::moe_router_forward(ctx, idx_d.get(), w_d.get(), p_d.get(), l_d.get(), c.N, c.E, c.k, c.norm);
      cuda::moe_sort(ctx, perm_d.get(), off_d.get(), idx_d.get(), c.N, c.k, c.E);
      cuda::moe_route_stats(ctx, psum_d.get(), counts_d.get(), layer == 1 ? layer_d.get() : nullptr, p_d.get(),
                            off_d.get(), c.N, c.E);
      ctx.synchronize();
      ASSERT_EQ(idx_d.download(), idx) << shape;  // same routing: the statistics must then agree
      probs_l.push_back(probs), idx_l.push_back(idx), probs_dl.push_back(std::move(p_d));
    }
    // Layer 1's own counts.
    std::vector<double> p1(size_t(c.E), 0.0), c1(size_t(c.E), 0.0);
    cpu::moe_route_stats(p1.data(), c1.data(), probs_l[1].data(), idx_l[1].data(), c.N, c.E, c.k);
    const std::vector<int64_t> got_counts = counts_d.download(), got_layer = layer_d.download();
    const std::vector<float> got_psum = psum_d.download();
    for (int64_t e = 0; e < c.E; ++e) {
      EXPECT_EQ(got_counts[size_t(e)], int64_t(counts[size_t(e)])) << shape << " expert " << e;
      EXPECT_EQ(got_layer[size_t(e)], int64_t(c1[size_t(e)])) << shape << " expert " << e;
      EXPECT_NEAR(got_psum[size_t(e)], psum[size_t(e)], 1e-5 * double(c.N)) << shape << " expert " << e;
    }
    // The loss and f over R = 2N rows, added to a total with a factor.
    const int64_t R = 2 * c.N;
    std::vector<double> f(size_t(c.E));
    double aux = 0;
    for (int64_t e = 0; e < c.E; ++e) f[size_t(e)] = counts[size_t(e)] / double(R), aux += f[size_t(e)] * psum[size_t(e)] / double(R);
    aux *= double(c.E);
    Buffer<double> aux_d(1), total_d(1);
    total_d.upload(std::vector<double>{0.25});
    cuda::moe_aux_loss(ctx, aux_d.get(), f_d.get(), total_d.get(), 3.0, psum_d.get(), counts_d.get(), c.E, R);
    ctx.synchronize();
    EXPECT_NEAR(aux_d.download()[0], aux, 1e-6 * aux) << shape;
    EXPECT_NEAR(total_d.download()[0], 0.25 + 3.0 * aux, 1e-6 * (0.25 + 3 * aux)) << shape;
    const std::vector<float> got_f = f_d.download();
    for (int64_t e = 0; e < c.E; ++e) EXPECT_FLOAT_EQ(got_f[size_t(e)], float(f[size_t(e)])) << shape;
    // The router backward of layer 0 with the aux term (and the top-k term).
    auto dw = randn_f32(size_t(c.N * c.k), rng), dl0 = randn_bf16(size_t(c.N * c.E), rng, 0.1f);
    std::vector<float> dl = dl0;
    const double scale = 0.7 * double(c.E) / double(R);
    cpu::moe_router_backward(dl.data(), dw.data(), probs_l[0].data(), idx_l[0].data(), c.N, c.E, c.k, c.norm);
    cpu::moe_aux_router_backward(dl.data(), probs_l[0].data(), f.data(), scale, c.N, c.E);
    auto dl_d = dev_bf16(dl0);
    auto dw_d = cuda::to_device(dw);
    Buffer<int32_t> idx0_d = cuda::to_device(idx_l[0]);
    cuda::moe_router_backward(ctx, dl_d.get(), dw_d.get(), probs_dl[0].get(), idx0_d.get(), c.N, c.E, c.k, c.norm,
                              f_d.get(), float(scale));
    ctx.synchronize();
    expect_close("moe_router_backward + aux dlogits " + shape, host_f32(dl_d), dl, kBf16Rtol, kAtolReduction);
    // The aux term alone (zero upstream, a scale that makes its values O(1)). With k = E every expert
    // gets every token, f is uniform and the term is zero analytically (only rounding noise remains).
    if (c.k == c.E) continue;
    const double big = 10.0 * double(c.E) * double(c.E);
    std::vector<float> zeros_w(dw.size(), 0.f), only(size_t(c.N * c.E), 0.f);
    cpu::moe_aux_router_backward(only.data(), probs_l[0].data(), f.data(), big, c.N, c.E);
    auto only_d = dev_bf16(std::vector<float>(only.size(), 0.f));
    auto zw_d = cuda::to_device(zeros_w);
    cuda::moe_router_backward(ctx, only_d.get(), zw_d.get(), probs_dl[0].get(), idx0_d.get(), c.N, c.E, c.k, c.norm,
                              f_d.get(), float(big));
    ctx.synchronize();
    expect_close("moe_router_backward aux term " + shape, host_f32(only_d), only, kBf16Rtol, kAtolReduction);
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
    // In place (the MoE backward writes dys over ys): overwriting, the same gradients as accumulating
    // into zeros, and dtopk_w from ys as it was.
    std::vector<float> dys_z(dys.size(), 0.f), dw_z(dw0);
    cpu::moe_combine_backward(dys_z.data(), dw_z.data(), dout.data(), ys.data(), w.data(), perm.data(), Nk, c.k, c.H);
    auto inplace_d = dev_bf16(ys);
    auto dw2_d = cuda::to_device(dw0);
    cuda::moe_combine_backward(ctx, inplace_d.get(), dw2_d.get(), dout_d.get(), inplace_d.get(), w_d.get(), perm_d.get(),
                               Nk, c.k, c.H, /*accumulate=*/false);
    expect_close("moe_combine_backward in place dys " + shape, host_f32(inplace_d), dys_z, kBf16Rtol, kAtolElementwise);
    expect_close("moe_combine_backward in place dtopk_w " + shape, host_f32(dw2_d), dw_z, 0, 1e-5);
  }
}

}  // namespace
}  // namespace qt::testing
