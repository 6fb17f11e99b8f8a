// MoE routing on the GPU (semantics of cpu::moe_*, see ops/cpu/moe.cpp for the math).
//   router: one warp per token, the lanes over experts (E <= 256: 8 per lane); softmax in fp32;
//           top-k by k rounds of a warp arg-max (value descending, lower index on ties, NaN last).
//   sort:   stable counting sort without atomics: one block per expert counts its assignments,
//           one thread scans the counts, then each expert's block writes its assignments in
//           ascending order with a block prefix sum (perm identical to cpu::moe_sort).
//   gather / combine: row copies and weighted sums; the token side walks the inverse permutation
//           so each token sums its k rows in the order j = 0..k-1 (deterministic, one rounding).
#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

constexpr int kMaxPerLane = 8;  // E <= 256
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float rank_key(float p) { return isnan(p) ? -INFINITY : p; }

// Warp arg-max over (key, index): larger key wins, lower index on ties. Every lane gets the winner.
__device__ __forceinline__ void warp_argmax(float& key, int& idx) {
  for (int o = 16; o > 0; o >>= 1) {
    const float k2 = __shfl_xor_sync(0xffffffffu, key, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
    if (k2 > key || (k2 == key && i2 < idx)) {
      key = k2;
      idx = i2;
    }
  }
}

__global__ void router_fwd_kernel(int32_t* topk_idx, float* topk_w, float* probs, const bf16* logits, int64_t N,
                                  int E, int k, bool norm) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  float p[kMaxPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int e = lane + 32 * t;
    p[t] = e < E ? to_f(logits[n * E + e]) : -INFINITY;
    mx = fmaxf(mx, p[t]);
  }
  mx = warp_max(mx);
  float sum = 0;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int e = lane + 32 * t;
    p[t] = e < E ? expf(p[t] - mx) : 0.0f;
    sum += p[t];
  }
  const float inv = 1.0f / warp_sum(sum);
  bool taken[kMaxPerLane];
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int e = lane + 32 * t;
    p[t] *= inv;
    taken[t] = e >= E;
    if (e < E) probs[n * E + e] = p[t];
  }
  float s = 0, chosen = 0;
  for (int j = 0; j < k; ++j) {
    float key = -INFINITY;
    int idx = 0x7fffffff;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int e = lane + 32 * t;
      const float kt = rank_key(p[t]);
      if (!taken[t] && (kt > key || (kt == key && e < idx))) {
        key = kt;
        idx = e;
      }
    }
    warp_argmax(key, idx);
    // the owner marks it taken and broadcasts its probability
    float w = 0;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t)
      if (lane + 32 * t == idx) {
        taken[t] = true;
        w = p[t];
      }
    w = warp_sum(w);  // exactly one lane holds it
    s += w;
    if (lane == j) chosen = w;
    if (lane == 0) topk_idx[n * k + j] = idx;
  }
  // k <= E <= 256 but the weights are written by lanes j < 32 first, then the rest serially
  if (k <= 32) {
    if (lane < k) topk_w[n * k + lane] = norm ? chosen / s : chosen;
  } else {
    __syncwarp();  // probs and topk_idx written by the other lanes are visible after this
    if (lane != 0) return;
    for (int j = 0; j < k; ++j) {
      const float w = probs[n * E + topk_idx[n * k + j]];
      topk_w[n * k + j] = norm ? w / s : w;
    }
  }
}

__global__ void router_bwd_kernel(bf16* dlogits, const float* dtopk_w, const float* probs, const int32_t* topk_idx,
                                  int64_t N, int E, int k, bool norm, const float* aux_f, float aux_scale) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const float* p = probs + n * E;
  const int32_t* idx = topk_idx + n * k;
  const float* dw = dtopk_w + n * k;
  float s = 0, dw_dot_w = 0;
  for (int j = lane; j < k; j += 32) s += p[idx[j]];
  s = warp_sum(s);
  if (norm)
    for (int j = lane; j < k; j += 32) dw_dot_w += dw[j] * p[idx[j]] / s;
  dw_dot_w = warp_sum(dw_dot_w);
  // dp at the top-k entries; p . dp
  auto dp_of = [&](int j) { return norm ? (dw[j] - dw_dot_w) / s : dw[j]; };
  float p_dot_dp = 0;
  for (int j = lane; j < k; j += 32) p_dot_dp += p[idx[j]] * dp_of(j);
  p_dot_dp = warp_sum(p_dot_dp);
  // the load-balancing loss: aux_scale * p (f - p.f)
  float p_dot_f = 0;
  if (aux_f)
    for (int e = lane; e < E; e += 32) p_dot_f += p[e] * aux_f[e];
  p_dot_f = warp_sum(p_dot_f);
  for (int e = lane; e < E; e += 32) {
    float dp = 0;
    for (int j = 0; j < k; ++j)
      if (idx[j] == e) dp = dp_of(j);
    float g = p[e] * (dp - p_dot_dp);
    if (aux_f) g += aux_scale * p[e] * (aux_f[e] - p_dot_f);
    bf16* d = dlogits + n * E + e;
    *d = to_bf(to_f(*d) + g);
  }
}

constexpr int kSortThreads = 1024;

// Block e: prob_sum[e] += sum_n probs[n, e] (fixed thread assignment and tree: deterministic);
// counts[e] (and layer_counts[e]) += offsets[e + 1] - offsets[e].
__global__ void route_stats_kernel(float* prob_sum, int64_t* counts, int64_t* layer_counts, const float* probs,
                                   const int64_t* offsets, int64_t N, int E) {
  __shared__ float shared[32];
  const int e = blockIdx.x;
  float s = 0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) s += probs[n * E + e];
  s = block_sum(s, shared);
  if (threadIdx.x == 0) {
    prob_sum[e] += s;
    const int64_t c = offsets[e + 1] - offsets[e];
    counts[e] += c;
    if (layer_counts) layer_counts[e] += c;
  }
}

// One thread: f = counts / R, aux = E * sum_e f_e prob_sum_e / R in double, in expert order.
__global__ void aux_loss_kernel(double* aux, float* f, double* add_to, double add_factor, const float* prob_sum,
                                const int64_t* counts, int E, int64_t R) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double acc = 0;
  for (int e = 0; e < E; ++e) {
    const double fe = R > 0 ? double(counts[e]) / double(R) : 0.0;
    f[e] = float(fe);
    acc += fe * (R > 0 ? double(prob_sum[e]) / double(R) : 0.0);
  }
  const double a = double(E) * acc;
  *aux = a;
  if (add_to) *add_to += add_factor * a;
}

// Block e: counts[e] = number of assignments with expert e.
__global__ void sort_count_kernel(int64_t* counts, const int32_t* topk_idx, int64_t Nk) {
  __shared__ float shared[32];
  const int e = blockIdx.x;
  float c = 0;  // exact in fp32 up to 2^24 per thread
  for (int64_t a = threadIdx.x; a < Nk; a += blockDim.x) c += topk_idx[a] == e ? 1.0f : 0.0f;
  // per-thread counts stay small; sum as integers through the block reduction in fp32 is exact
  // below 2^24 in total, checked by the caller (Nk < 2^24)
  c = block_sum(c, shared);
  if (threadIdx.x == 0) counts[e] = int64_t(c);
}

__global__ void sort_scan_kernel(int64_t* offsets, const int64_t* counts, int E) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  offsets[0] = 0;
  for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
}

// Block e writes its assignments in ascending order: chunks of blockDim.x, a block prefix sum of
// the match flags gives each match its rank.
__global__ void sort_place_kernel(int32_t* perm, const int64_t* offsets, const int32_t* topk_idx, int64_t Nk) {
  __shared__ int warp_tot[32];
  const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int64_t base = offsets[e];
  for (int64_t c0 = 0; c0 < Nk; c0 += blockDim.x) {
    const int64_t a = c0 + threadIdx.x;
    const bool hit = a < Nk && topk_idx[a] == e;
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    const int before_in_warp = __popc(mask & ((1u << lane) - 1u));
    __syncthreads();  // warp_tot of the previous chunk consumed
    if (lane == 0) warp_tot[warp] = __popc(mask);
    __syncthreads();
    int before = before_in_warp, total = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) before += warp_tot[w];
      total += warp_tot[w];
    }
    if (hit) perm[base + before] = int32_t(a);
    base += total;
  }
}

__global__ void inverse_kernel(int32_t* inv, const int32_t* perm, int64_t Nk) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < Nk; p += int64_t(gridDim.x) * blockDim.x)
    inv[perm[p]] = int32_t(p);
}

__global__ void gather_kernel(bf16* xs, const bf16* x, const int32_t* perm, int64_t Nk, int64_t k, int64_t H) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < Nk * H; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i / H, h = i % H;
    xs[i] = x[int64_t(perm[p] / k) * H + h];
  }
}

// out[n,h] += sum_j (w ? w[a] : 1) * rows[inv[a], h], a = n*k + j, in order j.
__global__ void token_sum_kernel(bf16* out, const bf16* rows, const float* w, const int32_t* inv, int64_t N,
                                 int64_t k, int64_t H) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * H; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / H, h = i % H;
    float acc = to_f(out[i]);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t a = n * k + j;
      acc += (w ? w[a] : 1.0f) * to_f(rows[int64_t(inv[a]) * H + h]);
    }
    out[i] = to_bf(acc);
  }
}

// One warp per expert-ordered row p. The row's dot product is complete (warp_sum) before its gradient is written,
// so dys may be ys.
__global__ void combine_bwd_kernel(bf16* dys, float* dtopk_w, const bf16* dout, const bf16* ys, const float* topk_w,
                                   const int32_t* perm, int64_t Nk, int64_t k, int64_t H, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t p = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (p >= Nk) return;
  const int64_t a = perm[p];
  const bf16* d = dout + (a / k) * H;
  if (dtopk_w) {
    const bf16* y = ys + p * H;
    float acc = 0;
    for (int64_t h = lane; h < H; h += 32) acc += to_f(d[h]) * to_f(y[h]);
    acc = warp_sum(acc);
    if (lane == 0) dtopk_w[a] += acc;
  }
  if (dys) {
    const float w = topk_w[a];
    bf16* dy = dys + p * H;
    for (int64_t h = lane; h < H; h += 32) dy[h] = to_bf((accumulate ? to_f(dy[h]) : 0.f) + w * to_f(d[h]));
  }
}

unsigned warp_blocks(int64_t rows) { return unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

int32_t* inverse_in_scratch(Context& ctx, const int32_t* perm, int64_t Nk) {
  auto* inv = static_cast<int32_t*>(ctx.scratch(size_t(Nk) * sizeof(int32_t)));
  inverse_kernel<<<grid_for(Nk), kThreads, 0, ctx.stream()>>>(inv, perm, Nk);
  QT_CUDA_LAUNCH_CHECK();
  return inv;
}

}  // namespace

void moe_router_forward(Context& ctx, int32_t* topk_idx, float* topk_w, float* probs, const bf16* logits, int64_t N,
                        int64_t E, int64_t k, bool norm_topk_prob) {
  QT_CUDA_ASSERT(E >= 1 && E <= 32 * kMaxPerLane && k >= 1 && k <= E, "moe_router: need 1 <= k <= E <= 256");
  if (N <= 0) return;
  router_fwd_kernel<<<warp_blocks(N), kWarpsPerBlock * 32, 0, ctx.stream()>>>(topk_idx, topk_w, probs, logits, N,
                                                                              int(E), int(k), norm_topk_prob);
  QT_CUDA_LAUNCH_CHECK();
}

void moe_router_backward(Context& ctx, bf16* dlogits, const float* dtopk_w, const float* probs,
                         const int32_t* topk_idx, int64_t N, int64_t E, int64_t k, bool norm_topk_prob,
                         const float* aux_f, float aux_scale) {
  QT_CUDA_ASSERT(E >= 1 && E <= 32 * kMaxPerLane && k >= 1 && k <= E, "moe_router: need 1 <= k <= E <= 256");
  if (N <= 0 || dlogits == nullptr) return;
  router_bwd_kernel<<<warp_blocks(N), kWarpsPerBlock * 32, 0, ctx.stream()>>>(dlogits, dtopk_w, probs, topk_idx, N,
                                                                              int(E), int(k), norm_topk_prob, aux_f,
                                                                              aux_scale);
  QT_CUDA_LAUNCH_CHECK();
}

void moe_sort(Context& ctx, int32_t* perm, int64_t* offsets, const int32_t* topk_idx, int64_t N, int64_t k,
              int64_t E) {
  const int64_t Nk = N * k;
  QT_CUDA_ASSERT(E >= 1 && E <= 65535 && Nk < (int64_t(1) << 24), "moe_sort: E or N*k out of range");
  auto* counts = static_cast<int64_t*>(ctx.scratch(size_t(E) * sizeof(int64_t)));
  sort_count_kernel<<<unsigned(E), kSortThreads, 0, ctx.stream()>>>(counts, topk_idx, Nk);
  QT_CUDA_LAUNCH_CHECK();
  sort_scan_kernel<<<1, 32, 0, ctx.stream()>>>(offsets, counts, int(E));
  QT_CUDA_LAUNCH_CHECK();
  if (Nk == 0) return;
  sort_place_kernel<<<unsigned(E), kSortThreads, 0, ctx.stream()>>>(perm, offsets, topk_idx, Nk);
  QT_CUDA_LAUNCH_CHECK();
}

void moe_route_stats(Context& ctx, float* prob_sum, int64_t* counts, int64_t* layer_counts, const float* probs,
                     const int64_t* offsets, int64_t N, int64_t E) {
  QT_CUDA_ASSERT(E >= 1 && E <= 65535 && N >= 0, "moe_route_stats: E or N out of range");
  route_stats_kernel<<<unsigned(E), kSortThreads, 0, ctx.stream()>>>(prob_sum, counts, layer_counts, probs, offsets, N,
                                                                      int(E));
  QT_CUDA_LAUNCH_CHECK();
}

void moe_aux_loss(Context& ctx, double* aux, float* f, double* add_to, double add_factor, const float* prob_sum,
                  const int64_t* counts, int64_t E, int64_t R) {
  aux_loss_kernel<<<1, 32, 0, ctx.stream()>>>(aux, f, add_to, add_factor, prob_sum, counts, int(E), R);
  QT_CUDA_LAUNCH_CHECK();
}

void moe_gather(Context& ctx, bf16* xs, const bf16* x, const int32_t* perm, int64_t Nk, int64_t k, int64_t H) {
  if (Nk * H <= 0) return;
  gather_kernel<<<grid_for(Nk * H), kThreads, 0, ctx.stream()>>>(xs, x, perm, Nk, k, H);
  QT_CUDA_LAUNCH_CHECK();
}

void moe_gather_backward(Context& ctx, bf16* dx, const bf16* dxs, const int32_t* perm, int64_t Nk, int64_t k,
                         int64_t H) {
  QT_CUDA_ASSERT(k >= 1 && Nk % k == 0, "moe: N*k not a multiple of k");
  if (dx == nullptr || Nk * H <= 0) return;
  const int32_t* inv = inverse_in_scratch(ctx, perm, Nk);
  token_sum_kernel<<<grid_for(Nk / k * H), kThreads, 0, ctx.stream()>>>(dx, dxs, nullptr, inv, Nk / k, k, H);
  QT_CUDA_LAUNCH_CHECK();
}

void moe_combine(Context& ctx, bf16* out, const bf16* ys, const float* topk_w, const int32_t* perm, int64_t Nk,
                 int64_t k, int64_t H) {
  QT_CUDA_ASSERT(k >= 1 && Nk % k == 0, "moe: N*k not a multiple of k");
  if (Nk * H <= 0) return;
  const int32_t* inv = inverse_in_scratch(ctx, perm, Nk);
  token_sum_kernel<<<grid_for(Nk / k * H), kThreads, 0, ctx.stream()>>>(out, ys, topk_w, inv, Nk / k, k, H);
  QT_CUDA_LAUNCH_CHECK();
}

void moe_combine_backward(Context& ctx, bf16* dys, float* dtopk_w, const bf16* dout, const bf16* ys,
                          const float* topk_w, const int32_t* perm, int64_t Nk, int64_t k, int64_t H, bool accumulate) {
  if ((dys == nullptr && dtopk_w == nullptr) || Nk <= 0) return;
  QT_CUDA_ASSERT(!accumulate || dys != ys, "moe_combine_backward: dys over ys needs accumulate false");
  combine_bwd_kernel<<<warp_blocks(Nk), kWarpsPerBlock * 32, 0, ctx.stream()>>>(dys, dtopk_w, dout, ys, topk_w, perm,
                                                                                Nk, k, H, accumulate);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace qt::cuda
