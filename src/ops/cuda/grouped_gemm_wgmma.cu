// The row-grouped NT expert product on Hopper (contract in grouped_gemm_wgmma.h):
//   Y (T,N) (+)= alpha (X (T,K) W_e^T + A2 (T,K2) W2_e^T)   for the rows [offsets[e], offsets[e+1]) of e
// with fp32 accumulation on wgmma and TMA tile loads, persistent and warp-specialised:
//
//   block      384 threads = 3 warpgroups, one per SM; tile BM x BN = 128 x BN of Y, k tiles of 64
//   producer   warpgroup 0 (one thread): for each of the block's tiles, for each k tile, waits until
//              stage s is free (empty[s]), then has TMA copy X (128 rows x 64 k) and W_e (BN rows x 64
//              k) into it (full[s] counts the bytes); the second product's k tiles follow the first's
//   consumers  warpgroups 1 and 2, rows 0-63 and 64-127 of the tile: wait for full[s], issue 4
//              wgmma m64 n BN k16 over the stage (one when only the second product's 16 k remain),
//              keep one k tile's products in flight and free the stage before (empty[s]); at the end
//              of the tile store bf16(alpha acc [+ Y]) for the rows that are the expert's and n < N
//   schedule   tile i = mt x n_tiles + nt, blocks take tiles blockIdx.x, + gridDim.x, ...; row tile mt
//              is found from the offsets on the device (grouped_tiles.cuh), so no host sync; the first
//              tile past the last expert's rows ends the block. With a pair, the column tiles [n_tiles
//              / 2, n_tiles) compute the pair's product (its maps and output).
//   bounds     rows of a tile past the expert's end are loaded (the next expert's rows, or zeros past
//              T: TMA fills outside the tensor) and computed but never stored; so are columns past N
//              (the next expert's weights); k past K or K2 is zero-filled, adding nothing.
// Ring of STAGES stages (A 16 KiB + B BN x 128 bytes each), 128-byte swizzle (hopper.cuh).
#include "ops/cuda/grouped_gemm_wgmma.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/common.cuh"
#include "ops/cuda/grouped_tiles.cuh"
#include "ops/cuda/hopper.cuh"

namespace qt::cuda {

namespace {

constexpr int kBM = 128, kBK = 64, kThreads = 384;

struct WgmmaArgs {
  CUtensorMap x, w, a2, w2;      // the first product (a2, w2 unused when K2 = 0)
  CUtensorMap wp, a2p, w2p;      // the pair's (unused without a pair)
  CUtensorMap ym, ypm;           // Y and the pair's, for TMA stores of whole tiles (TMA_STORE)
  bf16* y;
  bf16* yp;                      // the pair's output; null: no pair
  const int64_t* offsets;
  int64_t E, N, K, K2, n_tiles, tiles;  // n_tiles counts both products' column tiles
  float alpha;
  int accumulate;
};

template <int BN, int STAGES, bool TMA_STORE>
struct WgmmaCfg {
  static constexpr int A_BYTES = kBM * kBK * 2, B_BYTES = BN * kBK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  // TMA_STORE: per consumer warpgroup, 64 rows x 128 columns of the output tile (two 64 x 64 boxes)
  static constexpr int C_BYTES = TMA_STORE ? 2 * 64 * 128 * 2 : 0;
  static constexpr size_t SMEM = size_t(STAGES) * STAGE_BYTES + C_BYTES + 1024;  // + alignment to 1024 bytes
};

#if QT_SM90A
// acc (64 rows x BN) += the stage's A rows (64, at da) times its B tile (BN rows, at db), all 64 k.
template <int BN>
__device__ __forceinline__ void mma_k_tile(float (&acc)[BN / 2], uint64_t da, uint64_t db) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // the next k16 slice starts 32 bytes (2 descriptor units) further
    if constexpr (BN == 256) sm90::wgmma_m64n256k16(acc, da + 2 * k, db + 2 * k);
    else sm90::wgmma_m64n128k16(acc, da + 2 * k, db + 2 * k);
  }
}

// Row tiles over all experts (sum_e ceil(rows_e / kBM)), computed by one warp (every lane gets it).
__device__ __forceinline__ int64_t warp_count_row_tiles(const int64_t* offsets, int64_t E) {
  int64_t n = 0;
  for (int64_t e = threadIdx.x & 31; e < E; e += 32) n += (offsets[e + 1] - offsets[e] + kBM - 1) / kBM;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
  return n;
}

// What the producer found for a tile, handed to its consumers beside the tile's first stage.
struct TileInfo {
  int64_t m0, m_end;  // first row, the expert's end row
  int32_t nt;         // column tile within its product
  int32_t second;     // 1: the pair's product
};
#endif

// PINGPONG = false ("cooperative"): both consumer warpgroups work on one tile, rows 0-63 and 64-127,
// wgmma m64 n BN; PINGPONG = true: the two take alternate tiles, each all 128 rows (two m64 products
// per k16 slice); their turns alternate through the stage ring itself (tile i + 1's stages follow
// tile i's) and an order barrier (a warpgroup starts waiting for its tile's stages only after the
// other has issued all of its previous tile's products: the stage barriers' phases, told apart by
// parity only, are then never two ahead), so one warpgroup's epilogue runs under the other's products.
template <int BN, int STAGES, bool PINGPONG, bool TMA_STORE>
__global__ void __launch_bounds__(kThreads, 1) grouped_wgmma_nt_kernel(const __grid_constant__ WgmmaArgs p) {
#if QT_SM90A
  using namespace sm90;
  using C = WgmmaCfg<BN, STAGES, TMA_STORE>;
  static_assert(!(PINGPONG && TMA_STORE), "one output tile buffer: cooperative only");
  constexpr int MW = PINGPONG ? 128 : 64;  // rows per consumer warpgroup
  constexpr int HALVES = MW / 64;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  __shared__ TileInfo info[STAGES];
  __shared__ __align__(8) uint64_t order[2];  // PINGPONG: warpgroup w may start its next tile's products
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);                   // the producer's arrive (with the stage's bytes)
      mbar_init(&empty[s], PINGPONG ? 4 : 8);   // one arrive per consuming warp
    }
    mbar_init(&order[0], 4);
    mbar_init(&order[1], 4);
    mbar_fence_init();
  }
  __syncthreads();

  const int k_tiles1 = int((p.K + kBK - 1) / kBK), k_tiles = k_tiles1 + int((p.K2 + kBK - 1) / kBK);
  const int64_t half = p.yp != nullptr ? p.n_tiles / 2 : p.n_tiles;  // column tiles per product
  const int warpgroup = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);  // warp-uniform for the compiler
  // 384 threads x 168 registers at entry; the producer warpgroup keeps 56, the consumers get 224
  // (setmaxnreg: each role is one branch of this if / else).
  if (warpgroup == 0) {
    regs_dealloc<56>();
    if (threadIdx.x >= 32) return;  // the producer needs one warp: warp 0 finds the tiles, lane 0 copies
    const int64_t tiles = warp_count_row_tiles(p.offsets, p.E) * p.n_tiles;
    int it = 0;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int64_t e, rt;
      warp_find_row_tile<kBM>(p.offsets, p.E, tile / p.n_tiles, e, rt);
      int64_t nt = tile % p.n_tiles;
      const bool second = nt >= half;
      if (second) nt -= half;
      const int32_t m0 = int32_t(p.offsets[e] + rt * kBM), b0 = int32_t(e * p.N + nt * BN);
      const CUtensorMap* mw = second ? &p.wp : &p.w;
      const CUtensorMap* ma2 = second ? &p.a2p : &p.a2;
      const CUtensorMap* mw2 = second ? &p.w2p : &p.w2;
      if (threadIdx.x == 0) {
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
          const int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
          if (kt == 0) info[s] = TileInfo{m0, p.offsets[e + 1], int32_t(nt), second ? 1 : 0};
          mbar_arrive_expect_tx(&full[s], C::STAGE_BYTES);
          unsigned char* sa = smem + size_t(s) * C::STAGE_BYTES;
          if (kt < k_tiles1) {
            tma_load_2d(sa, &p.x, kt * kBK, m0, &full[s]);
            tma_load_2d(sa + C::A_BYTES, mw, kt * kBK, b0, &full[s]);
          } else {
            tma_load_2d(sa, ma2, (kt - k_tiles1) * kBK, m0, &full[s]);
            tma_load_2d(sa + C::A_BYTES, mw2, (kt - k_tiles1) * kBK, b0, &full[s]);
          }
        }
      }
      __syncwarp();
    }
  } else {  // consumers
    regs_alloc<224>();
    const int64_t tiles = warp_count_row_tiles(p.offsets, p.E) * p.n_tiles;
  const int cw = warpgroup - 1, warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  constexpr int R = BN / 2;  // accumulators per thread and 64-row half
  float acc[HALVES][R];
  int64_t local = 0;  // the block's tiles so far (both warpgroups'): its stages start at local * k_tiles
  uint32_t order_waits = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++local) {
    if constexpr (PINGPONG) {
      if ((local & 1) != cw) continue;  // the other warpgroup's turn
      if (local > 0) mbar_wait(&order[cw], order_waits++ & 1);  // its previous tile's products are issued
    }
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf)
#pragma unroll
      for (int i = 0; i < R; ++i) acc[hf][i] = 0.0f;
    int prev = -1;
    TileInfo ti{};
    int64_t it = local * k_tiles;
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int s = int(it % STAGES);
      mbar_wait(&full[s], uint32_t(it / STAGES) & 1);
      if (kt == 0) ti = info[s];
      const unsigned char* sa = smem + size_t(s) * C::STAGE_BYTES;
      const uint64_t db = sw128_desc(sa + C::A_BYTES);
      // all four k16 slices, also in the second product's tile where only K2 = 16 may hold data
      // (the rest is zero-filled): a branch between the products makes the compiler serialise them
#pragma unroll
      for (int hf = 0; hf < HALVES; ++hf) fence_regs(acc[hf]);
      wgmma_fence();
#pragma unroll
      for (int hf = 0; hf < HALVES; ++hf) mma_k_tile<BN>(acc[hf], sw128_desc(sa + (PINGPONG ? hf : cw) * 64 * 128), db);
      wgmma_commit();
      wgmma_wait<1>();  // the previous k tile's products are done: its stage is free
#pragma unroll
      for (int hf = 0; hf < HALVES; ++hf) fence_regs(acc[hf]);
      if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
      prev = s;
    }
    if (PINGPONG && lane == 0) mbar_arrive(&order[cw ^ 1]);  // the other warpgroup's turn
    wgmma_wait<0>();
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf) fence_regs(acc[hf]);
    if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);

    if constexpr (TMA_STORE) {
      // This warpgroup's 64 rows wholly inside the expert's (and not accumulating into Y): through
      // shared memory and TMA stores (whole 128-byte lines, in flight while the next tile's products
      // run), 128 columns at a time through the warpgroup's 16 KiB buffer.
      if (ti.m0 + (cw + 1) * 64 <= ti.m_end && !p.accumulate) {
        const bool issuer = threadIdx.x % 128 == 0;
        unsigned char* cs = smem + size_t(STAGES) * C::STAGE_BYTES + cw * (64 * 128 * 2);
        const CUtensorMap* ym = ti.second ? &p.ypm : &p.ym;
#pragma unroll
        for (int part = 0; part < BN / 128; ++part) {
          if (issuer) bulk_wait_read<0>();  // the buffer's previous stores have read it
          named_barrier_sync(2 + cw, 128);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = warp * 16 + g + 8 * h;
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {  // 16-byte chunk jj % 8 of box jj / 8, swizzled as TMA reads it
              const int j = part * 16 + jj, chunk = (jj % 8) ^ (r % 8);
              *reinterpret_cast<__nv_bfloat162*>(cs + (jj / 8) * (64 * 128) + r * 128 + chunk * 16 + 4 * t) =
                  __floats2bfloat162_rn(p.alpha * acc[0][4 * j + 2 * h], p.alpha * acc[0][4 * j + 2 * h + 1]);
            }
          }
          fence_proxy_async_smem();
          named_barrier_sync(2 + cw, 128);
          if (issuer) {
            const int32_t col = ti.nt * BN + part * 128, row = int32_t(ti.m0) + cw * 64;
            tma_store_2d(ym, col, row, cs);
            tma_store_2d(ym, col + 64, row, cs + 64 * 128);
            bulk_commit();
          }
        }
        continue;
      }
    }
    bf16* y = ti.second ? p.yp : p.y;
    const int64_t n0 = int64_t(ti.nt) * BN + 2 * t;
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = ti.m0 + (PINGPONG ? hf : cw) * 64 + warp * 16 + g + 8 * h;
        if (m >= ti.m_end) continue;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int64_t n = n0 + 8 * j;
          if (n >= p.N) continue;
          __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(y + m * p.N + n);
          float2 v = make_float2(p.alpha * acc[hf][4 * j + 2 * h], p.alpha * acc[hf][4 * j + 2 * h + 1]);
          if (p.accumulate) {
            const float2 old = __bfloat1622float2(*out);
            v.x += old.x;
            v.y += old.y;
          }
          *out = __floats2bfloat162_rn(v.x, v.y);
        }
      }
  }
  if (TMA_STORE && threadIdx.x % 128 == 0) bulk_wait<0>();  // the last stores are done before the block ends
  }
#else
  __trap();  // built without sm_90a: grouped_wgmma_enabled() keeps the host from launching this
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// A 2-D bf16 tensor (rows, cols), row stride cols, read in (box_rows x 64) 128-byte-swizzled tiles;
// false (and no driver call) for what TMA cannot describe: a row stride that is not a multiple of
// 16 bytes, an unaligned base, an empty tensor.
bool encode_map(CUtensorMap* m, const void* ptr, int64_t rows, int64_t cols, int box_rows) {
  const auto fn = encode_fn();
  if (!fn || cols % 8 != 0 || !aligned16(ptr) || rows <= 0 || cols <= 0 || rows > (int64_t(1) << 32)) return false;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(cols) * 2};
  const cuuint32_t box[2] = {cuuint32_t(kBK), cuuint32_t(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return fn(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The variant: QT_GROUPED_GEMM_WGMMA_BN = 128 | 256 | pingpong | 128tma | 256tma forces one (to
// measure them); otherwise 256-column tiles with TMA stores. The TMA stores need rows of Y in whole
// 16-byte units (N % 8 == 0); otherwise the same tiles store from registers.
enum class Variant { Coop128, Coop256, Pingpong128, Coop256Tma, Coop128Tma };
Variant pick_variant(int64_t N) {
  Variant v = Variant::Coop256Tma;
  if (const char* e = std::getenv("QT_GROUPED_GEMM_WGMMA_BN")) {
    if (std::strcmp(e, "128") == 0) v = Variant::Coop128;
    else if (std::strcmp(e, "256") == 0) v = Variant::Coop256;
    else if (std::strcmp(e, "pingpong") == 0) v = Variant::Pingpong128;
    else if (std::strcmp(e, "128tma") == 0) v = Variant::Coop128Tma;
  }
  if (N % 8 != 0 && v == Variant::Coop256Tma) v = Variant::Coop256;
  if (N % 8 != 0 && v == Variant::Coop128Tma) v = Variant::Coop128;
  return v;
}

template <int BN, int STAGES, bool PINGPONG, bool TMA_STORE = false>
void launch(Context& ctx, WgmmaArgs& a, int64_t T) {
  using C = WgmmaCfg<BN, STAGES, TMA_STORE>;
  QT_CUDA_ASSERT(C::SMEM <= ctx.max_smem_per_block(), "wgmma grouped GEMM stages do not fit in shared memory");
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  QT_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (!(configured.load() & bit)) {
    QT_CUDA_CHECK(cudaFuncSetAttribute(grouped_wgmma_nt_kernel<BN, STAGES, PINGPONG, TMA_STORE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(C::SMEM)));
    configured.fetch_or(bit);
  }
  a.n_tiles = (a.N + BN - 1) / BN * (a.yp != nullptr ? 2 : 1);
  a.tiles = ((T + kBM - 1) / kBM + a.E) * a.n_tiles;  // an upper bound on the row tiles, times columns
  const int64_t grid = std::min<int64_t>(a.tiles, ctx.sm_count());
  grouped_wgmma_nt_kernel<BN, STAGES, PINGPONG, TMA_STORE><<<unsigned(grid), kThreads, C::SMEM, ctx.stream()>>>(a);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool grouped_wgmma_enabled() {
  static const int cc_major = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return 0;
    return major;
  }();
  if (const char* v = std::getenv("QT_GROUPED_GEMM_WGMMA"); v && std::strcmp(v, "0") == 0) return false;
  return cc_major == 9 && encode_fn() != nullptr;
}

bool grouped_wgmma_nt(Context& ctx, const bf16* X, const WgmmaProduct& first, const WgmmaProduct* pair,
                      int64_t inner2, const int64_t* offsets, int64_t T, int64_t E, int64_t N, int64_t K, float alpha,
                      bool accumulate) {
  if (!grouped_wgmma_enabled() || N <= 64 || N % 2 != 0 || K % 8 != 0 || inner2 % 8 != 0 || K <= 0) return false;
  if (T >= (int64_t(1) << 31) || E * N >= (int64_t(1) << 31)) return false;
  const auto ok = [&](const WgmmaProduct& q) {
    return aligned16(q.Y) && aligned16(q.W) && (inner2 == 0 || (aligned16(q.a2) && aligned16(q.w2)));
  };
  if (!aligned16(X) || !ok(first) || (pair && !ok(*pair))) return false;
  const Variant variant = pick_variant(N);
  const int bn = variant == Variant::Coop256 || variant == Variant::Coop256Tma ? 256 : 128;
  const bool tma_store = variant == Variant::Coop256Tma || variant == Variant::Coop128Tma;
  WgmmaArgs a{};
  bool enc = encode_map(&a.x, X, T, K, kBM) && encode_map(&a.w, first.W, E * N, K, bn);
  if (inner2 > 0) enc = enc && encode_map(&a.a2, first.a2, T, inner2, kBM) && encode_map(&a.w2, first.w2, E * N, inner2, bn);
  if (pair) {
    enc = enc && encode_map(&a.wp, pair->W, E * N, K, bn);
    if (inner2 > 0)
      enc = enc && encode_map(&a.a2p, pair->a2, T, inner2, kBM) && encode_map(&a.w2p, pair->w2, E * N, inner2, bn);
  }
  if (tma_store) {  // the outputs, in (64 rows x 64) boxes
    enc = enc && encode_map(&a.ym, first.Y, T, N, 64);
    if (pair) enc = enc && encode_map(&a.ypm, pair->Y, T, N, 64);
  }
  if (!enc) return false;
  a.y = first.Y;
  a.yp = pair ? pair->Y : nullptr;
  a.offsets = offsets;
  a.E = E;
  a.N = N;
  a.K = K;
  a.K2 = inner2;
  a.alpha = alpha;
  a.accumulate = accumulate ? 1 : 0;
  switch (variant) {
    case Variant::Coop128: launch<128, 6, false>(ctx, a, T); break;
    case Variant::Pingpong128: launch<128, 6, true>(ctx, a, T); break;
    case Variant::Coop256: launch<256, 4, false>(ctx, a, T); break;
    case Variant::Coop256Tma: launch<256, 4, false, true>(ctx, a, T); break;
    case Variant::Coop128Tma: launch<128, 6, false, true>(ctx, a, T); break;
  }
  return true;
}

}  // namespace qt::cuda
