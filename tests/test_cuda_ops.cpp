// Op-parity harness, part 1: every dense CUDA op of ops/cuda/ops.h against the CPU reference of
// ops/cpu/ops.h (run in float on the same bf16-rounded inputs), forward and backward, over many
// shapes including odd ones (1, 3, 17, 127, non-multiples of warps and tiles). Tolerances are
// explained in cuda_parity.h. Skipped (never faked) when no CUDA device is present.
// QT_CUDA_PARITY_QUICK=1 keeps only the small shapes (for compute-sanitizer runs).
#include <gtest/gtest.h>

#include <cstdlib>
#include <limits>
#include <random>

#include "cuda_parity.h"
#include "model/lora.h"
#include "ops/cpu/ops.h"
#include "train/optimizer.h"

namespace qt::testing {
namespace {

bool quick() {
  const char* q = std::getenv("QT_CUDA_PARITY_QUICK");
  return q && std::string(q) == "1";
}

std::string tag(const char* op, std::initializer_list<int64_t> dims) {
  std::string s = op;
  s += " [";
  for (int64_t d : dims) s += std::to_string(d) + ",";
  s.back() = ']';
  return s;
}

// (R, D) row shapes for the norms and elementwise ops.
std::vector<std::pair<int64_t, int64_t>> row_shapes() {
  std::vector<std::pair<int64_t, int64_t>> s = {{1, 1}, {3, 17}, {7, 128}, {17, 3}, {33, 127}};
  if (!quick()) s.insert(s.end(), {{127, 1000}, {64, 4096}, {513, 96}});
  return s;
}

TEST(CudaOps, Elementwise) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(1);
  for (auto [R, D] : row_shapes()) {
    const size_t n = size_t(R * D);
    auto g = randn_bf16(n, rng, 3.0f), u = randn_bf16(n, rng), dh = randn_bf16(n, rng), dg0 = randn_bf16(n, rng),
         du0 = randn_bf16(n, rng), y0 = randn_bf16(n, rng);
    auto dg_d = dev_bf16(g), du_d = dev_bf16(u), dh_d = dev_bf16(dh);
    auto h_d = dev_poison_bf16(n), dgo = dev_bf16(dg0), duo = dev_bf16(du0), y_d = dev_bf16(y0);
    cuda::swiglu_forward(ctx, h_d.get(), dg_d.get(), du_d.get(), int64_t(n));
    cuda::swiglu_backward(ctx, dgo.get(), duo.get(), dh_d.get(), dg_d.get(), du_d.get(), int64_t(n));
    cuda::add_inplace(ctx, y_d.get(), du_d.get(), int64_t(n));
    // in place: g, u overwritten by dg, du (equal to the accumulating kernel onto zeros, bit for bit)
    auto gi_d = dev_bf16(g), ui_d = dev_bf16(u), dgz = dev_bf16(std::vector<float>(n, 0.f)),
         duz = dev_bf16(std::vector<float>(n, 0.f));
    cuda::swiglu_backward(ctx, dgz.get(), duz.get(), dh_d.get(), dg_d.get(), du_d.get(), int64_t(n));
    cuda::swiglu_backward_inplace(ctx, gi_d.get(), ui_d.get(), dh_d.get(), int64_t(n));
    std::vector<float> h(n), dg = dg0, du = du0, y = y0;
    cpu::swiglu_forward(h.data(), g.data(), u.data(), int64_t(n));
    cpu::swiglu_backward(dg.data(), du.data(), dh.data(), g.data(), u.data(), int64_t(n));
    cpu::add_inplace(y.data(), u.data(), int64_t(n));
    expect_close(tag("swiglu_forward", {int64_t(n)}), host_f32(h_d), h, kBf16Rtol, kAtolElementwise);
    expect_close(tag("swiglu_backward dg", {int64_t(n)}), host_f32(dgo), dg, kBf16Rtol, kAtolElementwise);
    expect_close(tag("swiglu_backward du", {int64_t(n)}), host_f32(duo), du, kBf16Rtol, kAtolElementwise);
    expect_close(tag("add_inplace", {int64_t(n)}), host_f32(y_d), y, kBf16Rtol, kAtolElementwise);
    std::vector<float> dgr(n, 0.f), dur(n, 0.f);
    cpu::swiglu_backward(dgr.data(), dur.data(), dh.data(), g.data(), u.data(), int64_t(n));
    expect_close(tag("swiglu_backward_inplace dg", {int64_t(n)}), host_f32(gi_d), dgr, kBf16Rtol, kAtolElementwise);
    expect_close(tag("swiglu_backward_inplace du", {int64_t(n)}), host_f32(ui_d), dur, kBf16Rtol, kAtolElementwise);
    EXPECT_EQ(host_f32(gi_d), host_f32(dgz)) << "in place dg differs from the accumulating kernel onto zeros";
    EXPECT_EQ(host_f32(ui_d), host_f32(duz)) << "in place du differs from the accumulating kernel onto zeros";
  }
}

// LoRA dropout: the mask is the CPU's counter hash bit for bit (the same zeros), the kept values
// x / (1 - p) rounded once to bf16; the backward adds the masked gradient.
TEST(CudaOps, DropoutMatchesCpuMask) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(12);
  for (auto [R, D] : row_shapes()) {
    for (double p : {0.1, 0.5}) {
      const size_t n = size_t(R * D);
      const uint64_t key = cpu::dropout_key(3, 7, 1, 2, 4);
      auto x = randn_bf16(n, rng), d0 = randn_bf16(n, rng);
      auto x_d = dev_bf16(x), y_d = dev_poison_bf16(n), dx_d = dev_bf16(d0);
      cuda::dropout_forward(ctx, y_d.get(), x_d.get(), R, D, p, key);
      cuda::dropout_backward(ctx, dx_d.get(), x_d.get(), R, D, p, key);
      std::vector<float> y(n), dx = d0;
      cpu::dropout_apply(y.data(), x.data(), R, D, p, key, nullptr);
      for (size_t i = 0; i < n; ++i) dx[i] += y[i];
      const auto got = host_f32(y_d);
      size_t zeros = 0;
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(got[i] == 0.f, y[i] == 0.f || x[i] == 0.f) << "mask differs at " << i << " p " << p;
        zeros += y[i] == 0.f;
      }
      if (n >= 1000) {
        EXPECT_NEAR(double(zeros) / double(n), p, 0.05) << "drop rate";
      }
      expect_close(tag("dropout_forward", {R, D}), got, y, kBf16Rtol, kAtolElementwise);
      expect_close(tag("dropout_backward", {R, D}), host_f32(dx_d), dx, kBf16Rtol, kAtolElementwise);
    }
  }
}

TEST(CudaOps, Embedding) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(2);
  for (auto [N, H] : row_shapes()) {
    const int64_t V = 37;
    auto table = randn_bf16(size_t(V * H), rng);
    std::vector<int32_t> ids(static_cast<size_t>(N));
    for (auto& id : ids) id = int32_t(rng() % V);
    auto t_d = dev_bf16(table);
    auto ids_d = cuda::to_device(ids);
    auto out_d = dev_poison_bf16(size_t(N * H));
    cuda::embedding_forward(ctx, out_d.get(), ids_d.get(), t_d.get(), N, V, H);
    std::vector<float> out(size_t(N * H));
    cpu::embedding_forward(out.data(), ids.data(), table.data(), N, H);
    expect_close(tag("embedding_forward", {N, H}), host_f32(out_d), out, 0, 0);  // a copy: exact
  }
}

TEST(CudaOps, RmsNormAndResidual) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(3);
  const double eps = 1e-6;
  for (auto [R, D] : row_shapes()) {
    const size_t n = size_t(R * D);
    auto x = randn_bf16(n, rng, 2.0f), res = randn_bf16(n, rng), w = randn_bf16(size_t(D), rng),
         dy = randn_bf16(n, rng), dx0 = randn_bf16(n, rng);
    auto x_d = dev_bf16(x), r_d = dev_bf16(res), w_d = dev_bf16(w), dy_d = dev_bf16(dy), dx_d = dev_bf16(dx0);
    auto y_d = dev_poison_bf16(n), h_d = dev_poison_bf16(n), y2_d = dev_poison_bf16(n);
    auto rstd_d = dev_poison_f32(static_cast<size_t>(R)), rstd2_d = dev_poison_f32(static_cast<size_t>(R));
    Buffer<float> dw_d(static_cast<size_t>(D));
    dw_d.upload(std::vector<float>(size_t(D), 0.5f));
    cuda::rmsnorm_forward(ctx, y_d.get(), rstd_d.get(), x_d.get(), w_d.get(), R, D, eps);
    cuda::rmsnorm_backward(ctx, dx_d.get(), dw_d.get(), dy_d.get(), x_d.get(), w_d.get(), rstd_d.get(), R, D);
    cuda::add_rmsnorm_forward(ctx, h_d.get(), y2_d.get(), rstd2_d.get(), x_d.get(), r_d.get(), w_d.get(), R, D, eps);

    std::vector<float> y(n), rstd(static_cast<size_t>(R)), dx = dx0, dw(size_t(D), 0.5f);
    cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), R, D, eps);
    cpu::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), R, D);
    // The fused residual: h = bf16(x + r) (the stored residual stream), then the norm of h.
    std::vector<float> h(n), y2(n), rstd2(static_cast<size_t>(R));
    for (size_t i = 0; i < n; ++i) h[i] = round_bf16(x[i] + res[i]);
    cpu::rmsnorm_forward(y2.data(), rstd2.data(), h.data(), w.data(), R, D, eps);

    expect_close(tag("rmsnorm_forward y", {R, D}), host_f32(y_d), y, kBf16Rtol, kAtolReduction);
    expect_close(tag("rmsnorm_forward rstd", {R, D}), host_f32(rstd_d), rstd, 0, 1e-5);
    expect_close(tag("rmsnorm_backward dx", {R, D}), host_f32(dx_d), dx, kBf16Rtol, kAtolReduction);
    expect_close(tag("rmsnorm_backward dw (fp32)", {R, D}), host_f32(dw_d), dw, 0, 1e-5);
    expect_close(tag("add_rmsnorm_forward h", {R, D}), host_f32(h_d), h, 0, 0);
    expect_close(tag("add_rmsnorm_forward y", {R, D}), host_f32(y2_d), y2, kBf16Rtol, kAtolReduction);
  }
}

TEST(CudaOps, QkNormRope) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(4);
  const double eps = 1e-6, theta = 1e6;
  struct Case { int64_t N, heads, hd; };
  std::vector<Case> cases = {{1, 1, 2}, {3, 2, 6}, {17, 3, 64}, {5, 4, 128}};
  if (!quick()) cases.insert(cases.end(), {{127, 7, 128}, {300, 2, 256}, {33, 16, 80}});
  for (const Case& c : cases) {
    const size_t n = size_t(c.N * c.heads * c.hd);
    std::vector<int32_t> pos(size_t(c.N));
    for (auto& p : pos) p = int32_t(rng() % 5000);
    auto x = randn_bf16(n, rng, 2.0f), w = randn_bf16(size_t(c.hd), rng), dy = randn_bf16(n, rng),
         dx0 = randn_bf16(n, rng);
    std::vector<float> cos(size_t(c.N * c.hd)), sin(cos.size());
    cpu::rope_table(cos.data(), sin.data(), pos.data(), c.N, c.hd, theta);
    auto pos_d = cuda::to_device(pos);
    auto cos_d = dev_poison_f32(cos.size()), sin_d = dev_poison_f32(sin.size());
    cuda::rope_table(ctx, cos_d.get(), sin_d.get(), pos_d.get(), c.N, c.hd, theta);
    // cos/sin of angles up to 5000 rad in fp32 on both sides: a few fp32 ulps of 1.
    expect_close(tag("rope_table cos", {c.N, c.hd}), host_f32(cos_d), cos, 0, 1e-6);
    expect_close(tag("rope_table sin", {c.N, c.hd}), host_f32(sin_d), sin, 0, 1e-6);
    auto x_d = dev_bf16(x), w_d = dev_bf16(w), dy_d = dev_bf16(dy);
    for (bool with_norm : {true, false}) {
      auto y_d = dev_poison_bf16(n), dx_d = dev_bf16(dx0);
      auto rstd_d = dev_poison_f32(size_t(c.N * c.heads));
      const bf16* wp = with_norm ? w_d.get() : nullptr;
      cuda::qk_norm_rope_forward(ctx, y_d.get(), rstd_d.get(), x_d.get(), wp, cos_d.get(), sin_d.get(), c.N, c.heads,
                                 c.hd, eps);
      cuda::qk_norm_rope_backward(ctx, dx_d.get(), dy_d.get(), x_d.get(), wp, rstd_d.get(), cos_d.get(), sin_d.get(),
                                  c.N, c.heads, c.hd);
      // CPU: rmsnorm per head (float, unrounded), then RoPE; backward in reverse.
      std::vector<float> y = x, rstd(size_t(c.N * c.heads)), dz = dy, dx = dx0;
      if (with_norm) cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), c.N * c.heads, c.hd, eps);
      cpu::rope_forward(y.data(), cos.data(), sin.data(), c.N, c.heads, c.hd);
      cpu::rope_backward(dz.data(), cos.data(), sin.data(), c.N, c.heads, c.hd);
      if (with_norm) {
        cpu::rmsnorm_backward(dx.data(), (float*)nullptr, dz.data(), x.data(), w.data(), rstd.data(), c.N * c.heads,
                              c.hd);
      } else {
        cpu::add_inplace(dx.data(), dz.data(), int64_t(n));
      }
      const std::string name = with_norm ? "qk_norm_rope" : "rope";
      expect_close(tag((name + "_forward").c_str(), {c.N, c.heads, c.hd}), host_f32(y_d), y, kBf16Rtol,
                   kAtolReduction);
      expect_close(tag((name + "_backward").c_str(), {c.N, c.heads, c.hd}), host_f32(dx_d), dx, kBf16Rtol,
                   kAtolReduction);
    }
  }
}

struct MatShape { int64_t N, in, out, r; };
std::vector<MatShape> mat_shapes() {
  std::vector<MatShape> s = {{1, 1, 1, 1}, {3, 17, 5, 2}, {17, 64, 127, 8}, {33, 128, 96, 16}};
  if (!quick()) s.insert(s.end(), {{127, 1000, 300, 16}, {512, 1024, 2048, 64}, {1, 4096, 1024, 8}});
  return s;
}

TEST(CudaOps, Gemm) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(5);
  for (const MatShape& s : mat_shapes()) {
    const int64_t M = s.N, N = s.out, K = s.in;
    for (int mode = 0; mode < 4; ++mode) {
      const bool ta = mode & 1, tb = mode & 2;
      auto A = randn_bf16(size_t(M * K), rng), B = randn_bf16(size_t(K * N), rng), C0 = randn_bf16(size_t(M * N), rng);
      auto A_d = dev_bf16(A), B_d = dev_bf16(B), C_d = dev_bf16(C0);
      Buffer<float> C32_d(size_t(M * N));
      C32_d.upload(C0);
      cuda::gemm(ctx, ta, tb, M, N, K, 0.75f, A_d.get(), B_d.get(), 1.0f, C_d.get());
      cuda::gemm(ctx, ta, tb, M, N, K, 0.75f, A_d.get(), B_d.get(), -0.5f, C32_d.get());
      std::vector<float> C = C0, C32 = C0;
      cpu::gemm<float>(ta, tb, M, N, K, 0.75f, A.data(), B.data(), 1.0f, C.data());
      cpu::gemm<float>(ta, tb, M, N, K, 0.75f, A.data(), B.data(), -0.5f, C32.data());
      const std::string t = std::string(ta ? "T" : "N") + (tb ? "T" : "N");
      expect_close(tag(("gemm bf16 " + t).c_str(), {M, N, K}), host_f32(C_d), C, kBf16Rtol, kAtolReduction);
      expect_close(tag(("gemm fp32 " + t).c_str(), {M, N, K}), host_f32(C32_d), C32, 0, 1e-5);
    }
  }
}

TEST(CudaOps, LinearAndLora) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(6);
  for (const MatShape& s : mat_shapes()) {
    const auto [N, in, out, r] = s;
    const float scale = 2.0f;
    auto x = randn_bf16(size_t(N * in), rng), W = randn_bf16(size_t(out * in), rng, 0.05f),
         b = randn_bf16(size_t(out), rng), dy = randn_bf16(size_t(N * out), rng), dx0 = randn_bf16(size_t(N * in), rng);
    auto A = randn_f32(size_t(r * in), rng, 0.05f), Bm = randn_f32(size_t(out * r), rng, 0.05f);
    auto dA0 = randn_f32(A.size(), rng), dB0 = randn_f32(Bm.size(), rng);
    auto x_d = dev_bf16(x), W_d = dev_bf16(W), b_d = dev_bf16(b), dy_d = dev_bf16(dy), dx_d = dev_bf16(dx0);
    auto A_d = cuda::to_device(A), B_d = cuda::to_device(Bm), dA_d = cuda::to_device(dA0), dB_d = cuda::to_device(dB0);
    auto y_d = dev_poison_bf16(size_t(N * out)), xa_d = dev_poison_bf16(size_t(N * r));
    cuda::linear_forward(ctx, y_d.get(), x_d.get(), W_d.get(), b_d.get(), N, in, out);
    auto ylin = host_f32(y_d);
    cuda::lora_forward(ctx, y_d.get(), xa_d.get(), x_d.get(), A_d.get(), B_d.get(), scale, N, in, out, r);
    cuda::linear_backward(ctx, dx_d.get(), dy_d.get(), W_d.get(), N, in, out);
    cuda::lora_backward(ctx, dx_d.get(), dA_d.get(), dB_d.get(), dy_d.get(), x_d.get(), xa_d.get(), A_d.get(),
                        B_d.get(), scale, N, in, out, r);

    // The CPU reference runs the documented contract: GEMMs on bf16 copies of A and B.
    std::vector<float> A16 = A, B16 = Bm;
    for (auto& v : A16) v = round_bf16(v);
    for (auto& v : B16) v = round_bf16(v);
    std::vector<float> y(size_t(N * out)), xa(size_t(N * r)), dx = dx0, dA = dA0, dB = dB0;
    cpu::linear_forward(y.data(), x.data(), W.data(), b.data(), N, in, out);
    expect_close(tag("linear_forward", {N, in, out}), ylin, y, kBf16Rtol, kAtolReduction);
    for (auto& v : y) v = round_bf16(v);  // the GPU's y holds the rounded base output
    cpu::lora_forward(y.data(), xa.data(), x.data(), A16.data(), B16.data(), scale, N, in, out, r);
    cpu::linear_backward(dx.data(), (float*)nullptr, (float*)nullptr, dy.data(), x.data(), W.data(), N, in, out);
    cpu::lora_backward(dx.data(), dA.data(), dB.data(), dy.data(), x.data(), xa.data(), A16.data(), B16.data(), scale,
                       N, in, out, r);
    expect_close(tag("lora_forward xa", {N, in, r}), host_f32(xa_d), xa, kBf16Rtol, kAtolReduction);
    expect_close(tag("linear+lora_forward y", {N, in, out, r}), host_f32(y_d), y, kBf16Rtol, kAtolBf16Intermediate);
    expect_close(tag("linear+lora_backward dx", {N, in, out, r}), host_f32(dx_d), dx, kBf16Rtol,
                 kAtolBf16Intermediate);
    expect_close(tag("lora_backward dA (fp32)", {N, in, out, r}), host_f32(dA_d), dA, 0, kAtolBf16Intermediate);
    expect_close(tag("lora_backward dB (fp32)", {N, in, out, r}), host_f32(dB_d), dB, 0, kAtolBf16Intermediate);
  }
}

// The rank-r update of LoRA's activations (Y = bf16(Y + alpha P Q)), both layouts of Q: the fused
// kernel and the cuBLASLt composition against the CPU GEMM, many ranks (odd ones, more than one
// 16-wide chunk) and widths (odd, below and above a block's 256 columns, rows past a 32-row block).
// Also linear_backward without accumulation: dx = dy W over a poisoned dx.
TEST(CudaOps, RankUpdateAndOverwritingLinearBackward) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(61);
  struct Case { int64_t N, M, r; };
  std::vector<Case> cases = {{1, 1, 1}, {3, 5, 3}, {33, 257, 16}, {70, 600, 17}, {64, 896, 8}};
  if (!quick()) cases.insert(cases.end(), {{513, 4864, 16}, {1000, 130, 64}, {257, 513, 40}});
  for (const Case& c : cases)
    for (bool q_rows_m : {true, false}) {
      auto P = randn_bf16(size_t(c.N * c.r), rng), Q = randn_bf16(size_t(c.M * c.r), rng, 0.1f),
           Y0 = randn_bf16(size_t(c.N * c.M), rng);
      auto P_d = dev_bf16(P), Q_d = dev_bf16(Q), Yf_d = dev_bf16(Y0), Yg_d = dev_bf16(Y0);
      cuda::rank_update_fused(ctx, Yf_d.get(), P_d.get(), Q_d.get(), q_rows_m, c.N, c.M, c.r, 1.5f);
      cuda::rank_update_via_gemm(ctx, Yg_d.get(), P_d.get(), Q_d.get(), q_rows_m, c.N, c.M, c.r, 1.5f);
      std::vector<float> Y = Y0;
      cpu::gemm<float>(false, q_rows_m, c.N, c.M, c.r, 1.5f, P.data(), Q.data(), 1.0f, Y.data());
      const std::string t = q_rows_m ? "P Q^T" : "P Q";
      expect_close(tag(("rank_update fused " + t).c_str(), {c.N, c.M, c.r}), host_f32(Yf_d), Y, kBf16Rtol,
                   kAtolReduction);
      expect_close(tag(("rank_update via gemm " + t).c_str(), {c.N, c.M, c.r}), host_f32(Yg_d), Y, kBf16Rtol,
                   kAtolReduction);
    }
  for (const MatShape& s : mat_shapes()) {
    auto dy = randn_bf16(size_t(s.N * s.out), rng), W = randn_bf16(size_t(s.out * s.in), rng, 0.05f);
    auto dy_d = dev_bf16(dy), W_d = dev_bf16(W), dx_d = dev_poison_bf16(size_t(s.N * s.in));
    cuda::linear_backward(ctx, dx_d.get(), dy_d.get(), W_d.get(), s.N, s.in, s.out, /*accumulate=*/false);
    std::vector<float> dx(size_t(s.N * s.in), 0.f);
    cpu::gemm<float>(false, false, s.N, s.in, s.out, 1.0f, dy.data(), W.data(), 0.0f, dx.data());
    expect_close(tag("linear_backward overwrite", {s.N, s.in, s.out}), host_f32(dx_d), dx, kBf16Rtol, kAtolReduction);
  }
}

TEST(CudaOps, CrossEntropy) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(7);
  struct Case { int64_t B, S, V; };
  std::vector<Case> cases = {{1, 1, 1}, {1, 2, 3}, {2, 17, 127}, {3, 5, 1000}};
  if (!quick()) cases.insert(cases.end(), {{2, 64, 32000}, {1, 9, 151936}});
  for (const Case& c : cases) {
    const size_t n = size_t(c.B * c.S * c.V);
    auto logits = randn_bf16(n, rng, 3.0f), d0 = randn_bf16(n, rng, 1e-3f);
    std::vector<int32_t> labels(size_t(c.B * c.S));
    for (auto& y : labels) y = (rng() % 4 == 0) ? -100 : int32_t(rng() % c.V);
    auto l_d = dev_bf16(logits), d_d = dev_bf16(d0);
    auto lab_d = cuda::to_device(labels);
    Buffer<double> sum_d(1);
    Buffer<int64_t> count_d(1);
    cuda::cross_entropy_forward(ctx, sum_d.get(), count_d.get(), l_d.get(), lab_d.get(), c.B, c.S, c.V);
    const float scale = 0.37f;
    cuda::cross_entropy_backward(ctx, d_d.get(), l_d.get(), lab_d.get(), scale, c.B, c.S, c.V);
    int64_t count = -1;
    const double sum = cpu::cross_entropy_forward(logits.data(), labels.data(), c.B, c.S, c.V, &count);
    std::vector<float> d = d0;
    cpu::cross_entropy_backward(d.data(), logits.data(), labels.data(), scale, c.B, c.S, c.V);
    QT_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(count_d.download()[0], count) << c.B << "x" << c.S << "x" << c.V;
    const double got = sum_d.download()[0];
    std::printf("[parity] %-44s loss_sum rel_err=%.3e\n", tag("cross_entropy_forward", {c.B, c.S, c.V}).c_str(),
                std::fabs(got - sum) / std::max(1.0, std::fabs(sum)));
    EXPECT_NEAR(got, sum, 1e-5 * std::max(1.0, std::fabs(sum)) * std::log2(double(c.V) + 2));
    expect_close(tag("cross_entropy_backward", {c.B, c.S, c.V}), host_f32(d_d), d, kBf16Rtol, kAtolReduction);
  }
}

// The lm_head GEMM + loss fused chunk by chunk, against the unfused CPU composition with the same
// two bf16 roundings (the logits, and the logits gradient fed to the dh GEMM).
TEST(CudaOps, FusedLinearCrossEntropy) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(9);
  // buf_rows > 0: the chunks in a caller's (poisoned) buffer of buf_rows rows and a few elements more
  struct Case { int64_t B, S, H, V, chunk, buf_rows = 0; };
  std::vector<Case> cases = {{1, 1, 1, 1, 0},        {1, 2, 3, 5, 1},        {2, 17, 64, 1000, 7},
                             {3, 5, 17, 127, 0},     {2, 17, 64, 1000, 0, 5}, {1, 3, 8, 50, 0, 10}};
  if (!quick())
    cases.insert(cases.end(), {{2, 100, 256, 32000, 64}, {1, 300, 128, 151936, 0}, {1, 300, 128, 151936, 0, 130}});
  for (const Case& c : cases) {
    const int64_t N = c.B * c.S;
    auto h = randn_bf16(size_t(N * c.H), rng), W = randn_bf16(size_t(c.V * c.H), rng, 0.5f),
         dh0 = randn_bf16(size_t(N * c.H), rng, 0.01f);
    std::vector<int32_t> labels(static_cast<size_t>(N));
    for (auto& y : labels) y = (rng() % 5 == 0) ? -100 : int32_t(rng() % c.V);
    std::vector<float> logits(size_t(N * c.V)), G(logits.size(), 0.0f), dh = dh0;
    cpu::gemm<float>(false, true, N, c.V, c.H, 1.0f, h.data(), W.data(), 0.0f, logits.data());
    for (auto& v : logits) v = round_bf16(v);
    int64_t count = 0;
    const double sum = cpu::cross_entropy_forward(logits.data(), labels.data(), c.B, c.S, c.V, &count);
    const float scale = count ? 1.0f / float(count) : 0.0f;
    cpu::cross_entropy_backward(G.data(), logits.data(), labels.data(), scale, c.B, c.S, c.V);
    for (auto& v : G) v = round_bf16(v);
    cpu::gemm<float>(false, false, N, c.H, c.V, 1.0f, G.data(), W.data(), 1.0f, dh.data());

    auto h_d = dev_bf16(h), W_d = dev_bf16(W), dh_d = dev_bf16(dh0);
    auto lab_d = cuda::to_device(labels);
    Buffer<double> sum_d(1), sum2_d(1);
    Buffer<int64_t> count_d(1), count2_d(1);
    const int64_t buf_elems = c.buf_rows > 0 ? c.buf_rows * c.V + 3 : 0;
    auto buf = dev_poison_bf16(size_t(std::max<int64_t>(buf_elems, 1)));
    bf16* bp = buf_elems ? buf.get() : nullptr;
    cuda::fused_linear_cross_entropy(ctx, sum_d.get(), count_d.get(), dh_d.get(), h_d.get(), W_d.get(), lab_d.get(),
                                     scale, c.B, c.S, c.H, c.V, c.chunk, bp, buf_elems);
    // loss only (evaluation): no gradient pass, same loss
    cuda::fused_linear_cross_entropy(ctx, sum2_d.get(), count2_d.get(), nullptr, h_d.get(), W_d.get(), lab_d.get(),
                                     scale, c.B, c.S, c.H, c.V, c.chunk, bp, buf_elems);
    ctx.synchronize();
    const std::string name = tag("fused_linear_cross_entropy", {c.B, c.S, c.H, c.V, c.chunk, c.buf_rows});
    EXPECT_EQ(count_d.download()[0], count) << name;
    const double got = sum_d.download()[0];
    EXPECT_EQ(sum2_d.download()[0], got) << name;
    std::printf("[parity] %-44s loss_sum rel_err=%.3e\n", name.c_str(), std::fabs(got - sum) / std::max(1.0, std::fabs(sum)));
    EXPECT_NEAR(got, sum, 1e-4 * std::max(1.0, std::fabs(sum))) << name;
    expect_close(name + " dh", host_f32(dh_d), dh, kBf16Rtol, kAtolBf16Intermediate);
  }
}

TEST(CudaOps, AdamWBitwise) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(8);
  for (auto [r, in] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 17}, {16, 1000}}) {
    // One LoRA slot (A: r x in, B: in x r) through the CPU optimizer, the same tensors on the GPU.
    LoraAdapter params, grads;
    params.layers.resize(1);
    grads.layers.resize(1);
    const std::vector<float> A0 = randn_f32(size_t(r * in), rng), B0 = randn_f32(size_t(in * r), rng);
    params.layers[0].slot[0].A = Tensor::from_vector(A0, {r, in});
    params.layers[0].slot[0].B = Tensor::from_vector(B0, {in, r});
    AdamWConfig cfg;
    cfg.weight_decay = 0.1;
    AdamW opt(params, cfg);
    auto p_d = cuda::to_device(A0);
    Buffer<float> m_d(A0.size()), v_d(A0.size());
    m_d.fill_bytes(0);
    v_d.fill_bytes(0);
    for (int step = 1; step <= 3; ++step) {
      const double lr = 1e-3 * step;
      const std::vector<float> gA = randn_f32(A0.size(), rng, 0.1f), gB = randn_f32(B0.size(), rng, 0.1f);
      grads.layers[0].slot[0].A = Tensor::from_vector(gA, {r, in});
      grads.layers[0].slot[0].B = Tensor::from_vector(gB, {in, r});
      opt.step(params, grads, lr);
      auto g_d = cuda::to_device(gA);
      const double bc1 = 1.0 - std::pow(cfg.beta1, double(step)), bc2 = std::sqrt(1.0 - std::pow(cfg.beta2, double(step)));
      cuda::adamw_step(ctx, p_d.get(), g_d.get(), m_d.get(), v_d.get(), int64_t(A0.size()), 1.0 - lr * cfg.weight_decay,
                       cfg.beta1, cfg.beta2, lr / bc1, bc2, cfg.eps);
      const auto p = host_f32(p_d), m = host_f32(m_d), v = host_f32(v_d);
      const OptimizerState st = opt.state();
      const float* pc = params.layers[0].slot[0].A.data<float>();
      const float* mc = st.tensors[0].second.data<float>();  // A's exp_avg, then exp_avg_sq
      const float* vc = st.tensors[1].second.data<float>();
      ASSERT_EQ(st.tensors[0].first.find(".lora_A.exp_avg"), st.tensors[0].first.size() - 15);
      for (size_t i = 0; i < A0.size(); ++i) {
        ASSERT_EQ(p[i], pc[i]) << "param " << i << " step " << step;
        ASSERT_EQ(m[i], mc[i]) << "exp_avg " << i << " step " << step;
        ASSERT_EQ(v[i], vc[i]) << "exp_avg_sq " << i << " step " << step;
      }
    }
    std::printf("[parity] adamw_step [%ld,%ld] x3 steps: bitwise equal\n", long(r), long(in));
    // The device-side skip: a guard over a non-finite value leaves p, m and v untouched.
    Buffer<double> good(1), nan(1);
    good.upload(std::vector<double>{1.0});
    nan.upload(std::vector<double>{std::nan("")});
    Buffer<int> skip(1);
    auto g_d = cuda::to_device(randn_f32(A0.size(), rng));
    const auto p0 = host_f32(p_d), m0 = host_f32(m_d), v0 = host_f32(v_d);
    cuda::step_guard(ctx, skip.get(), good.get(), nan.get());
    cuda::adamw_step(ctx, p_d.get(), g_d.get(), m_d.get(), v_d.get(), int64_t(A0.size()), 1.0, cfg.beta1, cfg.beta2, 1e-2,
                     1.0, cfg.eps, skip.get());
    EXPECT_EQ(host_f32(p_d), p0);
    EXPECT_EQ(host_f32(m_d), m0);
    EXPECT_EQ(host_f32(v_d), v0);
    cuda::step_guard(ctx, skip.get(), good.get(), good.get());
    cuda::adamw_step(ctx, p_d.get(), g_d.get(), m_d.get(), v_d.get(), int64_t(A0.size()), 1.0, cfg.beta1, cfg.beta2, 1e-2,
                     1.0, cfg.eps, skip.get());
    EXPECT_NE(host_f32(p_d), p0) << "a finite guard must let the update through";
  }
}

// Gradient norm and clipping against train/optimizer.cpp's grad_global_norm and clip_grad_norm.
TEST(CudaOps, GradNormAndClip) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(10);
  for (auto [r, in] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 17}, {16, 4096}, {64, 5000}}) {
    LoraAdapter grads;
    grads.layers.resize(1);
    const std::vector<float> gA = randn_f32(size_t(r * in), rng, 0.3f), gB = randn_f32(size_t(in * r), rng, 0.3f);
    grads.layers[0].slot[0].A = Tensor::from_vector(gA, {r, in});
    grads.layers[0].slot[0].B = Tensor::from_vector(gB, {in, r});
    auto a_d = cuda::to_device(gA), b_d = cuda::to_device(gB);
    Buffer<double> sum_d(1);
    sum_d.fill_bytes(0);
    cuda::sum_squares(ctx, sum_d.get(), a_d.get(), int64_t(gA.size()));
    cuda::sum_squares(ctx, sum_d.get(), b_d.get(), int64_t(gB.size()));
    ctx.synchronize();
    const double norm_gpu = std::sqrt(sum_d.download()[0]);
    const double max_norm = 0.5;
    const double norm_cpu = clip_grad_norm(grads, max_norm);  // also clips the CPU copy
    // Both sum in fp64, in different orders: agreement to fp64 rounding of the sum.
    EXPECT_NEAR(norm_gpu, norm_cpu, 1e-12 * norm_cpu) << r << "x" << in;
    const float coef = float(std::min(1.0, max_norm / (norm_cpu + 1e-6)));
    cuda::scale_inplace(ctx, a_d.get(), int64_t(gA.size()), coef);
    const auto a = host_f32(a_d);
    const float* ac = grads.layers[0].slot[0].A.data<float>();
    for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], ac[i]) << i;
    std::printf("[parity] grad norm [%ld,%ld] rel_err=%.3e, clipping bitwise equal\n", long(r), long(in),
                std::fabs(norm_gpu - norm_cpu) / norm_cpu);
  }
  // A non-finite gradient makes the sum non-finite (the trainer's finite check).
  std::vector<float> bad = {1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f};
  auto bad_d = cuda::to_device(bad);
  Buffer<double> s_d(1);
  s_d.fill_bytes(0);
  cuda::sum_squares(ctx, s_d.get(), bad_d.get(), 3);
  ctx.synchronize();
  EXPECT_FALSE(std::isfinite(s_d.download()[0]));
}

}  // namespace
}  // namespace qt::testing
