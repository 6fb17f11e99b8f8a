// Grouped expert GEMMs (ops/cuda/grouped_gemm.h) against a CPU double-precision loop over experts,
// on the tensor-core path and the SIMT kernels, and the two against each other: Y (+)= X W_e^T,
// dX (+)= dY W_e, Out_e += scale X_e^T dY_e. Routings: uniform random, only every third expert
// used (empty experts), one expert taking every row, rows past offsets[E] (must stay untouched),
// no rows at all; E = 1, 128 and > 256; T = 1, odd T, T not a multiple of any tile; K = N = 8; shapes the
// tensor cores do not take (N = 12, K = 20, r = 4: the SIMT fallback); the LoRA products at r = 4,
// 16, 64; a K-grouped product split over rows (E = 1), run twice for bitwise determinism; every
// tile configuration of the row-grouped products (forced with QT_GROUPED_GEMM_TILE).
// Tolerances (cuda_parity.h): bf16 outputs are rounded once, so |got - ref| <= 2^-8 |ref| +
// 2e-4 max|ref| (half a bf16 ulp plus fp32 summation-order differences); fp32 Out: rtol 0, atol
// 2e-4 max|ref|. A block that forgets a tile leaves the random initial output: far out of bounds.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "cuda_parity.h"
#include "ops/cuda/grouped_gemm.h"
#include "ops/cuda/grouped_gemm_wgmma.h"

namespace qt::testing {
namespace {

enum class Routing { Random, Empties, OneExpert, Tail, NoRows };

// offsets (E+1): how many of the T rows each expert owns under the routing.
std::vector<int64_t> make_offsets(int64_t T, int64_t E, Routing routing, std::mt19937_64& rng) {
  std::vector<int64_t> count(size_t(E), 0);
  const int64_t used = routing == Routing::Tail ? T - std::min<int64_t>(T, 5) : routing == Routing::NoRows ? 0 : T;
  for (int64_t r = 0; r < used; ++r) {
    int64_t e = int64_t(rng() % uint64_t(E));
    if (routing == Routing::Empties) e = (e / 3) * 3;
    if (routing == Routing::OneExpert) e = E / 2;
    ++count[size_t(e)];
  }
  std::vector<int64_t> off(size_t(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] = off[size_t(e)] + count[size_t(e)];
  return off;
}

const char* routing_name(Routing r) {
  switch (r) {
    case Routing::Random: return "random";
    case Routing::Empties: return "empties";
    case Routing::OneExpert: return "one-expert";
    case Routing::Tail: return "tail";
    case Routing::NoRows: return "no-rows";
  }
  return "?";
}

int64_t expert_of(const std::vector<int64_t>& off, int64_t row) {
  for (size_t e = 0; e + 1 < off.size(); ++e)
    if (row >= off[e] && row < off[e + 1]) return int64_t(e);
  return -1;
}

// sum_k A (row, k) B_e (k, n), k < Kc, in double; B_e element (k, n) at W[e][n][k] (nt) or W[e][k][n] (nn).
double dot_row(const std::vector<float>& A, const std::vector<float>& W, int64_t e, int64_t r, int64_t n, int64_t Nc,
               int64_t Kc, bool b_kmajor) {
  const float* We = W.data() + e * Nc * Kc;
  double s = 0;
  for (int64_t k = 0; k < Kc; ++k) s += double(A[size_t(r * Kc + k)]) * double(b_kmajor ? We[k * Nc + n] : We[n * Kc + k]);
  return s;
}

// out (T, Nc) = alpha (A B_e + A2 B2_e) (+ out0 when accumulate), the second product over Kc2 (0:
// none). Rows of no expert keep out0.
std::vector<float> ref_rows(const std::vector<float>& out0, const std::vector<float>& A, const std::vector<float>& W,
                            const std::vector<float>& A2, const std::vector<float>& W2, const std::vector<int64_t>& off,
                            int64_t T, int64_t Nc, int64_t Kc, int64_t Kc2, float alpha, bool accumulate,
                            bool b_kmajor) {
  std::vector<float> out = out0;
  for (int64_t r = 0; r < T; ++r) {
    const int64_t e = expert_of(off, r);
    if (e < 0) continue;
    for (int64_t n = 0; n < Nc; ++n) {
      double s = dot_row(A, W, e, r, n, Nc, Kc, b_kmajor);
      if (Kc2 > 0) s += dot_row(A2, W2, e, r, n, Nc, Kc2, b_kmajor);
      s *= alpha;
      if (accumulate) s += out0[size_t(r * Nc + n)];
      out[size_t(r * Nc + n)] = float(s);
    }
  }
  return out;
}

// Out (E,M,N) = Out0 + scale sum over the rows of e of X (row, m) dY (row, n).
std::vector<float> ref_kgrouped(const std::vector<float>& out0, const std::vector<float>& X,
                                const std::vector<float>& dY, const std::vector<int64_t>& off, int64_t E, int64_t M,
                                int64_t N, float scale) {
  std::vector<float> out = out0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r)
          s += double(X[size_t(r * M + m)]) * double(dY[size_t(r * N + n)]);
        const size_t i = size_t((e * M + m) * N + n);
        out[i] = float(double(out0[i]) + scale * s);
      }
  return out;
}

using RowsFn = void (*)(cuda::Context&, bf16*, const bf16*, const bf16*, const int64_t*, int64_t, int64_t, int64_t,
                        int64_t, float, bool, const cuda::SecondProduct&);
using KgFn = void (*)(cuda::Context&, float*, const bf16*, const bf16*, const int64_t*, int64_t, int64_t, int64_t,
                      int64_t, float);

// Checks Y (T, N) (+)= X W_e^T (nn = false) or dX (T, K) (+)= dY W_e (nn = true), W (E, N, K), on
// both paths, overwriting and accumulating; with inner > 0 plus the second product (NT: X2 (T,
// inner) W2_e^T, W2 (E, N, inner); NN: dY2 (T, inner) W2_e, W2 (E, inner, K)). A second product
// the tensor cores do not take (inner % 8 != 0) is added in a second pass: the output is rounded
// twice, so those cases use the bf16-intermediate tolerance (cuda_parity.h).
void check_rows(cuda::Context& ctx, bool nn, int64_t T, int64_t E, int64_t N, int64_t K, Routing routing,
                std::mt19937_64& rng, int64_t inner = 0) {
  const auto off = make_offsets(T, E, routing, rng);
  const int64_t in_w = nn ? N : K, out_w = nn ? K : N;
  const auto A = randn_bf16(size_t(T * in_w), rng), W = randn_bf16(size_t(E * N * K), rng, 0.1f),
             out0 = randn_bf16(size_t(T * out_w), rng);
  const auto A2 = randn_bf16(size_t(T * inner), rng), W2 = randn_bf16(size_t(E * out_w * inner), rng, 0.1f);
  auto A_d = dev_bf16(A), W_d = dev_bf16(W), A2_d = dev_bf16(A2), W2_d = dev_bf16(W2);
  auto off_d = cuda::to_device(off);
  const cuda::SecondProduct second{A2_d.get(), W2_d.get(), inner};
  const std::string shape = std::string(nn ? "nn" : "nt") + " [T" + std::to_string(T) + " E" + std::to_string(E) +
                            " N" + std::to_string(N) + " K" + std::to_string(K) +
                            (inner ? " +" + std::to_string(inner) : std::string()) + " " + routing_name(routing) + "]";
  const double atol = inner % 8 != 0 ? kAtolBf16Intermediate : kAtolReduction;
  const bool tc = cuda::grouped_gemm_tc_ok(nn ? cuda::GroupedOp::NN : cuda::GroupedOp::NT, N, K, A_d.get(),
                                           W_d.get(), A_d.get());
  for (const bool accumulate : {false, true}) {
    const float alpha = accumulate ? 0.5f : 1.0f;
    const auto ref = ref_rows(out0, A, W, A2, W2, off, T, out_w, in_w, inner, alpha, accumulate, nn);
    std::vector<float> got[2];
    for (const bool simt : {false, true}) {
      const RowsFn fn = nn ? (simt ? &cuda::grouped_gemm_nn_simt : &cuda::grouped_gemm_nn)
                           : (simt ? &cuda::grouped_gemm_nt_simt : &cuda::grouped_gemm_nt);
      auto out_d = dev_bf16(out0);
      fn(ctx, out_d.get(), A_d.get(), W_d.get(), off_d.get(), T, E, N, K, alpha, accumulate, second);
      got[simt] = host_f32(out_d);
      const std::string what = shape + (accumulate ? " acc" : "") + (simt ? " simt" : tc ? " tc" : " fallback");
      expect_close(what, got[simt], ref, kBf16Rtol, simt ? kAtolReduction : atol);
    }
    // Both outputs are rounded to bf16 from fp32 sums in different orders: where the exact value lies
    // near a rounding boundary they land one bf16 ulp apart (2^-7 relative), twice the tolerance
    // against the unrounded reference. Each has already been held to half an ulp of the CPU above.
    expect_close(shape + (accumulate ? " acc" : "") + " tc vs simt", got[0], got[1], 2 * kBf16Rtol, atol);
  }
}

// Checks Out (E, M, N) += scale X_e^T dY_e on both paths (and that the fast path is deterministic).
void check_kgrouped(cuda::Context& ctx, int64_t T, int64_t E, int64_t M, int64_t N, Routing routing,
                    std::mt19937_64& rng) {
  const auto off = make_offsets(T, E, routing, rng);
  const auto X = randn_bf16(size_t(T * M), rng), dY = randn_bf16(size_t(T * N), rng),
             out0 = randn_f32(size_t(E * M * N), rng);
  auto X_d = dev_bf16(X), dY_d = dev_bf16(dY);
  auto off_d = cuda::to_device(off);
  const float scale = 0.75f;
  const auto ref = ref_kgrouped(out0, X, dY, off, E, M, N, scale);
  const std::string shape = "tn_kgrouped [T" + std::to_string(T) + " E" + std::to_string(E) + " M" +
                            std::to_string(M) + " N" + std::to_string(N) + " " + routing_name(routing) + "]";
  std::vector<float> got[2];
  for (const bool simt : {false, true}) {
    const KgFn fn = simt ? &cuda::grouped_gemm_tn_kgrouped_simt : &cuda::grouped_gemm_tn_kgrouped;
    auto out_d = cuda::to_device(out0);
    fn(ctx, out_d.get(), X_d.get(), dY_d.get(), off_d.get(), T, E, M, N, scale);
    got[simt] = host_f32(out_d);
    expect_close(shape + (simt ? " simt" : " fast"), got[simt], ref, 0, kAtolReduction);
    if (!simt) {
      auto again = cuda::to_device(out0);
      fn(ctx, again.get(), X_d.get(), dY_d.get(), off_d.get(), T, E, M, N, scale);
      EXPECT_EQ(host_f32(again), got[0]) << shape << ": two runs differ";
    }
  }
  expect_close(shape + " fast vs simt", got[0], got[1], 0, kAtolReduction);
}

struct Case {
  int64_t T, E, N, K;
  Routing routing;
};
const Case kCases[] = {
    {1, 1, 8, 8, Routing::Random},          {37, 1, 8, 8, Routing::Random},
    {517, 4, 136, 200, Routing::Random},    {300, 8, 264, 72, Routing::Empties},
    {450, 6, 128, 96, Routing::OneExpert},  {200, 5, 96, 40, Routing::Tail},
    {50, 3, 16, 16, Routing::NoRows},       {2000, 128, 64, 128, Routing::Random},
    {1500, 128, 160, 64, Routing::Empties}, {101, 3, 12, 20, Routing::Random},  // SIMT fallback
    {301, 5, 12, 16, Routing::Random},  // NT on tensor cores with N % 8 != 0; NN and TN fall back
    {700, 2, 264, 1032, Routing::Random},   {1000, 3, 200, 136, Routing::Empties},
    {1200, 2, 72, 264, Routing::OneExpert}, {999, 2, 128, 128, Routing::Tail},
    {900, 300, 24, 16, Routing::Empties},   {3000, 290, 136, 40, Routing::Random},  // E > 256 (tile search)
};
// (The tile configuration depends on the shape: rows per expert >= 192 take 128-row tiles, fewer
// take 64-row tiles, N <= 64 (NT) or K <= 64 (NN) thin tiles; the cases cover each.)

TEST(CudaGroupedGemm, NtMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(71);
  for (const Case& c : kCases) check_rows(ctx, false, c.T, c.E, c.N, c.K, c.routing, rng);
}

TEST(CudaGroupedGemm, NnMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(72);
  for (const Case& c : kCases) check_rows(ctx, true, c.T, c.E, c.N, c.K, c.routing, rng);
}

TEST(CudaGroupedGemm, KGroupedMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(73);
  for (const Case& c : kCases) check_kgrouped(ctx, c.T, c.E, c.K, c.N, c.routing, rng);
  check_kgrouped(ctx, 3000, 1, 136, 72, Routing::Random, rng);  // few tiles: split over rows
}

// Every tile configuration of the row-grouped products, forced through QT_GROUPED_GEMM_TILE (the
// automatic choice only takes Wide when told to).
TEST(CudaGroupedGemm, EveryRowTileMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(75);
  for (const char* tile : {"big", "short", "wide"}) {
    std::printf("[tile] %s\n", tile);
    ASSERT_EQ(setenv("QT_GROUPED_GEMM_TILE", tile, 1), 0);
    for (const bool nn : {false, true}) {
      check_rows(ctx, nn, 517, 4, 264, 200, Routing::Random, rng);
      check_rows(ctx, nn, 1200, 3, 520, 96, Routing::Empties, rng);
      check_rows(ctx, nn, 300, 2, 136, 72, Routing::OneExpert, rng);
    }
    unsetenv("QT_GROUPED_GEMM_TILE");
  }
}

// The Hopper path (grouped_gemm_wgmma.cu: NT and NN with an output wider than 64, on compute
// capability 9.0) with each of its tiles (QT_GROUPED_GEMM_WGMMA_BN: 256 or 128 columns, storing whole
// row halves through TMA or every row from registers): row tails inside and past the experts,
// column tails inside a tile and past the last expert's weights, contracted extents that are not a
// multiple of 64 (zero-filled k; NN then reads the next expert's weight rows against zeros), K = 8,
// one row, E > 256, fused LoRA terms of rank 8, 16 and 64, rows past offsets[E] untouched,
// overwriting and accumulating (check_rows). Elsewhere the same cases run on the mma.sync kernels.
TEST(CudaGroupedGemm, WgmmaPathMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(76);
  std::printf("[wgmma] %s\n", cuda::grouped_wgmma_enabled() ? "enabled (sm_90)" : "not available: mma.sync kernels");
  int dev = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&dev), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), cudaSuccess);
  if (major == 9 && std::getenv("QT_GROUPED_GEMM_WGMMA") == nullptr) {
    // A Hopper build must take this path (not fall back silently): both entry points accept a
    // representative shape.
    ASSERT_TRUE(cuda::grouped_wgmma_enabled());
    const int64_t T = 300, E = 4, N = 192, K = 256;
    std::vector<int64_t> off = make_offsets(T, E, Routing::Random, rng);
    auto off_d = cuda::to_device(off);
    auto X = dev_bf16(randn_bf16(size_t(T * K), rng)), W = dev_bf16(randn_bf16(size_t(E * N * K), rng));
    auto Y = dev_poison_bf16(size_t(T * N)), dX = dev_poison_bf16(size_t(T * K));
    EXPECT_TRUE(cuda::grouped_wgmma_nt(ctx, X.get(), {Y.get(), W.get()}, nullptr, 0, off_d.get(), T, E, N, K, 1.f, false));
    EXPECT_TRUE(cuda::grouped_wgmma_nn(ctx, Y.get(), {dX.get(), W.get()}, 0, off_d.get(), T, E, N, K, 1.f, false));
    ctx.synchronize();
    // NN's last k tile (N = 72: 8 of 64 rows) must not read the next expert's weight rows: expert 1
    // (no rows routed) holds Inf everywhere, expert 0's outputs stay finite and right.
    const int64_t N2 = 72, K2 = 192;
    const std::vector<int64_t> off2 = {0, T, T};
    auto off2_d = cuda::to_device(off2);
    const auto dY2 = randn_bf16(size_t(T * N2), rng);
    auto W2 = randn_bf16(size_t(2 * N2 * K2), rng, 0.1f);
    for (size_t i = size_t(N2 * K2); i < W2.size(); ++i) W2[i] = std::numeric_limits<float>::infinity();
    auto dY2_d = dev_bf16(dY2), W2_d = dev_bf16(W2);
    auto dX2 = dev_poison_bf16(size_t(T * K2));
    EXPECT_TRUE(cuda::grouped_wgmma_nn(ctx, dY2_d.get(), {dX2.get(), W2_d.get()}, 0, off2_d.get(), T, 2, N2, K2, 1.f, false));
    const std::vector<float> zeros(size_t(T * K2), 0.0f), none;
    expect_close("nn k tail vs an Inf next expert", host_f32(dX2),
                 ref_rows(zeros, dY2, W2, none, none, off2, T, K2, N2, 0, 1.f, false, true), kBf16Rtol, kAtolReduction);
  }
  for (const char* tile : {"256tma", "256", "128", "128tma"}) {
    ASSERT_EQ(setenv("QT_GROUPED_GEMM_WGMMA_BN", tile, 1), 0);
    for (const bool nn : {false, true}) {
      check_rows(ctx, nn, 517, 4, 136, 200, Routing::Random, rng);
      check_rows(ctx, nn, 1200, 3, 520, 96, Routing::Empties, rng);
      check_rows(ctx, nn, 300, 2, 264, 72, Routing::OneExpert, rng);
      check_rows(ctx, nn, 1, 1, 66, 8, Routing::Random, rng);
      check_rows(ctx, nn, 999, 2, 256, 1032, Routing::Tail, rng, 16);
      check_rows(ctx, nn, 2000, 128, 96, 128, Routing::Random, rng, 16);
      check_rows(ctx, nn, 900, 300, 80, 136, Routing::Empties, rng, 64);
      check_rows(ctx, nn, 700, 16, 192, 256, Routing::Random, rng, 8);
    }
  }
  unsetenv("QT_GROUPED_GEMM_WGMMA_BN");
}

// grouped_gemm_nn_sum (an MoE layer's gate and up input gradients in one product): dX = alpha (dY1
// W1_e + t1 A1_e + dY2 W2_e + t2 A2_e) against the CPU, over a poisoned dX, with LoRA terms of rank 0,
// 8 and 16 (fused: one rounding), rank 4 or ranks that differ (two grouped_gemm_nn calls: two
// roundings, the bf16-intermediate tolerance); every routing, contracted extents not a multiple of 64.
TEST(CudaGroupedGemm, NnSumMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(77);
  struct SumCase {
    int64_t T, E, N, K, r1, r2;
    Routing routing;
  };
  const SumCase cases[] = {
      {700, 16, 192, 256, 0, 0, Routing::Random},    {700, 16, 192, 256, 16, 16, Routing::Empties},
      {999, 3, 136, 200, 8, 8, Routing::Tail},       {450, 6, 96, 128, 4, 4, Routing::OneExpert},
      {450, 6, 96, 136, 16, 8, Routing::Random},     {2000, 128, 72, 264, 16, 16, Routing::Random},
      {50, 3, 64, 96, 16, 16, Routing::NoRows},
  };
  for (const SumCase& c : cases) {
    const auto off = make_offsets(c.T, c.E, c.routing, rng);
    auto off_d = cuda::to_device(off);
    const auto dY1 = randn_bf16(size_t(c.T * c.N), rng), dY2 = randn_bf16(size_t(c.T * c.N), rng);
    const auto W1 = randn_bf16(size_t(c.E * c.N * c.K), rng, 0.1f), W2 = randn_bf16(size_t(c.E * c.N * c.K), rng, 0.1f);
    const auto t1 = randn_bf16(size_t(c.T * c.r1), rng), t2 = randn_bf16(size_t(c.T * c.r2), rng);
    const auto A1 = randn_bf16(size_t(c.E * c.r1 * c.K), rng, 0.1f), A2 = randn_bf16(size_t(c.E * c.r2 * c.K), rng, 0.1f);
    auto dY1_d = dev_bf16(dY1), dY2_d = dev_bf16(dY2), W1_d = dev_bf16(W1), W2_d = dev_bf16(W2);
    auto t1_d = dev_bf16(t1), t2_d = dev_bf16(t2), A1_d = dev_bf16(A1), A2_d = dev_bf16(A2);
    const std::vector<float> zeros(size_t(c.T * c.K), 0.0f);
    const float alpha = 0.75f;
    auto ref = ref_rows(zeros, dY1, W1, t1, A1, off, c.T, c.K, c.N, c.r1, alpha, false, true);
    const auto ref2 = ref_rows(zeros, dY2, W2, t2, A2, off, c.T, c.K, c.N, c.r2, alpha, false, true);
    for (size_t i = 0; i < ref.size(); ++i) ref[i] += ref2[i];
    auto dX = dev_poison_bf16(size_t(c.T * c.K));
    cuda::grouped_gemm_nn_sum(ctx, dX.get(), {dY1_d.get(), W1_d.get(), {t1_d.get(), A1_d.get(), c.r1}},
                              {dY2_d.get(), W2_d.get(), {t2_d.get(), A2_d.get(), c.r2}}, off_d.get(), c.T, c.E, c.N,
                              c.K, alpha);
    const bool fused = c.r1 == c.r2 && c.r1 % 8 == 0 && cuda::grouped_wgmma_enabled() &&
                       std::getenv("QT_GROUPED_GEMM_TILE") == nullptr;  // else two launches, two roundings
    const std::string shape = "nn_sum [T" + std::to_string(c.T) + " E" + std::to_string(c.E) + " N" +
                              std::to_string(c.N) + " K" + std::to_string(c.K) + " r" + std::to_string(c.r1) + "/" +
                              std::to_string(c.r2) + " " + routing_name(c.routing) + "]";
    // Rows past offsets[E] are not written: they keep the poison (NaN); the routed rows are compared.
    auto got = host_f32(dX);
    int64_t written_unrouted = 0;
    for (int64_t row = 0; row < c.T; ++row)
      if (expert_of(off, row) < 0)
        for (int64_t k = 0; k < c.K; ++k) {
          const size_t i = size_t(row * c.K + k);
          written_unrouted += std::isnan(got[i]) ? 0 : 1;
          got[i] = ref[i] = 0.0f;
        }
    EXPECT_EQ(written_unrouted, 0) << shape << ": rows past offsets[E] written";
    expect_close(shape, got, ref, kBf16Rtol, fused ? kAtolReduction : kAtolBf16Intermediate);
  }
}

// The LoRA products of one expert-parallel adapter (x (T,H), A (E,r,H), B (E,O,r)) at r = 4, 16, 64:
// xa = x A_e^T, y += xa B_e^T, t = dy B_e, dx += t A_e, dA_e = t^T x, dB_e = dy^T xa, and the base
// products with the LoRA term fused (SecondProduct).
TEST(CudaGroupedGemm, LoraShapesMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(74);
  const int64_t T = 700, E = 16, H = 256, O = 192;
  for (const int64_t r : {4, 16, 64}) {
    check_rows(ctx, false, T, E, r, H, Routing::Random, rng);   // xa = x A^T
    check_rows(ctx, false, T, E, O, r, Routing::Empties, rng);  // y += xa B^T
    check_rows(ctx, true, T, E, O, r, Routing::Random, rng);    // t = dy B
    check_rows(ctx, true, T, E, r, H, Routing::OneExpert, rng); // dx += t A
    check_kgrouped(ctx, T, E, r, H, Routing::Random, rng);      // dA = t^T x
    check_kgrouped(ctx, T, E, O, r, Routing::Empties, rng);     // dB = dy^T xa
    check_rows(ctx, false, T, E, O, H, Routing::Random, rng, r);  // y = x W^T + xa B^T, fused
    check_rows(ctx, true, T, E, O, H, Routing::Tail, rng, r);     // dx = dy W + t A, fused
  }
}

// grouped_gemm_nt_pair (an MoE layer's gate and up in one launch) writes exactly what two
// grouped_gemm_nt calls write, over poisoned outputs: without second products, with fused LoRA
// terms of rank 16 (one launch), and with ranks the tensor cores do not fuse (r = 4) or that differ
// between the two (the fallback: two launches); thin N (rank-sized xa products), N not a multiple
// of any tile, every routing, several expert counts.
TEST(CudaGroupedGemm, NtPairEqualsTwoProducts) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  std::mt19937_64 rng(91);
  struct PairCase {
    int64_t T, E, N, K, r1, r2;
    Routing routing;
  };
  const PairCase cases[] = {
      {700, 16, 192, 256, 0, 0, Routing::Random},  {700, 16, 192, 256, 16, 16, Routing::Empties},
      {517, 4, 136, 200, 16, 16, Routing::Tail},   {300, 8, 16, 264, 0, 0, Routing::Random},
      {450, 6, 96, 128, 4, 4, Routing::OneExpert}, {450, 6, 96, 128, 16, 0, Routing::Random},
      {2000, 128, 96, 64, 16, 16, Routing::Random}, {50, 3, 64, 64, 16, 16, Routing::NoRows},
  };
  for (const PairCase& c : cases) {
    const auto off = make_offsets(c.T, c.E, c.routing, rng);
    auto off_d = cuda::to_device(off);
    auto X = dev_bf16(randn_bf16(size_t(c.T * c.K), rng));
    auto W1 = dev_bf16(randn_bf16(size_t(c.E * c.N * c.K), rng, 0.1f)),
         W2 = dev_bf16(randn_bf16(size_t(c.E * c.N * c.K), rng, 0.1f));
    auto A1 = dev_bf16(randn_bf16(size_t(c.T * std::max<int64_t>(c.r1, 1)), rng)),
         A2 = dev_bf16(randn_bf16(size_t(c.T * std::max<int64_t>(c.r2, 1)), rng));
    auto B1 = dev_bf16(randn_bf16(size_t(c.E * c.N * std::max<int64_t>(c.r1, 1)), rng, 0.1f)),
         B2 = dev_bf16(randn_bf16(size_t(c.E * c.N * std::max<int64_t>(c.r2, 1)), rng, 0.1f));
    const cuda::SecondProduct s1{A1.get(), B1.get(), c.r1}, s2{A2.get(), B2.get(), c.r2};
    auto y1 = dev_poison_bf16(size_t(c.T * c.N)), y2 = dev_poison_bf16(size_t(c.T * c.N));
    auto p1 = dev_poison_bf16(size_t(c.T * c.N)), p2 = dev_poison_bf16(size_t(c.T * c.N));
    cuda::grouped_gemm_nt(ctx, y1.get(), X.get(), W1.get(), off_d.get(), c.T, c.E, c.N, c.K, 0.75f, false, s1);
    cuda::grouped_gemm_nt(ctx, y2.get(), X.get(), W2.get(), off_d.get(), c.T, c.E, c.N, c.K, 0.75f, false, s2);
    cuda::grouped_gemm_nt_pair(ctx, p1.get(), X.get(), W1.get(), s1, {p2.get(), W2.get(), s2}, off_d.get(), c.T, c.E,
                               c.N, c.K, 0.75f);
    const std::string shape = "pair [T" + std::to_string(c.T) + " E" + std::to_string(c.E) + " N" +
                              std::to_string(c.N) + " K" + std::to_string(c.K) + " r" + std::to_string(c.r1) + "/" +
                              std::to_string(c.r2) + " " + routing_name(c.routing) + "]";
    ctx.synchronize();  // the products ran on the context's non-blocking stream
    const auto a1 = y1.download(), a2 = y2.download(), b1 = p1.download(), b2 = p2.download();
    EXPECT_EQ(std::memcmp(a1.data(), b1.data(), a1.size() * sizeof(bf16)), 0) << shape << " first";
    EXPECT_EQ(std::memcmp(a2.data(), b2.data(), a2.size() * sizeof(bf16)), 0) << shape << " second";
  }
}

}  // namespace
}  // namespace qt::testing
