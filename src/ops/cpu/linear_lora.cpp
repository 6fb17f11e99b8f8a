// Linear layer and LoRA adapter (forward + backward), matrix products through gemm (BLAS).
//
// linear:  y (N,out) = x (N,in) W^T + b          W (out,in), b (out) or nullptr
//   dx += dy W,  dW += dy^T x,  db += sum_n dy
// LoRA (PEFT, added to the base output):  xa (N,r) = x A^T;  y += scale * xa B^T
//   A (r,in), B (out,r); with t (N,r) = dy B:
//   dx += scale t A,  dA += scale t^T x,  dB += scale dy^T xa
#include <algorithm>
#include <vector>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {
constexpr int64_t kColumnBlock = 64;
}  // namespace

template <typename T>
void linear_forward(T* y, const T* x, const T* W, const T* b, int64_t N, int64_t in, int64_t out) {
  gemm<T>(false, true, N, out, in, T(1), x, W, T(0), y);
  if (b == nullptr) return;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* yn = y + n * out;
    for (int64_t o = 0; o < out; ++o) yn[o] += b[o];
  }
}

template <typename T>
void linear_backward(T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, int64_t N, int64_t in, int64_t out) {
  if (dx) gemm<T>(false, false, N, in, out, T(1), dy, W, T(1), dx);
  if (dW) gemm<T>(true, false, out, in, N, T(1), dy, x, T(1), dW);
  if (db) {
    // Column sums split by column block: deterministic, no races.
    const int64_t blocks = (out + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t o0 = blk * kColumnBlock, o1 = std::min(out, o0 + kColumnBlock);
      double acc[kColumnBlock] = {};
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = o0; o < o1; ++o) acc[o - o0] += double(dy[n * out + o]);
      for (int64_t o = o0; o < o1; ++o) db[o] += T(acc[o - o0]);
    }
  }
}

template <typename T>
void lora_forward(T* y, T* xa, const T* x, const T* A, const T* B, T scale, int64_t N, int64_t in, int64_t out,
                  int64_t r) {
  gemm<T>(false, true, N, r, in, T(1), x, A, T(0), xa);
  gemm<T>(false, true, N, out, r, scale, xa, B, T(1), y);
}

template <typename T>
void lora_backward(T* dx, T* dA, T* dB, const T* dy, const T* x, const T* xa, const T* A, const T* B, T scale,
                   int64_t N, int64_t in, int64_t out, int64_t r) {
  if (dx || dA) {
    std::vector<T> t(size_t(N * r));  // (N,r) = dy B
    gemm<T>(false, false, N, r, out, T(1), dy, B, T(0), t.data());
    if (dx) gemm<T>(false, false, N, in, r, scale, t.data(), A, T(1), dx);
    if (dA) gemm<T>(true, false, r, in, N, scale, t.data(), x, T(1), dA);
  }
  if (dB) gemm<T>(true, false, out, r, N, scale, dy, xa, T(1), dB);
}

#define QT_INSTANTIATE(T)                                                                                     \
  template void linear_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);              \
  template void linear_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);     \
  template void lora_forward<T>(T*, T*, const T*, const T*, const T*, T, int64_t, int64_t, int64_t, int64_t); \
  template void lora_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*, T, int64_t,   \
                                 int64_t, int64_t, int64_t);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt::cpu
