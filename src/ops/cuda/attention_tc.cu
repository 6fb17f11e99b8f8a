// Tensor-core causal GQA attention (head_dim 64 and 128): the contract of attention.cu (same
// arguments, segments never crossed, lse per query row, dq/dk/dv accumulated), with the matrix
// products on mma.sync m16n8k16 (bf16 inputs, fp32 accumulation; sm_80 and later).
//
// Fragments (PTX ISA, m16n8k16 .bf16): lane = 4g + t. A (16x16, row-major): a0 = (g, 2t..2t+1),
// a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..). B (16x8): b0 = (k 2t..2t+1, n g), b1 =
// (k 2t+8.., n g). C (16x8 fp32): c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..). Every operand sits
// in shared memory row-major as loaded (rows padded by 8 bf16: the 8 rows g of a fragment, and the
// 8 row addresses of an ldmatrix, fall in distinct banks); the products that contract over a
// tile's rows (P V, dS K, P^T dO, dS^T Q) take their B fragments transposed by ldmatrix.trans.
// C fragments of two neighbouring 8-column tiles are the A fragment of the next product (P or dS
// rounded to bf16: the one intermediate rounding of this kernel).
//
// Forward (grid: 64 query rows x (b, h); 4 warps of 16 rows): per key tile of 64, S = Q K^T,
// online softmax in base 2 (fp32), O += P V. Backward (P recomputed from q, k and lse; D = dO.O
// per row from attention.cu; deterministic, no atomics):
//   dQ kernel, the forward's layout: dP = dO V^T, dS = P (dP - D), dQ += scale dS K;
//   dKV kernel (grid: 64 keys x (b, kv head); 4 warps of 16 keys): every query tile (QT rows) of
//   the group's heads at or after the keys: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T,
//   dK += scale dS^T Q. With GQA (nh / nkv > 1 query heads per kv head) the heads are split over
//   blocks instead (grid: 64 keys x (b, query head)): each block writes its head's fp32 partial dK,
//   dV to a scratch (2, B, S, nh, HD), and dkv_reduce_kernel sums a group's heads in head order
//   (deterministic) into dk, dv. A block per kv head looping over its 7 or 8 query heads left most
//   of the H100 idle (7B: 256 blocks, the first key tile doing 64 x 7 query tiles alone).
// A block does not even load a tile in which none of its (query, key) pairs is visible (another
// packed document; checked on the segment ids), and a warp skips the products of a tile invisible
// to its 16 rows (causal or other documents), so packed documents cost about their own blocks.
#include <cmath>

#include "ops/cuda/attention_tc.h"
#include "ops/cuda/common.cuh"
#include "ops/cuda/mma.cuh"

namespace qt::cuda {

namespace {

constexpr int kTcWarps = 4;
constexpr int kTile = 64;  // query rows (forward, dQ) or keys (dKV) per block: 16 per warp
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct TcShape {
  int64_t B, S, nh, nkv;
  float scale;
};

// A forward / dQ block: query rows row0.. of head h of batch b (grid: query tiles x (b, h)), its
// kv head, and the offsets of the head's row 0 in (B,S,nh,HD) and (B,S,nkv,HD) tensors.
struct RowBlock {
  int64_t bh, b, h, kvh, row0, q_base, kv_base;
  __device__ RowBlock(const TcShape& a, int hd)
      : bh(blockIdx.y), b(bh / a.nh), h(bh % a.nh), kvh(h / (a.nh / a.nkv)), row0(int64_t(blockIdx.x) * kTile),
        q_base((b * a.S * a.nh + h) * hd), kv_base((b * a.S * a.nkv + kvh) * hd) {}
};


__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// c (16 x 8*NT) += A (rows r0.., A's row-major tile in As) times Y^T (rows n0.. of Y): both
// contracted over KD contiguous columns. Fragments by ldmatrix.x4 (lanes 8i..8i+7 address the rows
// of matrix i): A's four 8x8 quarters (rows r0 + 8*(i & 1), columns 16*kc + 8*(i >> 1)), and the B
// fragments (b0, b1) of two 8-row tiles of Y (rows n0 + 8*(nt + (i >> 1)), columns 16*kc + 8*(i & 1)).
template <int NT, int KD>
__device__ __forceinline__ void mma_abt(float (&c)[NT][4], const bf16* As, int lda, int r0, const bf16* Y, int ldy,
                                        int n0, int lane) {
  static_assert(NT % 2 == 0, "mma_abt: pairs of 8-column tiles");
  const int mi = lane >> 3, mr = lane & 7;
  const bf16* arow = As + (r0 + (mi & 1) * 8 + mr) * lda + (mi >> 1) * 8;
  const bf16* yrow = Y + (n0 + (mi >> 1) * 8 + mr) * ldy + (mi & 1) * 8;
#pragma unroll
  for (int kc = 0; kc < KD / 16; ++kc) {
    uint32_t a[4];
    ldmatrix_x4(a, arow + kc * 16);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, yrow + np * 16 * ldy + kc * 16);
      mma_bf16(c[2 * np], a, b[0], b[1]);
      mma_bf16(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// c (16 x 8*NT) += W (16 x KW, the fp32 C fragments w, rounded to bf16) times Y, Y (KW rows x 8*NT
// columns) a row-major shared-memory tile (row stride ldy, 16-byte aligned rows) contracted over
// its rows: each ldmatrix.x4.trans gives the B fragments (b0, b1) of two 8-column tiles, matrix i
// = rows kc*16 + 8*(i & 1).., columns 16*np + 8*(i >> 1).. (lanes 8i..8i+7 address its rows).
template <int NT, int KW>
__device__ __forceinline__ void mma_frag_b(float (&c)[NT][4], const float (&w)[KW / 8][4], const bf16* Y, int ldy,
                                           int lane) {
  static_assert(NT % 2 == 0, "mma_frag_b: pairs of 8-column tiles");
  const int mi = lane >> 3, mr = lane & 7;
#pragma unroll
  for (int kc = 0; kc < KW / 16; ++kc) {
    const uint32_t a[4] = {pack_bf16(w[2 * kc][0], w[2 * kc][1]), pack_bf16(w[2 * kc][2], w[2 * kc][3]),
                           pack_bf16(w[2 * kc + 1][0], w[2 * kc + 1][1]),
                           pack_bf16(w[2 * kc + 1][2], w[2 * kc + 1][3])};
    const bf16* row = Y + (kc * 16 + (mi & 1) * 8 + mr) * ldy + (mi >> 1) * 8;
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, row + np * 16);
      mma_bf16(c[2 * np], a, b[0], b[1]);
      mma_bf16(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Calls f(x, hr, r, c) for every element x of the warp's C fragments (16 x 8*NT): r = its row in
// the block's tile (rows r0..r0+15; hr = 0 for r0 + g, 1 for r0 + g + 8), c its column.
template <int NT, typename F>
__device__ __forceinline__ void for_each_elem(float (&x)[NT][4], int r0, int g, int t, F&& f) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) f(x[nt][e], e >> 1, r0 + g + 8 * (e >> 1), nt * 8 + 2 * t + (e & 1));
}

template <int N, int M>
__device__ __forceinline__ void zero(float (&c)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) c[i][j] = 0.0f;
}

// dst (rows x HD, stride HD+8) = rows row0.. of src (row stride `stride`, bf16), zero past S.
// Block-cooperative, 16-byte loads.
template <int HD>
__device__ void load_tile(bf16* dst, int rows, const bf16* src, int64_t stride, int64_t row0, int64_t S) {
  constexpr int V = HD / 8;
  for (int idx = threadIdx.x; idx < rows * V; idx += blockDim.x) {
    const int r = idx / V, c = (idx % V) * 8;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (row0 + r < S) x = *reinterpret_cast<const uint4*>(src + (row0 + r) * stride + c);
    *reinterpret_cast<uint4*>(dst + r * (HD + 8) + c) = x;
  }
}

// load_tile's copy through cp.async (the caller commits and waits): rows past S zero-filled.
template <int HD>
__device__ void load_tile_async(bf16* dst, int rows, const bf16* src, int64_t stride, int64_t row0, int64_t S) {
  constexpr int V = HD / 8;
  for (int idx = threadIdx.x; idx < rows * V; idx += blockDim.x) {
    const int r = idx / V, c = (idx % V) * 8;
    const bool ok = row0 + r < S;
    cp_async16(dst + r * (HD + 8) + c, ok ? src + (row0 + r) * stride + c : src, ok);
  }
}

// segs[r] = segment id of row row0 + r (0 when no segments; -1 past S, never equal to a key's).
__device__ void load_segs(int* segs, int rows, const int32_t* segment, int64_t b, int64_t S, int64_t row0, int past) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t i = row0 + r;
    segs[r] = i >= S ? past : (segment ? segment[b * S + i] : 0);
  }
}

// Whether any (query, key) pair of row r of a tile (rows: queries when rows_are_queries, else keys)
// against half `half` of its n columns is visible (causal, same segment).
__device__ __forceinline__ bool row_sees_any(const int* rseg, int64_t r_first, const int* cseg, int64_t c_first,
                                             int n, bool rows_are_queries, int r, int half) {
  bool any = false;
  for (int c = half * (n / 2); c < (half + 1) * (n / 2); ++c) {
    const int64_t i = rows_are_queries ? r_first + r : c_first + c, j = rows_are_queries ? c_first + c : r_first + r;
    any |= j <= i && rseg[r] == cseg[c];
  }
  return any;
}

// Any visible pair in the warp's 16 x n tile (lane: row lane >> 1, half lane & 1).
__device__ __forceinline__ bool warp_any_visible(const int* rseg, int64_t r_first, const int* cseg, int64_t c_first,
                                                 int n, bool rows_are_queries, int lane) {
  return __any_sync(0xffffffffu, row_sees_any(rseg, r_first, cseg, c_first, n, rows_are_queries, lane >> 1, lane & 1));
}

// Whether every (row, column) pair of the warp's 16 rows (segment ids rseg[0..15]) and the tile's n
// columns (cseg[0..n-1]) shares one segment (always without segments): the masks then reduce to the
// causal one. Each lane compares a row and n / 32 columns with row 0.
__device__ __forceinline__ bool warp_one_segment(const int* rseg, const int* cseg, int n, int lane) {
  const int s0 = rseg[0];
  bool same = rseg[lane & 15] == s0;
  for (int c = lane; c < n; c += 32) same &= cseg[c] == s0;
  return __all_sync(0xffffffffu, same);
}

// The same for the block's 64 x n tile (thread: row tid >> 1, half tid & 1). Starts with a barrier
// (the segment ids were just written by other threads) and ends with one.
static_assert(kTcWarps * 32 == 2 * kTile && kTile == 64, "block_any_visible: two threads per tile row");
__device__ __forceinline__ bool block_any_visible(const int* rseg, int64_t r_first, const int* cseg, int64_t c_first,
                                                  int n, bool rows_are_queries) {
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  __syncthreads();
  return __syncthreads_or(row_sees_any(rseg, r_first, cseg, c_first, n, rows_are_queries, r, half)) != 0;
}

// The double-buffered tile loop of every kernel here: visits the tiles first, first + step, ... < end
// that visible(i, buf) accepts (it loads the tile's segment ids into buffer buf and decides for the
// whole block; tiles of other packed documents are skipped without being loaded); while tile n is
// used by body(i, buf) (buffer n % 2), fetch(i, buf ^ 1) has the next visible tile's operands on the
// way (cp.async, committed). A barrier before each body (its buffer has landed everywhere) and after
// it (the buffer is refilled two tiles on); one before the first (the block-resident tile).
template <typename Visible, typename Fetch, typename Body>
__device__ void stream_tiles(int64_t first, int64_t end, int64_t step, Visible&& visible, Fetch&& fetch, Body&& body) {
  auto next = [&](int64_t i, int buf) {
    for (; i < end; i += step)
      if (visible(i, buf)) return i;
    return end;
  };
  __syncthreads();
  int buf = 0;
  int64_t i = next(first, 0);
  if (i < end) fetch(i, 0);
  while (i < end) {
    const int64_t i_next = next(i + step, buf ^ 1);
    if (i_next < end) {
      fetch(i_next, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    body(i, buf);
    __syncthreads();
    i = i_next;
    buf ^= 1;
  }
}

// The key tiles (K and V, kTile rows each) a forward or dQ block of query rows row0.. visits, in
// order, through stream_tiles: for_each_tile(body) calls body(j0, Ks, Vs, kseg) for every tile that
// the calling warp's 16 query rows see part of.
template <int HD>
struct KeyTileStream {
  const bf16 *k, *v;
  int64_t kstride, S, end;  // end: one past the last key any query row of the block may see
  const int32_t* segment;
  int64_t b;
  const int* qseg;
  int64_t row0;
  bf16 *Ks0, *Vs0;
  int* kseg0;

  template <typename F>
  __device__ void for_each_tile(F&& body) const {
    const int lane = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16;
    stream_tiles(
        0, end, kTile,
        [&](int64_t j0, int buf) {
          load_segs(kseg0 + buf * kTile, kTile, segment, b, S, j0, -2);
          return !segment || block_any_visible(qseg, row0, kseg0 + buf * kTile, j0, kTile, true);
        },
        [&](int64_t j0, int buf) {
          load_tile_async<HD>(Ks0 + buf * kTile * (HD + 8), kTile, k, kstride, j0, S);
          load_tile_async<HD>(Vs0 + buf * kTile * (HD + 8), kTile, v, kstride, j0, S);
          cp_async_commit();
        },
        [&](int64_t j0, int buf) {
          const int* kseg = kseg0 + buf * kTile;
          if (segment ? warp_any_visible(qseg + r0, row0 + r0, kseg, j0, kTile, true, lane) : j0 <= row0 + r0 + 15)
            body(j0, Ks0 + buf * kTile * (HD + 8), Vs0 + buf * kTile * (HD + 8), kseg);
        });
  }
};

template <int HD>
__global__ void __launch_bounds__(kTcWarps * 32) tc_fwd_kernel(bf16* out, float* lse, const bf16* q, const bf16* k,
                                                               const bf16* v, const int32_t* segment, TcShape a) {
  constexpr int LD = HD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // kTile x LD
  bf16* Ks0 = Qs + kTile * LD;                    // 2 x kTile x LD (double-buffered key tiles)
  bf16* Vs0 = Ks0 + 2 * kTile * LD;               // 2 x kTile x LD
  int* qseg = reinterpret_cast<int*>(Vs0 + 2 * kTile * LD);
  int* kseg0 = qseg + kTile;                      // 2 x kTile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const RowBlock blk(a, HD);
  const int64_t S = a.S, bh = blk.bh, b = blk.b, row0 = blk.row0, qstride = a.nh * HD, kstride = a.nkv * HD;
  const int r0 = warp * 16;
  const float sl2 = a.scale * kLog2e;

  load_tile<HD>(Qs, kTile, q + blk.q_base, qstride, row0, S);
  load_segs(qseg, kTile, segment, b, S, row0, -1);
  float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  zero(o);
  const KeyTileStream<HD> stream{k + blk.kv_base, v + blk.kv_base, kstride, S, min(S - 1, row0 + kTile - 1) + 1,
                                 segment, b, qseg, row0, Ks0, Vs0, kseg0};
  stream.for_each_tile([&](int64_t j0, const bf16* Ks, const bf16* Vs, const int* kseg) {
    float s[kTile / 8][4];
    zero(s);
    mma_abt<kTile / 8, HD>(s, Qs, LD, r0, Ks, LD, 0, lane);
    float mx[2] = {-INFINITY, -INFINITY};
    // A tile wholly below the diagonal within one document needs no mask (the common case).
    if (j0 + kTile - 1 <= row0 + r0 && (!segment || warp_one_segment(qseg + r0, kseg, kTile, lane))) {
      for_each_elem(s, r0, g, t, [&](float& x, int hr, int, int) {
        x *= sl2;
        mx[hr] = fmaxf(mx[hr], x);
      });
    } else {
      for_each_elem(s, r0, g, t, [&](float& x, int hr, int r, int c) {
        const bool vis = j0 + c <= row0 + r && qseg[r] == kseg[c];
        x = vis ? x * sl2 : -INFINITY;
        mx[hr] = fmaxf(mx[hr], x);
      });
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
      const float m_new = fmaxf(m[hr], mx[hr]);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // row sees nothing yet: p = 0 below
      const float corr = exp2f(m[hr] - base);
      m[hr] = m_new;
      mx[hr] = base;
      l[hr] *= corr;
#pragma unroll
      for (int dn = 0; dn < HD / 8; ++dn) {
        o[dn][2 * hr] *= corr;
        o[dn][2 * hr + 1] *= corr;
      }
    }
    for_each_elem(s, r0, g, t, [&](float& x, int hr, int, int) {
      x = exp2f(x - mx[hr]);
      l[hr] += x;
    });
    mma_frag_b<HD / 8, kTile>(o, s, Vs, LD, lane);
  });
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 1);
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 2);
    const int64_t i = row0 + r0 + g + 8 * hr;
    if (i >= S) continue;
    const float inv_l = 1.0f / l[hr];
    bf16* oi = out + blk.q_base + i * qstride;
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn)
      *reinterpret_cast<__nv_bfloat162*>(oi + dn * 8 + 2 * t) =
          __floats2bfloat162_rn(o[dn][2 * hr] * inv_l, o[dn][2 * hr + 1] * inv_l);
    if (t == 0) lse[bh * S + i] = m[hr] * kLn2 + logf(l[hr]);
  }
}

template <int HD>
__global__ void __launch_bounds__(kTcWarps * 32)
    tc_dq_kernel(bf16* dq, const bf16* dout, const float* lse, const float* Drow, const bf16* q, const bf16* k,
                 const bf16* v, const int32_t* segment, TcShape a) {
  constexpr int LD = HD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // kTile x LD
  bf16* dOs = Qs + kTile * LD;                    // kTile x LD
  bf16* Ks0 = dOs + kTile * LD;                   // 2 x kTile x LD (double-buffered key tiles)
  bf16* Vs0 = Ks0 + 2 * kTile * LD;               // 2 x kTile x LD
  int* qseg = reinterpret_cast<int*>(Vs0 + 2 * kTile * LD);
  int* kseg0 = qseg + kTile;                      // 2 x kTile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const RowBlock blk(a, HD);
  const int64_t S = a.S, bh = blk.bh, b = blk.b, row0 = blk.row0, qstride = a.nh * HD, kstride = a.nkv * HD;
  const int r0 = warp * 16;
  const float sl2 = a.scale * kLog2e;

  load_tile<HD>(Qs, kTile, q + blk.q_base, qstride, row0, S);
  load_tile<HD>(dOs, kTile, dout + blk.q_base, qstride, row0, S);
  load_segs(qseg, kTile, segment, b, S, row0, -1);
  float lse2[2], Dr[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t i = row0 + r0 + g + 8 * hr;
    lse2[hr] = i < S ? lse[bh * S + i] * kLog2e : 0.0f;
    Dr[hr] = i < S ? Drow[bh * S + i] : 0.0f;
  }
  float acc[HD / 8][4];
  zero(acc);
  const KeyTileStream<HD> stream{k + blk.kv_base, v + blk.kv_base, kstride, S, min(S - 1, row0 + kTile - 1) + 1,
                                 segment, b, qseg, row0, Ks0, Vs0, kseg0};
  stream.for_each_tile([&](int64_t j0, const bf16* Ks, const bf16* Vs, const int* kseg) {
    float p[kTile / 8][4], dp[kTile / 8][4];
    zero(p);
    zero(dp);
    mma_abt<kTile / 8, HD>(p, Qs, LD, r0, Ks, LD, 0, lane);
    mma_abt<kTile / 8, HD>(dp, dOs, LD, r0, Vs, LD, 0, lane);
    if (j0 + kTile - 1 <= row0 + r0 && (!segment || warp_one_segment(qseg + r0, kseg, kTile, lane))) {
      for_each_elem(p, r0, g, t, [&](float& x, int hr, int, int) { x = exp2f(x * sl2 - lse2[hr]); });
    } else {
      for_each_elem(p, r0, g, t, [&](float& x, int hr, int r, int c) {
        const bool vis = j0 + c <= row0 + r && qseg[r] == kseg[c];
        x = vis ? exp2f(x * sl2 - lse2[hr]) : 0.0f;
      });
    }
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] *= dp[nt][e] - Dr[e >> 1];  // dS
    mma_frag_b<HD / 8, kTile>(acc, p, Ks, LD, lane);
  });
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t i = row0 + r0 + g + 8 * hr;
    if (i >= S) continue;
    bf16* di = dq + blk.q_base + i * qstride;
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn) {
      auto* p2 = reinterpret_cast<__nv_bfloat162*>(di + dn * 8 + 2 * t);
      const float2 old = __bfloat1622float2(*p2);
      *p2 = __floats2bfloat162_rn(old.x + a.scale * acc[dn][2 * hr], old.y + a.scale * acc[dn][2 * hr + 1]);
    }
  }
}

template <int HD>
constexpr int dkv_query_tile() {
  return HD > 64 ? 32 : 64;  // keeps dK, dV (16 x HD each) and the S, dP tiles in registers
}

// kPerHead: blockIdx.y = (b, query head) and the fp32 partials go to part (dK then dV, each
// (B,S,nh,HD), unscaled); else blockIdx.y = (b, kv head) and dk, dv are accumulated directly.
template <int HD, bool kPerHead>
__global__ void __launch_bounds__(kTcWarps * 32)
    tc_dkv_kernel(bf16* dk, bf16* dv, float* part, const bf16* dout, const float* lse, const float* Drow,
                  const bf16* q, const bf16* k, const bf16* v, const int32_t* segment, TcShape a) {
  constexpr int QT = dkv_query_tile<HD>(), LD = HD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Two buffers of the streamed query tile (Q, dO, lse, D, segments): tile n+1 is copied in
  // (cp.async) while tile n is multiplied.
  bf16* Ks = reinterpret_cast<bf16*>(smem_raw);  // kTile x LD
  bf16* Vs = Ks + kTile * LD;                     // kTile x LD
  bf16* Qs0 = Vs + kTile * LD;                    // 2 x QT x LD
  bf16* dOs0 = Qs0 + 2 * QT * LD;                 // 2 x QT x LD
  float* lse20 = reinterpret_cast<float*>(dOs0 + 2 * QT * LD);  // 2 x QT (times log2 e)
  float* Dq0 = lse20 + 2 * QT;                                   // 2 x QT
  int* qseg0 = reinterpret_cast<int*>(Dq0 + 2 * QT);             // 2 x QT
  int* kseg = qseg0 + 2 * QT;                                    // kTile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t S = a.S, bg = blockIdx.y, grp = a.nh / a.nkv;
  // One query head per block: its own (kPerHead), or the kv head's only one (grp = 1).
  const int64_t b = kPerHead ? bg / a.nh : bg / a.nkv, kvh = kPerHead ? (bg % a.nh) / grp : bg % a.nkv;
  const int64_t h = kPerHead ? bg % a.nh : kvh, bh = b * a.nh + h;
  const int64_t j0 = int64_t(blockIdx.x) * kTile, qstride = a.nh * HD, kstride = a.nkv * HD;
  const int k0 = warp * 16;
  const float sl2 = a.scale * kLog2e;
  const bf16* qh = q + (b * S * a.nh + h) * HD;
  const bf16* doh = dout + (b * S * a.nh + h) * HD;

  load_tile<HD>(Ks, kTile, k + (b * S * a.nkv + kvh) * HD, kstride, j0, S);
  load_tile<HD>(Vs, kTile, v + (b * S * a.nkv + kvh) * HD, kstride, j0, S);
  load_segs(kseg, kTile, segment, b, S, j0, -2);
  float dk_acc[HD / 8][4], dv_acc[HD / 8][4];
  zero(dk_acc);
  zero(dv_acc);
  // The query tiles at or after the block's keys that any of them sees.
  stream_tiles(
      (j0 / QT) * QT, S, QT,
      [&](int64_t i0, int buf) {
        load_segs(qseg0 + buf * QT, QT, segment, b, S, i0, -1);
        return !segment || block_any_visible(kseg, j0, qseg0 + buf * QT, i0, QT, false);
      },
      [&](int64_t i0, int buf) {
        load_tile_async<HD>(Qs0 + buf * QT * LD, QT, qh, qstride, i0, S);
        load_tile_async<HD>(dOs0 + buf * QT * LD, QT, doh, qstride, i0, S);
        cp_async_commit();
        for (int r = threadIdx.x; r < QT; r += blockDim.x) {
          lse20[buf * QT + r] = i0 + r < S ? lse[bh * S + i0 + r] * kLog2e : 0.0f;
          Dq0[buf * QT + r] = i0 + r < S ? Drow[bh * S + i0 + r] : 0.0f;
        }
      },
      [&](int64_t i0, int buf) {
        const bf16* Qs = Qs0 + buf * QT * LD;
        const bf16* dOs = dOs0 + buf * QT * LD;
        const float* lse2 = lse20 + buf * QT;
        const float* Dq = Dq0 + buf * QT;
        const int* qseg = qseg0 + buf * QT;
        if (segment ? warp_any_visible(kseg + k0, j0 + k0, qseg, i0, QT, false, lane) : j0 + k0 <= i0 + QT - 1) {
          float p[QT / 8][4], dp[QT / 8][4];
          zero(p);
          mma_abt<QT / 8, HD>(p, Ks, LD, k0, Qs, LD, 0, lane);  // S^T (16 keys x QT queries)
          // keys all before the tile's first query, every query < S, one document: no mask
          if (j0 + k0 + 15 <= i0 && i0 + QT <= S && (!segment || warp_one_segment(kseg + k0, qseg, QT, lane))) {
            for_each_elem(p, k0, g, t, [&](float& x, int, int, int c) { x = exp2f(x * sl2 - lse2[c]); });
          } else {
            for_each_elem(p, k0, g, t, [&](float& x, int, int r, int c) {
              const bool vis = j0 + r <= i0 + c && i0 + c < S && qseg[c] == kseg[r];
              x = vis ? exp2f(x * sl2 - lse2[c]) : 0.0f;
            });
          }
          mma_frag_b<HD / 8, QT>(dv_acc, p, dOs, LD, lane);
          zero(dp);
          mma_abt<QT / 8, HD>(dp, Vs, LD, k0, dOs, LD, 0, lane);  // dP^T
#pragma unroll
          for (int nt = 0; nt < QT / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[nt][e] *= dp[nt][e] - Dq[nt * 8 + 2 * t + (e & 1)];  // dS^T
          mma_frag_b<HD / 8, QT>(dk_acc, p, Qs, LD, lane);
        }
      });
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t j = j0 + k0 + g + 8 * hr;
    if (j >= S) continue;
    if constexpr (kPerHead) {
      float* pk = part + ((b * S + j) * a.nh + h) * HD;
      float* pv = pk + a.B * S * a.nh * HD;
#pragma unroll
      for (int dn = 0; dn < HD / 8; ++dn) {
        *reinterpret_cast<float2*>(pk + dn * 8 + 2 * t) = make_float2(dk_acc[dn][2 * hr], dk_acc[dn][2 * hr + 1]);
        *reinterpret_cast<float2*>(pv + dn * 8 + 2 * t) = make_float2(dv_acc[dn][2 * hr], dv_acc[dn][2 * hr + 1]);
      }
      continue;
    }
    const int64_t off = ((b * S + j) * a.nkv + kvh) * HD;
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn) {
      if (dk) {
        auto* p2 = reinterpret_cast<__nv_bfloat162*>(dk + off + dn * 8 + 2 * t);
        const float2 old = __bfloat1622float2(*p2);
        *p2 = __floats2bfloat162_rn(old.x + a.scale * dk_acc[dn][2 * hr], old.y + a.scale * dk_acc[dn][2 * hr + 1]);
      }
      if (dv) {
        auto* p2 = reinterpret_cast<__nv_bfloat162*>(dv + off + dn * 8 + 2 * t);
        const float2 old = __bfloat1622float2(*p2);
        *p2 = __floats2bfloat162_rn(old.x + dv_acc[dn][2 * hr], old.y + dv_acc[dn][2 * hr + 1]);
      }
    }
  }
}

// dk, dv (B,S,nkv,HD) += (scale *) the sum over each kv head's grp query heads of the partials.
__global__ void dkv_reduce_kernel(bf16* dk, bf16* dv, const float* part, TcShape a, int hd) {
  const int64_t grp = a.nh / a.nkv, n = a.B * a.S * a.nkv * hd, half = a.B * a.S * a.nh * hd;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % hd, kvh = (i / hd) % a.nkv, bj = i / (hd * a.nkv);
    const float* p = part + (bj * a.nh + kvh * grp) * hd + d;
    float sk = 0.f, sv = 0.f;
    for (int64_t g = 0; g < grp; ++g) sk += p[g * hd], sv += p[g * hd + half];
    if (dk) dk[i] = to_bf(to_f(dk[i]) + a.scale * sk);
    if (dv) dv[i] = to_bf(to_f(dv[i]) + sv);
  }
}

template <typename Kernel>
void set_smem(Context& ctx, Kernel kernel, size_t bytes) {
  QT_CUDA_ASSERT(bytes <= ctx.max_smem_per_block(), "attention (tensor cores): not enough shared memory");
  if (bytes > 48 * 1024)
    QT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <typename Fn>
void with_hd(int64_t hd, Fn&& fn) {
  if (hd == 64) fn(std::integral_constant<int, 64>{});
  else fn(std::integral_constant<int, 128>{});
}

TcShape tc_shape(int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  QT_CUDA_ASSERT(attention_tc_supported(hd) && nh > 0 && nkv > 0 && nh % nkv == 0,
                 "attention (tensor cores): bad shape");
  QT_CUDA_ASSERT(B * nh <= 65535, "attention: B * heads exceeds the grid");
  return TcShape{B, S, nh, nkv, float(1.0 / std::sqrt(double(hd)))};
}

}  // namespace

bool attention_tc_supported(int64_t hd) { return hd == 64 || hd == 128; }

size_t attention_tc_backward_scratch_floats(int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  return nkv > 0 && nh / nkv > 1 ? size_t(2 * B * S * nh * hd) : 0;
}

void attention_tc_forward(Context& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                          const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  const TcShape a = tc_shape(B, S, nh, nkv, hd);
  if (B * S == 0) return;
  with_hd(hd, [&](auto hdc) {
    constexpr int HD = decltype(hdc)::value;
    const size_t smem = size_t(5 * kTile * (HD + 8)) * 2 + 3 * kTile * 4;
    auto kernel = tc_fwd_kernel<HD>;
    set_smem(ctx, kernel, smem);
    const dim3 grid(unsigned((S + kTile - 1) / kTile), unsigned(B * nh));
    kernel<<<grid, kTcWarps * 32, smem, ctx.stream()>>>(out, lse, q, k, v, segment, a);
    QT_CUDA_LAUNCH_CHECK();
  });
}

void attention_tc_backward(Context& ctx, const float* Drow, float* part, bf16* dq, bf16* dk, bf16* dv,
                           const bf16* dout, const float* lse, const bf16* q, const bf16* k, const bf16* v,
                           const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd) {
  const TcShape a = tc_shape(B, S, nh, nkv, hd);
  if (B * S == 0) return;
  with_hd(hd, [&](auto hdc) {
    constexpr int HD = decltype(hdc)::value;
    if (dq) {
      const size_t smem = size_t(6 * kTile * (HD + 8)) * 2 + 3 * kTile * 4;
      auto kernel = tc_dq_kernel<HD>;
      set_smem(ctx, kernel, smem);
      const dim3 grid(unsigned((S + kTile - 1) / kTile), unsigned(B * nh));
      kernel<<<grid, kTcWarps * 32, smem, ctx.stream()>>>(dq, dout, lse, Drow, q, k, v, segment, a);
      QT_CUDA_LAUNCH_CHECK();
    }
    if (dk || dv) {
      constexpr int QT = dkv_query_tile<HD>();
      const size_t smem = size_t(2 * kTile * (HD + 8) + 4 * QT * (HD + 8)) * 2 + size_t(6 * QT + kTile) * 4;
      const bool per_head = attention_tc_backward_scratch_floats(B, S, nh, nkv, hd) > 0;
      QT_CUDA_ASSERT(!per_head || part, "attention (tensor cores): the GQA backward needs its partials scratch");
      auto kernel = per_head ? tc_dkv_kernel<HD, true> : tc_dkv_kernel<HD, false>;
      set_smem(ctx, kernel, smem);
      const dim3 grid(unsigned((S + kTile - 1) / kTile), unsigned(B * (per_head ? nh : nkv)));
      kernel<<<grid, kTcWarps * 32, smem, ctx.stream()>>>(dk, dv, part, dout, lse, Drow, q, k, v, segment, a);
      QT_CUDA_LAUNCH_CHECK();
      if (per_head) {
        dkv_reduce_kernel<<<grid_for(B * S * nkv * HD), kThreads, 0, ctx.stream()>>>(dk, dv, part, a, HD);
        QT_CUDA_LAUNCH_CHECK();
      }
    }
  });
}

}  // namespace qt::cuda
