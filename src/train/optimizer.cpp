// AdamW, gradient norm and clipping over LoRA adapters; formulas in optimizer.h.
#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <map>

namespace qt {

namespace {

// "layers.L.self_attn.q_proj.lora_A" (relative to the PEFT prefix base_model.model.model.).
std::string param_name(size_t layer, int slot, bool is_b) {
  return fmt::format("layers.{}.{}.{}.lora_{}", layer, slot <= kLoraO ? "self_attn" : "mlp",
                     lora_slot_module(LoraSlot(slot)), is_b ? 'B' : 'A');
}

Tensor& pick(LoraAdapter& a, size_t layer, int slot, bool is_b) {
  LoraPair& p = a.layers[layer].slot[size_t(slot)];
  return is_b ? p.B : p.A;
}
const Tensor& pick(const LoraAdapter& a, size_t layer, int slot, bool is_b) {
  const LoraPair& p = a.layers[layer].slot[size_t(slot)];
  return is_b ? p.B : p.A;
}

// Calls fn(tensor) for every present tensor in a fixed order (layer, slot, A before B); `a` may be
// const or mutable.
template <typename Adapter, typename Fn>
void for_each_present(Adapter& a, Fn&& fn) {
  for (auto& layer : a.layers)
    for (auto& p : layer.slot)
      if (p.present()) {
        fn(p.A);
        fn(p.B);
      }
}

bool is_f32_or_f64(DType t) { return t == DType::F32 || t == DType::F64; }

template <typename P, typename S>
void adamw_update(P* p, const P* g, S* m, S* v, int64_t n, double decay_mul, double b1, double b2,
                  double step_size, double bc2_sqrt, double eps) {
#pragma omp parallel for schedule(static) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    const double gi = double(g[i]);
    const double mi = b1 * double(m[i]) + (1.0 - b1) * gi;
    const double vi = b2 * double(v[i]) + (1.0 - b2) * gi * gi;
    const double denom = std::sqrt(vi) / bc2_sqrt + eps;
    p[i] = P(double(p[i]) * decay_mul - step_size * mi / denom);
    m[i] = S(mi);
    v[i] = S(vi);
  }
}

// Sum of squares of n values, in double, as fixed blocks summed in order (deterministic).
template <typename T>
double sum_squares(const T* x, int64_t n) {
  constexpr int64_t kBlock = 8192;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(size_t(blocks), 0.0);
#pragma omp parallel for schedule(static) if (blocks > 4)
  for (int64_t b = 0; b < blocks; ++b) {
    double s = 0.0;
    const int64_t end = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) s += double(x[i]) * double(x[i]);
    partial[size_t(b)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

template <typename T>
bool all_finite(const T* x, int64_t n) {
  bool ok = true;
#pragma omp parallel for schedule(static) reduction(&& : ok) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) ok = ok && std::isfinite(x[i]);
  return ok;
}

}  // namespace

void AdamWConfig::validate() const {
  auto check = [](const char* what, double x, bool ok) {
    if (!ok || !std::isfinite(x)) fail("optimizer", "{} out of range: {}", what, x);
  };
  check("beta1 (must be in [0, 1))", beta1, beta1 >= 0.0 && beta1 < 1.0);
  check("beta2 (must be in [0, 1))", beta2, beta2 >= 0.0 && beta2 < 1.0);
  check("eps (must be >= 0)", eps, eps >= 0.0);
  check("weight_decay (must be >= 0)", weight_decay, weight_decay >= 0.0);
}

AdamW::AdamW(const LoraAdapter& params, const AdamWConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  for (size_t l = 0; l < params.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      if (!params.layers[l].slot[size_t(s)].present()) continue;
      for (bool is_b : {false, true}) {
        const Tensor& p = pick(params, l, s, is_b);
        QT_ASSERT(p.defined(), "{}: missing tensor", param_name(l, s, is_b));
        QT_ASSERT(is_f32_or_f64(p.dtype()), "AdamW: {} is {}, expected F32 or F64", param_name(l, s, is_b),
                  dtype_name(p.dtype()));
        const DType state_dtype = p.dtype() == DType::F64 ? DType::F64 : DType::F32;
        slots_.push_back(Slot{param_name(l, s, is_b), l, s, is_b, Tensor::zeros(p.shape(), state_dtype),
                              Tensor::zeros(p.shape(), state_dtype)});
      }
    }
}

void AdamW::step(LoraAdapter& params, const LoraAdapter& grads, double lr) {
  QT_ASSERT(std::isfinite(lr) && lr >= 0.0, "AdamW: bad learning rate {}", lr);
  QT_ASSERT(params.layers.size() == grads.layers.size(), "AdamW: params have {} layers, grads {}",
            params.layers.size(), grads.layers.size());
  ++step_;
  const double t = double(step_);
  const double bias_correction1 = 1.0 - std::pow(cfg_.beta1, t);
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(cfg_.beta2, t));
  const double step_size = lr / bias_correction1;
  const double decay_mul = 1.0 - lr * cfg_.weight_decay;
  for (Slot& sl : slots_) {
    Tensor& p = pick(params, sl.layer, sl.slot, sl.is_b);
    const Tensor& g = pick(grads, sl.layer, sl.slot, sl.is_b);
    QT_ASSERT(p.defined() && g.defined() && p.shape() == sl.exp_avg.shape() && g.shape() == p.shape() &&
                  g.dtype() == p.dtype(),
              "AdamW: {} param {} {} / grad {} {} / state {}", sl.name, shape_str(p.shape()), dtype_name(p.dtype()),
              shape_str(g.shape()), dtype_name(g.dtype()), shape_str(sl.exp_avg.shape()));
    const int64_t n = p.numel();
    if (p.dtype() == DType::F64)
      adamw_update(p.data<double>(), g.data<double>(), sl.exp_avg.data<double>(), sl.exp_avg_sq.data<double>(), n,
                   decay_mul, cfg_.beta1, cfg_.beta2, step_size, bias_correction2_sqrt, cfg_.eps);
    else
      adamw_update(p.data<float>(), g.data<float>(), sl.exp_avg.data<float>(), sl.exp_avg_sq.data<float>(), n,
                   decay_mul, cfg_.beta1, cfg_.beta2, step_size, bias_correction2_sqrt, cfg_.eps);
  }
}

OptimizerState AdamW::state() const {
  OptimizerState st;
  st.step = step_;
  for (const Slot& sl : slots_) {
    st.tensors.emplace_back(sl.name + ".exp_avg", sl.exp_avg.clone());
    st.tensors.emplace_back(sl.name + ".exp_avg_sq", sl.exp_avg_sq.clone());
  }
  return st;
}

void AdamW::load_state(const OptimizerState& st, const std::string& origin) {
  if (st.step < 0) fail("optimizer", "{}: step count {} is negative", origin, st.step);
  std::map<std::string, const Tensor*> by_name;
  for (const auto& [name, t] : st.tensors)
    if (!by_name.emplace(name, &t).second) fail("optimizer", "{}: tensor '{}' appears twice", origin, name);
  // Validate everything before changing anything.
  std::vector<Tensor> loaded;
  for (const Slot& sl : slots_)
    for (const Tensor* want : {&sl.exp_avg, &sl.exp_avg_sq}) {
      const std::string name = sl.name + (want == &sl.exp_avg ? ".exp_avg" : ".exp_avg_sq");
      auto it = by_name.find(name);
      if (it == by_name.end()) fail("optimizer", "{}: missing optimizer state '{}'", origin, name);
      const Tensor& t = *it->second;
      if (!t.defined() || t.shape() != want->shape())
        fail("optimizer", "{}: '{}' has shape {}, expected {}", origin, name, t.defined() ? shape_str(t.shape()) : "(none)",
             shape_str(want->shape()));
      if (t.dtype() != DType::F32 && t.dtype() != DType::F64 && t.dtype() != DType::BF16 && t.dtype() != DType::F16)
        fail("optimizer", "{}: '{}' has dtype {}, expected a float type", origin, name, dtype_name(t.dtype()));
      if (t.device() != Device::CPU) fail("optimizer", "{}: '{}' is not on the CPU", origin, name);
      loaded.push_back(t.to(want->dtype()));
      by_name.erase(it);
    }
  if (!by_name.empty())
    fail("optimizer", "{}: unexpected optimizer state '{}' (the adapter has no such tensor)", origin, by_name.begin()->first);
  size_t k = 0;
  for (Slot& sl : slots_) {
    sl.exp_avg = std::move(loaded[k++]);
    sl.exp_avg_sq = std::move(loaded[k++]);
  }
  step_ = st.step;
}

std::pair<LoraAdapter, LoraAdapter> AdamW::moments(const LoraAdapter& params) const {
  std::pair<LoraAdapter, LoraAdapter> out{params.zeros_like(), params.zeros_like()};
  for (const Slot& sl : slots_) {
    pick(out.first, sl.layer, sl.slot, sl.is_b) = sl.exp_avg.to(pick(params, sl.layer, sl.slot, sl.is_b).dtype());
    pick(out.second, sl.layer, sl.slot, sl.is_b) = sl.exp_avg_sq.to(pick(params, sl.layer, sl.slot, sl.is_b).dtype());
  }
  return out;
}

void AdamW::set_moments(const LoraAdapter& exp_avg, const LoraAdapter& exp_avg_sq, int64_t step) {
  QT_ASSERT(step >= 0, "AdamW: step {}", step);
  for (Slot& sl : slots_)
    for (auto [dst, src] : {std::pair{&sl.exp_avg, &exp_avg}, std::pair{&sl.exp_avg_sq, &exp_avg_sq}}) {
      QT_ASSERT(sl.layer < src->layers.size(), "AdamW: moments lack layer {}", sl.layer);
      const Tensor& t = pick(*src, sl.layer, sl.slot, sl.is_b);
      QT_ASSERT(t.defined() && t.shape() == dst->shape(), "AdamW: moment {} does not match its parameter", sl.name);
      *dst = t.to(dst->dtype());
    }
  step_ = step;
}

double grad_global_norm(const LoraAdapter& grads) {
  double total = 0.0;
  for_each_present(grads, [&](const Tensor& t) {
    QT_ASSERT(is_f32_or_f64(t.dtype()), "gradient dtype {} is not F32/F64", dtype_name(t.dtype()));
    total += t.dtype() == DType::F64 ? sum_squares(t.data<double>(), t.numel()) : sum_squares(t.data<float>(), t.numel());
  });
  return std::sqrt(total);
}

bool grads_all_finite(const LoraAdapter& grads) {
  bool ok = true;
  for_each_present(grads, [&](const Tensor& t) {
    QT_ASSERT(is_f32_or_f64(t.dtype()), "gradient dtype {} is not F32/F64", dtype_name(t.dtype()));
    if (ok) ok = t.dtype() == DType::F64 ? all_finite(t.data<double>(), t.numel()) : all_finite(t.data<float>(), t.numel());
  });
  return ok;
}

double clip_grad_norm(LoraAdapter& grads, double max_norm) {
  QT_ASSERT(max_norm > 0.0 && std::isfinite(max_norm), "clip_grad_norm: max_norm {} must be > 0", max_norm);
  const double norm = grad_global_norm(grads);
  if (!std::isfinite(norm)) return norm;
  const double coef = std::min(1.0, max_norm / (norm + 1e-6));
  for_each_present(grads, [&](Tensor& t) {
    const int64_t n = t.numel();
    if (t.dtype() == DType::F64) {
      double* g = t.data<double>();
#pragma omp parallel for schedule(static) if (n > 32768)
      for (int64_t i = 0; i < n; ++i) g[i] *= coef;
    } else {
      float* g = t.data<float>();
      const float c = float(coef);
#pragma omp parallel for schedule(static) if (n > 32768)
      for (int64_t i = 0; i < n; ++i) g[i] *= c;
    }
  });
  return norm;
}

}  // namespace qt
