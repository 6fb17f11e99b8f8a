// CPU ops (all but attention and MoE): forward against naive formulas written here, backward by
// float64 central differences (loss = sum(out * R)), accumulation (+=) and nullptr skipping, and the
// float instantiation against the double one. Attention lives in test_ops_cpu_attention.cpp.
//
// Every analytic gradient is taken from a buffer pre-filled with random values, minus those values:
// an op that overwrote instead of accumulating would fail the finite-difference comparison.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "grad_check.h"
#include "ops/cpu/ops.h"

using namespace qt::cpu;
using qt::testing::dot;
using qt::testing::expect_grad_close;
using qt::testing::minus;
using qt::testing::numeric_grad;
using qt::testing::random_vec;
using qt::testing::rel_error;
using Vec = std::vector<double>;

namespace {


// Values rounded to float, so a float run and a double run see the same inputs.
Vec float_rounded(Vec v) {
  for (auto& x : v) x = double(float(x));
  return v;
}
std::vector<float> to_float(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }
Vec to_double(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

// Row-major naive product: C (M,N) = op(A) op(B).
Vec naive_matmul(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const Vec& A, const Vec& B) {
  Vec C(size_t(M * N), 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += (ta ? A[k * M + i] : A[i * K + k]) * (tb ? B[j * K + k] : B[k * N + j]);
      C[i * N + j] = s;
    }
  return C;
}

}  // namespace

// ---- gemm -----------------------------------------------------------------------------------

TEST(Gemm, AllTransposesMatchNaiveProduct) {
  const int64_t M = 5, N = 3, K = 7;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      Vec A = random_vec(M * K, 1), B = random_vec(K * N, 2), C0 = random_vec(M * N, 3);
      Vec C = C0;
      gemm<double>(ta, tb, M, N, K, 0.5, A.data(), B.data(), -2.0, C.data());
      Vec ref = naive_matmul(ta, tb, M, N, K, A, B);
      for (size_t i = 0; i < ref.size(); ++i) ref[i] = 0.5 * ref[i] - 2.0 * C0[i];
      EXPECT_LE(rel_error(C, ref), 1e-14) << "ta=" << ta << " tb=" << tb;

      std::vector<float> Af = to_float(A), Bf = to_float(B), Cf = to_float(C0);
      gemm<float>(ta, tb, M, N, K, 0.5f, Af.data(), Bf.data(), -2.0f, Cf.data());
      EXPECT_LE(rel_error(to_double(Cf), ref), 1e-6) << "float ta=" << ta << " tb=" << tb;
    }
}

TEST(Gemm, EmptyInnerDimensionScalesC) {
  Vec C = {1, 2, 3, std::nan("")};
  gemm<double>(false, false, 2, 2, 0, 1.0, nullptr, nullptr, 0.0, C.data());
  EXPECT_EQ(C, Vec(4, 0.0));  // beta = 0 clears, NaN included (BLAS semantics)
  Vec D = {1, 2, 3, 4};
  gemm<double>(false, true, 2, 2, 0, 1.0, nullptr, nullptr, 3.0, D.data());
  EXPECT_EQ(D, (Vec{3, 6, 9, 12}));
}

// ---- embedding ------------------------------------------------------------------------------

TEST(Embedding, ForwardGathersAndBackwardScattersRepeatedIds) {
  const int64_t V = 6, H = 70, N = 5;  // H > one column block
  std::vector<int32_t> ids = {3, 0, 3, 5, 3};
  Vec table = random_vec(V * H, 4), out(N * H);
  embedding_forward<double>(out.data(), ids.data(), table.data(), N, H);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) ASSERT_EQ(out[n * H + h], table[ids[n] * H + h]);

  Vec R = random_vec(N * H, 5);
  auto loss = [&] {
    embedding_forward<double>(out.data(), ids.data(), table.data(), N, H);
    return dot(out, R);
  };
  Vec num = numeric_grad(table, loss);
  Vec d0 = random_vec(V * H, 6), d = d0;
  embedding_backward<double>(d.data(), R.data(), ids.data(), N, H);
  expect_grad_close(minus(d, d0), num, "dtable");
  // row 3 received three tokens, rows 1, 2, 4 none
  for (int64_t h = 0; h < H; ++h) {
    EXPECT_NEAR(d[3 * H + h] - d0[3 * H + h], R[0 * H + h] + R[2 * H + h] + R[4 * H + h], 1e-14);
    EXPECT_EQ(d[1 * H + h], d0[1 * H + h]);
  }
}

// ---- RMSNorm --------------------------------------------------------------------------------

namespace {
void rmsnorm_grad_case(int64_t R, int64_t D, double eps, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "R=" << R << " D=" << D);
  Vec x = random_vec(R * D, seed), w = random_vec(D, seed + 1), Rw = random_vec(R * D, seed + 2);
  Vec y(R * D), rstd(R);
  auto loss = [&] {
    rmsnorm_forward<double>(y.data(), rstd.data(), x.data(), w.data(), R, D, eps);
    return dot(y, Rw);
  };
  Vec nx = numeric_grad(x, loss), nw = numeric_grad(w, loss);
  loss();
  // forward against the formula
  for (int64_t r = 0; r < R; ++r) {
    double ms = 0;
    for (int64_t j = 0; j < D; ++j) ms += x[r * D + j] * x[r * D + j] / double(D);
    const double rs = 1.0 / std::sqrt(ms + eps);
    EXPECT_NEAR(rstd[r], rs, 1e-14 * rs);
    for (int64_t j = 0; j < D; ++j) EXPECT_NEAR(y[r * D + j], w[j] * x[r * D + j] * rs, 1e-13);
  }
  Vec dx0 = random_vec(R * D, seed + 3), dw0 = random_vec(D, seed + 4), dx = dx0, dw = dw0;
  rmsnorm_backward<double>(dx.data(), dw.data(), Rw.data(), x.data(), w.data(), rstd.data(), R, D);
  expect_grad_close(minus(dx, dx0), nx, "dx");
  expect_grad_close(minus(dw, dw0), nw, "dw");
  // nullptr gradients are skipped, the other still computed
  Vec dw2 = dw0;
  rmsnorm_backward<double>(nullptr, dw2.data(), Rw.data(), x.data(), w.data(), rstd.data(), R, D);
  EXPECT_EQ(dw2, dw);
}
}  // namespace

TEST(RmsNorm, GradCheck) {
  rmsnorm_grad_case(3, 5, 1e-6, 10);
  rmsnorm_grad_case(4, 8, 1e-6, 20);
  rmsnorm_grad_case(2, 67, 1e-6, 30);  // more than one column block for dw
  rmsnorm_grad_case(3, 1, 0.5, 40);    // D = 1: eps large enough that y depends on x
  rmsnorm_grad_case(1, 2, 1e-6, 50);
}

TEST(RmsNorm, OutputMayAliasInput) {
  const int64_t R = 3, D = 9;
  Vec x = random_vec(R * D, 60), w = random_vec(D, 61), y(R * D), rstd(R), rstd2(R);
  rmsnorm_forward<double>(y.data(), rstd.data(), x.data(), w.data(), R, D, 1e-6);
  rmsnorm_forward<double>(x.data(), rstd2.data(), x.data(), w.data(), R, D, 1e-6);
  EXPECT_EQ(x, y);
  EXPECT_EQ(rstd, rstd2);
}

TEST(RmsNorm, FloatMatchesDouble) {
  const int64_t R = 48, D = 256;
  Vec x = float_rounded(random_vec(R * D, 70)), w = float_rounded(random_vec(D, 71));
  Vec dy = float_rounded(random_vec(R * D, 72));
  Vec y(R * D), rs(R), dx(R * D, 0.0), dw(D, 0.0);
  rmsnorm_forward<double>(y.data(), rs.data(), x.data(), w.data(), R, D, 1e-6);
  rmsnorm_backward<double>(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rs.data(), R, D);
  std::vector<float> xf = to_float(x), wf = to_float(w), dyf = to_float(dy), yf(R * D), rsf(R), dxf(R * D, 0.f),
                     dwf(D, 0.f);
  rmsnorm_forward<float>(yf.data(), rsf.data(), xf.data(), wf.data(), R, D, 1e-6);
  rmsnorm_backward<float>(dxf.data(), dwf.data(), dyf.data(), xf.data(), wf.data(), rsf.data(), R, D);
  EXPECT_LE(rel_error(to_double(yf), y), 1e-5);
  EXPECT_LE(rel_error(to_double(dxf), dx), 1e-5);
  EXPECT_LE(rel_error(to_double(dwf), dw), 1e-5);
}

// ---- RoPE -----------------------------------------------------------------------------------

TEST(Rope, TableFollowsTheFloat32RecipeAndTheExactFormula) {
  const int64_t hd = 128, half = hd / 2;
  std::vector<int32_t> pos = {0, 1, 7, 513, 4095, 32000};
  const int64_t N = int64_t(pos.size());
  for (double theta : {10000.0, 1000000.0}) {
    std::vector<float> c(N * hd), s(N * hd);
    rope_table(c.data(), s.data(), pos.data(), N, hd, theta);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < hd; ++i) {
        const int64_t f = i % half;  // emb = [angle, angle]
        // HF: inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim)) in float32, angle in float32
        const float inv_f = 1.0f / std::pow(float(theta), float(2 * f) / float(hd));
        const float angle_f = float(pos[n]) * inv_f;
        ASSERT_EQ(c[n * hd + i], std::cos(angle_f)) << n << "," << i;
        ASSERT_EQ(s[n * hd + i], std::sin(angle_f)) << n << "," << i;
        // and close to the exact value: the float32 angle error is a few units of |angle| * 2^-23
        const double angle = double(pos[n]) * std::pow(theta, -2.0 * double(f) / double(hd));
        const double tol = 4e-7 + 6 * angle * std::ldexp(1.0, -24);  // powf, divide, multiply roundings
        EXPECT_NEAR(c[n * hd + i], std::cos(angle), tol);
        EXPECT_NEAR(s[n * hd + i], std::sin(angle), tol);
      }
  }
}

namespace {
void rope_case(int64_t N, int64_t heads, int64_t hd, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " heads=" << heads << " hd=" << hd);
  std::vector<int32_t> pos(N);
  for (int64_t n = 0; n < N; ++n) pos[n] = int32_t((n * 37 + 3) % 50);
  std::vector<float> c(N * hd), s(N * hd);
  rope_table(c.data(), s.data(), pos.data(), N, hd, 10000.0);
  Vec x = random_vec(N * heads * hd, seed), R = random_vec(N * heads * hd, seed + 1);
  // forward against x*cos + rotate_half(x)*sin built explicitly
  Vec y = x;
  rope_forward<double>(y.data(), c.data(), s.data(), N, heads, hd);
  const int64_t half = hd / 2;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < heads; ++h) {
      const double* xv = x.data() + (n * heads + h) * hd;
      Vec rot(hd);
      for (int64_t i = 0; i < hd; ++i) rot[i] = i < half ? -xv[i + half] : xv[i - half];
      for (int64_t i = 0; i < hd; ++i)
        EXPECT_NEAR(y[(n * heads + h) * hd + i], xv[i] * c[n * hd + i] + rot[i] * s[n * hd + i], 1e-15);
    }
  auto loss = [&] {
    Vec t = x;
    rope_forward<double>(t.data(), c.data(), s.data(), N, heads, hd);
    return dot(t, R);
  };
  Vec num = numeric_grad(x, loss);
  Vec g = R;  // backward works in place: the gradient replaces dy
  rope_backward<double>(g.data(), c.data(), s.data(), N, heads, hd);
  expect_grad_close(g, num, "dx");
}
}  // namespace

TEST(Rope, GradCheck) {
  rope_case(5, 3, 8, 100);
  rope_case(1, 1, 2, 110);  // hd = 2
  rope_case(4, 2, 6, 120);
}

TEST(Rope, FloatMatchesDouble) {
  const int64_t N = 64, heads = 4, hd = 64;
  std::vector<int32_t> pos(N);
  std::iota(pos.begin(), pos.end(), 100);
  std::vector<float> c(N * hd), s(N * hd);
  rope_table(c.data(), s.data(), pos.data(), N, hd, 1e6);
  Vec x = float_rounded(random_vec(N * heads * hd, 130)), xd = x;
  std::vector<float> xf = to_float(x);
  rope_forward<double>(xd.data(), c.data(), s.data(), N, heads, hd);
  rope_forward<float>(xf.data(), c.data(), s.data(), N, heads, hd);
  EXPECT_LE(rel_error(to_double(xf), xd), 1e-5);
  rope_backward<double>(xd.data(), c.data(), s.data(), N, heads, hd);
  rope_backward<float>(xf.data(), c.data(), s.data(), N, heads, hd);
  EXPECT_LE(rel_error(to_double(xf), x), 1e-5);  // the rotation is orthogonal: back to x
}

// ---- linear ---------------------------------------------------------------------------------

namespace {
void linear_case(int64_t N, int64_t in, int64_t out, bool bias, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " in=" << in << " out=" << out << " bias=" << bias);
  Vec x = random_vec(N * in, seed), W = random_vec(out * in, seed + 1), b = random_vec(out, seed + 2);
  Vec R = random_vec(N * out, seed + 3), y(N * out);
  const double* bp = bias ? b.data() : nullptr;
  auto loss = [&] {
    y.assign(y.size(), std::nan(""));  // forward overwrites
    linear_forward<double>(y.data(), x.data(), W.data(), bp, N, in, out);
    return dot(y, R);
  };
  loss();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < out; ++o) {
      double ref = bias ? b[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) ref += x[n * in + i] * W[o * in + i];
      EXPECT_NEAR(y[n * out + o], ref, 1e-13);
    }
  Vec nx = numeric_grad(x, loss), nW = numeric_grad(W, loss), nb = numeric_grad(b, loss);
  Vec dx0 = random_vec(N * in, seed + 4), dW0 = random_vec(out * in, seed + 5), db0 = random_vec(out, seed + 6);
  Vec dx = dx0, dW = dW0, db = db0;
  linear_backward<double>(dx.data(), dW.data(), bias ? db.data() : nullptr, R.data(), x.data(), W.data(), N, in, out);
  expect_grad_close(minus(dx, dx0), nx, "dx");
  expect_grad_close(minus(dW, dW0), nW, "dW");
  if (bias) expect_grad_close(minus(db, db0), nb, "db");
  else EXPECT_EQ(db, db0);
  // frozen base weight: dW nullptr, dx still accumulated
  Vec dx2 = dx0;
  linear_backward<double>(dx2.data(), nullptr, nullptr, R.data(), x.data(), W.data(), N, in, out);
  EXPECT_LE(rel_error(minus(dx2, dx0), minus(dx, dx0)), 1e-15);
}
}  // namespace

TEST(Linear, GradCheck) {
  linear_case(4, 5, 3, true, 200);
  linear_case(1, 3, 7, false, 210);  // N = 1
  linear_case(3, 1, 2, true, 220);
  linear_case(2, 6, 70, true, 230);  // bias sum over more than one column block
}

TEST(Linear, BackwardAccumulates) {
  const int64_t N = 3, in = 4, out = 5;
  Vec x = random_vec(N * in, 240), W = random_vec(out * in, 241), dy = random_vec(N * out, 242);
  Vec dx(N * in, 0.0), dW(out * in, 0.0), db(out, 0.0);
  linear_backward<double>(dx.data(), dW.data(), db.data(), dy.data(), x.data(), W.data(), N, in, out);
  Vec dx1 = dx, dW1 = dW, db1 = db;
  linear_backward<double>(dx.data(), dW.data(), db.data(), dy.data(), x.data(), W.data(), N, in, out);
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_DOUBLE_EQ(dx[i], 2 * dx1[i]);
  for (size_t i = 0; i < dW.size(); ++i) EXPECT_DOUBLE_EQ(dW[i], 2 * dW1[i]);
  for (size_t i = 0; i < db.size(); ++i) EXPECT_DOUBLE_EQ(db[i], 2 * db1[i]);
}

// ---- LoRA -----------------------------------------------------------------------------------

namespace {
void lora_case(int64_t N, int64_t in, int64_t out, int64_t r, double scale, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " in=" << in << " out=" << out << " r=" << r);
  Vec x = random_vec(N * in, seed), A = random_vec(r * in, seed + 1), B = random_vec(out * r, seed + 2);
  Vec y0 = random_vec(N * out, seed + 3), R = random_vec(N * out, seed + 4), y(N * out), xa(N * r);
  auto loss = [&] {
    y = y0;  // lora adds to the base output
    lora_forward<double>(y.data(), xa.data(), x.data(), A.data(), B.data(), scale, N, in, out, r);
    return dot(y, R);
  };
  loss();
  for (int64_t n = 0; n < N; ++n) {
    Vec ref_xa(r, 0.0);
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < in; ++i) ref_xa[k] += x[n * in + i] * A[k * in + i];
    for (int64_t k = 0; k < r; ++k) EXPECT_NEAR(xa[n * r + k], ref_xa[k], 1e-13);
    for (int64_t o = 0; o < out; ++o) {
      double ref = 0;
      for (int64_t k = 0; k < r; ++k) ref += ref_xa[k] * B[o * r + k];
      EXPECT_NEAR(y[n * out + o], y0[n * out + o] + scale * ref, 1e-12);
    }
  }
  Vec nx = numeric_grad(x, loss), nA = numeric_grad(A, loss), nB = numeric_grad(B, loss);
  loss();  // xa for the backward
  Vec dx0 = random_vec(N * in, seed + 5), dA0 = random_vec(r * in, seed + 6), dB0 = random_vec(out * r, seed + 7);
  Vec dx = dx0, dA = dA0, dB = dB0;
  lora_backward<double>(dx.data(), dA.data(), dB.data(), R.data(), x.data(), xa.data(), A.data(), B.data(), scale, N,
                        in, out, r);
  expect_grad_close(minus(dx, dx0), nx, "dx");
  expect_grad_close(minus(dA, dA0), nA, "dA");
  expect_grad_close(minus(dB, dB0), nB, "dB");
  // only dB wanted (e.g. input gradient not needed and A frozen)
  Vec dB2 = dB0;
  lora_backward<double>(nullptr, nullptr, dB2.data(), R.data(), x.data(), xa.data(), A.data(), B.data(), scale, N, in,
                        out, r);
  EXPECT_LE(rel_error(minus(dB2, dB0), minus(dB, dB0)), 1e-15);
}
}  // namespace

TEST(Lora, GradCheck) {
  lora_case(4, 6, 5, 2, 2.0, 300);
  lora_case(3, 5, 4, 1, 0.5, 310);  // r = 1
  lora_case(1, 2, 3, 4, 1.0, 320);  // N = 1, r > in
}

TEST(LinearLora, FloatMatchesDouble) {
  const int64_t N = 32, in = 96, out = 80, r = 8;
  const double scale = 2.0;
  Vec x = float_rounded(random_vec(N * in, 330)), W = float_rounded(random_vec(out * in, 331, 0.1));
  Vec b = float_rounded(random_vec(out, 332)), A = float_rounded(random_vec(r * in, 333, 0.1));
  Vec B = float_rounded(random_vec(out * r, 334, 0.1)), dy = float_rounded(random_vec(N * out, 335));
  Vec y(N * out), xa(N * r), dx(N * in, 0.0), dW(out * in, 0.0), db(out, 0.0), dA(r * in, 0.0), dB(out * r, 0.0);
  linear_forward<double>(y.data(), x.data(), W.data(), b.data(), N, in, out);
  lora_forward<double>(y.data(), xa.data(), x.data(), A.data(), B.data(), scale, N, in, out, r);
  linear_backward<double>(dx.data(), dW.data(), db.data(), dy.data(), x.data(), W.data(), N, in, out);
  lora_backward<double>(dx.data(), dA.data(), dB.data(), dy.data(), x.data(), xa.data(), A.data(), B.data(), scale, N,
                        in, out, r);
  std::vector<float> xf = to_float(x), Wf = to_float(W), bf = to_float(b), Af = to_float(A), Bf = to_float(B),
                     dyf = to_float(dy), yf(N * out), xaf(N * r), dxf(N * in, 0.f), dWf(out * in, 0.f), dbf(out, 0.f),
                     dAf(r * in, 0.f), dBf(out * r, 0.f);
  linear_forward<float>(yf.data(), xf.data(), Wf.data(), bf.data(), N, in, out);
  lora_forward<float>(yf.data(), xaf.data(), xf.data(), Af.data(), Bf.data(), float(scale), N, in, out, r);
  linear_backward<float>(dxf.data(), dWf.data(), dbf.data(), dyf.data(), xf.data(), Wf.data(), N, in, out);
  lora_backward<float>(dxf.data(), dAf.data(), dBf.data(), dyf.data(), xf.data(), xaf.data(), Af.data(), Bf.data(),
                       float(scale), N, in, out, r);
  EXPECT_LE(rel_error(to_double(yf), y), 1e-5);
  EXPECT_LE(rel_error(to_double(xaf), xa), 1e-5);
  EXPECT_LE(rel_error(to_double(dxf), dx), 1e-5);
  EXPECT_LE(rel_error(to_double(dWf), dW), 1e-5);
  EXPECT_LE(rel_error(to_double(dbf), db), 1e-5);
  EXPECT_LE(rel_error(to_double(dAf), dA), 1e-5);
  EXPECT_LE(rel_error(to_double(dBf), dB), 1e-5);
}

// ---- SwiGLU and residual --------------------------------------------------------------------

TEST(SwiGlu, ForwardAndGradCheck) {
  for (int64_t n : {1, 37}) {
    Vec g = random_vec(n, 400 + n, 3.0), u = random_vec(n, 401 + n), R = random_vec(n, 402 + n), h(n);
    if (n > 1) g[0] = 30.0, g[1] = -30.0;  // saturated sigmoid on both sides
    auto loss = [&] {
      swiglu_forward<double>(h.data(), g.data(), u.data(), n);
      return dot(h, R);
    };
    loss();
    for (int64_t i = 0; i < n; ++i)
      EXPECT_NEAR(h[i], g[i] / (1 + std::exp(-g[i])) * u[i], 1e-14 * (1 + std::fabs(h[i])));
    Vec ng = numeric_grad(g, loss), nu = numeric_grad(u, loss);
    Vec dg0 = random_vec(n, 403 + n), du0 = random_vec(n, 404 + n), dg = dg0, du = du0;
    swiglu_backward<double>(dg.data(), du.data(), R.data(), g.data(), u.data(), n);
    expect_grad_close(minus(dg, dg0), ng, "dg");
    expect_grad_close(minus(du, du0), nu, "du");
    Vec du2 = du0;
    swiglu_backward<double>(nullptr, du2.data(), R.data(), g.data(), u.data(), n);
    EXPECT_EQ(du2, du);
  }
}

TEST(SwiGlu, ExtremeGateStaysFinite) {
  Vec g = {-1000.0, 1000.0, -750.0}, u = {1.0, 2.0, 3.0}, h(3), dg(3, 0.0), du(3, 0.0), dh = {1.0, 1.0, 1.0};
  swiglu_forward<double>(h.data(), g.data(), u.data(), 3);
  swiglu_backward<double>(dg.data(), du.data(), dh.data(), g.data(), u.data(), 3);
  EXPECT_EQ(h[0], 0.0);
  EXPECT_EQ(h[1], 2000.0);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(std::isfinite(dg[i]) && std::isfinite(du[i])) << i;
  EXPECT_EQ(dg[1], 2.0);
}

TEST(SwiGlu, FloatMatchesDouble) {
  const int64_t n = 4096;
  Vec g = float_rounded(random_vec(n, 410, 2.0)), u = float_rounded(random_vec(n, 411));
  Vec dh = float_rounded(random_vec(n, 412)), h(n), dg(n, 0.0), du(n, 0.0);
  swiglu_forward<double>(h.data(), g.data(), u.data(), n);
  swiglu_backward<double>(dg.data(), du.data(), dh.data(), g.data(), u.data(), n);
  std::vector<float> gf = to_float(g), uf = to_float(u), dhf = to_float(dh), hf(n), dgf(n, 0.f), duf(n, 0.f);
  swiglu_forward<float>(hf.data(), gf.data(), uf.data(), n);
  swiglu_backward<float>(dgf.data(), duf.data(), dhf.data(), gf.data(), uf.data(), n);
  EXPECT_LE(rel_error(to_double(hf), h), 1e-5);
  EXPECT_LE(rel_error(to_double(dgf), dg), 1e-5);
  EXPECT_LE(rel_error(to_double(duf), du), 1e-5);
}

TEST(AddInplace, Adds) {
  Vec y = random_vec(9, 420), x = random_vec(9, 421), y0 = y;
  add_inplace<double>(y.data(), x.data(), 9);
  for (int i = 0; i < 9; ++i) EXPECT_EQ(y[i], y0[i] + x[i]);
}

// ---- cross entropy --------------------------------------------------------------------------

namespace {
// Explicit shifted log-softmax loss sum and count.
double naive_ce(const Vec& logits, const std::vector<int32_t>& labels, int64_t B, int64_t S, int64_t V,
                int64_t* count) {
  double total = 0;
  *count = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < S; ++t) {
      const int32_t y = labels[b * S + t + 1];
      if (y == -100) continue;
      const double* row = logits.data() + (b * S + t) * V;
      double z = 0;
      for (int64_t v = 0; v < V; ++v) z += std::exp(row[v]);
      total += -std::log(std::exp(row[y]) / z);
      ++*count;
    }
  return total;
}
}  // namespace

TEST(CrossEntropy, ForwardMatchesExplicitLogSoftmaxAndCounts) {
  const int64_t B = 2, S = 5, V = 7;
  Vec logits = random_vec(B * S * V, 500);
  std::vector<int32_t> labels = {-100, 3, -100, 6, 0,  //
                                 2, 1, 1, -100, -100};
  int64_t count = -1, ref_count = -1;
  const double loss = cross_entropy_forward<double>(logits.data(), labels.data(), B, S, V, &count);
  const double ref = naive_ce(logits, labels, B, S, V, &ref_count);
  EXPECT_EQ(count, 5);  // labels at t >= 1 that are not -100: 3, 6, 0, 1, 1
  EXPECT_EQ(ref_count, 5);
  EXPECT_NEAR(loss, ref, 1e-12 * ref);
  // The label at position 0 is never predicted and the last logits row predicts nothing.
  labels[0] = 4;
  for (int64_t v = 0; v < V; ++v) logits[(1 * S + S - 1) * V + v] = 1e3;
  EXPECT_EQ(cross_entropy_forward<double>(logits.data(), labels.data(), B, S, V, &count), loss);
  EXPECT_EQ(count, 5);
}

TEST(CrossEntropy, StableForLargeLogits) {
  const int64_t B = 1, S = 4, V = 9;
  Vec logits = random_vec(B * S * V, 510), shifted = logits;
  for (auto& x : shifted) x += 5000.0;  // exp would overflow without the max shift
  std::vector<int32_t> labels = {0, 8, 2, 5};
  int64_t c1, c2;
  const double a = cross_entropy_forward<double>(logits.data(), labels.data(), B, S, V, &c1);
  const double b = cross_entropy_forward<double>(shifted.data(), labels.data(), B, S, V, &c2);
  ASSERT_TRUE(std::isfinite(b));
  EXPECT_NEAR(a, b, 1e-9 * a);
  std::vector<float> sf = to_float(shifted);
  EXPECT_TRUE(std::isfinite(cross_entropy_forward<float>(sf.data(), labels.data(), B, S, V, &c2)));
}

TEST(CrossEntropy, RejectsLabelsOutsideVocabulary) {
  const int64_t B = 1, S = 3, V = 4;
  Vec logits = random_vec(B * S * V, 520), d(B * S * V, 0.0);
  for (std::vector<int32_t> labels : {std::vector<int32_t>{0, 4, 1}, std::vector<int32_t>{0, 1, -1}}) {
    int64_t count;
    EXPECT_THROW(cross_entropy_forward<double>(logits.data(), labels.data(), B, S, V, &count), qt::Error);
    EXPECT_THROW(cross_entropy_backward<double>(d.data(), logits.data(), labels.data(), 1.0, B, S, V), qt::Error);
  }
  std::vector<int32_t> first_unused = {99, 1, 2};  // position 0 is never a target
  int64_t count;
  EXPECT_NO_THROW(cross_entropy_forward<double>(logits.data(), first_unused.data(), B, S, V, &count));
}

TEST(CrossEntropy, GradCheckAndMaskedRowsGetNothing) {
  struct Case {
    int64_t B, S, V;
    std::vector<int32_t> labels;
  };
  const std::vector<Case> cases = {{2, 4, 5, {-100, 1, 4, 0, 3, -100, 2, 2}},
                                   {1, 2, 3, {0, 2}},
                                   {1, 1, 4, {1}},  // S = 1: nothing predicted
                                   {3, 3, 1, {0, 0, 0, 0, -100, 0, 0, 0, 0}}};  // V = 1: loss 0
  uint64_t seed = 530;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "B=" << c.B << " S=" << c.S << " V=" << c.V);
    const int64_t n = c.B * c.S * c.V;
    Vec logits = random_vec(n, seed++, 2.0);
    const double scale = 0.37;
    auto loss = [&] {
      int64_t count;
      return scale * cross_entropy_forward<double>(logits.data(), c.labels.data(), c.B, c.S, c.V, &count);
    };
    Vec num = numeric_grad(logits, loss);
    Vec d0 = random_vec(n, seed++), d = d0;
    cross_entropy_backward<double>(d.data(), logits.data(), c.labels.data(), scale, c.B, c.S, c.V);
    Vec got = minus(d, d0);
    if (dot(num, num) > 0) {
      expect_grad_close(got, num, "dlogits");
    } else {
      for (double g : got) EXPECT_NEAR(g, 0.0, 1e-15);
    }
    // rows that predict nothing (last position, or next label -100) receive exactly nothing
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < c.S; ++t) {
        if (t + 1 < c.S && c.labels[b * c.S + t + 1] != -100) continue;
        for (int64_t v = 0; v < c.V; ++v) EXPECT_EQ(d[(b * c.S + t) * c.V + v], d0[(b * c.S + t) * c.V + v]);
      }
  }
}

TEST(CrossEntropy, BackwardAccumulates) {
  const int64_t B = 1, S = 3, V = 6;
  Vec logits = random_vec(B * S * V, 560), d(B * S * V, 0.0);
  std::vector<int32_t> labels = {1, 2, 3};
  cross_entropy_backward<double>(d.data(), logits.data(), labels.data(), 0.5, B, S, V);
  Vec once = d;
  cross_entropy_backward<double>(d.data(), logits.data(), labels.data(), 0.5, B, S, V);
  for (size_t i = 0; i < d.size(); ++i) EXPECT_DOUBLE_EQ(d[i], 2 * once[i]);
}

TEST(CrossEntropy, FloatMatchesDouble) {
  const int64_t B = 2, S = 16, V = 1000;
  Vec logits = float_rounded(random_vec(B * S * V, 570, 3.0));
  std::vector<int32_t> labels(B * S);
  for (int64_t i = 0; i < B * S; ++i) labels[i] = i % 5 == 2 ? -100 : int32_t((i * 7919) % V);
  int64_t cd, cf;
  Vec d(B * S * V, 0.0);
  const double ld = cross_entropy_forward<double>(logits.data(), labels.data(), B, S, V, &cd);
  cross_entropy_backward<double>(d.data(), logits.data(), labels.data(), 1.0 / double(cd), B, S, V);
  std::vector<float> lf = to_float(logits), df(B * S * V, 0.f);
  const double lff = cross_entropy_forward<float>(lf.data(), labels.data(), B, S, V, &cf);
  cross_entropy_backward<float>(df.data(), lf.data(), labels.data(), 1.0f / float(cf), B, S, V);
  EXPECT_EQ(cd, cf);
  EXPECT_NEAR(lff, ld, 1e-5 * ld);
  EXPECT_LE(rel_error(to_double(df), d), 1e-5);
}
