// Attention of n new queries over a KV cache (decoding; cpu::attention_kv_forward with B = 1):
//   out[i,h,:] = sum_{j <= past+i} softmax_j(s_j) v[j,g,:],  s_j = scale q[i,h,:] . k[j,g,:]
// with g = h / (nh / nkv) (GQA) and scale = 1/sqrt(hd); q, out (n,nh,hd); k, v (past+n, nkv, hd), bf16.
//
// Grid (n, nh): one block per (query row, head), kWarps warps. Warp w takes keys j = w, w + kWarps, ...;
// its lanes split the head dims (lane holds d = lane + 32 t, t < 8, so hd <= 256), the dot product is
// a butterfly warp sum (every lane gets it), and each warp keeps its own online softmax in fp32:
//   m' = max(m, s);  c = e^(m - m');  p = e^(s - m');  l = c l + p;  acc = c acc + p v_j.
// Then the warps' states merge through shared memory: M = max_w m_w, f_w = e^(m_w - M) (0 for a warp
// that saw no key), out = sum_w f_w acc_w / sum_w f_w l_w, rounded once to bf16. Plain fp32 SIMT,
// no tensor cores: a decode step is one query row per head and bound by reading the cache.
#include <cmath>
#include <cstdint>

#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

constexpr int kKvWarps = 4;
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 32 * 8

__global__ void attention_kv_kernel(bf16* out, const bf16* q, const bf16* k, const bf16* v, int64_t past, int64_t nh,
                                    int64_t nkv, int64_t hd, float scale) {
  const int64_t i = blockIdx.x, h = blockIdx.y, g = h / (nh / nkv);
  const int lane = int(threadIdx.x & 31), warp = int(threadIdx.x >> 5);
  const int64_t keys = past + i + 1;  // query i sees keys 0..past+i
  const bf16* qi = q + (i * nh + h) * hd;
  float qr[kMaxDimsPerLane], acc[kMaxDimsPerLane];
#pragma unroll
  for (int t = 0; t < kMaxDimsPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    qr[t] = d < hd ? to_f(qi[d]) : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = warp; j < keys; j += kKvWarps) {
    const bf16* kj = k + (j * nkv + g) * hd;
    const bf16* vj = v + (j * nkv + g) * hd;
    float dot = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxDimsPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < hd) dot += qr[t] * to_f(kj[d]);
    }
    const float s = scale * warp_sum(dot);
    const float m_new = fmaxf(m, s);
    const float c = expf(m - m_new);  // 0 on the warp's first key (m = -inf)
    const float p = expf(s - m_new);
    l = l * c + p;
#pragma unroll
    for (int t = 0; t < kMaxDimsPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < hd) acc[t] = acc[t] * c + p * to_f(vj[d]);
    }
    m = m_new;
  }
  __shared__ float ms[kKvWarps], ls[kKvWarps];
  __shared__ float accs[kKvWarps][32 * kMaxDimsPerLane];
  if (lane == 0) ms[warp] = m, ls[warp] = l;
#pragma unroll
  for (int t = 0; t < kMaxDimsPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < hd) accs[warp][d] = acc[t];
  }
  __syncthreads();
  float mt = -INFINITY;
  for (int w = 0; w < kKvWarps; ++w) mt = fmaxf(mt, ms[w]);
  float f[kKvWarps], lt = 0.0f;
  for (int w = 0; w < kKvWarps; ++w) {
    f[w] = ms[w] == -INFINITY ? 0.0f : expf(ms[w] - mt);
    lt += f[w] * ls[w];
  }
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kKvWarps; ++w) o += f[w] * accs[w][d];
    out[(i * nh + h) * hd + d] = to_bf(o / lt);
  }
}

}  // namespace

void attention_kv_forward(Context& ctx, bf16* out, const bf16* q, const bf16* k, const bf16* v, int64_t n,
                          int64_t past, int64_t nh, int64_t nkv, int64_t hd) {
  QT_CUDA_ASSERT(n >= 0 && past >= 0 && nh > 0 && nkv > 0 && nh % nkv == 0, "attention_kv: bad shape");
  QT_CUDA_ASSERT(hd > 0 && hd <= 32 * kMaxDimsPerLane, "attention_kv: head_dim > 256");
  QT_CUDA_ASSERT(nh <= 65535, "attention_kv: more than 65535 heads");
  if (n == 0) return;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  attention_kv_kernel<<<dim3(unsigned(n), unsigned(nh)), 32 * kKvWarps, 0, ctx.stream()>>>(out, q, k, v, past, nh, nkv,
                                                                                          hd, scale);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace qt::cuda
