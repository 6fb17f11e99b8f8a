// Causal self-attention with grouped-query heads and optional packed-document segments.
//
// For batch b, query head h (kv head g = h / (nh/nkv)), query row i, visible keys j (j <= i and, with
// segments, segment[b,j] == segment[b,i]):
//   s_j   = scale * q_i . k_j               scale = 1/sqrt(hd)
//   lse_i = m + log(sum_j exp(s_j - m))     m = max_j s_j   (sum in double)
//   p_j   = exp(s_j - lse_i);  o_i = sum_j p_j v_j
// Backward (P recomputed from q, k and the saved lse):
//   D_i = dO_i . O_i;  dp_j = dO_i . v_j;  ds_j = p_j (dp_j - D_i)
//   dq_i += scale sum_j ds_j k_j;  dk_j += scale ds_j q_i;  dv_j += p_j dO_i
// Work is split over (b, h) with OpenMP; no BLAS here (OpenBLAS-pthread must not run inside an
// OpenMP region). The inner products are written as axpy loops over contiguous rows (K and V are
// transposed per head into hd x S scratch) so the compiler vectorises them without reassociation.
// dk/dv of query heads sharing a kv head are accumulated in per-head scratch and summed afterwards
// in head order, so results are deterministic.
// attention_kv_forward (decoding with a KV cache) runs the same per-row code (attend_row) for
// queries at positions past..past+n-1 against all past+n cached keys.
#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {

struct AttnShape {
  int64_t B, S, nh, nkv, hd;
  int64_t group() const { return nh / nkv; }
  // q/out/dq (B,S,nh,hd) and k/v (B,S,nkv,hd) row offsets and strides between sequence positions
  int64_t q_off(int64_t b, int64_t i, int64_t h) const { return ((b * S + i) * nh + h) * hd; }
  int64_t kv_off(int64_t b, int64_t j, int64_t g) const { return ((b * S + j) * nkv + g) * hd; }
};

void check_shape(const AttnShape& a) {
  QT_ASSERT(a.B >= 0 && a.S >= 0 && a.hd > 0 && a.nkv > 0 && a.nh > 0 && a.nh % a.nkv == 0,
            "attention: bad shape B={} S={} nh={} nkv={} hd={}", a.B, a.S, a.nh, a.nkv, a.hd);
}

// first_visible (B,S): the smallest key index j <= i with the same segment as i (0 without segments).
// Keys before it are never visible, so the loops start there; keys after it still check the mask.
std::vector<int64_t> first_visible_keys(const int32_t* segment, int64_t B, int64_t S) {
  std::vector<int64_t> first(size_t(B * S), 0);
  if (segment == nullptr) return first;
  for (int64_t b = 0; b < B; ++b) {
    std::unordered_map<int32_t, int64_t> seen;
    for (int64_t i = 0; i < S; ++i) {
      auto it = seen.try_emplace(segment[b * S + i], i).first;
      first[size_t(b * S + i)] = it->second;
    }
  }
  return first;
}

// kt (hd, S) = the rows j of one kv head, transposed.
template <typename T>
void transpose_head(T* kt, const T* k, const AttnShape& a, int64_t b, int64_t g) {
  for (int64_t j = 0; j < a.S; ++j) {
    const T* kj = k + a.kv_off(b, j, g);
    for (int64_t d = 0; d < a.hd; ++d) kt[d * a.S + j] = kj[d];
  }
}

// s[j] = scale * qi . k_j for j in [j0, i] (kt is the transposed head).
template <typename T>
void scores_row(T* s, const T* qi, const T* kt, int64_t S, int64_t hd, int64_t j0, int64_t i, T scale) {
  std::fill(s + j0, s + i + 1, T(0));
  for (int64_t d = 0; d < hd; ++d) {
    const T qd = qi[d];
    const T* ktd = kt + d * S;
    for (int64_t j = j0; j <= i; ++j) s[j] += qd * ktd[j];
  }
  for (int64_t j = j0; j <= i; ++j) s[j] *= scale;
}

inline bool visible(const int32_t* seg_b, int64_t i, int64_t j) {
  return seg_b == nullptr || seg_b[j] == seg_b[i];
}

// One query row: o (hd) = softmax(scores over keys [j0, i] of kv head g in row b) V, returning the
// log-sum-exp; keys with another segment than i are masked. s (S) and acc (hd) are scratch.
template <typename T>
T attend_row(T* o, const T* qi, const T* kt, const T* v, const AttnShape& a, int64_t b, int64_t g, int64_t j0,
             int64_t i, const int32_t* seg_b, T* s, T* acc) {
  const T scale = T(1.0 / std::sqrt(double(a.hd)));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  scores_row(s, qi, kt, a.S, a.hd, j0, i, scale);
  T m = neg_inf;
  for (int64_t j = j0; j <= i; ++j) {
    if (!visible(seg_b, i, j)) s[j] = neg_inf;
    m = std::max(m, s[j]);
  }
  double l = 0;
  std::fill(acc, acc + a.hd, T(0));
  for (int64_t j = j0; j <= i; ++j) {
    if (s[j] == neg_inf) continue;
    const T p = std::exp(s[j] - m);
    l += double(p);
    const T* vj = v + a.kv_off(b, j, g);
    for (int64_t d = 0; d < a.hd; ++d) acc[d] += p * vj[d];
  }
  const T inv_l = T(1.0 / l);
  for (int64_t d = 0; d < a.hd; ++d) o[d] = acc[d] * inv_l;
  return T(double(m) + std::log(l));
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const int32_t* segment, int64_t B,
                       int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  const AttnShape a{B, S, nh, nkv, hd};
  check_shape(a);
  const std::vector<int64_t> first = first_visible_keys(segment, B, S);

#pragma omp parallel
  {
    std::vector<T> kt(size_t(hd * S)), s(static_cast<size_t>(S)), acc(static_cast<size_t>(hd));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh, g = h / a.group();
      const int32_t* seg_b = segment ? segment + b * S : nullptr;
      transpose_head(kt.data(), k, a, b, g);
      for (int64_t i = 0; i < S; ++i)
        lse[bh * S + i] = attend_row(out + a.q_off(b, i, h), q + a.q_off(b, i, h), kt.data(), v, a, b, g,
                                     first[size_t(b * S + i)], i, seg_b, s.data(), acc.data());
    }
  }
}

template <typename T>
void attention_kv_forward(T* out, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t n, int64_t past,
                          int64_t nh, int64_t nkv, int64_t hd) {
  QT_ASSERT(n >= 0 && past >= 0, "attention_kv: n={} past={}", n, past);
  const AttnShape a{B, past + n, nh, nkv, hd};  // the key/value rows
  check_shape(a);
  const int64_t S = a.S;

#pragma omp parallel
  {
    std::vector<T> kt(size_t(hd * S)), s(static_cast<size_t>(S)), acc(static_cast<size_t>(hd));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh, g = h / a.group();
      transpose_head(kt.data(), k, a, b, g);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t qo = ((b * n + i) * nh + h) * hd;
        const T l = attend_row(out + qo, q + qo, kt.data(), v, a, b, g, 0, past + i, nullptr, s.data(), acc.data());
        if (lse) lse[bh * n + i] = l;
      }
    }
  }
}

template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse, const T* q, const T* k,
                        const T* v, const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv,
                        int64_t hd) {
  if (dq == nullptr && dk == nullptr && dv == nullptr) return;
  const AttnShape a{B, S, nh, nkv, hd};
  check_shape(a);
  const std::vector<int64_t> first = first_visible_keys(segment, B, S);
  const T scale = T(1.0 / std::sqrt(double(hd)));
  // Per query head dk/dv contributions (B,nh,S,hd), reduced over each kv group below.
  std::vector<T> dk_heads(dk ? size_t(B * nh * S * hd) : 0, T(0));
  std::vector<T> dv_heads(dv ? size_t(B * nh * S * hd) : 0, T(0));

#pragma omp parallel
  {
    std::vector<T> kt(size_t(hd * S)), vt(size_t(hd * S)), s(static_cast<size_t>(S)), dp(static_cast<size_t>(S));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh, g = h / a.group();
      const int32_t* seg_b = segment ? segment + b * S : nullptr;
      transpose_head(kt.data(), k, a, b, g);
      transpose_head(vt.data(), v, a, b, g);
      T* dkh = dk ? dk_heads.data() + bh * S * hd : nullptr;  // (S,hd)
      T* dvh = dv ? dv_heads.data() + bh * S * hd : nullptr;  // (S,hd)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t j0 = first[size_t(b * S + i)];
        const T* qi = q + a.q_off(b, i, h);
        const T* doi = dout + a.q_off(b, i, h);
        const T* oi = out + a.q_off(b, i, h);
        const T lse_i = lse[bh * S + i];
        // p_j in s (0 where masked), dp_j = dO_i . v_j
        scores_row(s.data(), qi, kt.data(), S, hd, j0, i, scale);
        for (int64_t j = j0; j <= i; ++j) s[size_t(j)] = visible(seg_b, i, j) ? std::exp(s[size_t(j)] - lse_i) : T(0);
        std::fill(dp.begin() + j0, dp.begin() + i + 1, T(0));
        for (int64_t d = 0; d < hd; ++d) {
          const T dod = doi[d];
          const T* vtd = vt.data() + d * S;
          for (int64_t j = j0; j <= i; ++j) dp[size_t(j)] += dod * vtd[j];
        }
        double rowdot = 0;
        for (int64_t d = 0; d < hd; ++d) rowdot += double(doi[d]) * double(oi[d]);
        const T D_i = T(rowdot);
        T* dqi = dq ? dq + a.q_off(b, i, h) : nullptr;
        for (int64_t j = j0; j <= i; ++j) {
          const T p = s[size_t(j)];
          if (p == T(0)) continue;
          const T ds = p * (dp[size_t(j)] - D_i) * scale;  // includes the score scale
          if (dqi) {
            const T* kj = k + a.kv_off(b, j, g);
            for (int64_t d = 0; d < hd; ++d) dqi[d] += ds * kj[d];
          }
          if (dkh) {
            T* dkj = dkh + j * hd;
            for (int64_t d = 0; d < hd; ++d) dkj[d] += ds * qi[d];
          }
          if (dvh) {
            T* dvj = dvh + j * hd;
            for (int64_t d = 0; d < hd; ++d) dvj[d] += p * doi[d];
          }
        }
      }
    }

    // dk, dv (B,S,nkv,hd) += sum over the query heads of each group, in head order.
    const int64_t grp = a.group();
#pragma omp for schedule(static)
    for (int64_t bj = 0; bj < B * S; ++bj) {
      const int64_t b = bj / S, j = bj % S;
      for (int64_t g = 0; g < nkv; ++g) {
        const int64_t off = a.kv_off(b, j, g);
        for (int64_t h = g * grp; h < (g + 1) * grp; ++h) {
          const int64_t src = ((b * nh + h) * S + j) * hd;
          if (dk)
            for (int64_t d = 0; d < hd; ++d) dk[off + d] += dk_heads[size_t(src + d)];
          if (dv)
            for (int64_t d = 0; d < hd; ++d) dv[off + d] += dv_heads[size_t(src + d)];
        }
      }
    }
  }
}

#define QT_INSTANTIATE(T)                                                                                         \
  template void attention_kv_forward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t,       \
                                        int64_t, int64_t, int64_t);                                             \
  template void attention_forward<T>(T*, T*, const T*, const T*, const T*, const int32_t*, int64_t, int64_t,      \
                                     int64_t, int64_t, int64_t);                                                \
  template void attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*, const T*,    \
                                      const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t);
QT_INSTANTIATE(float)
QT_INSTANTIATE(double)
#undef QT_INSTANTIATE

}  // namespace qt::cpu
