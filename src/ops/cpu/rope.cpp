// Rotary position embedding, rotate-half (NeoX) layout, as HF transformers builds and applies it.
//
// Table (float32, like HF's _compute_default_rope_parameters + rotary forward):
//   inv_freq[i] = 1 / powf(theta, f32(2i) / f32(hd))      i < hd/2
//   angle[i]    = f32(pos) * inv_freq[i];  emb = [angle, angle]  (hd)
//   cos = cosf(emb), sin = sinf(emb)
// Apply to each head vector x = [a, b] (halves of hd/2):
//   a' = a*cos1 - b*sin1,  b' = b*cos2 + a*sin2       (cos1 = cos[:hd/2], cos2 = cos[hd/2:])
// Backward is the transpose:  da = da'*cos1 + db'*sin2,  db = db'*cos2 - da'*sin1.
#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

void rope_table(float* cos, float* sin, const int32_t* pos, int64_t N, int64_t hd, double theta) {
  QT_ASSERT(hd > 0 && hd % 2 == 0, "rope: head_dim {} must be even", hd);
  const int64_t half = hd / 2;
  const float base = float(theta);
  std::vector<float> inv_freq(size_t(half), 0.0f);
  for (int64_t i = 0; i < half; ++i) inv_freq[size_t(i)] = 1.0f / std::pow(base, float(2 * i) / float(hd));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float p = float(pos[n]);
    float* c = cos + n * hd;
    float* s = sin + n * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float angle = p * inv_freq[size_t(i)];
      c[i] = c[i + half] = std::cos(angle);
      s[i] = s[i + half] = std::sin(angle);
    }
  }
}

template <typename T>
void rope_forward(T* x, const float* cos, const float* sin, int64_t N, int64_t heads, int64_t hd) {
  QT_ASSERT(hd % 2 == 0, "rope: head_dim {} must be even", hd);
  const int64_t half = hd / 2;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* c = cos + n * hd;
    const float* s = sin + n * hd;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (n * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half];
        v[i] = a * T(c[i]) - b * T(s[i]);
        v[i + half] = b * T(c[i + half]) + a * T(s[i + half]);
      }
    }
  }
}

template <typename T>
void rope_backward(T* dx, const float* cos, const float* sin, int64_t N, int64_t heads, int64_t hd) {
  QT_ASSERT(hd % 2 == 0, "rope: head_dim {} must be even", hd);
  const int64_t half = hd / 2;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* c = cos + n * hd;
    const float* s = sin + n * hd;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = dx + (n * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const T da = v[i], db = v[i + half];
        v[i] = da * T(c[i]) + db * T(s[i + half]);
        v[i + half] = db * T(c[i + half]) - da * T(s[i]);
      }
    }
  }
}

template void rope_forward<float>(float*, const float*, const float*, int64_t, int64_t, int64_t);
template void rope_forward<double>(double*, const float*, const float*, int64_t, int64_t, int64_t);
template void rope_backward<float>(float*, const float*, const float*, int64_t, int64_t, int64_t);
template void rope_backward<double>(double*, const float*, const float*, int64_t, int64_t, int64_t);

}  // namespace qt::cpu
