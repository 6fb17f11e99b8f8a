// The MoE MLP block (model/moe_mlp.h) in float64: forward against a naive per-token loop written here
// (loop tokens, loop its k experts, dense math with LoRA), backward by central differences for dx and
// every present expert LoRA A and B, with LoRA on all of gate/up/down and on subsets; cases with
// experts that receive no tokens, one expert taking every token, top-k = 1 and = E, a single token.
// Inputs are redrawn until every token's router probabilities are at least 1e-3 apart at the top-k
// boundary (and within the top-k), so no routing decision flips under the perturbation.
// Also: the load-balancing aux loss (model/moe_aux_loss.h) forward and its gradient through the router.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "grad_check.h"
#include "model/moe_aux_loss.h"
#include "model/moe_mlp.h"

using namespace qt;
using qt::testing::dot;
using qt::testing::expect_grad_close;
using qt::testing::minus;
using qt::testing::numeric_grad;
using qt::testing::random_vec;
using qt::testing::rel_error;
using Vec = std::vector<double>;

namespace {


// A tensor viewing a vector's memory: perturbing the vector perturbs the tensor.
Tensor view(Vec& v, const Shape& shape) {
  EXPECT_EQ(int64_t(v.size()), shape_numel(shape));
  return Tensor::view_of(v.data(), shape, DType::F64, nullptr);
}

constexpr LoraSlot kSlots[3] = {kLoraGate, kLoraUp, kLoraDown};

struct MoeCase {
  int64_t N = 6, H = 5, I = 4, E = 4, k = 2, r = 2;
  bool norm = true;
  std::array<bool, 3> lora_on = {true, true, true};  // gate, up, down
  double scale = 0.75;
  // Column 0 of x is set to 3 and column 0 of the router to `router_col0[e]` (0 elsewhere):
  // a per-expert logit offset that starves or favours experts.
  std::vector<double> router_col0;
  uint64_t seed = 1;
};

// Owns the float64 parameters (vectors) and tensor views of them.
struct MoeSetup {
  MoeCase c;
  Vec x, router, gate, up, down;
  std::array<Vec, 3> A, B;
  MlpWeights w;
  LayerLora lora;

  int64_t in_of(int s) const { return s == 2 ? c.I : c.H; }
  int64_t out_of(int s) const { return s == 2 ? c.H : c.I; }

  explicit MoeSetup(const MoeCase& mc, uint64_t seed) : c(mc) {
    const double ws = 1.0 / std::sqrt(double(c.H));
    x = random_vec(c.N * c.H, seed);
    router = random_vec(c.E * c.H, seed + 1, 1.0);
    gate = random_vec(c.E * c.I * c.H, seed + 2, 2 * ws);
    up = random_vec(c.E * c.I * c.H, seed + 3, 2 * ws);
    down = random_vec(c.E * c.H * c.I, seed + 4, 1.0 / std::sqrt(double(c.I)));
    if (!c.router_col0.empty()) {
      for (int64_t n = 0; n < c.N; ++n) x[n * c.H] = 3.0;
      for (int64_t e = 0; e < c.E; ++e) router[e * c.H] = c.router_col0[e];
    }
    w.router = view(router, {c.E, c.H});
    w.gate = view(gate, {c.E, c.I, c.H});
    w.up = view(up, {c.E, c.I, c.H});
    w.down = view(down, {c.E, c.H, c.I});
    for (int s = 0; s < 3; ++s) {
      if (!c.lora_on[s]) continue;
      A[s] = random_vec(c.E * c.r * in_of(s), seed + 10 + s, 0.5);
      B[s] = random_vec(c.E * out_of(s) * c.r, seed + 20 + s, 0.5);  // non-zero, so dA is non-zero
      lora.slot[kSlots[s]].A = view(A[s], {c.E, c.r, in_of(s)});
      lora.slot[kSlots[s]].B = view(B[s], {c.E, out_of(s), c.r});
    }
  }

  Vec forward(MoeMlpCache<double>& cache) const {
    Vec y(c.N * c.H, std::nan(""));  // forward must overwrite
    moe_mlp_forward<double>(y.data(), cache, x.data(), c.N, w, lora, c.scale, c.k, c.norm);
    return y;
  }
};

// Naive reference: per token, router logits and softmax, k times the largest remaining prob, then
// the dense expert math. Returns y and the logits.
Vec naive_moe(const MoeSetup& s, Vec* logits_out) {
  const MoeCase& c = s.c;
  Vec y(c.N * c.H, 0.0), logits(c.N * c.E);
  auto proj = [&](int slot, const Vec& W, int64_t e, const Vec& v) {  // W_e v + scale B_e A_e v
    const int64_t in = s.in_of(slot), out = s.out_of(slot);
    Vec o(out, 0.0);
    for (int64_t i = 0; i < out; ++i)
      for (int64_t j = 0; j < in; ++j) o[i] += W[(e * out + i) * in + j] * v[j];
    if (c.lora_on[slot]) {
      Vec t(c.r, 0.0);
      for (int64_t q = 0; q < c.r; ++q)
        for (int64_t j = 0; j < in; ++j) t[q] += s.A[slot][(e * c.r + q) * in + j] * v[j];
      for (int64_t i = 0; i < out; ++i)
        for (int64_t q = 0; q < c.r; ++q) o[i] += c.scale * s.B[slot][(e * out + i) * c.r + q] * t[q];
    }
    return o;
  };
  for (int64_t n = 0; n < c.N; ++n) {
    Vec xn(s.x.begin() + n * c.H, s.x.begin() + (n + 1) * c.H), p(c.E);
    double mx = -std::numeric_limits<double>::infinity(), z = 0;
    for (int64_t e = 0; e < c.E; ++e) {
      double l = 0;
      for (int64_t h = 0; h < c.H; ++h) l += s.router[e * c.H + h] * xn[h];
      logits[n * c.E + e] = l;
      mx = std::max(mx, l);
    }
    for (int64_t e = 0; e < c.E; ++e) z += std::exp(logits[n * c.E + e] - mx);
    for (int64_t e = 0; e < c.E; ++e) p[e] = std::exp(logits[n * c.E + e] - mx) / z;
    std::vector<int64_t> chosen;
    std::vector<bool> taken(c.E, false);
    double wsum = 0;
    for (int64_t j = 0; j < c.k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < c.E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = true;
      chosen.push_back(best);
      wsum += p[best];
    }
    for (int64_t e : chosen) {
      const double wt = c.norm ? p[e] / wsum : p[e];
      Vec g = proj(0, s.gate, e, xn), u = proj(1, s.up, e, xn), hh(c.I);
      for (int64_t i = 0; i < c.I; ++i) hh[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      Vec o = proj(2, s.down, e, hh);
      for (int64_t h = 0; h < c.H; ++h) y[n * c.H + h] += wt * o[h];
    }
  }
  if (logits_out) *logits_out = logits;
  return y;
}

// True when every token's probabilities are >= 1e-3 apart among its top k+1 (the k chosen and the
// first one left out), so a perturbation changes neither the selection nor its order.
bool routing_is_separated(const MoeMlpCache<double>& cache) {
  for (int64_t n = 0; n < cache.N; ++n) {
    Vec p(cache.probs.begin() + n * cache.E, cache.probs.begin() + (n + 1) * cache.E);
    std::sort(p.begin(), p.end(), std::greater<double>());
    for (int64_t j = 0; j < std::min(cache.k, cache.E - 1); ++j)
      if (p[j] - p[j + 1] < 1e-3) return false;
  }
  return true;
}

// Draws parameters (seed, seed + 1000, ...) until the routing is separated.
std::unique_ptr<MoeSetup> separated_setup(const MoeCase& c) {
  for (uint64_t attempt = 0; attempt < 200; ++attempt) {
    auto s = std::make_unique<MoeSetup>(c, c.seed + 1000 * attempt);
    MoeMlpCache<double> cache;
    s->forward(cache);
    if (routing_is_separated(cache)) return s;
  }
  ADD_FAILURE() << "no separated routing found";
  return nullptr;
}

// Forward against the naive loop, then dx and every present LoRA dA/dB against central differences.
// Returns the cache of the forward pass for case-specific checks.
MoeMlpCache<double> check_block(const MoeCase& c) {
  auto sp = separated_setup(c);
  if (!sp) return {};
  MoeSetup& s = *sp;
  MoeMlpCache<double> cache;
  Vec y = s.forward(cache);
  Vec ref_logits;
  Vec ref = naive_moe(s, &ref_logits);
  EXPECT_LE(rel_error(y, ref), 1e-12) << "forward";
  EXPECT_LE(rel_error(cache.router_logits, ref_logits), 1e-13) << "router logits";

  Vec R = random_vec(c.N * c.H, c.seed + 77);
  auto loss = [&] {
    MoeMlpCache<double> tmp;
    return dot(s.forward(tmp), R);
  };
  Vec num_x = numeric_grad(s.x, loss);
  std::array<Vec, 3> num_A, num_B;
  for (int sl = 0; sl < 3; ++sl)
    if (c.lora_on[sl]) {
      num_A[sl] = numeric_grad(s.A[sl], loss);
      num_B[sl] = numeric_grad(s.B[sl], loss);
    }

  // analytic, accumulated onto random buffers
  s.forward(cache);
  Vec dx0 = random_vec(c.N * c.H, c.seed + 78), dx = dx0;
  std::array<Vec, 3> dA0, dB0, dA, dB;
  LayerLora dlora;
  for (int sl = 0; sl < 3; ++sl)
    if (c.lora_on[sl]) {
      dA0[sl] = random_vec(s.A[sl].size(), c.seed + 80 + sl);
      dB0[sl] = random_vec(s.B[sl].size(), c.seed + 90 + sl);
      dA[sl] = dA0[sl];
      dB[sl] = dB0[sl];
      dlora.slot[kSlots[sl]].A = view(dA[sl], s.lora.slot[kSlots[sl]].A.shape());
      dlora.slot[kSlots[sl]].B = view(dB[sl], s.lora.slot[kSlots[sl]].B.shape());
    }
  moe_mlp_backward<double>(dx.data(), &dlora, R.data(), cache, s.w, s.lora, c.scale);
  expect_grad_close(minus(dx, dx0), num_x, "dx");
  const char* names[3] = {"gate", "up", "down"};
  for (int sl = 0; sl < 3; ++sl)
    if (c.lora_on[sl]) {
      expect_grad_close(minus(dA[sl], dA0[sl]), num_A[sl], (std::string("dA ") + names[sl]).c_str());
      expect_grad_close(minus(dB[sl], dB0[sl]), num_B[sl], (std::string("dB ") + names[sl]).c_str());
    }

  // null outputs are skipped and do not change the others
  Vec dx_only = dx0;
  moe_mlp_backward<double>(dx_only.data(), nullptr, R.data(), cache, s.w, s.lora, c.scale);
  EXPECT_LE(rel_error(dx_only, dx), 1e-15);
  std::array<Vec, 3> dA2 = dA0, dB2 = dB0;
  LayerLora dlora2;
  for (int sl = 0; sl < 3; ++sl)
    if (c.lora_on[sl]) {
      dlora2.slot[kSlots[sl]].A = view(dA2[sl], s.lora.slot[kSlots[sl]].A.shape());
      dlora2.slot[kSlots[sl]].B = view(dB2[sl], s.lora.slot[kSlots[sl]].B.shape());
    }
  moe_mlp_backward<double>(nullptr, &dlora2, R.data(), cache, s.w, s.lora, c.scale);
  for (int sl = 0; sl < 3; ++sl)
    if (c.lora_on[sl]) {
      EXPECT_LE(rel_error(dA2[sl], dA[sl]), 1e-15) << names[sl];
      EXPECT_LE(rel_error(dB2[sl], dB[sl]), 1e-15) << names[sl];
    }
  return cache;
}

}  // namespace

// ---- forward + gradient cases ---------------------------------------------------------------

TEST(MoeMlp, AllLoraSlotsTop2Norm) { check_block(MoeCase{}); }

TEST(MoeMlp, LoraOnGateAndDownNoNorm) {
  MoeCase c;
  c.lora_on = {true, false, true};
  c.norm = false;
  c.seed = 2;
  check_block(c);
}

TEST(MoeMlp, LoraOnUpOnlyTop3) {
  MoeCase c;
  c.lora_on = {false, true, false};
  c.E = 5, c.k = 3, c.seed = 3;
  check_block(c);
}

TEST(MoeMlp, NoLora) {
  MoeCase c;
  c.lora_on = {false, false, false};
  c.seed = 4;
  check_block(c);
}

TEST(MoeMlp, ExpertsWithoutTokens) {
  for (bool norm : {true, false}) {
    MoeCase c;
    c.E = 6, c.k = 2, c.norm = norm, c.seed = 5;
    c.router_col0 = {0, -4, 0, 0, -4, 0};  // logits of experts 1 and 4 pushed down by 12
    MoeMlpCache<double> cache = check_block(c);
    ASSERT_EQ(cache.offsets.size(), 7u);
    EXPECT_EQ(cache.tokens_of_expert(1), 0);
    EXPECT_EQ(cache.tokens_of_expert(4), 0);
  }
}

TEST(MoeMlp, OneExpertTakesEveryToken) {
  for (bool norm : {false, true}) {
    MoeCase c;
    c.E = 4, c.k = 1, c.norm = norm, c.seed = 6;
    c.router_col0 = {0, 0, 4, 0};  // expert 2's logit pushed up by 12
    MoeMlpCache<double> cache = check_block(c);
    ASSERT_EQ(cache.offsets.size(), 5u);
    EXPECT_EQ(cache.tokens_of_expert(2), c.N);
  }
}

TEST(MoeMlp, TopkEqualsNumExperts) {
  for (bool norm : {true, false}) {
    MoeCase c;
    c.E = 4, c.k = 4, c.norm = norm, c.seed = 7;
    check_block(c);
  }
}

TEST(MoeMlp, Top1) {
  for (bool norm : {false, true}) {
    MoeCase c;
    c.k = 1, c.norm = norm, c.seed = 8;
    check_block(c);
  }
}

TEST(MoeMlp, SingleToken) {
  MoeCase c;
  c.N = 1, c.seed = 9;
  check_block(c);
  c.k = 1;
  check_block(c);
}

TEST(MoeMlp, MoreTokensAndExperts) {
  MoeCase c;
  c.N = 12, c.E = 8, c.k = 3, c.r = 3, c.H = 6, c.I = 5, c.seed = 10;
  check_block(c);
}

TEST(MoeMlp, ZeroTokens) {
  MoeCase c;
  c.N = 0;
  MoeSetup s(c, 11);
  MoeMlpCache<double> cache;
  Vec y = s.forward(cache);
  EXPECT_TRUE(y.empty());
  for (int64_t e = 0; e < c.E; ++e) EXPECT_EQ(cache.tokens_of_expert(e), 0);
  moe_mlp_backward<double>(nullptr, nullptr, nullptr, cache, s.w, s.lora, c.scale);
}

// An extra gradient on the router logits (from an aux loss) reaches dx through the router.
TEST(MoeMlp, ExtraRouterLogitGradient) {
  MoeCase c;
  c.seed = 12;
  auto sp = separated_setup(c);
  ASSERT_TRUE(sp);
  MoeSetup& s = *sp;
  Vec R = random_vec(c.N * c.H, 13), R2 = random_vec(c.N * c.E, 14);
  auto loss = [&] {
    MoeMlpCache<double> tmp;
    Vec y = s.forward(tmp);
    return dot(y, R) + dot(tmp.router_logits, R2);
  };
  Vec num = numeric_grad(s.x, loss);
  MoeMlpCache<double> cache;
  s.forward(cache);
  Vec dx(c.N * c.H, 0.0);
  moe_mlp_backward<double>(dx.data(), nullptr, R.data(), cache, s.w, s.lora, c.scale, R2.data());
  expect_grad_close(dx, num, "dx with router-logit gradient");
}

TEST(MoeMlp, FloatFollowsDouble) {
  MoeCase c;
  c.N = 10, c.E = 6, c.k = 2, c.seed = 15;
  auto sp = separated_setup(c);
  ASSERT_TRUE(sp);
  MoeSetup& s = *sp;
  MoeMlpCache<double> cd;
  Vec y = s.forward(cd);
  Vec R = random_vec(c.N * c.H, 16), dx(c.N * c.H, 0.0);
  moe_mlp_backward<double>(dx.data(), nullptr, R.data(), cd, s.w, s.lora, c.scale);

  MlpWeights wf{s.w.gate.to(DType::F32), s.w.up.to(DType::F32), s.w.down.to(DType::F32), s.w.router.to(DType::F32)};
  LayerLora lf;
  for (LoraSlot sl : kSlots) lf.slot[sl] = {s.lora.slot[sl].A.to(DType::F32), s.lora.slot[sl].B.to(DType::F32)};
  std::vector<float> xf(s.x.begin(), s.x.end()), yf(c.N * c.H), Rf(R.begin(), R.end()), dxf(c.N * c.H, 0.f);
  MoeMlpCache<float> cf;
  moe_mlp_forward<float>(yf.data(), cf, xf.data(), c.N, wf, lf, float(c.scale), c.k, c.norm);
  moe_mlp_backward<float>(dxf.data(), nullptr, Rf.data(), cf, wf, lf, float(c.scale));
  EXPECT_EQ(cf.topk_idx, cd.topk_idx);
  EXPECT_LE(rel_error(Vec(yf.begin(), yf.end()), y), 1e-5);
  EXPECT_LE(rel_error(Vec(dxf.begin(), dxf.end()), dx), 1e-5);
}

// ---- input validation -----------------------------------------------------------------------

TEST(MoeMlp, RejectsBadInputs) {
  MoeCase c;
  MoeSetup s(c, 17);
  MoeMlpCache<double> cache;
  Vec y(c.N * c.H);
  auto fwd = [&](const MlpWeights& w, const LayerLora& l, int64_t k) {
    moe_mlp_forward<double>(y.data(), cache, s.x.data(), c.N, w, l, c.scale, k, c.norm);
  };
  EXPECT_THROW(fwd(s.w, s.lora, 0), qt::Error);
  EXPECT_THROW(fwd(s.w, s.lora, c.E + 1), qt::Error);
  MlpWeights bad = s.w;
  bad.down = bad.down.reshape({c.E, c.I, c.H});
  EXPECT_THROW(fwd(bad, s.lora, c.k), qt::Error);
  bad = s.w;
  bad.router = Tensor();
  EXPECT_THROW(fwd(bad, s.lora, c.k), qt::Error);
  MlpWeights as_float{s.w.gate.to(DType::F32), s.w.up, s.w.down, s.w.router};
  EXPECT_THROW(fwd(as_float, s.lora, c.k), qt::Error);
  LayerLora bad_lora = s.lora;
  bad_lora.slot[kLoraUp].B = bad_lora.slot[kLoraUp].B.reshape({c.E, c.r, c.I});
  EXPECT_THROW(fwd(s.w, bad_lora, c.k), qt::Error);
  try {
    fwd(s.w, bad_lora, c.k);
  } catch (const qt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("[moe_mlp]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("up_proj lora_B"), std::string::npos) << e.what();
  }

  // backward: a gradient adapter missing a slot the adapter has
  fwd(s.w, s.lora, c.k);
  LayerLora dl;
  Vec dy(c.N * c.H, 1.0), dx(c.N * c.H, 0.0);
  EXPECT_THROW(moe_mlp_backward<double>(dx.data(), &dl, dy.data(), cache, s.w, s.lora, c.scale), qt::Error);
  // backward with another adapter than the forward's
  LayerLora no_lora;
  EXPECT_THROW(moe_mlp_backward<double>(dx.data(), nullptr, dy.data(), cache, s.w, no_lora, c.scale), qt::Error);
}

// ---- load-balancing aux loss ----------------------------------------------------------------

TEST(MoeAuxLoss, MatchesTheFormulaAndItsGradientThroughTheRouter) {
  MoeCase c1, c2;
  c1.N = c2.N = 7;
  c1.E = c2.E = 5;
  c1.k = c2.k = 2;
  c1.seed = 20, c2.seed = 21;
  c2.lora_on = {false, false, false};
  auto s1 = separated_setup(c1), s2 = separated_setup(c2);
  ASSERT_TRUE(s1 && s2);
  const int64_t N = c1.N, E = c1.E, k = c1.k;
  const double coef = 0.37;

  // forward against the formula, from naive logits
  MoeMlpCache<double> k1, k2;
  s1->forward(k1);
  s2->forward(k2);
  Vec l1, l2;
  naive_moe(*s1, &l1);
  naive_moe(*s2, &l2);
  Vec f(E, 0.0), P(E, 0.0);
  for (const Vec* l : {&l1, &l2})
    for (int64_t n = 0; n < N; ++n) {
      Vec p(E);
      double z = 0;
      for (int64_t e = 0; e < E; ++e) z += std::exp((*l)[n * E + e]);
      for (int64_t e = 0; e < E; ++e) p[e] = std::exp((*l)[n * E + e]) / z;
      for (int64_t e = 0; e < E; ++e) P[e] += p[e] / double(2 * N);
      std::vector<bool> taken(E, false);
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        taken[best] = true;
        f[best] += 1.0 / double(2 * N);
      }
    }
  const double ref = double(E) * dot(f, P);
  EXPECT_NEAR(moe_load_balancing_loss<double>({&k1, &k2}), ref, 1e-14 * ref);

  // gradient w.r.t. each layer's input x, through router logits -> moe_mlp_backward
  auto loss = [&] {
    MoeMlpCache<double> a, b;
    s1->forward(a);
    s2->forward(b);
    return coef * moe_load_balancing_loss<double>({&a, &b});
  };
  Vec num1 = numeric_grad(s1->x, loss), num2 = numeric_grad(s2->x, loss);
  s1->forward(k1);
  s2->forward(k2);
  Vec dl1(N * E, 0.0), dl2 = random_vec(N * E, 22), dl2_0 = dl2;
  moe_load_balancing_loss_backward<double>({dl1.data(), dl2.data()}, {&k1, &k2}, coef);
  dl2 = minus(dl2, dl2_0);  // accumulated onto the random values
  Vec zero(N * c1.H, 0.0), dx1(N * c1.H, 0.0), dx2(N * c1.H, 0.0);
  moe_mlp_backward<double>(dx1.data(), nullptr, zero.data(), k1, s1->w, s1->lora, c1.scale, dl1.data());
  moe_mlp_backward<double>(dx2.data(), nullptr, zero.data(), k2, s2->w, s2->lora, c2.scale, dl2.data());
  expect_grad_close(dx1, num1, "aux dx layer 1");
  expect_grad_close(dx2, num2, "aux dx layer 2");

  // layers of different shapes are rejected
  MoeCase c3 = c1;
  c3.k = 1;
  MoeSetup s3(c3, 23);
  MoeMlpCache<double> k3;
  s3.forward(k3);
  EXPECT_THROW(moe_load_balancing_loss<double>({&k1, &k3}), qt::Error);
  EXPECT_EQ(moe_load_balancing_loss<double>({}), 0.0);
}
