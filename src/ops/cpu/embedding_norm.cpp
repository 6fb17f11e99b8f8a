// Embedding lookup and RMSNorm (forward + backward).
//
// RMSNorm over rows of length D (HF Qwen2/Qwen3 RMSNorm):
//   rstd = 1 / sqrt(mean(x^2) + eps)   (sum of squares accumulated in double)
//   y    = w * (x * rstd)              (rounded in that order, as HF does)
// Backward, with g = dy * w:
//   dx_j = rstd * g_j - rstd^3 * x_j * sum_i(g_i x_i) / D
//   dw_j = sum_rows dy_j * x_j * rstd
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {
// Columns per task when a reduction over rows is split by column (deterministic, race free).
constexpr int64_t kColumnBlock = 64;
}  // namespace

template <typename T>
void embedding_forward(T* out, const int32_t* ids, const T* table, int64_t N, int64_t H) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* src = table + int64_t(ids[n]) * H;
    std::copy(src, src + H, out + n * H);
  }
}

template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t H) {
  if (dtable == nullptr) return;
  // Repeated ids hit the same table row, so split by column: each task owns a column block and
  // adds every token in order (deterministic).
  const int64_t blocks = (H + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t h0 = blk * kColumnBlock, h1 = std::min(H, h0 + kColumnBlock);
    for (int64_t n = 0; n < N; ++n) {
      T* dst = dtable + int64_t(ids[n]) * H;
      const T* src = dout + n * H;
      for (int64_t h = h0; h < h1; ++h) dst[h] += src[h];
    }
  }
}

template <typename T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t R, int64_t D, double eps) {
  QT_ASSERT(D > 0, "rmsnorm: empty rows");
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    double sumsq = 0;
    for (int64_t j = 0; j < D; ++j) sumsq += double(xr[j]) * double(xr[j]);
    const T rs = T(1.0 / std::sqrt(sumsq / double(D) + eps));
    rstd[r] = rs;
    for (int64_t j = 0; j < D; ++j) yr[j] = w[j] * T(xr[j] * rs);  // y may alias x: read before write
  }
}

template <typename T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t R, int64_t D) {
  if (dx != nullptr) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const T* xr = x + r * D;
      const T* dyr = dy + r * D;
      T* dxr = dx + r * D;
      double gx = 0;  // sum_i dy_i w_i x_i
      for (int64_t j = 0; j < D; ++j) gx += double(dyr[j]) * double(w[j]) * double(xr[j]);
      const double rs = double(rstd[r]);
      const T coef = T(rs * rs * rs * gx / double(D));
      const T rsT = T(rs);
      for (int64_t j = 0; j < D; ++j) dxr[j] += rsT * dyr[j] * w[j] - coef * xr[j];
    }
  }
  if (dw != nullptr) {
    const int64_t blocks = (D + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t j0 = blk * kColumnBlock, j1 = std::min(D, j0 + kColumnBlock);
      double acc[kColumnBlock] = {};
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + r * D;
        const T* dyr = dy + r * D;
        const double rs = double(rstd[r]);
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += double(dyr[j]) * double(xr[j]) * rs;
      }
      for (int64_t j = j0; j < j1; ++j) dw[j] += T(acc[j - j0]);
    }
  }
}

#define QT_INSTANTIATE(T)                                                                                   \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int64_t, int64_t);                      \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t);                     \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int64_t, int64_t, double);                  \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t, int64_t);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt::cpu
