// AdamW, gradient norm and clipping against a reference written here from torch's documented
// formulas (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_), straightforwardly in double.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <random>

#include "train/optimizer.h"

using namespace qt;

namespace {

// A small adapter: layer 0 has q_proj (dense), layer 1 has gate_proj as fused experts (3-D) and
// down_proj (dense); other slots absent.
LoraAdapter make_adapter(DType dtype, uint64_t seed) {
  LoraAdapter a;
  a.layers.resize(2);
  auto fill = [&](const Shape& shape, uint64_t salt) {
    std::mt19937_64 rng(seed * 1000 + salt);
    std::vector<double> v(size_t(shape_numel(shape)));
    for (double& x : v) x = double(rng() >> 11) * 0x1.0p-53 * 2.0 - 1.0;  // [-1, 1)
    return Tensor::from_vector(v, shape).to(dtype);
  };
  a.layers[0].slot[kLoraQ] = {fill({2, 5}, 1), fill({3, 2}, 2)};
  a.layers[1].slot[kLoraGate] = {fill({2, 2, 5}, 3), fill({2, 4, 2}, 4)};
  a.layers[1].slot[kLoraDown] = {fill({2, 4}, 5), fill({5, 2}, 6)};
  return a;
}

// All present tensors as double vectors, in the optimizer's order (layer, slot, A then B).
std::vector<std::vector<double>> flatten(const LoraAdapter& a) {
  std::vector<std::vector<double>> out;
  for (const LayerLora& l : a.layers)
    for (const LoraPair& p : l.slot)
      if (p.present())
        for (const Tensor* t : {&p.A, &p.B}) {
          Tensor d = t->to(DType::F64);
          out.emplace_back(d.data<double>(), d.data<double>() + d.numel());
        }
  return out;
}

// Straightforward double reference of torch's AdamW, with optional clip_grad_norm_ before each step.
struct RefAdamW {
  double b1, b2, eps, wd;
  std::vector<std::vector<double>> p, m, v;
  int t = 0;
  void step(std::vector<std::vector<double>> g, double lr, double max_norm) {
    if (max_norm > 0) {
      double sq = 0;
      for (auto& x : g)
        for (double e : x) sq += e * e;
      const double norm = std::sqrt(sq);
      double coef = max_norm / (norm + 1e-6);
      if (coef > 1.0) coef = 1.0;
      for (auto& x : g)
        for (double& e : x) e *= coef;
    }
    ++t;
    for (size_t k = 0; k < p.size(); ++k)
      for (size_t i = 0; i < p[k].size(); ++i) {
        p[k][i] = p[k][i] * (1.0 - lr * wd);
        m[k][i] = b1 * m[k][i] + (1.0 - b1) * g[k][i];
        v[k][i] = b2 * v[k][i] + (1.0 - b2) * g[k][i] * g[k][i];
        const double mhat = m[k][i] / (1.0 - std::pow(b1, t));
        const double vhat_sqrt = std::sqrt(v[k][i]) / std::sqrt(1.0 - std::pow(b2, t));
        p[k][i] = p[k][i] - lr * mhat / (vhat_sqrt + eps);
      }
  }
};

RefAdamW make_ref(const LoraAdapter& params, const AdamWConfig& c) {
  RefAdamW r{c.beta1, c.beta2, c.eps, c.weight_decay, flatten(params), {}, {}};
  for (auto& x : r.p) {
    r.m.emplace_back(x.size(), 0.0);
    r.v.emplace_back(x.size(), 0.0);
  }
  return r;
}

double max_abs_diff(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    EXPECT_EQ(a[k].size(), b[k].size());
    for (size_t i = 0; i < a[k].size(); ++i) d = std::max(d, std::abs(a[k][i] - b[k][i]));
  }
  return d;
}

// Runs `steps` updates of engine and reference with fresh gradients per step (some scaled large so
// clipping engages), a varying lr and weight decay; returns the max |param difference|.
double run_against_reference(DType dtype, double max_norm, int steps) {
  AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  LoraAdapter params = make_adapter(dtype, 7);
  AdamW opt(params, cfg);
  RefAdamW ref = make_ref(params, cfg);
  for (int s = 0; s < steps; ++s) {
    LoraAdapter grads = make_adapter(dtype, 100 + uint64_t(s));
    if (s % 2 == 1)  // alternate big and small gradients: clipping on some steps only
      for (LayerLora& l : grads.layers)
        for (LoraPair& p : l.slot)
          if (p.present())
            for (Tensor* t : {&p.A, &p.B}) {
              Tensor d = t->to(DType::F64);
              for (int64_t i = 0; i < d.numel(); ++i) d.data<double>()[i] *= 3.0;
              *t = d.to(dtype);
            }
    const double lr = 0.01 * (1.0 + 0.5 * s);
    std::vector<std::vector<double>> g = flatten(grads);  // exactly the values the engine sees
    if (max_norm > 0) clip_grad_norm(grads, max_norm);
    opt.step(params, grads, lr);
    ref.step(g, lr, max_norm);
  }
  EXPECT_EQ(opt.step_count(), steps);
  return max_abs_diff(flatten(params), ref.p);
}

}  // namespace

TEST(AdamW, MatchesReferenceF64) {
  EXPECT_LT(run_against_reference(DType::F64, 0.0, 6), 1e-13);
}

TEST(AdamW, MatchesReferenceF64WithClipping) {
  EXPECT_LT(run_against_reference(DType::F64, 1.5, 6), 1e-13);
}

TEST(AdamW, MatchesReferenceF32WithClipping) {
  // Parameters (|p| < 1.1) and states are rounded to f32 after every step: a few ulps of drift.
  EXPECT_LT(run_against_reference(DType::F32, 1.5, 6), 1e-6);
}

TEST(AdamW, FirstStepMovesByLrTimesSign) {
  // With bias correction, step 1 is lr * g / (|g| + eps) ~ lr * sign(g) (without it, 3.16 * lr).
  AdamWConfig cfg;
  cfg.weight_decay = 0.0;
  LoraAdapter params = make_adapter(DType::F64, 1);
  const auto before = flatten(params);
  LoraAdapter grads = make_adapter(DType::F64, 2);
  const auto g = flatten(grads);
  AdamW opt(params, cfg);
  opt.step(params, grads, 0.001);
  const auto after = flatten(params);
  for (size_t k = 0; k < g.size(); ++k)
    for (size_t i = 0; i < g[k].size(); ++i) {
      const double expect = -0.001 * (g[k][i] > 0 ? 1.0 : -1.0);
      // eps makes the step lr * |g| / (|g| + eps): off by at most lr * eps / |g|.
      EXPECT_NEAR(after[k][i] - before[k][i], expect, 0.001 * 1e-8 / std::abs(g[k][i]) + 1e-15) << k << "," << i;
    }
}

TEST(AdamW, ZeroGradientOnlyDecays) {
  AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  LoraAdapter params = make_adapter(DType::F64, 3);
  const auto p0 = flatten(params);
  LoraAdapter grads = params.zeros_like();
  AdamW opt(params, cfg);
  for (int s = 0; s < 3; ++s) opt.step(params, grads, 0.5);
  const auto p3 = flatten(params);
  for (size_t k = 0; k < p0.size(); ++k)
    for (size_t i = 0; i < p0[k].size(); ++i) EXPECT_NEAR(p3[k][i], p0[k][i] * 0.95 * 0.95 * 0.95, 1e-15);
}

TEST(AdamW, DeterministicAndThreadIndependent) {
  auto run = [](int threads) {
    omp_set_num_threads(threads);
    LoraAdapter params = make_adapter(DType::F32, 5);
    AdamW opt(params, AdamWConfig{});
    for (int s = 0; s < 3; ++s) {
      LoraAdapter grads = make_adapter(DType::F32, 50 + uint64_t(s));
      clip_grad_norm(grads, 0.7);
      opt.step(params, grads, 0.02);
    }
    return flatten(params);
  };
  const int saved = omp_get_max_threads();
  const auto a = run(1), b = run(2), c = run(2);
  omp_set_num_threads(saved);
  EXPECT_EQ(a, b);
  EXPECT_EQ(b, c);
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  LoraAdapter pa = make_adapter(DType::F32, 9);
  AdamW a(pa, AdamWConfig{});
  for (int s = 0; s < 2; ++s) a.step(pa, make_adapter(DType::F32, 200 + uint64_t(s)), 0.01);
  const OptimizerState st = a.state();
  EXPECT_EQ(st.step, 2);
  ASSERT_EQ(st.tensors.size(), 12u);  // 3 slots x (A, B) x (exp_avg, exp_avg_sq)
  bool found = false;
  for (const auto& [name, t] : st.tensors)
    if (name == "layers.1.mlp.gate_proj.lora_A.exp_avg") {
      found = true;
      EXPECT_EQ(t.shape(), (Shape{2, 2, 5}));
      EXPECT_EQ(t.dtype(), DType::F32);
    }
  EXPECT_TRUE(found);

  LoraAdapter pb = make_adapter(DType::F32, 0);
  for (size_t l = 0; l < pa.layers.size(); ++l)
    for (size_t s = 0; s < size_t(kNumLoraSlots); ++s)
      if (pa.layers[l].slot[s].present()) pb.layers[l].slot[s] = {pa.layers[l].slot[s].A.clone(), pa.layers[l].slot[s].B.clone()};
  AdamW b(pb, AdamWConfig{});
  b.load_state(st, "ckpt");
  EXPECT_EQ(b.step_count(), 2);
  for (int s = 2; s < 5; ++s) {
    LoraAdapter g = make_adapter(DType::F32, 200 + uint64_t(s));
    a.step(pa, g, 0.01);
    b.step(pb, g, 0.01);
  }
  EXPECT_EQ(flatten(pa), flatten(pb));
}

TEST(AdamW, LoadStateRejectsBadCheckpoints) {
  LoraAdapter p = make_adapter(DType::F32, 9);
  AdamW opt(p, AdamWConfig{});
  const OptimizerState good = opt.state();
  auto expect_fail = [&](OptimizerState st, const char* needle) {
    try {
      opt.load_state(st, "ckpt.safetensors");
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  OptimizerState missing = good;
  missing.tensors.pop_back();
  expect_fail(missing, "missing optimizer state");
  OptimizerState extra = good;
  extra.tensors.emplace_back("layers.0.self_attn.k_proj.lora_A.exp_avg", Tensor::zeros({2, 5}, DType::F32));
  expect_fail(extra, "unexpected optimizer state");
  OptimizerState shape = good;
  shape.tensors[0].second = Tensor::zeros({5, 2}, DType::F32);
  expect_fail(shape, "has shape");
  OptimizerState dtype = good;
  dtype.tensors[0].second = Tensor::zeros(good.tensors[0].second.shape(), DType::I32);
  expect_fail(dtype, "float type");
  OptimizerState dup = good;
  dup.tensors.push_back(good.tensors[0]);
  expect_fail(dup, "twice");
  OptimizerState neg = good;
  neg.step = -1;
  expect_fail(neg, "negative");
  EXPECT_EQ(opt.step_count(), 0);  // nothing was changed by the failed loads
  // A state in another float dtype is converted.
  OptimizerState f64 = good;
  for (auto& [n, t] : f64.tensors) t = t.to(DType::F64);
  f64.step = 4;
  opt.load_state(f64, "ckpt");
  EXPECT_EQ(opt.step_count(), 4);
}

TEST(AdamW, RejectsBadHyperparameters) {
  LoraAdapter p = make_adapter(DType::F32, 1);
  AdamWConfig c;
  c.beta1 = 1.0;
  EXPECT_THROW(AdamW(p, c), Error);
  c = AdamWConfig{};
  c.beta2 = -0.1;
  EXPECT_THROW(AdamW(p, c), Error);
  c = AdamWConfig{};
  c.eps = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(AdamW(p, c), Error);
  c = AdamWConfig{};
  c.weight_decay = -1;
  EXPECT_THROW(AdamW(p, c), Error);
}

TEST(GradClip, NormAndClipAsTorch) {
  LoraAdapter g = make_adapter(DType::F32, 1).zeros_like();
  g.layers[0].slot[kLoraQ].A.data<float>()[3] = 3.0f;
  g.layers[1].slot[kLoraGate].B.data<float>()[7] = -4.0f;
  EXPECT_EQ(grad_global_norm(g), 5.0);
  // max_norm above the norm: coefficient clamps to 1, gradients unchanged.
  EXPECT_EQ(clip_grad_norm(g, 10.0), 5.0);
  EXPECT_EQ(g.layers[0].slot[kLoraQ].A.data<float>()[3], 3.0f);
  // max_norm 1: scaled by 1 / (5 + 1e-6).
  EXPECT_EQ(clip_grad_norm(g, 1.0), 5.0);
  const float coef = float(1.0 / (5.0 + 1e-6));
  EXPECT_EQ(g.layers[0].slot[kLoraQ].A.data<float>()[3], 3.0f * coef);
  EXPECT_EQ(g.layers[1].slot[kLoraGate].B.data<float>()[7], -4.0f * coef);
  EXPECT_NEAR(grad_global_norm(g), 1.0, 1e-6);
}

TEST(GradClip, NormIsThreadIndependentOnLargeTensors) {
  LoraAdapter g;
  g.layers.resize(1);
  std::vector<double> a(300001), b(70000);
  std::mt19937_64 rng(3);
  for (double& x : a) x = double(rng() >> 11) * 0x1.0p-53 - 0.5;
  for (double& x : b) x = double(rng() >> 11) * 0x1.0p-50;
  g.layers[0].slot[kLoraV] = {Tensor::from_vector(a, {300001}).to(DType::F32), Tensor::from_vector(b, {70000}).to(DType::F32)};
  double sq = 0;  // plain serial sum of the f32 values
  for (const Tensor* t : {&g.layers[0].slot[kLoraV].A, &g.layers[0].slot[kLoraV].B})
    for (int64_t i = 0; i < t->numel(); ++i) sq += double(t->data<float>()[i]) * double(t->data<float>()[i]);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double n1 = grad_global_norm(g);
  omp_set_num_threads(2);
  const double n2 = grad_global_norm(g);
  omp_set_num_threads(saved);
  EXPECT_EQ(n1, n2);
  EXPECT_NEAR(n1, std::sqrt(sq), 1e-12 * std::sqrt(sq));
}

TEST(GradClip, NonFiniteGradientsAreReported) {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                     -std::numeric_limits<double>::infinity()}) {
    LoraAdapter g = make_adapter(DType::F32, 4);
    EXPECT_TRUE(grads_all_finite(g));
    g.layers[1].slot[kLoraDown].B.data<float>()[9] = float(bad);
    const float kept = g.layers[0].slot[kLoraQ].A.data<float>()[0];
    EXPECT_FALSE(grads_all_finite(g));
    EXPECT_FALSE(std::isfinite(grad_global_norm(g)));
    EXPECT_FALSE(std::isfinite(clip_grad_norm(g, 1.0)));
    EXPECT_EQ(g.layers[0].slot[kLoraQ].A.data<float>()[0], kept);  // untouched
  }
  LoraAdapter g64 = make_adapter(DType::F64, 4);
  EXPECT_TRUE(grads_all_finite(g64));
  g64.layers[0].slot[kLoraQ].B.data<double>()[0] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(grads_all_finite(g64));
}

TEST(AdamW, MatchesTorchGolden) {
  // Printed by torch 2.11.0 (H100 machine) for this exact loop in float64:
  //   p = Parameter(data(0.3)); opt = AdamW([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8,
  //   weight_decay=0.1, foreach=False); for t in 1..6: p.grad = data(t) * (3.0 if t even else 0.2);
  //   clip_grad_norm_([p], 1.5); lr = 0.01 * (1 + 0.5 (t-1)); opt.step()
  // with data(seed)[i] = sin(1.7 i + seed) * (1 + i % 3), i < 12.
  const std::vector<double> torch_result = {
      0.25386992205855413, 1.8317018913378023,  -1.5385506347711746, -0.8049627744196112,
      1.4176437088609002,  1.7923905813335324,  -0.8575182272901647, -0.7631163043173212,
      2.8789342489852467,  0.15586473219201477, -1.9894254556889848, 0.40145286516455797};
  auto data = [](double seed) {
    std::vector<double> v(12);
    for (int i = 0; i < 12; ++i) v[size_t(i)] = std::sin(1.7 * i + seed) * (1 + i % 3);
    return v;
  };
  AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  LoraAdapter params;
  params.layers.resize(1);
  params.layers[0].slot[kLoraQ] = {Tensor::from_vector(data(0.3), {2, 6}), Tensor::zeros({3, 2}, DType::F64)};
  AdamW opt(params, cfg);
  for (int t = 1; t <= 6; ++t) {
    LoraAdapter grads = params.zeros_like();  // B's gradient stays 0: adds nothing to the norm
    std::vector<double> g = data(t);
    for (double& x : g) x *= (t % 2 == 0 ? 3.0 : 0.2);
    grads.layers[0].slot[kLoraQ].A = Tensor::from_vector(g, {2, 6});
    clip_grad_norm(grads, 1.5);
    opt.step(params, grads, 0.01 * (1 + 0.5 * (t - 1)));
  }
  const double* p = params.layers[0].slot[kLoraQ].A.data<double>();
  for (size_t i = 0; i < 12; ++i) EXPECT_NEAR(p[i], torch_result[i], 1e-13 * std::abs(torch_result[i])) << i;
}
