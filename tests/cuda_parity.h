// Helpers for the CUDA op-parity tests: random bf16-representable inputs, host <-> device copies,
// and the tolerance check against the CPU reference (run in float on the same bf16-rounded inputs).
//
// Tolerances. The CPU reference is exact float arithmetic on the very inputs the GPU sees, so an
// op whose result is rounded to bf16 once differs by at most half a bf16 ulp (<= 2^-8 |ref|) plus
// the fp32 difference of the two summation orders (delta):
//   |got - ref| <= rtol |ref| + atol * scale,   scale = max |ref|,   rtol = 2^-8
// with atol = 1e-5 for elementwise ops and 2e-4 for reductions (row norms, GEMMs, softmax: fp32
// sums of up to a few thousand terms in a different order). Ops that round intermediates to bf16
// (LoRA's xa and dy B) carry one more relative 2^-8 on a term: atol 8e-3. fp32 outputs (LoRA
// gradients) use rtol 0. AdamW is compared bitwise. NaN or inf never passes.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "model/lora.h"
#include "model/weights.h"
#include "ops/cuda/ops.h"

namespace qt::testing {

using cuda::bf16;
using cuda::Buffer;

constexpr double kBf16Rtol = 1.0 / 256.0;  // half a bf16 ulp, relative
constexpr double kAtolElementwise = 1e-5;
constexpr double kAtolReduction = 2e-4;
constexpr double kAtolBf16Intermediate = 8e-3;

#define QT_SKIP_WITHOUT_GPU()                                          \
  do {                                                                 \
    if (::qt::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// n normal(0, sd) values rounded to bf16 (so CPU and GPU read identical inputs).
inline std::vector<float> randn_bf16(size_t n, std::mt19937_64& rng, float sd = 1.0f) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = round_bf16(d(rng));
  return v;
}
inline std::vector<float> randn_f32(size_t n, std::mt19937_64& rng, float sd = 1.0f) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline Buffer<bf16> dev_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> bits(x.size());
  for (size_t i = 0; i < x.size(); ++i) bits[i] = f32_to_bf16(x[i]);
  Buffer<bf16> b(x.size());
  if (!x.empty()) QT_CUDA_CHECK(cudaMemcpy(b.get(), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
  QT_CUDA_CHECK(cudaDeviceSynchronize());  // visible to the ops' non-blocking streams (see Buffer::upload)
  return b;
}
inline std::vector<float> host_f32(const Buffer<bf16>& b) {
  std::vector<uint16_t> bits(b.size());
  QT_CUDA_CHECK(cudaDeviceSynchronize());
  if (b.size()) QT_CUDA_CHECK(cudaMemcpy(bits.data(), b.get(), bits.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> v(bits.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(bits[i]);
  return v;
}
inline std::vector<float> host_f32(const Buffer<float>& b) {
  QT_CUDA_CHECK(cudaDeviceSynchronize());
  return b.download();
}
// A device output poisoned with NaN (bf16 0xFFFF), so an element the kernel forgets to write fails.
inline Buffer<bf16> dev_poison_bf16(size_t n) {
  Buffer<bf16> b(n);
  b.fill_bytes(0xFF);
  return b;
}
inline Buffer<float> dev_poison_f32(size_t n) {
  Buffer<float> b(n);
  b.fill_bytes(0xFF);
  return b;
}

// An f32 model's tensors rounded to bf16 (what the GPU engine uploads), so both engines read the same
// weights; norms and biases perturbed first so they matter. MoE routers are left to the caller.
inline void randomise_and_round(ModelWeights& w, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  auto round_all = [&](Tensor& t, float jitter) {
    if (!t.defined()) return;
    float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = round_bf16(p[i] + jitter * nd(rng));
  };
  round_all(w.embed, 0.f);
  if (!w.cfg.tie_word_embeddings) round_all(w.lm_head, 0.f);
  round_all(w.final_norm, 0.1f);
  for (auto& l : w.layers) {
    round_all(l.input_norm, 0.1f), round_all(l.post_norm, 0.1f);
    round_all(l.attn.q_norm, 0.1f), round_all(l.attn.k_norm, 0.1f);
    round_all(l.attn.q_b, 0.05f), round_all(l.attn.k_b, 0.05f), round_all(l.attn.v_b, 0.05f);
    for (Tensor* t : {&l.attn.q_w, &l.attn.k_w, &l.attn.v_w, &l.attn.o_w, &l.mlp.gate, &l.mlp.up, &l.mlp.down})
      round_all(*t, 0.f);
  }
}

// An fp32 adapter with rank r, alpha = 2r on all seven modules: A as PEFT initialises it (seed 5), B
// normal(0, b_std) from rng (non-zero, so every LoRA path counts).
inline LoraAdapter random_lora_all_modules(const ModelConfig& cfg, std::mt19937_64& rng, float b_std, int64_t r = 4) {
  LoraConfig lc;
  lc.r = r, lc.alpha = double(2 * r);
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  LoraAdapter a = init_lora(cfg, lc, DType::F32, 5);
  std::normal_distribution<float> nd(0.f, b_std);
  for (auto& l : a.layers)
    for (auto& p : l.slot)
      for (int64_t i = 0; i < p.B.numel(); ++i) p.B.data<float>()[i] = nd(rng);
  return a;
}

// Calls f(tensor of a, tensor of b, label) for every A and B of two adapters of one structure.
template <typename F>
void for_each_lora_pair(const LoraAdapter& a, const LoraAdapter& b, F&& f) {
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s)
      for (bool is_b : {false, true}) {
        const Tensor& x = is_b ? a.layers[l].slot[s].B : a.layers[l].slot[s].A;
        const Tensor& y = is_b ? b.layers[l].slot[s].B : b.layers[l].slot[s].A;
        if (!x.defined()) continue;
        ASSERT_EQ(x.numel(), y.numel());
        f(x, y, "layer " + std::to_string(l) + " " + lora_slot_module(LoraSlot(s)) + (is_b ? " B" : " A"));
      }
}

// Checks |got - ref| <= rtol |ref| + atol * max|ref| elementwise; prints the measured worst
// error relative to the scale (the numbers the parity report quotes).
inline void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref,
                         double rtol, double atol) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double scale = 0;
  for (float r : ref) scale = std::max(scale, double(std::fabs(r)));
  if (scale == 0) scale = 1;
  double worst = 0, worst_excess = -1;
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(got[i]) - double(ref[i]));
    const double allowed = rtol * std::fabs(double(ref[i])) + atol * scale;
    if (!(err <= allowed)) {  // NaN fails here too
      if (bad++ == 0) first_bad = i;
    }
    if (std::isfinite(err)) worst = std::max(worst, err);
    worst_excess = std::max(worst_excess, err - allowed);
  }
  std::printf("[parity] %-44s n=%-8zu max_abs_err/scale=%.3e (scale %.3e)\n", what.c_str(), got.size(), worst / scale,
              scale);
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements out of tolerance; first at "
                     << first_bad << " got " << got[first_bad] << " want " << ref[first_bad];
}

}  // namespace qt::testing
