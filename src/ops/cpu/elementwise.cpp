// Elementwise ops: SwiGLU gate and the residual add.
//   h = silu(g) * u,  silu(g) = g * sigmoid(g),  sigmoid(g) = 1 / (1 + exp(-g))
//   dg += dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du += dh * silu(g)
#include <cmath>

#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {
template <typename T>
inline T sigmoid(T g) {
  return T(1) / (T(1) + std::exp(-g));  // exp overflow gives 1/inf = 0, the right limit
}
}  // namespace

template <typename T>
void swiglu_forward(T* h, const T* g, const T* u, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) h[i] = (g[i] * sigmoid(g[i])) * u[i];
}

template <typename T>
void swiglu_backward(T* dg, T* du, const T* dh, const T* g, const T* u, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T sg = sigmoid(g[i]);
    if (dg) dg[i] += dh[i] * u[i] * sg * (T(1) + g[i] * (T(1) - sg));
    if (du) du[i] += dh[i] * g[i] * sg;
  }
}

template <typename T>
void add_inplace(T* y, const T* x, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

#define QT_INSTANTIATE(T)                                                              \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t);                   \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t);    \
  template void add_inplace<T>(T*, const T*, int64_t);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt::cpu
