// MoE routing ops (HF transformers Qwen3-MoE semantics).
//
// Router, per token n (logits l (E)):
//   p = softmax(l)                 computed in T: float for the engine (HF computes it in float32,
//                                  F.softmax(router_logits, dim=1, dtype=torch.float)), double in the
//                                  float64 tests (a smooth double softmax, so finite differences work)
//   S = top-k indices of p by descending p (ties: lower index first; NaN sorts last)
//   w_j = p_{S_j}            or, when norm_topk_prob,   w_j = p_{S_j} / s,  s = sum_j p_{S_j}
// Backward (top-k selection is piecewise constant, so only the values carry gradient):
//   dp_{S_j} = dw_j          or, normalised,            dp_{S_j} = (dw_j - sum_i dw_i w_i) / s
//   dl_e = p_e (dp_e - sum_i p_i dp_i)                   (softmax Jacobian; dp = 0 off the top-k)
//
// Dispatch: assignment a = n*k + j goes to expert topk_idx[a]; moe_sort orders assignments by expert
// with a stable counting sort, perm[p] = a. Gather / combine move rows between token order (N,H)
// and expert order (N*k,H). To stay deterministic without atomics, the token-side loops walk the
// inverse permutation (a -> p) so each token sums its k rows in the order j = 0..k-1.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {

// Sort key: NaN probabilities rank below everything (a NaN in the comparison would break the strict
// weak ordering std::partial_sort needs).
template <typename T>
inline T rank_key(T p) {
  return std::isnan(p) ? -std::numeric_limits<T>::infinity() : p;
}

// inv[a] = p for perm[p] = a; perm must be a permutation of 0..Nk-1.
std::vector<int32_t> inverse_permutation(const int32_t* perm, int64_t Nk, int64_t k) {
  QT_ASSERT(k >= 1 && Nk % k == 0, "moe: {} assignments are not a multiple of k = {}", Nk, k);
  std::vector<int32_t> inv(size_t(Nk), -1);
  for (int64_t p = 0; p < Nk; ++p) {
    const int32_t a = perm[p];
    QT_ASSERT(a >= 0 && a < Nk && inv[size_t(a)] < 0, "moe: perm is not a permutation of 0..{} (perm[{}] = {})",
              Nk - 1, p, a);
    inv[size_t(a)] = int32_t(p);
  }
  return inv;
}

}  // namespace

template <typename T>
void moe_router_forward(int32_t* topk_idx, T* topk_w, T* probs, const T* logits, int64_t N, int64_t E, int64_t k,
                        bool norm_topk_prob) {
  QT_ASSERT(E >= 1 && k >= 1 && k <= E, "moe_router_forward: k = {} with E = {}", k, E);
#pragma omp parallel
  {
    std::vector<int32_t> order(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* l = logits + n * E;
      T* p = probs + n * E;
      // softmax in T (see the top comment)
      T mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      T sum = T(0);
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(l[e] - mx);
        sum += p[e];
      }
      const T inv = T(1) / sum;
      for (int64_t e = 0; e < E; ++e) p[e] *= inv;

      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [p](int32_t a, int32_t b) {
        const T ka = rank_key(p[a]), kb = rank_key(p[b]);
        return ka > kb || (ka == kb && a < b);
      });
      int32_t* idx = topk_idx + n * k;
      T* w = topk_w + n * k;
      T s = T(0);
      for (int64_t j = 0; j < k; ++j) {
        idx[j] = order[size_t(j)];
        w[j] = p[idx[j]];
        s += w[j];
      }
      if (norm_topk_prob)
        for (int64_t j = 0; j < k; ++j) w[j] /= s;
    }
  }
}

template <typename T>
void moe_router_backward(T* dlogits, const T* dtopk_w, const T* probs, const int32_t* topk_idx, int64_t N, int64_t E,
                         int64_t k, bool norm_topk_prob) {
  if (dlogits == nullptr) return;
  QT_ASSERT(E >= 1 && k >= 1 && k <= E, "moe_router_backward: k = {} with E = {}", k, E);
#pragma omp parallel
  {
    std::vector<double> dp(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* p = probs + n * E;
      const int32_t* idx = topk_idx + n * k;
      const T* dw = dtopk_w + n * k;
      std::fill(dp.begin(), dp.end(), 0.0);
      if (norm_topk_prob) {
        double s = 0, dw_dot_w = 0;
        for (int64_t j = 0; j < k; ++j) s += double(p[idx[j]]);
        for (int64_t j = 0; j < k; ++j) dw_dot_w += double(dw[j]) * double(p[idx[j]]) / s;
        for (int64_t j = 0; j < k; ++j) dp[size_t(idx[j])] = (double(dw[j]) - dw_dot_w) / s;
      } else {
        for (int64_t j = 0; j < k; ++j) dp[size_t(idx[j])] = double(dw[j]);
      }
      double p_dot_dp = 0;
      for (int64_t j = 0; j < k; ++j) p_dot_dp += double(p[idx[j]]) * dp[size_t(idx[j])];
      T* dl = dlogits + n * E;
      for (int64_t e = 0; e < E; ++e) dl[e] += T(double(p[e]) * (dp[size_t(e)] - p_dot_dp));
    }
  }
}

template <typename T>
void moe_route_stats(double* prob_sum, double* counts, const T* probs, const int32_t* topk_idx, int64_t N, int64_t E,
                     int64_t k) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) prob_sum[e] += double(probs[n * E + e]);
  for (int64_t a = 0; a < N * k; ++a) {
    QT_ASSERT(topk_idx[a] >= 0 && topk_idx[a] < E, "moe_route_stats: expert {} of {}", topk_idx[a], E);
    counts[topk_idx[a]] += 1.0;
  }
}

template <typename T>
void moe_aux_router_backward(T* dlogits, const T* probs, const double* f, double scale, int64_t N, int64_t E) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* p = probs + n * E;
    double p_dot_f = 0;
    for (int64_t e = 0; e < E; ++e) p_dot_f += double(p[e]) * f[e];
    for (int64_t e = 0; e < E; ++e) dlogits[n * E + e] += T(scale * double(p[e]) * (f[e] - p_dot_f));
  }
}

void moe_sort(int32_t* perm, int64_t* offsets, const int32_t* topk_idx, int64_t N, int64_t k, int64_t E) {
  const int64_t Nk = N * k;
  QT_ASSERT(Nk <= std::numeric_limits<int32_t>::max(), "moe_sort: {} assignments exceed int32 indices", Nk);
  std::fill(offsets, offsets + E + 1, int64_t(0));
  for (int64_t a = 0; a < Nk; ++a) {
    const int32_t e = topk_idx[a];
    QT_ASSERT(e >= 0 && e < E, "moe_sort: expert index {} outside [0, {})", e, E);
    ++offsets[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> cursor(offsets, offsets + E);
  for (int64_t a = 0; a < Nk; ++a) perm[cursor[size_t(topk_idx[a])]++] = int32_t(a);  // stable: a ascending
}

template <typename T>
void moe_gather(T* xs, const T* x, const int32_t* perm, int64_t Nk, int64_t k, int64_t H) {
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < Nk; ++p) {
    const T* src = x + int64_t(perm[p] / k) * H;
    std::copy(src, src + H, xs + p * H);
  }
}

template <typename T>
void moe_gather_backward(T* dx, const T* dxs, const int32_t* perm, int64_t Nk, int64_t k, int64_t H) {
  if (dx == nullptr) return;
  const std::vector<int32_t> inv = inverse_permutation(perm, Nk, k);
  const int64_t N = Nk / k;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* d = dx + n * H;
    for (int64_t j = 0; j < k; ++j) {
      const T* src = dxs + int64_t(inv[size_t(n * k + j)]) * H;
      for (int64_t h = 0; h < H; ++h) d[h] += src[h];
    }
  }
}

template <typename T>
void moe_combine(T* out, const T* ys, const T* topk_w, const int32_t* perm, int64_t Nk, int64_t k, int64_t H) {
  const std::vector<int32_t> inv = inverse_permutation(perm, Nk, k);
  const int64_t N = Nk / k;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * H;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t a = n * k + j;
      const T w = topk_w[a];
      const T* y = ys + int64_t(inv[size_t(a)]) * H;
      for (int64_t h = 0; h < H; ++h) o[h] += w * y[h];
    }
  }
}

template <typename T>
void moe_combine_backward(T* dys, T* dtopk_w, const T* dout, const T* ys, const T* topk_w, const int32_t* perm,
                          int64_t Nk, int64_t k, int64_t H) {
  if (dys == nullptr && dtopk_w == nullptr) return;
  // Each p owns row p of dys and element perm[p] of dtopk_w: no two iterations write the same place.
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < Nk; ++p) {
    const int64_t a = perm[p];
    const T* d = dout + (a / k) * H;
    if (dys) {
      const T w = topk_w[a];
      T* dy = dys + p * H;
      for (int64_t h = 0; h < H; ++h) dy[h] += w * d[h];
    }
    if (dtopk_w) {
      const T* y = ys + p * H;
      double acc = 0;
      for (int64_t h = 0; h < H; ++h) acc += double(d[h]) * double(y[h]);
      dtopk_w[a] += T(acc);
    }
  }
}

#define QT_INSTANTIATE(T)                                                                                          \
  template void moe_router_forward<T>(int32_t*, T*, T*, const T*, int64_t, int64_t, int64_t, bool);                \
  template void moe_router_backward<T>(T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, bool);   \
  template void moe_route_stats<T>(double*, double*, const T*, const int32_t*, int64_t, int64_t, int64_t);        \
  template void moe_aux_router_backward<T>(T*, const T*, const double*, double, int64_t, int64_t);                 \
  template void moe_gather<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t);                           \
  template void moe_gather_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t);                  \
  template void moe_combine<T>(T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t);                \
  template void moe_combine_backward<T>(T*, T*, const T*, const T*, const T*, const int32_t*, int64_t, int64_t,   \
                                        int64_t);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt::cpu
