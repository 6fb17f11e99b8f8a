// Counter-based inverted dropout for the LoRA input (PEFT's nn.Dropout before lora_A).
//   mix(z)        = the splitmix64 finaliser of z + 0x9e3779b97f4a7c15
//   key           = mix(mix(mix(mix(mix(seed) ^ step) ^ micro_batch) ^ layer) ^ slot)
//   u(key, r, f)  = (mix(mix(key ^ r) ^ f) >> 11) * 2^-53            in [0, 1)
//   y[n, f]       = u(key, row_n, f) >= p ? x[n, f] / (1 - p) : 0
// No generator state: a resumed run, a recomputation in the backward pass, or another thread count
// reproduces the mask exactly.
#include <cmath>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {

inline uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

uint64_t dropout_key(uint64_t seed, int64_t step, int64_t micro_batch, int64_t layer, int64_t slot) {
  uint64_t k = mix(seed);
  for (int64_t v : {step, micro_batch, layer, slot}) k = mix(k ^ uint64_t(v));
  return k;
}

double dropout_uniform(uint64_t key, uint64_t row, uint64_t feature) {
  return double(mix(mix(key ^ row) ^ feature) >> 11) * 0x1.0p-53;
}

template <typename T>
void dropout_apply(T* y, const T* x, int64_t N, int64_t D, double p, uint64_t key, const int32_t* rows) {
  QT_ASSERT(p >= 0 && p < 1, "dropout probability {}", p);
  const T keep_scale = T(1.0 / (1.0 - p));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint64_t row = rows ? uint64_t(rows[n]) : uint64_t(n);
    for (int64_t f = 0; f < D; ++f)
      y[n * D + f] = dropout_uniform(key, row, uint64_t(f)) >= p ? x[n * D + f] * keep_scale : T(0);
  }
}

template void dropout_apply<float>(float*, const float*, int64_t, int64_t, double, uint64_t, const int32_t*);
template void dropout_apply<double>(double*, const double*, int64_t, int64_t, double, uint64_t, const int32_t*);

}  // namespace qt::cpu
