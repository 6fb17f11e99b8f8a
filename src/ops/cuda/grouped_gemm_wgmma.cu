// The row-grouped expert products on Hopper (contract in grouped_gemm_wgmma.h):
//   NT  Y  (T,N) (+)= alpha (X (T,K) W_e^T + A2 (T,K2) W2_e^T)   W (E,N,K): B tiles K-major
//   NN  dX (T,K) (+)= alpha (dY (T,N) W_e + A2 (T,K2) W2_e)      W (E,N,K): B tiles MN-major
// for the rows [offsets[e], offsets[e+1]) of expert e, with fp32 accumulation on wgmma and TMA tile
// loads, persistent and warp-specialised. Below, C (rows, Nc) = sum over segments of A_s B_s,e: NT
// has Nc = N and contracts over K, NN has Nc = K and contracts over N; a segment is one product's k
// range (the base product, then the LoRA term).
//
//   block      384 threads = 3 warpgroups, one per SM; tile 128 x BN of C, k tiles of 64
//   producer   warpgroup 0 (one thread): for each of the block's tiles, for each k tile (the
//              segments' one after the other), waits until stage s is free (empty[s]), then has TMA
//              copy A (128 rows x 64 k) and B_e (BN columns x 64 k) into it (full[s] counts the bytes)
//   consumers  warpgroups 1 and 2, rows 0-63 and 64-127 of the tile: wait for full[s], issue 4 wgmma
//              m64 n BN k16 over the stage, keep one k tile's products in flight and free the stage
//              before (empty[s]); at the end of the tile a warpgroup whose 64 rows all belong to the
//              expert (and that does not accumulate) writes bf16(alpha acc) to shared memory and has
//              TMA store it (TMA_STORE; the stores drain while the next tile runs); other rows are
//              stored from registers, bf16(alpha acc [+ C]) for the expert's rows and columns < Nc
//   schedule   tile i = mt x n_tiles + nt, blocks take tiles blockIdx.x, + gridDim.x, ...; row tile mt
//              is found from the offsets on the device (grouped_tiles.cuh), so no host sync; the
//              producer hands it to the consumers beside the tile's first stage. With a pair (NT), the
//              column tiles [n_tiles / 2, n_tiles) compute the pair's product (its maps and output).
//   bounds     rows of a tile past the expert's end are loaded (the next expert's rows, or zeros past
//              T: TMA fills outside the tensor) and computed but never stored; so are columns past Nc;
//              k past a segment's extent reads zeros from A and B (outside their tensors: NN reads
//              B through a 3-D map (E, k, Nc), so not the next expert's first rows), adding nothing.
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

constexpr int kBM = 128, kBK = 64, kThreads = 384, kMaxSegments = 4;

struct Segment {
  CUtensorMap a, b;  // A (T rows, k contiguous); B: NT (E x Nc rows, k contiguous), NN (E x k rows, Nc contiguous)
};

struct WgmmaArgs {
  Segment seg[2][kMaxSegments];  // [product: first, pair][segment]
  CUtensorMap ym[2];             // the outputs, for TMA stores of whole 64-row halves (TMA_STORE)
  bf16* y[2];                    // y[1] null: no pair
  const int64_t* offsets;
  int64_t E, Nc, n_tiles, tiles;  // n_tiles counts both products' column tiles
  int segments;
  int seg_tiles[kMaxSegments];    // k tiles of each segment
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
// acc (64 rows x BN) += the stage's A rows (64, at da) times its B tile (BN columns, at sb), all 64 k.
template <int BN, bool B_MN>
__device__ __forceinline__ void mma_k_tile(float (&acc)[BN / 2], uint64_t da, const unsigned char* sb) {
  using namespace sm90;
  const uint64_t db = B_MN ? sw128_mn_desc(sb) : sw128_desc(sb);
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // the next k16 slice: 32 bytes further in A (and a K-major B), 16 rows in MN-major B
    const uint64_t dbk = db + (B_MN ? 128 : 2) * k;
    if constexpr (BN == 256) wgmma_m64n256k16<B_MN ? 1 : 0>(acc, da + 2 * k, dbk);
    else wgmma_m64n128k16<B_MN ? 1 : 0>(acc, da + 2 * k, dbk);
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

template <int BN, int STAGES, bool TMA_STORE, bool B_MN>
__global__ void __launch_bounds__(kThreads, 1) grouped_wgmma_kernel(const __grid_constant__ WgmmaArgs p) {
#if QT_SM90A
  using namespace sm90;
  using C = WgmmaCfg<BN, STAGES, TMA_STORE>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  __shared__ TileInfo info[STAGES];
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);   // the producer's arrive (with the stage's bytes)
      mbar_init(&empty[s], 8);  // one arrive per consumer warp
    }
    mbar_fence_init();
  }
  __syncthreads();

  int k_tiles = 0;
  for (int i = 0; i < p.segments; ++i) k_tiles += p.seg_tiles[i];
  const int64_t half = p.y[1] != nullptr ? p.n_tiles / 2 : p.n_tiles;  // column tiles per product
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
      const int prod = nt >= half ? 1 : 0;
      nt -= prod * half;
      const int32_t m0 = int32_t(p.offsets[e] + rt * kBM), n0 = int32_t(nt * BN);
      if (threadIdx.x == 0) {
        int sg = 0, kl = 0;  // segment, k tile within it
        for (int kt = 0; kt < k_tiles; ++kt, ++it, ++kl) {
          while (kl >= p.seg_tiles[sg]) kl -= p.seg_tiles[sg++];
          const int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
          if (kt == 0) info[s] = TileInfo{m0, p.offsets[e + 1], int32_t(nt), prod};
          mbar_arrive_expect_tx(&full[s], C::STAGE_BYTES);
          unsigned char* sa = smem + size_t(s) * C::STAGE_BYTES;
          const Segment& g = p.seg[prod][sg];
          tma_load_2d(sa, &g.a, kl * kBK, m0, &full[s]);
          if constexpr (!B_MN) {
            tma_load_2d(sa + C::A_BYTES, &g.b, kl * kBK, int32_t(e * p.Nc) + n0, &full[s]);
          } else {
#pragma unroll
            for (int b = 0; b < BN / 64; ++b)  // 64-column boxes of 64 k rows of expert e (zeros past its k)
              tma_load_3d(sa + C::A_BYTES + b * (64 * 128), &g.b, n0 + b * 64, kl * kBK, int32_t(e), &full[s]);
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
    constexpr int R = BN / 2;  // accumulators per thread
    float acc[R];
    int64_t it = 0;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
#pragma unroll
      for (int i = 0; i < R; ++i) acc[i] = 0.0f;
      int prev = -1;
      TileInfo ti{};
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = int(it % STAGES);
        mbar_wait(&full[s], uint32_t(it / STAGES) & 1);
        if (kt == 0) ti = info[s];
        const unsigned char* sa = smem + size_t(s) * C::STAGE_BYTES;
        // all four k16 slices, also where a segment's last tile is mostly zero-filled (K2 = 16): a
        // branch between the products would make the compiler serialise them
        fence_regs(acc);
        wgmma_fence();
        mma_k_tile<BN, B_MN>(acc, sw128_desc(sa + cw * 64 * 128), sa + C::A_BYTES);
        wgmma_commit();
        wgmma_wait<1>();  // the previous k tile's products are done: its stage is free
        fence_regs(acc);
        if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
        prev = s;
      }
      wgmma_wait<0>();
      fence_regs(acc);
      if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);

      if constexpr (TMA_STORE) {
        // This warpgroup's 64 rows wholly inside the expert's (and not accumulating): through shared
        // memory and TMA stores (whole 128-byte lines, in flight while the next tile's products
        // run), 128 columns at a time through the warpgroup's 16 KiB buffer.
        if (ti.m0 + (cw + 1) * 64 <= ti.m_end && !p.accumulate) {
          const bool issuer = threadIdx.x % 128 == 0;
          unsigned char* cs = smem + size_t(STAGES) * C::STAGE_BYTES + cw * (64 * 128 * 2);
          const CUtensorMap* ym = &p.ym[ti.second];
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
                    __floats2bfloat162_rn(p.alpha * acc[4 * j + 2 * h], p.alpha * acc[4 * j + 2 * h + 1]);
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
      bf16* y = p.y[ti.second];
      const int64_t n0 = int64_t(ti.nt) * BN + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = ti.m0 + cw * 64 + warp * 16 + g + 8 * h;
        if (m >= ti.m_end) continue;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int64_t n = n0 + 8 * j;
          if (n >= p.Nc) continue;
          __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(y + m * p.Nc + n);
          float2 v = make_float2(p.alpha * acc[4 * j + 2 * h], p.alpha * acc[4 * j + 2 * h + 1]);
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

// W (E, k, cols) bf16 as a 3-D tensor read in (64 rows of k x 64 cols) boxes, 128-byte swizzled: a
// box reaching past an expert's k rows is zero-filled there (not the next expert's rows).
bool encode_map_3d(CUtensorMap* m, const void* ptr, int64_t E, int64_t k, int64_t cols) {
  const auto fn = encode_fn();
  if (!fn || cols % 8 != 0 || !aligned16(ptr) || E <= 0 || k <= 0 || cols <= 0 || E * k > (int64_t(1) << 32))
    return false;
  const cuuint64_t dims[3] = {cuuint64_t(cols), cuuint64_t(k), cuuint64_t(E)};
  const cuuint64_t strides[2] = {cuuint64_t(cols) * 2, cuuint64_t(k * cols) * 2};
  const cuuint32_t box[3] = {cuuint32_t(kBK), 64, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return fn(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(ptr), dims, strides, box, elem_strides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tile: QT_GROUPED_GEMM_WGMMA_BN = 128 | 256 | 128tma | 256tma forces one (to measure them);
// otherwise 256 columns (128 when Nc <= 128) with TMA stores. The TMA stores need the output rows
// in whole 16-byte units (Nc % 8 == 0); otherwise the same tiles store from registers.
struct Tile {
  int bn;
  bool tma_store;
};
Tile pick_tile(int64_t Nc) {
  Tile t{Nc <= 128 ? 128 : 256, true};
  if (const char* e = std::getenv("QT_GROUPED_GEMM_WGMMA_BN")) {
    if (std::strcmp(e, "128") == 0) t = {128, false};
    else if (std::strcmp(e, "256") == 0) t = {256, false};
    else if (std::strcmp(e, "128tma") == 0) t = {128, true};
    else if (std::strcmp(e, "256tma") == 0) t = {256, true};
  }
  if (Nc % 8 != 0) t.tma_store = false;
  return t;
}

template <int BN, int STAGES, bool TMA_STORE, bool B_MN>
void launch(Context& ctx, WgmmaArgs& a, int64_t T) {
  using C = WgmmaCfg<BN, STAGES, TMA_STORE>;
  const auto kernel = grouped_wgmma_kernel<BN, STAGES, TMA_STORE, B_MN>;
  QT_CUDA_ASSERT(C::SMEM <= ctx.max_smem_per_block(), "wgmma grouped GEMM stages do not fit in shared memory");
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  QT_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (!(configured.load() & bit)) {
    QT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::SMEM)));
    configured.fetch_or(bit);
  }
  a.n_tiles = (a.Nc + BN - 1) / BN * (a.y[1] != nullptr ? 2 : 1);
  a.tiles = ((T + kBM - 1) / kBM + a.E) * a.n_tiles;  // an upper bound on the row tiles, times columns
  const int64_t grid = std::min<int64_t>(a.tiles, ctx.sm_count());
  kernel<<<unsigned(grid), kThreads, C::SMEM, ctx.stream()>>>(a);
  QT_CUDA_LAUNCH_CHECK();
}

template <bool B_MN>
void launch_tile(Context& ctx, WgmmaArgs& a, int64_t T, Tile tile) {
  if (tile.bn == 256) {
    if (tile.tma_store) launch<256, 4, true, B_MN>(ctx, a, T);
    else launch<256, 4, false, B_MN>(ctx, a, T);
  } else {
    if (tile.tma_store) launch<128, 6, true, B_MN>(ctx, a, T);
    else launch<128, 6, false, B_MN>(ctx, a, T);
  }
}

// One output's k segments: C (T, Nc) = sum_s A_s (T, k_s) B_s,e, with B_s (E x Nc rows, k_s
// contiguous) for NT or (E x k_s rows, Nc contiguous) for NN.
struct Segments {
  const bf16* a[kMaxSegments] = {};
  const bf16* b[kMaxSegments] = {};
  int64_t k[kMaxSegments] = {};
  int n = 0;
  void add(const bf16* a_, const bf16* b_, int64_t k_) {
    a[n] = a_;
    b[n] = b_;
    k[n++] = k_;
  }
};

// The shared part of the entry points: Y[q] (T, Nc) (+)= alpha sum_s A_s B_s,e for one product, or
// two (q = 0, 1: an NT pair, its segments of the same extents).
bool run(Context& ctx, bool b_mn, bf16* const (&Y)[2], const Segments (&segs)[2], int products,
         const int64_t* offsets, int64_t T, int64_t E, int64_t Nc, float alpha, bool accumulate) {
  if (!grouped_wgmma_enabled() || Nc <= 64 || Nc % 2 != 0) return false;
  const Segments& s0 = segs[0];
  int64_t max_rows = std::max(T, E * Nc);
  for (int i = 0; i < s0.n; ++i) {
    if (s0.k[i] <= 0 || s0.k[i] % 8 != 0) return false;
    max_rows = std::max(max_rows, E * s0.k[i]);
  }
  if (max_rows >= (int64_t(1) << 31)) return false;  // TMA coordinates are 32-bit
  const Tile tile = pick_tile(Nc);
  WgmmaArgs a{};
  a.segments = s0.n;
  for (int i = 0; i < s0.n; ++i) {
    a.seg_tiles[i] = int((s0.k[i] + kBK - 1) / kBK);
  }
  for (int q = 0; q < products; ++q) {
    if (!aligned16(Y[q])) return false;
    for (int i = 0; i < s0.n; ++i) {
      Segment& g = a.seg[q][i];
      const int64_t k = s0.k[i];
      if (!encode_map(&g.a, segs[q].a[i], T, k, kBM)) return false;
      if (!(b_mn ? encode_map_3d(&g.b, segs[q].b[i], E, k, Nc) : encode_map(&g.b, segs[q].b[i], E * Nc, k, tile.bn)))
        return false;
    }
    if (tile.tma_store && !encode_map(&a.ym[q], Y[q], T, Nc, 64)) return false;
    a.y[q] = Y[q];
  }
  a.offsets = offsets;
  a.E = E;
  a.Nc = Nc;
  a.alpha = alpha;
  a.accumulate = accumulate ? 1 : 0;
  if (b_mn) launch_tile<true>(ctx, a, T, tile);
  else launch_tile<false>(ctx, a, T, tile);
  return true;
}

// A product and its LoRA term as segments.
Segments segments_of(const bf16* A, const bf16* W, int64_t k, const bf16* a2, const bf16* w2, int64_t k2) {
  Segments s;
  s.add(A, W, k);
  if (k2 > 0) s.add(a2, w2, k2);
  return s;
}

__global__ void sm90a_probe_kernel(int* out) { *out = QT_SM90A; }

// Whether the code the current device runs was compiled for sm_90a (a build for plain sm_90, or PTX
// JIT-compiled from an older target, has only the trapping stubs of the kernels above). Asked once,
// with one host synchronisation (the first grouped product, e.g. in a warm-up step).
bool device_code_has_sm90a() {
  int* d = nullptr;
  int h = 0;
  if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) return false;
  sm90a_probe_kernel<<<1, 1>>>(d);
  const bool ok = cudaGetLastError() == cudaSuccess && cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(d);
  return ok && h == 1;
}

}  // namespace

bool grouped_wgmma_enabled() {
  static const bool usable = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    return major == 9 && encode_fn() != nullptr && device_code_has_sm90a();
  }();
  if (const char* v = std::getenv("QT_GROUPED_GEMM_WGMMA"); v && std::strcmp(v, "0") == 0) return false;
  return usable;
}

bool grouped_wgmma_nt(Context& ctx, const bf16* X, const WgmmaProduct& first, const WgmmaProduct* pair,
                      int64_t inner2, const int64_t* offsets, int64_t T, int64_t E, int64_t N, int64_t K, float alpha,
                      bool accumulate) {
  bf16* const Y[2] = {first.Y, pair ? pair->Y : nullptr};
  Segments segs[2] = {segments_of(X, first.W, K, first.a2, first.w2, inner2), {}};
  if (pair) segs[1] = segments_of(X, pair->W, K, pair->a2, pair->w2, inner2);
  return run(ctx, false, Y, segs, pair ? 2 : 1, offsets, T, E, N, alpha, accumulate);
}

bool grouped_wgmma_nn(Context& ctx, const bf16* dY, const WgmmaProduct& out, int64_t inner2, const int64_t* offsets,
                      int64_t T, int64_t E, int64_t N, int64_t K, float alpha, bool accumulate) {
  bf16* const Y[2] = {out.Y, nullptr};
  const Segments segs[2] = {segments_of(dY, out.W, N, out.a2, out.w2, inner2), {}};
  return run(ctx, true, Y, segs, 1, offsets, T, E, K, alpha, accumulate);
}

bool grouped_wgmma_nn_sum(Context& ctx, bf16* dX, const bf16* dY1, const WgmmaProduct& one, const bf16* dY2,
                          const WgmmaProduct& two, int64_t inner2, const int64_t* offsets, int64_t T, int64_t E,
                          int64_t N, int64_t K, float alpha) {
  bf16* const Y[2] = {dX, nullptr};
  Segments s;
  s.add(dY1, one.W, N);
  s.add(dY2, two.W, N);
  if (inner2 > 0) {
    s.add(one.a2, one.w2, inner2);
    s.add(two.a2, two.w2, inner2);
  }
  const Segments segs[2] = {s, {}};
  return run(ctx, true, Y, segs, 1, offsets, T, E, K, alpha, false);
}

}  // namespace qt::cuda
