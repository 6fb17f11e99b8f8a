// Causal GQA attention with packed-document segments, flash-style: S x S is never stored.
// Math as cpu::attention_forward/backward (s = scale q.k, scale = 1/sqrt(hd); key j visible to
// query i iff j <= i and equal segments; lse saved per query row).
//
// Forward (grid: query tiles of kRows x (b, h); 4 warps, each owning 4 query rows): key tiles of
// 32 go through shared memory (fp32, K rows padded by one word so the lanes, one key each, read
// without bank conflicts); per row an online softmax (running max m, sum l, fp32 accumulator with
// the lanes over head dims).
// Backward, deterministic without atomics, P recomputed from q, k and lse:
//   D_i = dO_i . O_i (one warp per row);
//   dQ kernel: the forward's layout; ds_j = p_j (dO_i.v_j - D_i); dq_i += scale sum_j ds_j k_j;
//   dKV kernel (grid: key tiles of 32 x (b, kv head)): all query rows of the group's heads go by,
//     4 at a time (one per warp computes p and ds for the 32 keys), then each warp accumulates
//     dv_j += p_j dO_i and dk_j += scale ds_j q_i for its quarter of the head dims in registers.
// Plain fp32 FMAs (attention_*_simt: any hd <= 256, the reference); the public op sends head_dim
// 64 and 128 to the tensor-core kernels of attention_tc.cu. Every key tile up to the diagonal is
// loaded; a query row whose segment has no key in the tile skips it (packed documents cost about
// their own causal blocks, not the whole sequence's).
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "ops/cuda/attention_tc.h"
#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block (forward, dQ)
constexpr int kKeys = 32;                     // keys per tile: one per lane

struct Shape {
  int64_t B, S, nh, nkv, hd;
  float scale;
  __device__ int64_t q_off(int64_t b, int64_t i, int64_t h) const { return ((b * S + i) * nh + h) * hd; }
  __device__ int64_t kv_off(int64_t b, int64_t j, int64_t g) const { return ((b * S + j) * nkv + g) * hd; }
};

// Loads key tile [j0, j0+32) of kv head g into shared memory: K (and V when vpad) with row stride
// hd+1, V otherwise hd; seg ids (0 past S). Rows past S are zero. Block-cooperative.
__device__ void load_kv_tile(float* Ks, float* Vs, int* segs, const bf16* k, const bf16* v, const int32_t* segment,
                             const Shape& a, int64_t b, int64_t g, int64_t j0, bool vpad) {
  const int64_t hd = a.hd;
  for (int64_t idx = threadIdx.x; idx < kKeys * hd; idx += blockDim.x) {
    const int64_t jj = idx / hd, d = idx % hd, j = j0 + jj;
    const bool in = j < a.S;
    Ks[jj * (hd + 1) + d] = in ? to_f(k[a.kv_off(b, j, g) + d]) : 0.0f;
    Vs[jj * (vpad ? hd + 1 : hd) + d] = in ? to_f(v[a.kv_off(b, j, g) + d]) : 0.0f;
  }
  for (int64_t jj = threadIdx.x; jj < kKeys; jj += blockDim.x)
    segs[jj] = (segment && j0 + jj < a.S) ? segment[b * a.S + j0 + jj] : 0;
}

// dst (kRows, hd) = rows row0.. of head h of x (B,S,nh,hd) in fp32, zero past S. Block-cooperative.
__device__ void load_query_tile(float* dst, const bf16* x, const Shape& a, int64_t b, int64_t h, int64_t row0) {
  for (int64_t idx = threadIdx.x; idx < kRows * a.hd; idx += blockDim.x) {
    const int64_t i = row0 + idx / a.hd, d = idx % a.hd;
    dst[idx] = i < a.S ? to_f(x[a.q_off(b, i, h) + d]) : 0.0f;
  }
}

__device__ __forceinline__ float dot_row(const float* x, const float* y, int64_t hd) {
  float s = 0;
  for (int64_t d = 0; d < hd; ++d) s += x[d] * y[d];
  return s;
}

// acc[t] (head dim lane + 32t) += sum over the tile's keys jj of w_jj * rows[jj * stride + d], where
// lane jj holds w_jj (the warp's weights of one query row: p for the output, ds for dq).
template <int DPL>
__device__ __forceinline__ void add_weighted_rows(float (&acc)[DPL], float w, const float* rows, int64_t stride,
                                                  int64_t hd, int lane) {
  for (int jj = 0; jj < kKeys; ++jj) {
    const float wj = __shfl_sync(0xffffffffu, w, jj);
    if (wj == 0.0f) continue;
    const float* row = rows + jj * stride;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < hd) acc[t] += wj * row[d];
    }
  }
}

template <int DPL>  // head dims per lane: hd <= 32 * DPL
__global__ void attn_fwd_kernel(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                const int32_t* segment, Shape a) {
  extern __shared__ float smem[];
  const int64_t hd = a.hd, S = a.S;
  float* Qs = smem;                     // kRows x hd
  float* Ks = Qs + kRows * hd;          // kKeys x (hd+1)
  float* Vs = Ks + kKeys * (hd + 1);    // kKeys x hd
  int* segs = reinterpret_cast<int*>(Vs + kKeys * hd);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bh = blockIdx.y, b = bh / a.nh, h = bh % a.nh, g = h / (a.nh / a.nkv);
  const int64_t row0 = int64_t(blockIdx.x) * kRows;

  load_query_tile(Qs, q, a, b, h, row0);
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
  int seg_i[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = row0 + warp * kRowsPerWarp + rr;
    m[rr] = -INFINITY;
    l[rr] = 0;
    seg_i[rr] = (segment && i < S) ? segment[b * S + i] : 0;
#pragma unroll
    for (int t = 0; t < DPL; ++t) acc[rr][t] = 0;
  }
  const int64_t last_row = min(S - 1, row0 + kRows - 1);
  for (int64_t j0 = 0; j0 <= last_row; j0 += kKeys) {
    __syncthreads();  // previous tile fully consumed (and Qs written, first time)
    load_kv_tile(Ks, Vs, segs, k, v, segment, a, b, g, j0, false);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = row0 + r, j = j0 + lane;
      if (i >= S || j0 > i) continue;  // warp-uniform
      const bool valid = j <= i && (segment == nullptr || segs[lane] == seg_i[rr]);
      if (!__any_sync(0xffffffffu, valid)) continue;  // no visible key here (another packed document)
      const float s = valid ? a.scale * dot_row(Qs + r * hd, Ks + lane * (hd + 1), hd) : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(s));
      if (m_new == -INFINITY) continue;  // nothing visible yet (warp-uniform)
      const float p = valid ? expf(s - m_new) : 0.0f;
      const float corr = expf(m[rr] - m_new);
      l[rr] = l[rr] * corr + warp_sum(p);
      m[rr] = m_new;
#pragma unroll
      for (int t = 0; t < DPL; ++t) acc[rr][t] *= corr;
      add_weighted_rows<DPL>(acc[rr], p, Vs, hd, hd, lane);
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = row0 + warp * kRowsPerWarp + rr;
    if (i >= S) continue;
    const float inv_l = 1.0f / l[rr];
    bf16* oi = out + a.q_off(b, i, h);
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < hd) oi[d] = to_bf(acc[rr][t] * inv_l);
    }
    if (lane == 0) lse[bh * S + i] = m[rr] + logf(l[rr]);
  }
}

// Drow (B,nh,S) = dO . O per query row; one warp per row.
__global__ void attn_rowdot_kernel(float* Drow, const bf16* dout, const bf16* out, Shape a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);  // (b, i, h) order
  if (row >= a.B * a.S * a.nh) return;
  const int64_t h = row % a.nh, bi = row / a.nh, b = bi / a.S, i = bi % a.S;
  const bf16 *o = out + row * a.hd, *dO = dout + row * a.hd;
  float s = 0;
  for (int64_t d = lane; d < a.hd; d += 32) s += to_f(o[d]) * to_f(dO[d]);
  s = warp_sum(s);
  if (lane == 0) Drow[(b * a.nh + h) * a.S + i] = s;
}

template <int DPL>
__global__ void attn_dq_kernel(bf16* dq, const bf16* dout, const float* lse, const float* Drow, const bf16* q,
                               const bf16* k, const bf16* v, const int32_t* segment, Shape a) {
  extern __shared__ float smem[];
  const int64_t hd = a.hd, S = a.S;
  float* Qs = smem;                    // kRows x hd
  float* dOs = Qs + kRows * hd;        // kRows x hd
  float* Ks = dOs + kRows * hd;        // kKeys x (hd+1)
  float* Vs = Ks + kKeys * (hd + 1);   // kKeys x (hd+1)
  int* segs = reinterpret_cast<int*>(Vs + kKeys * (hd + 1));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bh = blockIdx.y, b = bh / a.nh, h = bh % a.nh, g = h / (a.nh / a.nkv);
  const int64_t row0 = int64_t(blockIdx.x) * kRows;

  load_query_tile(Qs, q, a, b, h, row0);
  load_query_tile(dOs, dout, a, b, h, row0);
  float acc[kRowsPerWarp][DPL], lse_i[kRowsPerWarp], D_i[kRowsPerWarp];
  int seg_i[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = row0 + warp * kRowsPerWarp + rr;
    lse_i[rr] = i < S ? lse[bh * S + i] : 0.0f;
    D_i[rr] = i < S ? Drow[bh * S + i] : 0.0f;
    seg_i[rr] = (segment && i < S) ? segment[b * S + i] : 0;
#pragma unroll
    for (int t = 0; t < DPL; ++t) acc[rr][t] = 0;
  }
  const int64_t last_row = min(S - 1, row0 + kRows - 1);
  for (int64_t j0 = 0; j0 <= last_row; j0 += kKeys) {
    __syncthreads();
    load_kv_tile(Ks, Vs, segs, k, v, segment, a, b, g, j0, true);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = row0 + r, j = j0 + lane;
      if (i >= S || j0 > i) continue;
      const bool valid = j <= i && (segment == nullptr || segs[lane] == seg_i[rr]);
      if (!__any_sync(0xffffffffu, valid)) continue;  // no visible key here (another packed document)
      float ds = 0;
      if (valid) {
        const float p = expf(a.scale * dot_row(Qs + r * hd, Ks + lane * (hd + 1), hd) - lse_i[rr]);
        ds = p * (dot_row(dOs + r * hd, Vs + lane * (hd + 1), hd) - D_i[rr]);
      }
      add_weighted_rows<DPL>(acc[rr], ds, Ks, hd + 1, hd, lane);
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = row0 + warp * kRowsPerWarp + rr;
    if (i >= S) continue;
    bf16* dqi = dq + a.q_off(b, i, h);
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < hd) dqi[d] = to_bf(to_f(dqi[d]) + a.scale * acc[rr][t]);
    }
  }
}

template <int DPL>
__global__ void attn_dkv_kernel(bf16* dk, bf16* dv, const bf16* dout, const float* lse, const float* Drow,
                                const bf16* q, const bf16* k, const bf16* v, const int32_t* segment, Shape a) {
  constexpr int CH = 8 * DPL;  // head dims per warp in the accumulation phase (4 warps: 32*DPL)
  extern __shared__ float smem[];
  const int64_t hd = a.hd, S = a.S;
  float* Ks = smem;                     // kKeys x (hd+1)
  float* Vs = Ks + kKeys * (hd + 1);    // kKeys x (hd+1)
  float* Qr = Vs + kKeys * (hd + 1);    // kWarps x hd: the row each warp handles this step
  float* dOr = Qr + kWarps * hd;        // kWarps x hd
  float* P = dOr + kWarps * hd;         // kWarps x kKeys
  float* DS = P + kWarps * kKeys;       // kWarps x kKeys (includes the score scale)
  int* segs = reinterpret_cast<int*>(DS + kWarps * kKeys);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bg = blockIdx.y, b = bg / a.nkv, g = bg % a.nkv, grp = a.nh / a.nkv;
  const int64_t j0 = int64_t(blockIdx.x) * kKeys, j = j0 + lane;

  load_kv_tile(Ks, Vs, segs, k, v, segment, a, b, g, j0, true);
  float dk_acc[CH], dv_acc[CH];
#pragma unroll
  for (int t = 0; t < CH; ++t) dk_acc[t] = dv_acc[t] = 0;
  const int64_t rows_per_head = S - j0, total = grp * rows_per_head;  // query rows i >= j0 of each head
  __syncthreads();
  for (int64_t u0 = 0; u0 < total; u0 += kWarps) {
    // Phase 1: warp w takes row u0 + w: p and ds for the 32 keys of the tile.
    const int64_t u = u0 + warp;
    float p = 0, ds = 0;
    if (u < total) {  // warp-uniform
      const int64_t h = g * grp + u / rows_per_head, i = j0 + u % rows_per_head, bh = b * a.nh + h;
      const int seg_i = segment ? segment[b * S + i] : 0;
      const bool valid = j < S && j <= i && (segment == nullptr || segs[lane] == seg_i);
      // A row that sees none of these keys (another packed document) is skipped: p = ds = 0, so
      // phase 2 never reads its (unloaded) Qr / dOr.
      if (__any_sync(0xffffffffu, valid)) {
        for (int64_t d = lane; d < hd; d += 32) {
          Qr[warp * hd + d] = to_f(q[a.q_off(b, i, h) + d]);
          dOr[warp * hd + d] = to_f(dout[a.q_off(b, i, h) + d]);
        }
        __syncwarp();
      }
      if (valid) {
        p = expf(a.scale * dot_row(Qr + warp * hd, Ks + lane * (hd + 1), hd) - lse[bh * S + i]);
        ds = a.scale * p * (dot_row(dOr + warp * hd, Vs + lane * (hd + 1), hd) - Drow[bh * S + i]);
      }
    }
    P[warp * kKeys + lane] = p;
    DS[warp * kKeys + lane] = ds;
    __syncthreads();
    // Phase 2: lane = key, warp = a quarter of the head dims, over the (up to) 4 rows of this step.
    for (int r = 0; r < kWarps; ++r) {
      const float pr = P[r * kKeys + lane], dsr = DS[r * kKeys + lane];
      if (pr == 0.0f && dsr == 0.0f) continue;
      const float *qr = Qr + r * hd, *dor = dOr + r * hd;
#pragma unroll
      for (int t = 0; t < CH; ++t) {
        const int64_t d = warp * CH + t;
        if (d < hd) {
          dv_acc[t] += pr * dor[d];
          dk_acc[t] += dsr * qr[d];
        }
      }
    }
    __syncthreads();  // Qr, dOr, P, DS are rewritten next step
  }
  if (j >= S) return;
#pragma unroll
  for (int t = 0; t < CH; ++t) {
    const int64_t d = warp * CH + t;
    if (d >= hd) continue;
    const int64_t off = a.kv_off(b, j, g) + d;
    if (dk) dk[off] = to_bf(to_f(dk[off]) + dk_acc[t]);
    if (dv) dv[off] = to_bf(to_f(dv[off]) + dv_acc[t]);
  }
}

Shape make_shape(int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  QT_CUDA_ASSERT(B >= 0 && S >= 0 && nh > 0 && nkv > 0 && nh % nkv == 0 && hd > 0 && hd <= 256,
                 "attention: bad shape (need nh % nkv == 0, 0 < hd <= 256)");
  QT_CUDA_ASSERT(B * nh <= 65535 && B * nkv <= 65535, "attention: B * heads exceeds the grid");
  return Shape{B, S, nh, nkv, hd, float(1.0 / std::sqrt(double(hd)))};
}

template <typename Kernel>
void prepare_smem(Context& ctx, Kernel kernel, size_t bytes) {
  QT_CUDA_ASSERT(bytes <= ctx.max_smem_per_block(), "attention: head_dim needs more shared memory than the device has");
  if (bytes > 48 * 1024)
    QT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// Calls fn(std::integral_constant<int, DPL>) for the smallest DPL in {1,2,4,8} with hd <= 32*DPL.
template <typename Fn>
void with_dpl(int64_t hd, Fn&& fn) {
  if (hd <= 32) fn(std::integral_constant<int, 1>{});
  else if (hd <= 64) fn(std::integral_constant<int, 2>{});
  else if (hd <= 128) fn(std::integral_constant<int, 4>{});
  else fn(std::integral_constant<int, 8>{});
}

// Drow (B,nh,S) = dO . O per query row, in the context's scratch, followed by extra_floats more
// (from drow_floats(a) on, 16-byte aligned) for the caller.
size_t drow_floats(const Shape& a) { return (size_t(a.B * a.nh * a.S) + 63) / 64 * 64; }
float* row_dot(Context& ctx, const bf16* dout, const bf16* out, const Shape& a, size_t extra_floats = 0) {
  float* Drow = static_cast<float*>(ctx.scratch((drow_floats(a) + extra_floats) * sizeof(float)));
  const int64_t rows = a.B * a.S * a.nh;
  attn_rowdot_kernel<<<unsigned((rows + 7) / 8), 256, 0, ctx.stream()>>>(Drow, dout, out, a);
  QT_CUDA_LAUNCH_CHECK();
  return Drow;
}

}  // namespace

void attention_forward_simt(Context& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                       const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  const Shape a = make_shape(B, S, nh, nkv, hd);
  if (B * S == 0) return;
  const size_t smem = size_t(kRows * hd + kKeys * (hd + 1) + kKeys * hd + kKeys) * 4;
  const dim3 grid(unsigned((S + kRows - 1) / kRows), unsigned(B * nh));
  with_dpl(hd, [&](auto dpl) {
    auto kernel = attn_fwd_kernel<decltype(dpl)::value>;
    prepare_smem(ctx, kernel, smem);
    kernel<<<grid, kWarps * 32, smem, ctx.stream()>>>(out, lse, q, k, v, segment, a);
    QT_CUDA_LAUNCH_CHECK();
  });
}

void attention_backward_simt(Context& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                        const float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* segment,
                        int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  const Shape a = make_shape(B, S, nh, nkv, hd);
  if (B * S == 0 || (!dq && !dk && !dv)) return;
  const float* Drow = row_dot(ctx, dout, out, a);
  with_dpl(hd, [&](auto dpl) {
    constexpr int DPL = decltype(dpl)::value;
    if (dq) {
      const size_t smem = size_t(2 * kRows * hd + 2 * kKeys * (hd + 1) + kKeys) * 4;
      auto kernel = attn_dq_kernel<DPL>;
      prepare_smem(ctx, kernel, smem);
      const dim3 grid(unsigned((S + kRows - 1) / kRows), unsigned(B * nh));
      kernel<<<grid, kWarps * 32, smem, ctx.stream()>>>(dq, dout, lse, Drow, q, k, v, segment, a);
      QT_CUDA_LAUNCH_CHECK();
    }
    if (dk || dv) {
      const size_t smem = size_t(2 * kKeys * (hd + 1) + 2 * kWarps * hd + 2 * kWarps * kKeys + kKeys) * 4;
      auto kernel = attn_dkv_kernel<DPL>;
      prepare_smem(ctx, kernel, smem);
      const dim3 grid(unsigned((S + kKeys - 1) / kKeys), unsigned(B * nkv));
      kernel<<<grid, kWarps * 32, smem, ctx.stream()>>>(dk, dv, dout, lse, Drow, q, k, v, segment, a);
      QT_CUDA_LAUNCH_CHECK();
    }
  });
}

namespace {
// The tensor-core kernels move rows in 16-byte vectors.
bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}
}  // namespace

// The public op: tensor cores for head_dim 64 and 128 (16-byte aligned tensors), the SIMT kernels
// above otherwise.
void attention_forward(Context& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                       const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  if (!attention_tc_supported(hd) || !aligned16({out, q, k, v}))
    return attention_forward_simt(ctx, out, lse, q, k, v, segment, B, S, nh, nkv, hd);
  make_shape(B, S, nh, nkv, hd);  // same checks
  attention_tc_forward(ctx, out, lse, q, k, v, segment, B, S, nh, nkv, hd);
}

void attention_backward(Context& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                        const float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* segment,
                        int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  if (!attention_tc_supported(hd) || !aligned16({dq, dk, dv, dout, q, k, v}))
    return attention_backward_simt(ctx, dq, dk, dv, dout, out, lse, q, k, v, segment, B, S, nh, nkv, hd);
  const Shape a = make_shape(B, S, nh, nkv, hd);
  if (B * S == 0 || (!dq && !dk && !dv)) return;
  float* Drow = row_dot(ctx, dout, out, a, attention_tc_backward_scratch_floats(B, S, nh, nkv, hd));
  attention_tc_backward(ctx, Drow, Drow + drow_floats(a), dq, dk, dv, dout, lse, q, k, v, segment, B, S, nh, nkv, hd);
}

}  // namespace qt::cuda
