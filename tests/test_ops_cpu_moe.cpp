// CPU MoE ops: router forward against a naive softmax / repeated-argmax top-k written here, router
// backward by float64 central differences (norm_topk_prob on and off, k = 1, 2, E), moe_sort offsets
// and stability, gather / combine forward against their definitions and backward (incl. dtopk_w) by
// finite differences. Analytic gradients are taken from buffers pre-filled with random values, minus
// those values, so an op that overwrote instead of accumulating would fail.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

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
using IVec = std::vector<int32_t>;

namespace {


struct NaiveRouting {
  Vec probs;  // (N,E)
  IVec idx;   // (N,k)
  Vec w;      // (N,k)
};

// softmax per row, then k times "the largest not yet taken, lowest index on ties", then renorm.
NaiveRouting naive_router(const Vec& logits, int64_t N, int64_t E, int64_t k, bool norm) {
  NaiveRouting r{Vec(N * E), IVec(N * k), Vec(N * k)};
  for (int64_t n = 0; n < N; ++n) {
    double mx = -std::numeric_limits<double>::infinity(), s = 0;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[n * E + e]);
    for (int64_t e = 0; e < E; ++e) s += std::exp(logits[n * E + e] - mx);
    for (int64_t e = 0; e < E; ++e) r.probs[n * E + e] = std::exp(logits[n * E + e] - mx) / s;
    std::vector<bool> taken(E, false);
    double ws = 0;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || r.probs[n * E + e] > r.probs[n * E + best])) best = e;
      taken[best] = true;
      r.idx[n * k + j] = int32_t(best);
      r.w[n * k + j] = r.probs[n * E + best];
      ws += r.w[n * k + j];
    }
    if (norm)
      for (int64_t j = 0; j < k; ++j) r.w[n * k + j] /= ws;
  }
  return r;
}

// Random logits whose probabilities are pairwise at least 1e-3 apart in every row, so that no top-k
// selection flips under a finite-difference perturbation.
Vec separated_logits(int64_t N, int64_t E, uint64_t seed) {
  for (int attempt = 0; attempt < 200; ++attempt) {
    Vec l = random_vec(N * E, seed + 7919 * uint64_t(attempt), 1.5);
    NaiveRouting r = naive_router(l, N, E, 1, false);
    bool ok = true;
    for (int64_t n = 0; n < N && ok; ++n) {
      Vec p(r.probs.begin() + n * E, r.probs.begin() + (n + 1) * E);
      std::sort(p.begin(), p.end());
      for (int64_t e = 1; e < E; ++e) ok = ok && p[e] - p[e - 1] >= 1e-3;
    }
    if (ok) return l;
  }
  ADD_FAILURE() << "could not draw separated logits";
  return {};
}

}  // namespace

// ---- router ---------------------------------------------------------------------------------

TEST(MoeRouter, ForwardMatchesNaiveSoftmaxTopk) {
  const int64_t N = 7, E = 6;
  Vec logits = random_vec(N * E, 1, 2.0);
  for (int64_t k : {1, 2, 3, 6})
    for (bool norm : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "k=" << k << " norm=" << norm);
      NaiveRouting ref = naive_router(logits, N, E, k, norm);
      Vec probs(N * E), w(N * k);
      IVec idx(N * k);
      moe_router_forward<double>(idx.data(), w.data(), probs.data(), logits.data(), N, E, k, norm);
      EXPECT_EQ(idx, ref.idx);
      EXPECT_LE(rel_error(probs, ref.probs), 1e-14);
      EXPECT_LE(rel_error(w, ref.w), 1e-14);
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t j = 0; j < k; ++j) s += w[n * k + j];
        if (norm) {
          EXPECT_NEAR(s, 1.0, 1e-14);
        }
        for (int64_t j = 1; j < k; ++j) EXPECT_GE(w[n * k + j - 1], w[n * k + j]);  // descending
      }
    }
}

TEST(MoeRouter, TiesTakeTheLowerIndexFirst) {
  const int64_t E = 5;
  Vec logits = {1.0, 3.0, 3.0, 0.0, 3.0};
  Vec probs(E), w(4);
  IVec idx(4);
  moe_router_forward<double>(idx.data(), w.data(), probs.data(), logits.data(), 1, E, 4, false);
  EXPECT_EQ(idx, (IVec{1, 2, 4, 0}));
  // all equal: identity order
  Vec flat(E, 0.25);
  IVec idx5(E);
  Vec w5(E);
  moe_router_forward<double>(idx5.data(), w5.data(), probs.data(), flat.data(), 1, E, E, true);
  EXPECT_EQ(idx5, (IVec{0, 1, 2, 3, 4}));
  for (double v : w5) EXPECT_NEAR(v, 0.2, 1e-15);
}

TEST(MoeRouter, NanLogitsDoNotBreakTheSort) {
  const int64_t E = 4;
  Vec logits = {std::nan(""), 1.0, 2.0, 0.5};
  Vec probs(E), w(2);
  IVec idx(2, -1);
  moe_router_forward<double>(idx.data(), w.data(), probs.data(), logits.data(), 1, E, 2, true);
  for (int32_t i : idx) EXPECT_TRUE(i >= 0 && i < E);  // a valid (if meaningless) routing, no crash
  EXPECT_NE(idx[0], idx[1]);
}

TEST(MoeRouter, FloatFollowsDouble) {
  const int64_t N = 9, E = 8, k = 3;
  Vec logits = separated_logits(N, E, 5);
  std::vector<float> lf(logits.begin(), logits.end()), pf(N * E), wf(N * k);
  IVec idxf(N * k), idx(N * k);
  Vec p(N * E), w(N * k);
  moe_router_forward<float>(idxf.data(), wf.data(), pf.data(), lf.data(), N, E, k, true);
  moe_router_forward<double>(idx.data(), w.data(), p.data(), logits.data(), N, E, k, true);
  EXPECT_EQ(idxf, idx);
  EXPECT_LE(rel_error(Vec(pf.begin(), pf.end()), p), 1e-6);
  EXPECT_LE(rel_error(Vec(wf.begin(), wf.end()), w), 1e-6);

  // backward: float against double on the same inputs
  Vec dw = random_vec(N * k, 6);
  std::vector<float> dwf(dw.begin(), dw.end()), dlf(N * E, 0.f);
  Vec dl(N * E, 0.0);
  moe_router_backward<float>(dlf.data(), dwf.data(), pf.data(), idxf.data(), N, E, k, true);
  moe_router_backward<double>(dl.data(), dw.data(), p.data(), idx.data(), N, E, k, true);
  EXPECT_LE(rel_error(Vec(dlf.begin(), dlf.end()), dl), 1e-5);
}

namespace {
void router_grad_case(int64_t N, int64_t E, int64_t k, bool norm, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " E=" << E << " k=" << k << " norm=" << norm);
  Vec logits = separated_logits(N, E, seed);
  Vec R = random_vec(N * k, seed + 1);
  Vec probs(N * E), w(N * k);
  IVec idx(N * k);
  auto loss = [&] {
    moe_router_forward<double>(idx.data(), w.data(), probs.data(), logits.data(), N, E, k, norm);
    return dot(w, R);
  };
  Vec num = numeric_grad(logits, loss);
  loss();
  Vec d0 = random_vec(N * E, seed + 2), d = d0;
  moe_router_backward<double>(d.data(), R.data(), probs.data(), idx.data(), N, E, k, norm);
  if (norm && k == 1) {
    // the single renormalised weight is identically 1: no gradient at all
    for (size_t i = 0; i < d.size(); ++i) EXPECT_NEAR(d[i] - d0[i], 0.0, 1e-15);
    for (double g : num) EXPECT_NEAR(g, 0.0, 1e-9);
    return;
  }
  expect_grad_close(minus(d, d0), num, "dlogits");
  moe_router_backward<double>(nullptr, R.data(), probs.data(), idx.data(), N, E, k, norm);  // skipped, no crash
}
}  // namespace

TEST(MoeRouter, BackwardGradCheck) {
  const int64_t N = 5, E = 6;
  uint64_t seed = 100;
  for (bool norm : {false, true})
    for (int64_t k : {int64_t(1), int64_t(2), E}) router_grad_case(N, E, k, norm, seed += 10);
  router_grad_case(1, 2, 1, false, 300);
  router_grad_case(3, 3, 3, true, 310);
}

// ---- sort -----------------------------------------------------------------------------------

TEST(MoeSort, HandCase) {
  // tokens 0..4, k = 2; expert 1 receives nothing
  IVec idx = {2, 0, 0, 2, 2, 3, 0, 2, 3, 0};
  IVec perm(10);
  std::vector<int64_t> off(5);
  moe_sort(perm.data(), off.data(), idx.data(), 5, 2, 4);
  EXPECT_EQ(off, (std::vector<int64_t>{0, 4, 4, 8, 10}));
  EXPECT_EQ(perm, (IVec{1, 2, 6, 9, 0, 3, 4, 7, 5, 8}));
}

TEST(MoeSort, RandomCasesAreStableGroupedPermutations) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t E = 1 + int64_t(rng() % 9), k = 1 + int64_t(rng() % E), N = int64_t(rng() % 13);
    IVec idx(N * k);
    for (int64_t n = 0; n < N; ++n) {  // k distinct experts per token, like a real router
      IVec all(E);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      std::copy(all.begin(), all.begin() + k, idx.begin() + n * k);
    }
    IVec perm(N * k, -1);
    std::vector<int64_t> off(E + 1, -7);
    moe_sort(perm.data(), off.data(), idx.data(), N, k, E);
    ASSERT_EQ(off[0], 0);
    ASSERT_EQ(off[E], N * k);
    IVec seen(N * k, 0);
    for (int64_t e = 0; e < E; ++e) {
      int64_t count = 0;
      for (int32_t v : idx) count += v == e;
      EXPECT_EQ(off[e + 1] - off[e], count) << "expert " << e;
      for (int64_t p = off[e]; p < off[e + 1]; ++p) {
        EXPECT_EQ(idx[perm[p]], e);
        if (p > off[e]) {
          EXPECT_LT(perm[p - 1], perm[p]) << "not stable";
        }
        ++seen[perm[p]];
      }
    }
    for (int32_t s : seen) EXPECT_EQ(s, 1);
  }
}

// ---- gather / combine ----------------------------------------------------------------------

namespace {
struct Dispatch {
  int64_t N, k, E, H;
  IVec idx, perm;
  std::vector<int64_t> off;
};
Dispatch make_dispatch(int64_t N, int64_t k, int64_t E, int64_t H, uint64_t seed) {
  Dispatch d{N, k, E, H, IVec(N * k), IVec(N * k), std::vector<int64_t>(E + 1)};
  Vec logits = random_vec(N * E, seed);
  Vec probs(N * E), w(N * k);
  moe_router_forward<double>(d.idx.data(), w.data(), probs.data(), logits.data(), N, E, k, false);
  moe_sort(d.perm.data(), d.off.data(), d.idx.data(), N, k, E);
  return d;
}
}  // namespace

TEST(MoeGather, ForwardCopiesRowsAndBackwardScatters) {
  for (auto [N, k, E, H] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{6, 2, 4, 5}, {1, 3, 3, 4}, {5, 1, 2, 3}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << N << " k=" << k);
    Dispatch d = make_dispatch(N, k, E, H, 20 + N);
    const int64_t Nk = N * k;
    Vec x = random_vec(N * H, 21), xs(Nk * H);
    moe_gather<double>(xs.data(), x.data(), d.perm.data(), Nk, k, H);
    for (int64_t p = 0; p < Nk; ++p)
      for (int64_t h = 0; h < H; ++h) ASSERT_EQ(xs[p * H + h], x[(d.perm[p] / k) * H + h]);

    Vec R = random_vec(Nk * H, 22);
    auto loss = [&] {
      moe_gather<double>(xs.data(), x.data(), d.perm.data(), Nk, k, H);
      return dot(xs, R);
    };
    Vec num = numeric_grad(x, loss);
    Vec dx0 = random_vec(N * H, 23), dx = dx0;
    moe_gather_backward<double>(dx.data(), R.data(), d.perm.data(), Nk, k, H);
    expect_grad_close(minus(dx, dx0), num, "dx");
    moe_gather_backward<double>(nullptr, R.data(), d.perm.data(), Nk, k, H);  // skipped
  }
}

TEST(MoeCombine, ForwardAddsWeightedRows) {
  const int64_t N = 5, k = 2, E = 4, H = 3, Nk = N * k;
  Dispatch d = make_dispatch(N, k, E, H, 30);
  Vec ys = random_vec(Nk * H, 31), w = random_vec(Nk, 32), out0 = random_vec(N * H, 33), out = out0;
  moe_combine<double>(out.data(), ys.data(), w.data(), d.perm.data(), Nk, k, H);
  Vec ref = out0;
  for (int64_t p = 0; p < Nk; ++p) {
    const int64_t a = d.perm[p], n = a / k;
    for (int64_t h = 0; h < H; ++h) ref[n * H + h] += w[a] * ys[p * H + h];
  }
  EXPECT_LE(rel_error(out, ref), 1e-15);

  std::vector<float> ysf(ys.begin(), ys.end()), wf(w.begin(), w.end()), outf(out0.begin(), out0.end());
  moe_combine<float>(outf.data(), ysf.data(), wf.data(), d.perm.data(), Nk, k, H);
  EXPECT_LE(rel_error(Vec(outf.begin(), outf.end()), ref), 1e-6);
}

TEST(MoeCombine, BackwardGradCheck) {
  for (auto [N, k, E, H] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{5, 2, 4, 3}, {1, 4, 4, 5}, {4, 1, 3, 6}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << N << " k=" << k);
    const int64_t Nk = N * k;
    Dispatch d = make_dispatch(N, k, E, H, 40 + N);
    Vec ys = random_vec(Nk * H, 41), w = random_vec(Nk, 42), R = random_vec(N * H, 43), out(N * H);
    auto loss = [&] {
      std::fill(out.begin(), out.end(), 0.0);
      moe_combine<double>(out.data(), ys.data(), w.data(), d.perm.data(), Nk, k, H);
      return dot(out, R);
    };
    Vec num_ys = numeric_grad(ys, loss), num_w = numeric_grad(w, loss);
    Vec dys0 = random_vec(Nk * H, 44), dw0 = random_vec(Nk, 45), dys = dys0, dw = dw0;
    moe_combine_backward<double>(dys.data(), dw.data(), R.data(), ys.data(), w.data(), d.perm.data(), Nk, k, H);
    expect_grad_close(minus(dys, dys0), num_ys, "dys");
    expect_grad_close(minus(dw, dw0), num_w, "dtopk_w");
    // each null output skipped, the other unchanged
    Vec dw2 = dw0, dys2 = dys0;
    moe_combine_backward<double>(nullptr, dw2.data(), R.data(), ys.data(), w.data(), d.perm.data(), Nk, k, H);
    moe_combine_backward<double>(dys2.data(), nullptr, R.data(), ys.data(), w.data(), d.perm.data(), Nk, k, H);
    EXPECT_EQ(dw2, dw);
    EXPECT_EQ(dys2, dys);
  }
}
