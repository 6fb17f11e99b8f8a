// Grouped expert GEMMs (contracts in grouped_gemm.h). One kernel template computes, for every
// expert, C (Mc,Nc) = A (Mc,Kc) B (Kc,Nc) tile by tile on tensor cores; the three products differ
// only in which dimension is grouped by expert and in how A and B lie in memory:
//   NT  Y = X W_e^T:    Mc = the expert's rows, A = X rows (k contiguous), B = W_e (N,K) (k contiguous)
//   NN  dX = dY W_e:    Mc = the expert's rows, A = dY rows (k contiguous), B = W_e (N,K) read as
//                       (Kc = N rows, Nc = K contiguous): "k-major"
//   TN  Out_e = X_e^T dY_e: Kc = the expert's rows, A = X (rows = k, m contiguous), B = dY (rows = k,
//                       n contiguous): both k-major
// NT and NN may add a second product into the same accumulators (SecondProduct, the LoRA term):
// its k tiles follow the first's through the same pipeline, so the output is written once.
//
// Block tile BM x BN x BK, WARPS_M x WARPS_N warps each owning (BM/WARPS_M) x (BN/WARPS_N) of C in
// m16n8k16 fragments (bf16 in, fp32 accumulate). Tiles stream global -> shared with 16-byte
// cp.async in a STAGES-deep ring (zero-filled past the valid rows / columns, so tails need no
// special case), fragments come from shared memory with ldmatrix (.trans for k-major tiles). Every
// shared row is padded by 8 bf16 (16 bytes): the 8 row addresses of one ldmatrix phase then fall in
// 8 distinct 16-byte bank groups (row strides of 80, 272 or 48 bytes), i.e. no bank conflicts,
// without an XOR swizzle.
//
// Device-side schedule (no host sync): NT/NN launch ceil(T/BM) + E row tiles (an upper bound on
// sum_e ceil(rows_e/BM)) times ceil(Nc/BN) column tiles; warp 0 of each block scans the offsets
// (prefix sum of ceil(rows_e/BM), 32 experts per step) to find its expert and row tile; blocks past
// the last tile exit. Consecutive blocks share a row tile (and the expert's weights: L2 reuse).
// TN launches E x ceil(M/BM) x ceil(N/BN) tiles times `splits` (host-chosen from T/E and the SM
// count when the tiles alone would not fill the GPU): split s sums a contiguous BK-aligned chunk
// of the expert's rows; with one split the block adds scale*acc into Out itself, otherwise the
// splits write fp32 partials (context scratch) and a second kernel adds scale * (sum over s in
// order) into Out: deterministic, no atomics.
//
// Tile configurations (4 warps each, 4 stages): Big 128x128x32 with 64x64 warp tiles (80 KiB
// shared, 2 blocks per SM on sm_80/sm_90a, 1 on sm_89; a 64x64 warp tile needs 1.5x fewer ldmatrix
// bytes per mma than 64x32, which matters on Hopper where mma.sync is bound by shared-memory
// bandwidth); Short 64x128 (32x64 warp tiles) when the experts average < 192 rows (128-row tiles
// would be a third padding or more); ThinN 128x32 for Nc <= 64 (LoRA x A^T at r <= 64, dy B,
// dB = dy^T xa); ThinM 32x128 for the K-grouped product with M <= 32 (dA = t^T x). Wide 128x256
// (8 warps of 64x64, 3 stages, 90 KiB, 1 block per SM) only when QT_GROUPED_GEMM_TILE=wide: kept to
// be measured against Big on the H100 (which one wins there is not known yet).
// Small K (xa B^T, K = r) runs on Big with one (zero-padded) k tile: those products are bound by
// the bf16 write of Y. Shapes the tensor-core path does not take (grouped_gemm_tc_ok: a dimension
// read in 16-byte chunks not a multiple of 8, pointers not 16-byte aligned; at r = 4 every LoRA
// product except x A_e^T) go to the SIMT kernels.
//
// cuBLAS: cublasGemmGroupedBatchedEx takes every group's m, n, k from HOST arrays, so it would
// need the offsets on the host (a sync per MoE layer): not used. The CUDA 13.0 cuBLASLt headers
// here have no grouped matrix layout (only strided and pointer-array batches of equal shapes);
// newer cuBLASLt releases document CUBLASLT_MATRIX_LAYOUT_GROUPED_ROWS_ARRAY / _COLS_ARRAY (per
// nvmath-python's binding of cublasLtMatrixLayoutAttribute_t), which may allow device-side group
// sizes: to be measured against these kernels when the toolkit is upgraded.
// Hopper: on compute capability 9.0 the NT and NN products with an output wider than 64 (gate_up,
// down, their input gradients, with LoRA terms fused and gate/up paired) run on the wgmma + TMA
// kernel of grouped_gemm_wgmma.cu instead (QT_GROUPED_GEMM_WGMMA=0 or a forced QT_GROUPED_GEMM_TILE
// keeps them here); TN and thin shapes stay on mma.sync.
#include "ops/cuda/grouped_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/common.cuh"
#include "ops/cuda/grouped_gemm_wgmma.h"
#include "ops/cuda/grouped_tiles.cuh"
#include "ops/cuda/mma.cuh"

namespace qt::cuda {

namespace {

enum class Mode { NT, NN, TN };

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;              // m16 and n8 fragments per warp
  static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BK % 16 == 0, "fragment tiling");
};
using Big = Cfg<128, 128, 32, 2, 2, 4, 2>;   // warp tile 64x64
using Short = Cfg<64, 128, 32, 2, 2, 4, 3>;  // warp tile 32x64: experts of few rows (less padding)
using Wide = Cfg<128, 256, 32, 2, 4, 3, 1>;  // warp tile 64x64, 8 warps, 3 stages (90 KiB)
using ThinN = Cfg<128, 32, 32, 4, 1, 4, 4>;
using ThinM = Cfg<32, 128, 32, 1, 4, 4, 4>;

// Shared elements of one operand tile: R outer rows x BK (k contiguous) or BK x R (k-major), padded.
template <bool KMAJOR, int R, int BK>
constexpr int tile_elems() {
  return KMAJOR ? BK * (R + 8) : R * (BK + 8);
}

struct GroupedArgs {
  const bf16* A;
  const bf16* B;
  void* C;           // bf16 Y / dX (NT, NN) or fp32 Out (TN)
  float* partial;    // TN with splits > 1: (splits, E, M, N) fp32
  const int64_t* offsets;
  int64_t E, Mc, Nc, Kc;  // NT/NN: Nc, Kc (rows grouped); TN: Mc = M, Nc = N (rows = k, grouped)
  int64_t lda, ldb, b_expert_stride;
  // NT/NN: a second product over the same output, its k range appended after the first
  // (C = alpha (A B_e + A2 B2_e)); Kc2 = 0 when absent.
  const bf16* A2;
  const bf16* B2;
  int64_t Kc2, lda2, ldb2, b2_expert_stride;
  // NT pair (gate and up in one launch): the column tiles [n_tiles / 2, n_tiles) compute the second
  // product of the pair, C_p = alpha (A B_p,e + A2_p B2_p,e), with the first's shapes; null: no pair.
  const bf16* Bp;
  const bf16* A2p;
  const bf16* B2p;
  void* Cp;
  int64_t m_tiles, n_tiles;
  float alpha;
  int accumulate, splits;
};

// One operand's global view: element (o, k) (o = the row of C it feeds for A, the column for B)
// lives at g[o * ld + k] (k contiguous) or g[k * ld + o] (k-major); valid for o < o_end, k < k_end.
struct Operand {
  const bf16* g;
  int64_t ld, o0, o_end;
};

// Block-cooperative async copy of the tile (o0.., k0..) of `op` into shared s (16-byte chunks; the
// contiguous dimension's extent is a multiple of 8, so a chunk is wholly valid or wholly outside).
template <bool KMAJOR, int R, int BK, int THREADS>
__device__ __forceinline__ void load_tile(bf16* s, const Operand& op, int64_t k0, int64_t k_end) {
  if constexpr (!KMAJOR) {
    constexpr int CPR = BK / 8, CHUNKS = R * CPR;  // chunks per row, per tile
#pragma unroll
    for (int it = 0; it < (CHUNKS + THREADS - 1) / THREADS; ++it) {
      const int i = int(threadIdx.x) + it * THREADS;
      if (CHUNKS % THREADS != 0 && i >= CHUNKS) break;
      const int r = i / CPR, c = (i % CPR) * 8;
      const int64_t o = op.o0 + r, k = k0 + c;
      const bool ok = o < op.o_end && k < k_end;
      cp_async16(s + r * (BK + 8) + c, ok ? op.g + o * op.ld + k : op.g, ok);
    }
  } else {
    constexpr int CPR = R / 8, CHUNKS = BK * CPR;
#pragma unroll
    for (int it = 0; it < (CHUNKS + THREADS - 1) / THREADS; ++it) {
      const int i = int(threadIdx.x) + it * THREADS;
      if (CHUNKS % THREADS != 0 && i >= CHUNKS) break;
      const int r = i / CPR, c = (i % CPR) * 8;
      const int64_t k = k0 + r, o = op.o0 + c;
      const bool ok = o < op.o_end && k < k_end;
      cp_async16(s + r * (R + 8) + c, ok ? op.g + k * op.ld + o : op.g, ok);
    }
  }
}

// A fragment (rows mm..mm+15, k kk..kk+15) of an m16n8k16 product from the shared A tile.
template <bool KMAJOR, int BM, int BK>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const bf16* sA, int mm, int kk, int lane) {
  if constexpr (!KMAJOR)  // sA[m][k]: matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
    ldmatrix_x4(a, sA + (mm + (lane & 15)) * (BK + 8) + kk + (lane >> 4) * 8);
  else  // sA[k][m], transposed on load: same four matrices
    ldmatrix_x4_trans(a, sA + (kk + (lane & 7) + (lane >> 4) * 8) * (BM + 8) + mm + ((lane >> 3) & 1) * 8);
}

// B fragments of two n8 blocks (columns nn..nn+15, k kk..kk+15): b[0], b[1] for nn..nn+7 and
// b[2], b[3] for nn+8..nn+15.
template <bool KMAJOR, int BN, int BK>
__device__ __forceinline__ void load_b_frag(uint32_t (&b)[4], const bf16* sB, int nn, int kk, int lane) {
  if constexpr (!KMAJOR)  // sB[n][k]
    ldmatrix_x4(b, sB + (nn + (lane & 7) + (lane >> 4) * 8) * (BK + 8) + kk + ((lane >> 3) & 1) * 8);
  else  // sB[k][n]
    ldmatrix_x4_trans(b, sB + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * (BN + 8) + nn + (lane >> 4) * 8);
}

// Warp 0 finds the expert and its row tile for row-tile index mt (grouped_tiles.cuh); every
// thread returns the same values.
template <int BM>
__device__ __forceinline__ void find_row_tile(const int64_t* offsets, int64_t E, int64_t mt, int64_t& e_out,
                                              int64_t& tile_out) {
  __shared__ int64_t s_e, s_tile;
  if (threadIdx.x < 32) {
    int64_t found, tile;
    warp_find_row_tile<BM>(offsets, E, mt, found, tile);
    if (threadIdx.x == 0) {
      s_e = found;
      s_tile = tile;
    }
  }
  __syncthreads();
  e_out = s_e;
  tile_out = s_tile;
}

template <class C, Mode MODE>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS) grouped_mma_kernel(GroupedArgs a) {
  constexpr bool A_KMAJOR = MODE == Mode::TN, B_KMAJOR = MODE != Mode::NT;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, STAGES = C::STAGES;
  constexpr int A_ELEMS = tile_elems<A_KMAJOR, BM, BK>(), B_ELEMS = tile_elems<B_KMAJOR, BN, BK>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sA = reinterpret_cast<bf16*>(smem_raw);  // STAGES x A_ELEMS
  bf16* sB = sA + STAGES * A_ELEMS;              // STAGES x B_ELEMS

  int64_t e, m0, n0, kbeg, kend, kend2 = 0;
  Operand opA, opB, opA2{}, opB2{};
  void* Cout = a.C;
  if constexpr (MODE != Mode::TN) {
    const int64_t mt = int64_t(blockIdx.x) / a.n_tiles;
    int64_t nt = int64_t(blockIdx.x) % a.n_tiles;
    const bf16 *B = a.B, *A2 = a.A2, *B2 = a.B2;
    if (a.Cp != nullptr && nt >= a.n_tiles / 2) nt -= a.n_tiles / 2, B = a.Bp, A2 = a.A2p, B2 = a.B2p, Cout = a.Cp;
    n0 = nt * BN;
    int64_t tile;
    find_row_tile<BM>(a.offsets, a.E, mt, e, tile);
    if (e < 0) return;
    m0 = a.offsets[e] + tile * BM;  // absolute row
    kbeg = 0;
    kend = a.Kc;
    opA = {a.A, a.lda, m0, a.offsets[e + 1]};
    opB = {B + e * a.b_expert_stride, a.ldb, n0, a.Nc};
    if (a.Kc2 > 0) {
      kend2 = a.Kc2;
      opA2 = {A2, a.lda2, m0, a.offsets[e + 1]};
      opB2 = {B2 + e * a.b2_expert_stride, a.ldb2, n0, a.Nc};
    }
  } else {
    int64_t id = blockIdx.x;
    n0 = (id % a.n_tiles) * BN;
    id /= a.n_tiles;
    m0 = (id % a.m_tiles) * BM;
    e = id / a.m_tiles;
    const int64_t r0 = a.offsets[e], r1 = a.offsets[e + 1];
    const int64_t per = ((r1 - r0 + a.splits - 1) / a.splits + BK - 1) / BK * BK;
    kbeg = min(r1, r0 + int64_t(blockIdx.y) * per);
    kend = min(r1, kbeg + per);
    if (a.splits == 1 && kend <= kbeg) return;  // an expert without rows adds nothing
    opA = {a.A, a.lda, m0, a.Mc};
    opB = {a.B, a.ldb, n0, a.Nc};
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp / C::WARPS_N) * C::WTM, wn = (warp % C::WARPS_N) * C::WTN;
  float acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // k tiles of the first product, then of the second (if any), through one pipeline
  const int k_tiles1 = int((kend - kbeg + BK - 1) / BK);
  const int k_tiles = k_tiles1 + int((kend2 + BK - 1) / BK);
  auto load_stage = [&](int kt) {
    const int s = kt % STAGES;
    if (kt < k_tiles1) {
      const int64_t k0 = kbeg + int64_t(kt) * BK;
      load_tile<A_KMAJOR, BM, BK, C::THREADS>(sA + s * A_ELEMS, opA, k0, kend);
      load_tile<B_KMAJOR, BN, BK, C::THREADS>(sB + s * B_ELEMS, opB, k0, kend);
    } else {
      const int64_t k0 = int64_t(kt - k_tiles1) * BK;
      load_tile<A_KMAJOR, BM, BK, C::THREADS>(sA + s * A_ELEMS, opA2, k0, kend2);
      load_tile<B_KMAJOR, BN, BK, C::THREADS>(sB + s * B_ELEMS, opB2, k0, kend2);
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s);
    cp_async_commit();  // empty groups keep the count uniform
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();              // ... for every thread; and stage (kt-1) % STAGES is free again
    if (kt + STAGES - 1 < k_tiles) load_stage(kt + STAGES - 1);
    cp_async_commit();
    const bf16* tA = sA + (kt % STAGES) * A_ELEMS;
    const bf16* tB = sB + (kt % STAGES) * B_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[C::MI][4], bfr[C::NI / 2][4];
#pragma unroll
      for (int i = 0; i < C::MI; ++i) load_a_frag<A_KMAJOR, BM, BK>(af[i], tA, wm + i * 16, kk, lane);
#pragma unroll
      for (int j = 0; j < C::NI / 2; ++j) load_b_frag<B_KMAJOR, BN, BK>(bfr[j], tB, wn + j * 16, kk, lane);
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NI; ++j) mma_bf16(acc[i][j], af[i], bfr[j / 2][(j & 1) * 2], bfr[j / 2][(j & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: C fragment element q of (i, j) is row g + 8 (q >> 1), columns 2t, 2t + 1.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wm + i * 16 + g + 8 * h;
      if (m >= opA.o_end) continue;
#pragma unroll
      for (int j = 0; j < C::NI; ++j) {
        const int64_t n = n0 + wn + j * 8 + 2 * t;
        if (n >= a.Nc) continue;
        const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if constexpr (MODE != Mode::TN) {
          __nv_bfloat162* y = reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(Cout) + m * a.Nc + n);
          float2 out = make_float2(a.alpha * v0, a.alpha * v1);
          if (a.accumulate) {
            const float2 old = __bfloat1622float2(*y);
            out.x += old.x;
            out.y += old.y;
          }
          *y = __floats2bfloat162_rn(out.x, out.y);
        } else if (a.splits == 1) {
          float2* o = reinterpret_cast<float2*>(static_cast<float*>(a.C) + (e * a.Mc + m) * a.Nc + n);
          float2 cur = *o;
          cur.x += a.alpha * v0;
          cur.y += a.alpha * v1;
          *o = cur;
        } else {
          float2* p = reinterpret_cast<float2*>(a.partial + ((int64_t(blockIdx.y) * a.E + e) * a.Mc + m) * a.Nc + n);
          *p = make_float2(v0, v1);
        }
      }
    }
}

// Out (n) += scale * sum_s partial (s, n), s in order.
__global__ void reduce_splits_kernel(float* out, const float* partial, int64_t n, int splits, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int p = 0; p < splits; ++p) s += partial[int64_t(p) * n + i];
    out[i] += scale * s;
  }
}

template <class C, Mode MODE>
void launch_mma(Context& ctx, const GroupedArgs& a, dim3 grid) {
  constexpr size_t smem = size_t(C::STAGES) *
                          (tile_elems<MODE == Mode::TN, C::BM, C::BK>() + tile_elems<MODE != Mode::NT, C::BN, C::BK>()) *
                          sizeof(bf16);
  QT_CUDA_ASSERT(smem <= ctx.max_smem_per_block(), "grouped GEMM tile does not fit in shared memory");
  // The opt-in above 48 KiB, once per device and kernel (a host call, not a stream operation: the
  // first call, e.g. a warm-up step, makes it before any graph capture).
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  QT_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (!(configured.load() & bit)) {
    QT_CUDA_CHECK(cudaFuncSetAttribute(grouped_mma_kernel<C, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(smem)));
    configured.fetch_or(bit);
  }
  grouped_mma_kernel<C, MODE><<<grid, C::THREADS, smem, ctx.stream()>>>(a);
  QT_CUDA_LAUNCH_CHECK();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NT and NN on tensor cores: grid = (row tiles upper bound) x column tiles.
template <class C, Mode MODE>
void launch_rows_grouped(Context& ctx, GroupedArgs a, int64_t T) {
  a.n_tiles = ceil_div(a.Nc, C::BN) * (a.Cp != nullptr ? 2 : 1);
  const int64_t blocks = (ceil_div(T, C::BM) + a.E) * a.n_tiles;
  QT_CUDA_ASSERT(blocks < (int64_t(1) << 31), "grouped GEMM grid too large");
  launch_mma<C, MODE>(ctx, a, dim3(unsigned(blocks)));
}

template <class C>
void launch_kgrouped(Context& ctx, GroupedArgs a, int64_t T, float* Out) {
  a.m_tiles = ceil_div(a.Mc, C::BM);
  a.n_tiles = ceil_div(a.Nc, C::BN);
  const int64_t tiles = a.E * a.m_tiles * a.n_tiles;
  QT_CUDA_ASSERT(tiles < (int64_t(1) << 31), "grouped GEMM grid too large");
  // Splits when the tiles leave the GPU half idle: each split keeps >= 4 k tiles of an average
  // expert, the partials stay under 256 MiB.
  const int64_t emn = a.E * a.Mc * a.Nc;
  int64_t splits = 1;
  if (tiles < 2 * int64_t(ctx.sm_count())) {
    splits = std::min(ceil_div(2 * int64_t(ctx.sm_count()), tiles), ceil_div(T, a.E * 4 * C::BK));
    splits = std::min<int64_t>({splits, 32, std::max<int64_t>(1, (int64_t(256) << 20) / (emn * 4))});
    splits = std::max<int64_t>(splits, 1);
  }
  a.splits = int(splits);
  a.C = Out;
  if (splits > 1) a.partial = static_cast<float*>(ctx.scratch(size_t(splits * emn) * sizeof(float)));
  launch_mma<C, Mode::TN>(ctx, a, dim3(unsigned(tiles), unsigned(splits)));
  if (splits > 1) {
    reduce_splits_kernel<<<grid_for(emn), kThreads, 0, ctx.stream()>>>(Out, a.partial, emn, int(splits), a.alpha);
    QT_CUDA_LAUNCH_CHECK();
  }
}

// ---- SIMT reference kernels --------------------------------------------------------------

// The expert owning `row` (the e with offsets[e] <= row < offsets[e+1]), or -1 past offsets[E].
__device__ __forceinline__ int64_t expert_of_row(const int64_t* offsets, int64_t E, int64_t row) {
  if (row >= offsets[E]) return -1;
  int64_t lo = 0, hi = E;  // first j in [0, E] with offsets[j] > row, minus one
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] > row) hi = mid;
    else lo = mid + 1;
  }
  return lo - 1;
}

// sum_k A (row, k) B_e (k, n) over k < Kc, A (T, Kc), B_e element (k, n) at W_e[n*Kc + k] or, when
// b_kmajor, W_e[k*Nc + n] (W_e = W + e Nc Kc); fp32 accumulation into s.
__device__ __forceinline__ float simt_dot(float s, const bf16* A, const bf16* W, int64_t e, int64_t row, int64_t n,
                                          int64_t Nc, int64_t Kc, bool b_kmajor) {
  const bf16* We = W + e * Nc * Kc;
  for (int64_t k = 0; k < Kc; ++k) s += to_f(A[row * Kc + k]) * to_f(b_kmajor ? We[k * Nc + n] : We[n * Kc + k]);
  return s;
}

// Y (T,N) (+)= alpha (X W_e^T + X2 W2_e^T) (b_kmajor = false) or dX (T,N=K) (+)= alpha (dY W_e +
// dY2 W2_e) (b_kmajor = true), the second product when Kc2 > 0. One thread per output element.
__global__ void simt_rows_kernel(bf16* out, const bf16* A, const bf16* W, const bf16* A2, const bf16* W2,
                                 const int64_t* offsets, int64_t T, int64_t E, int64_t Nc, int64_t Kc, int64_t Kc2,
                                 float alpha, bool accumulate, bool b_kmajor) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < T * Nc; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / Nc, n = i % Nc;
    const int64_t e = expert_of_row(offsets, E, row);
    if (e < 0) continue;
    float s = simt_dot(0.0f, A, W, e, row, n, Nc, Kc, b_kmajor);
    if (Kc2 > 0) s = simt_dot(s, A2, W2, e, row, n, Nc, Kc2, b_kmajor);
    s *= alpha;
    if (accumulate) s += to_f(out[i]);
    out[i] = to_bf(s);
  }
}

// Out (E,M,N) += scale sum over the rows of e of X (row, m) dY (row, n).
__global__ void simt_kgrouped_kernel(float* out, const bf16* X, const bf16* dY, const int64_t* offsets, int64_t E,
                                     int64_t M, int64_t N, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < E * M * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i / (M * N), m = (i / N) % M, n = i % N;
    float s = 0.0f;
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) s += to_f(X[r * M + m]) * to_f(dY[r * N + n]);
    out[i] += scale * s;
  }
}

// Arguments of the row-grouped products (NT, NN): C (rows, Nc) = A (rows, Kc) B_e, W (E, ...) with
// N * K = Nc * Kc elements per expert.
GroupedArgs rows_args(const bf16* A, const bf16* W, bf16* C, const int64_t* offsets, int64_t E, int64_t Nc,
                      int64_t Kc, int64_t lda, int64_t ldb, float alpha, bool accumulate) {
  GroupedArgs a{};
  a.A = A;
  a.B = W;
  a.C = C;
  a.offsets = offsets;
  a.E = E;
  a.Nc = Nc;
  a.Kc = Kc;
  a.lda = lda;
  a.ldb = ldb;
  a.b_expert_stride = Nc * Kc;
  a.alpha = alpha;
  a.accumulate = accumulate;
  a.splits = 1;
  return a;
}

// The tile of the row-grouped products with Nc > 64: QT_GROUPED_GEMM_TILE = big | short | wide
// forces one (to measure them against each other: cuda_ops_bench grouped); otherwise Big.
enum class RowTile { Big, Short, Wide };
bool row_tile_forced() {
  const char* v = std::getenv("QT_GROUPED_GEMM_TILE");
  return v && (std::strcmp(v, "big") == 0 || std::strcmp(v, "short") == 0 || std::strcmp(v, "wide") == 0);
}
RowTile pick_row_tile(int64_t T, int64_t E) {
  if (const char* v = std::getenv("QT_GROUPED_GEMM_TILE")) {
    if (std::strcmp(v, "big") == 0) return RowTile::Big;
    if (std::strcmp(v, "short") == 0) return RowTile::Short;
    if (std::strcmp(v, "wide") == 0) return RowTile::Wide;
  }
  // Measured on the H100 (docs/benchmarks.md, Qwen3-30B-A3B expert shapes, E=128): Big was fastest
  // at both T=2048 (178 vs 141 TFLOP/s for Short on gate_up, 162 vs 132 on down) and T=8192 (equal),
  // so it is the default; Short and Wide stay available for other shapes.
  (void)T, (void)E;
  return RowTile::Big;
}

template <Mode MODE>
void launch_rows_by_tile(Context& ctx, const GroupedArgs& a, int64_t T, int64_t E) {
  if (a.Nc <= 64) return launch_rows_grouped<ThinN, MODE>(ctx, a, T);
  switch (pick_row_tile(T, E)) {
    case RowTile::Short: return launch_rows_grouped<Short, MODE>(ctx, a, T);
    case RowTile::Wide: return launch_rows_grouped<Wide, MODE>(ctx, a, T);
    case RowTile::Big: break;
  }
  launch_rows_grouped<Big, MODE>(ctx, a, T);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

bool grouped_gemm_tc_ok(GroupedOp op, int64_t N, int64_t K, const void* a, const void* b, const void* c) {
  // NT reads X and W_e along K only (16-byte chunks) and stores Y in bf16 pairs.
  const bool dims = op == GroupedOp::NT ? K % 8 == 0 && N % 2 == 0 : N % 8 == 0 && K % 8 == 0;
  return dims && aligned16(a) && aligned16(b) && aligned16(c);
}

void grouped_gemm_nt_simt(Context& ctx, bf16* Y, const bf16* X, const bf16* W, const int64_t* offsets, int64_t T,
                          int64_t E, int64_t N, int64_t K, float alpha, bool accumulate, const SecondProduct& second) {
  if (T <= 0 || E <= 0 || N <= 0) return;
  simt_rows_kernel<<<grid_for(T * N), kThreads, 0, ctx.stream()>>>(Y, X, W, second.a, second.w, offsets, T, E, N, K,
                                                                    second.inner, alpha, accumulate, false);
  QT_CUDA_LAUNCH_CHECK();
}

void grouped_gemm_nn_simt(Context& ctx, bf16* dX, const bf16* dY, const bf16* W, const int64_t* offsets, int64_t T,
                          int64_t E, int64_t N, int64_t K, float alpha, bool accumulate, const SecondProduct& second) {
  if (T <= 0 || E <= 0 || K <= 0) return;
  // out (T, K) = dY (T, N) W_e (N, K): the row kernel with Nc = K, Kc = N, W_e read k-major
  simt_rows_kernel<<<grid_for(T * K), kThreads, 0, ctx.stream()>>>(dX, dY, W, second.a, second.w, offsets, T, E, K, N,
                                                                    second.inner, alpha, accumulate, true);
  QT_CUDA_LAUNCH_CHECK();
}

void grouped_gemm_tn_kgrouped_simt(Context& ctx, float* Out, const bf16* X, const bf16* dY, const int64_t* offsets,
                                   int64_t T, int64_t E, int64_t M, int64_t N, float scale) {
  if (T <= 0 || E <= 0 || M <= 0 || N <= 0) return;
  simt_kgrouped_kernel<<<grid_for(E * M * N), kThreads, 0, ctx.stream()>>>(Out, X, dY, offsets, E, M, N, scale);
  QT_CUDA_LAUNCH_CHECK();
}

namespace {

// The row-grouped product on the best path: fused on tensor cores when both products qualify;
// the SIMT kernel (fused) when the first does not; otherwise the first on tensor cores and the
// second added by the SIMT kernel (two roundings of the output; e.g. LoRA rank 4).
template <Mode MODE>
void rows_product(Context& ctx, bf16* C, const bf16* A, const bf16* W, const int64_t* offsets, int64_t T, int64_t E,
                  int64_t N, int64_t K, float alpha, bool accumulate, const SecondProduct& second,
                  const NtPair* pair = nullptr) {
  constexpr bool nt = MODE == Mode::NT;
  const auto simt = nt ? &grouped_gemm_nt_simt : &grouped_gemm_nn_simt;
  const GroupedOp op = nt ? GroupedOp::NT : GroupedOp::NN;
  if (!grouped_gemm_tc_ok(op, N, K, C, A, W)) return simt(ctx, C, A, W, offsets, T, E, N, K, alpha, accumulate, second);
  // NT: C (rows, N) = X (rows, K) W_e^T, W_e (N, K) with k contiguous; second: X2 (rows, K2), W2_e (N, K2).
  // NN: C (rows, K) = dY (rows, N) W_e, contracted over N, W_e read k-major (row stride K); second:
  //     dY2 (rows, N2), W2_e (N2, K).
  const int64_t Nc = nt ? N : K, Kc = nt ? K : N, inner2 = second.inner;
  const bool fuse = inner2 > 0 && grouped_gemm_tc_ok(op, nt ? N : inner2, nt ? inner2 : K, C, second.a, second.w);
  GroupedArgs a = rows_args(A, W, C, offsets, E, Nc, Kc, Kc, K, alpha, accumulate);
  if (fuse) {
    a.A2 = second.a;
    a.B2 = second.w;
    a.Kc2 = inner2;
    a.lda2 = inner2;
    a.ldb2 = nt ? inner2 : K;
    a.b2_expert_stride = Nc * inner2;
  }
  if (pair) {  // grouped_gemm_nt_pair checked that both products take this (fused tensor-core) path
    a.Cp = pair->Y;
    a.Bp = pair->W;
    a.A2p = pair->second.a;
    a.B2p = pair->second.w;
  }
  // Hopper: the NT and NN products wider than 64 on wgmma + TMA (grouped_gemm_wgmma.cu) unless a
  // tile of the mma.sync kernels is forced (QT_GROUPED_GEMM_TILE, to measure them).
  bool done = false;
  if (!row_tile_forced()) {
    const WgmmaProduct first{C, W, fuse ? second.a : nullptr, fuse ? second.w : nullptr};
    if constexpr (nt) {
      WgmmaProduct other{};
      if (pair) other = {pair->Y, pair->W, pair->second.a, pair->second.w};
      done = grouped_wgmma_nt(ctx, A, first, pair ? &other : nullptr, fuse ? inner2 : 0, offsets, T, E, N, K, alpha,
                              accumulate);
    } else {
      done = grouped_wgmma_nn(ctx, A, first, fuse ? inner2 : 0, offsets, T, E, N, K, alpha, accumulate);
    }
  }
  if (!done) launch_rows_by_tile<MODE>(ctx, a, T, E);
  if (inner2 > 0 && !fuse)
    simt(ctx, C, second.a, second.w, offsets, T, E, nt ? N : inner2, nt ? inner2 : K, alpha, true, SecondProduct{});
}

}  // namespace

void grouped_gemm_nt(Context& ctx, bf16* Y, const bf16* X, const bf16* W, const int64_t* offsets, int64_t T,
                     int64_t E, int64_t N, int64_t K, float alpha, bool accumulate, const SecondProduct& second) {
  if (T <= 0 || E <= 0 || N <= 0) return;
  rows_product<Mode::NT>(ctx, Y, X, W, offsets, T, E, N, K, alpha, accumulate, second);
}

void grouped_gemm_nt_pair(Context& ctx, bf16* Y, const bf16* X, const bf16* W, const SecondProduct& second,
                          const NtPair& pair, const int64_t* offsets, int64_t T, int64_t E, int64_t N, int64_t K,
                          float alpha) {
  if (T <= 0 || E <= 0 || N <= 0) return;
  // One launch when both products take the same tensor-core path (fused second products alike);
  // otherwise the two products one after the other, which computes the same bits.
  auto fused_tc = [&](const bf16* y, const bf16* w, const SecondProduct& s) {
    return grouped_gemm_tc_ok(GroupedOp::NT, N, K, y, X, w) &&
           (s.inner == 0 || grouped_gemm_tc_ok(GroupedOp::NT, N, s.inner, y, s.a, s.w));
  };
  if (second.inner == pair.second.inner && fused_tc(Y, W, second) && fused_tc(pair.Y, pair.W, pair.second))
    return rows_product<Mode::NT>(ctx, Y, X, W, offsets, T, E, N, K, alpha, false, second, &pair);
  rows_product<Mode::NT>(ctx, Y, X, W, offsets, T, E, N, K, alpha, false, second);
  rows_product<Mode::NT>(ctx, pair.Y, X, pair.W, offsets, T, E, N, K, alpha, false, pair.second);
}

void grouped_gemm_nn(Context& ctx, bf16* dX, const bf16* dY, const bf16* W, const int64_t* offsets, int64_t T,
                     int64_t E, int64_t N, int64_t K, float alpha, bool accumulate, const SecondProduct& second) {
  if (T <= 0 || E <= 0 || K <= 0) return;
  rows_product<Mode::NN>(ctx, dX, dY, W, offsets, T, E, N, K, alpha, accumulate, second);
}

void grouped_gemm_nn_sum(Context& ctx, bf16* dX, const NnTerm& one, const NnTerm& two, const int64_t* offsets,
                         int64_t T, int64_t E, int64_t N, int64_t K, float alpha) {
  if (T <= 0 || E <= 0 || K <= 0) return;
  const int64_t r = one.second.inner;
  if (r == two.second.inner && !row_tile_forced() &&
      grouped_wgmma_nn_sum(ctx, dX, one.dY, {nullptr, one.W, one.second.a, one.second.w}, two.dY,
                           {nullptr, two.W, two.second.a, two.second.w}, r, offsets, T, E, N, K, alpha))
    return;
  grouped_gemm_nn(ctx, dX, one.dY, one.W, offsets, T, E, N, K, alpha, false, one.second);
  grouped_gemm_nn(ctx, dX, two.dY, two.W, offsets, T, E, N, K, alpha, true, two.second);
}

void grouped_gemm_tn_kgrouped(Context& ctx, float* Out, const bf16* X, const bf16* dY, const int64_t* offsets,
                              int64_t T, int64_t E, int64_t M, int64_t N, float scale) {
  if (T <= 0 || E <= 0 || M <= 0 || N <= 0) return;
  if (!grouped_gemm_tc_ok(GroupedOp::TN, M, N, Out, X, dY))
    return grouped_gemm_tn_kgrouped_simt(ctx, Out, X, dY, offsets, T, E, M, N, scale);
  GroupedArgs a{};
  a.A = X;
  a.B = dY;
  a.offsets = offsets;
  a.E = E;
  a.Mc = M;
  a.Nc = N;
  a.lda = M;
  a.ldb = N;
  a.alpha = scale;
  if (M <= 32) launch_kgrouped<ThinM>(ctx, a, T, Out);
  else if (N <= 64) launch_kgrouped<ThinN>(ctx, a, T, Out);
  else launch_kgrouped<Big>(ctx, a, T, Out);
}

}  // namespace qt::cuda
