// Causal GQA attention on CPU: forward against an explicit masked score matrix + softmax, packed
// documents (segments) never attending across each other, float64 finite-difference gradients for
// q, k, v over MHA / GQA / odd shapes, accumulation and nullptr gradients, float vs double, and the
// wall time of a S=512 forward+backward.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "grad_check.h"
#include "ops/cpu/ops.h"

using namespace qt::cpu;
using qt::testing::dot;
using qt::testing::expect_grad_close;
using qt::testing::numeric_grad;
using qt::testing::random_vec;
using qt::testing::rel_error;
using Vec = std::vector<double>;
using Seg = std::vector<int32_t>;

namespace {

struct Shape {
  int64_t B, S, nh, nkv, hd;
  int64_t q_size() const { return B * S * nh * hd; }
  int64_t kv_size() const { return B * S * nkv * hd; }
};

Vec minus(const Vec& a, const Vec& b) {
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

// Finite-difference check; where the true gradient is identically zero (S = 1: one visible key, so q
// and k cannot move the output) the analytic one must be zero too.
void expect_grad_or_zero(const Vec& analytic, const Vec& numeric, const char* what) {
  if (dot(numeric, numeric) > 0) return expect_grad_close(analytic, numeric, what);
  for (double g : analytic) EXPECT_NEAR(g, 0.0, 1e-14) << what;
}

// Explicit reference: the full (S,S) score matrix with -inf outside the mask, then softmax.
void naive_attention(Vec& out, Vec& lse, const Vec& q, const Vec& k, const Vec& v, const Seg* seg, const Shape& a) {
  out.assign(size_t(a.q_size()), 0.0);
  lse.assign(size_t(a.B * a.nh * a.S), 0.0);
  const double scale = 1.0 / std::sqrt(double(a.hd));
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.nh; ++h) {
      const int64_t g = h / (a.nh / a.nkv);
      std::vector<Vec> score(size_t(a.S), Vec(size_t(a.S), -INFINITY));
      for (int64_t i = 0; i < a.S; ++i)
        for (int64_t j = 0; j < a.S; ++j) {
          const bool allowed = j <= i && (seg == nullptr || (*seg)[b * a.S + j] == (*seg)[b * a.S + i]);
          if (!allowed) continue;
          double s = 0;
          for (int64_t d = 0; d < a.hd; ++d)
            s += q[((b * a.S + i) * a.nh + h) * a.hd + d] * k[((b * a.S + j) * a.nkv + g) * a.hd + d];
          score[i][j] = s * scale;
        }
      for (int64_t i = 0; i < a.S; ++i) {
        double m = -INFINITY;
        for (double s : score[i]) m = std::max(m, s);
        double z = 0;
        for (double s : score[i]) z += std::exp(s - m);
        lse[(b * a.nh + h) * a.S + i] = m + std::log(z);
        for (int64_t j = 0; j < a.S; ++j) {
          const double p = std::exp(score[i][j] - m) / z;
          for (int64_t d = 0; d < a.hd; ++d)
            out[((b * a.S + i) * a.nh + h) * a.hd + d] += p * v[((b * a.S + j) * a.nkv + g) * a.hd + d];
        }
      }
    }
}

void forward(Vec& out, Vec& lse, const Vec& q, const Vec& k, const Vec& v, const Seg* seg, const Shape& a) {
  out.assign(size_t(a.q_size()), std::nan(""));  // forward must overwrite
  lse.assign(size_t(a.B * a.nh * a.S), std::nan(""));
  attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), seg ? seg->data() : nullptr, a.B,
                            a.S, a.nh, a.nkv, a.hd);
}

void check_case(const Shape& a, const Seg* seg, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "B=" << a.B << " S=" << a.S << " nh=" << a.nh << " nkv=" << a.nkv
                                    << " hd=" << a.hd << " segments=" << (seg != nullptr));
  Vec q = random_vec(a.q_size(), seed), k = random_vec(a.kv_size(), seed + 1), v = random_vec(a.kv_size(), seed + 2);
  Vec R = random_vec(a.q_size(), seed + 3), out, lse, ref_out, ref_lse;

  forward(out, lse, q, k, v, seg, a);
  naive_attention(ref_out, ref_lse, q, k, v, seg, a);
  EXPECT_LE(rel_error(out, ref_out), 1e-13) << "out";
  EXPECT_LE(rel_error(lse, ref_lse), 1e-13) << "lse";

  auto loss = [&] {
    Vec o, l;
    forward(o, l, q, k, v, seg, a);
    return dot(o, R);
  };
  Vec nq = numeric_grad(q, loss), nk = numeric_grad(k, loss), nv = numeric_grad(v, loss);
  Vec dq0 = random_vec(a.q_size(), seed + 4), dk0 = random_vec(a.kv_size(), seed + 5);
  Vec dv0 = random_vec(a.kv_size(), seed + 6), dq = dq0, dk = dk0, dv = dv0;
  attention_backward<double>(dq.data(), dk.data(), dv.data(), R.data(), out.data(), lse.data(), q.data(), k.data(),
                             v.data(), seg ? seg->data() : nullptr, a.B, a.S, a.nh, a.nkv, a.hd);
  expect_grad_or_zero(minus(dq, dq0), nq, "dq");
  expect_grad_or_zero(minus(dk, dk0), nk, "dk");
  expect_grad_or_zero(minus(dv, dv0), nv, "dv");
  EXPECT_GT(dot(nv, nv), 0.0) << "dv is never identically zero";
  if (a.S > 1 && seg == nullptr) {
    EXPECT_GT(dot(nq, nq) * dot(nk, nk), 0.0) << "dq, dk are zero only for S = 1";
  }

  // each gradient alone (others nullptr) gives the same contribution
  Vec dq1 = dq0, dk1 = dk0, dv1 = dv0;
  attention_backward<double>(dq1.data(), nullptr, nullptr, R.data(), out.data(), lse.data(), q.data(), k.data(),
                             v.data(), seg ? seg->data() : nullptr, a.B, a.S, a.nh, a.nkv, a.hd);
  attention_backward<double>(nullptr, dk1.data(), nullptr, R.data(), out.data(), lse.data(), q.data(), k.data(),
                             v.data(), seg ? seg->data() : nullptr, a.B, a.S, a.nh, a.nkv, a.hd);
  attention_backward<double>(nullptr, nullptr, dv1.data(), R.data(), out.data(), lse.data(), q.data(), k.data(),
                             v.data(), seg ? seg->data() : nullptr, a.B, a.S, a.nh, a.nkv, a.hd);
  EXPECT_EQ(dq1, dq);
  EXPECT_EQ(dk1, dk);
  EXPECT_EQ(dv1, dv);
}

}  // namespace

TEST(Attention, ForwardAndGradCheckWithoutSegments) {
  check_case({1, 1, 1, 1, 2}, nullptr, 10);  // S = 1, hd = 2
  check_case({2, 5, 4, 2, 4}, nullptr, 20);  // GQA 4:2
  check_case({1, 6, 6, 1, 2}, nullptr, 30);  // GQA 6:1
  check_case({1, 7, 3, 3, 4}, nullptr, 40);  // MHA
  check_case({2, 3, 2, 1, 6}, nullptr, 50);
}

TEST(Attention, ForwardAndGradCheckWithSegments) {
  const Seg packed = {0, 0, 0, 1, 1, 2, 2,  //
                      5, 5, 5, 5, 7, 7, 7};
  check_case({2, 7, 4, 2, 4}, &packed, 60);
  const Seg single_tokens = {3, 4, 4, 6, 7};  // one-token documents attend only to themselves
  check_case({1, 5, 2, 1, 2}, &single_tokens, 70);
  const Seg interleaved = {0, 1, 0, 1, 1, 0, 2};  // not contiguous: the mask still applies inside the range
  check_case({1, 7, 6, 3, 2}, &interleaved, 80);
}

TEST(Attention, PackedDocumentsEqualSeparateSequences) {
  const Shape a{1, 9, 4, 2, 8};
  const Seg seg = {0, 0, 0, 0, 1, 1, 1, 2, 2};
  const std::vector<std::pair<int64_t, int64_t>> docs = {{0, 4}, {4, 7}, {7, 9}};
  Vec q = random_vec(a.q_size(), 90), k = random_vec(a.kv_size(), 91), v = random_vec(a.kv_size(), 92), out, lse;
  forward(out, lse, q, k, v, &seg, a);
  for (auto [s0, s1] : docs) {
    const Shape d{1, s1 - s0, a.nh, a.nkv, a.hd};
    Vec dq(q.begin() + s0 * a.nh * a.hd, q.begin() + s1 * a.nh * a.hd);
    Vec dk(k.begin() + s0 * a.nkv * a.hd, k.begin() + s1 * a.nkv * a.hd);
    Vec dv(v.begin() + s0 * a.nkv * a.hd, v.begin() + s1 * a.nkv * a.hd);
    Vec dout, dlse;
    forward(dout, dlse, dq, dk, dv, nullptr, d);
    for (int64_t i = 0; i < d.S * a.nh * a.hd; ++i) EXPECT_NEAR(out[s0 * a.nh * a.hd + i], dout[i], 1e-14);
    for (int64_t h = 0; h < a.nh; ++h)
      for (int64_t i = 0; i < d.S; ++i) EXPECT_NEAR(lse[h * a.S + s0 + i], dlse[h * d.S + i], 1e-14);
  }
}

TEST(Attention, OtherDocumentsDoNotChangeOutputOrGradients) {
  const Shape a{1, 8, 2, 1, 4};
  const Seg seg = {0, 0, 0, 1, 1, 1, 1, 2};
  Vec q = random_vec(a.q_size(), 100), k = random_vec(a.kv_size(), 101), v = random_vec(a.kv_size(), 102);
  Vec dO = random_vec(a.q_size(), 103), out, lse;
  auto grads = [&](Vec& o, Vec& dq, Vec& dk, Vec& dv) {
    Vec l;
    forward(o, l, q, k, v, &seg, a);
    dq.assign(size_t(a.q_size()), 0.0);
    dk.assign(size_t(a.kv_size()), 0.0);
    dv.assign(size_t(a.kv_size()), 0.0);
    attention_backward<double>(dq.data(), dk.data(), dv.data(), dO.data(), o.data(), l.data(), q.data(), k.data(),
                               v.data(), seg.data(), a.B, a.S, a.nh, a.nkv, a.hd);
  };
  Vec o1, dq1, dk1, dv1, o2, dq2, dk2, dv2;
  grads(o1, dq1, dk1, dv1);
  // change every input of the token at position 4 (document 1)
  for (int64_t d = 0; d < a.nh * a.hd; ++d) q[4 * a.nh * a.hd + d] += 1.5;
  for (int64_t d = 0; d < a.nkv * a.hd; ++d) k[4 * a.nkv * a.hd + d] -= 2.0, v[4 * a.nkv * a.hd + d] += 3.0;
  grads(o2, dq2, dk2, dv2);
  auto same_rows = [&](const Vec& x, const Vec& y, int64_t row, int64_t width, const char* what) {
    for (int64_t i = 0; i < width; ++i) EXPECT_EQ(x[row * width + i], y[row * width + i]) << what << " row " << row;
  };
  for (int64_t pos : {0, 1, 2, 7}) {  // documents 0 and 2
    same_rows(o1, o2, pos, a.nh * a.hd, "out");
    same_rows(dq1, dq2, pos, a.nh * a.hd, "dq");
    same_rows(dk1, dk2, pos, a.nkv * a.hd, "dk");
    same_rows(dv1, dv2, pos, a.nkv * a.hd, "dv");
  }
  bool changed = false;  // and the change is visible inside document 1
  for (int64_t i = 0; i < a.nh * a.hd; ++i) changed |= o1[5 * a.nh * a.hd + i] != o2[5 * a.nh * a.hd + i];
  EXPECT_TRUE(changed);
}

TEST(Attention, BackwardAccumulates) {
  const Shape a{1, 4, 2, 1, 4};
  Vec q = random_vec(a.q_size(), 110), k = random_vec(a.kv_size(), 111), v = random_vec(a.kv_size(), 112);
  Vec dO = random_vec(a.q_size(), 113), out, lse;
  forward(out, lse, q, k, v, nullptr, a);
  Vec dq(a.q_size(), 0.0), dk(a.kv_size(), 0.0), dv(a.kv_size(), 0.0);
  auto run = [&] {
    attention_backward<double>(dq.data(), dk.data(), dv.data(), dO.data(), out.data(), lse.data(), q.data(), k.data(),
                               v.data(), nullptr, a.B, a.S, a.nh, a.nkv, a.hd);
  };
  run();
  Vec dq1 = dq, dk1 = dk, dv1 = dv;
  run();
  for (size_t i = 0; i < dq.size(); ++i) EXPECT_DOUBLE_EQ(dq[i], 2 * dq1[i]);
  for (size_t i = 0; i < dk.size(); ++i) EXPECT_DOUBLE_EQ(dk[i], 2 * dk1[i]);
  for (size_t i = 0; i < dv.size(); ++i) EXPECT_DOUBLE_EQ(dv[i], 2 * dv1[i]);
}

namespace {

struct FloatRun {
  double seconds_forward = 0, seconds_backward = 0;
};

// Runs float and double on the same float-rounded inputs; expects agreement within 1e-5 relative.
FloatRun compare_float_double(const Shape& a, const Seg* seg, uint64_t seed) {
  auto rounded = [](Vec x) {
    for (auto& e : x) e = double(float(e));
    return x;
  };
  Vec q = rounded(random_vec(a.q_size(), seed)), k = rounded(random_vec(a.kv_size(), seed + 1));
  Vec v = rounded(random_vec(a.kv_size(), seed + 2)), dO = rounded(random_vec(a.q_size(), seed + 3));
  const int32_t* sp = seg ? seg->data() : nullptr;
  Vec out(a.q_size()), lse(a.B * a.nh * a.S), dq(a.q_size(), 0.0), dk(a.kv_size(), 0.0), dv(a.kv_size(), 0.0);
  attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), sp, a.B, a.S, a.nh, a.nkv, a.hd);
  attention_backward<double>(dq.data(), dk.data(), dv.data(), dO.data(), out.data(), lse.data(), q.data(), k.data(),
                             v.data(), sp, a.B, a.S, a.nh, a.nkv, a.hd);

  std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end()), dOf(dO.begin(), dO.end());
  std::vector<float> outf(a.q_size()), lsef(a.B * a.nh * a.S), dqf(a.q_size(), 0.f), dkf(a.kv_size(), 0.f),
      dvf(a.kv_size(), 0.f);
  FloatRun t;
  auto t0 = std::chrono::steady_clock::now();
  attention_forward<float>(outf.data(), lsef.data(), qf.data(), kf.data(), vf.data(), sp, a.B, a.S, a.nh, a.nkv, a.hd);
  auto t1 = std::chrono::steady_clock::now();
  attention_backward<float>(dqf.data(), dkf.data(), dvf.data(), dOf.data(), outf.data(), lsef.data(), qf.data(),
                            kf.data(), vf.data(), sp, a.B, a.S, a.nh, a.nkv, a.hd);
  auto t2 = std::chrono::steady_clock::now();
  t.seconds_forward = std::chrono::duration<double>(t1 - t0).count();
  t.seconds_backward = std::chrono::duration<double>(t2 - t1).count();

  auto as_double = [](const std::vector<float>& f) { return Vec(f.begin(), f.end()); };
  EXPECT_LE(rel_error(as_double(outf), out), 1e-5) << "out";
  EXPECT_LE(rel_error(as_double(lsef), lse), 1e-5) << "lse";
  EXPECT_LE(rel_error(as_double(dqf), dq), 1e-5) << "dq";
  EXPECT_LE(rel_error(as_double(dkf), dk), 1e-5) << "dk";
  EXPECT_LE(rel_error(as_double(dvf), dv), 1e-5) << "dv";
  return t;
}

}  // namespace

TEST(Attention, FloatMatchesDouble) {
  const Shape a{2, 64, 4, 2, 32};
  Seg seg(a.B * a.S);
  for (int64_t i = 0; i < a.B * a.S; ++i) seg[i] = int32_t((i % a.S) / 20);  // documents of 20 tokens
  compare_float_double(a, nullptr, 120);
  compare_float_double(a, &seg, 130);
}

// B=1, S=512, nh=8, nkv=2, hd=64 in float: prints the wall time (and checks against double).
TEST(Attention, TimingS512) {
  const Shape a{1, 512, 8, 2, 64};
  FloatRun t = compare_float_double(a, nullptr, 140);
  std::printf("[timing] attention float B=1 S=512 nh=8 nkv=2 hd=64: forward %.1f ms, backward %.1f ms, total %.1f ms\n",
              1e3 * t.seconds_forward, 1e3 * t.seconds_backward, 1e3 * (t.seconds_forward + t.seconds_backward));
  RecordProperty("attention_fwd_bwd_ms", int(1e3 * (t.seconds_forward + t.seconds_backward)));
}

// attention_kv_forward (decoding with a cache): queries at positions past..past+n-1 against the keys
// of positions 0..past+n-1 give the rows past..past+n-1 of the full causal attention over the first
// past+n tokens, checked against the explicit-matrix reference (and attention_forward) for prefill
// (past = 0), chunks and single decode steps, in MHA and GQA, float64 and float32.
TEST(AttentionKv, RowsEqualFullCausalAttention) {
  for (const Shape& full : {Shape{2, 11, 4, 2, 8}, Shape{1, 9, 3, 3, 5}, Shape{1, 6, 8, 1, 16}}) {
    const Vec q = random_vec(full.q_size(), 70), k = random_vec(full.kv_size(), 71), v = random_vec(full.kv_size(), 72);
    for (int64_t past = 0; past < full.S; past += 2)
      for (int64_t n : {int64_t(1), full.S - past}) {
        SCOPED_TRACE(::testing::Message() << "S=" << full.S << " nh=" << full.nh << " nkv=" << full.nkv
                                          << " past=" << past << " n=" << n);
        const Shape sub{full.B, past + n, full.nh, full.nkv, full.hd};  // the first past+n tokens
        auto rows = [&](const Vec& x, int64_t heads, int64_t from, int64_t to) {
          Vec r;
          for (int64_t b = 0; b < full.B; ++b)
            r.insert(r.end(), x.begin() + ((b * full.S + from) * heads) * full.hd,
                     x.begin() + ((b * full.S + to) * heads) * full.hd);
          return r;
        };
        const Vec qs = rows(q, full.nh, 0, past + n), ks = rows(k, full.nkv, 0, past + n),
                  vs = rows(v, full.nkv, 0, past + n);
        Vec ref_out, ref_lse, fwd_out, fwd_lse;
        naive_attention(ref_out, ref_lse, qs, ks, vs, nullptr, sub);
        forward(fwd_out, fwd_lse, qs, ks, vs, nullptr, sub);
        // expected: rows past..past+n-1 of each batch row (out (B,n,nh,hd), lse (B,nh,n))
        Vec want_out, want_lse, fwd_rows;
        for (int64_t b = 0; b < full.B; ++b) {
          const size_t rb = size_t((b * sub.S + past) * full.nh * full.hd), re = size_t((b * sub.S + past + n) * full.nh * full.hd);
          want_out.insert(want_out.end(), ref_out.begin() + rb, ref_out.begin() + re);
          fwd_rows.insert(fwd_rows.end(), fwd_out.begin() + rb, fwd_out.begin() + re);
          for (int64_t h = 0; h < full.nh; ++h)
            for (int64_t i = past; i < past + n; ++i) want_lse.push_back(ref_lse[size_t((b * full.nh + h) * sub.S + i)]);
        }
        const Vec qn = rows(q, full.nh, past, past + n);
        Vec out(want_out.size(), std::nan("")), lse(want_lse.size(), std::nan(""));
        attention_kv_forward<double>(out.data(), lse.data(), qn.data(), ks.data(), vs.data(), full.B, n, past, full.nh,
                                     full.nkv, full.hd);
        EXPECT_LE(rel_error(out, want_out), 1e-13) << "out vs reference";
        EXPECT_LE(rel_error(lse, want_lse), 1e-13) << "lse vs reference";
        EXPECT_LE(rel_error(out, fwd_rows), 1e-15) << "out vs attention_forward (same arithmetic)";

        std::vector<float> qf(qn.begin(), qn.end()), kf(ks.begin(), ks.end()), vf(vs.begin(), vs.end());
        std::vector<float> outf(out.size());
        attention_kv_forward<float>(outf.data(), nullptr, qf.data(), kf.data(), vf.data(), full.B, n, past, full.nh,
                                    full.nkv, full.hd);
        EXPECT_LE(rel_error(Vec(outf.begin(), outf.end()), want_out), 1e-6) << "float32";
      }
  }
}
