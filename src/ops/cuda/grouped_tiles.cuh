// The row-tile schedule of the row-grouped expert products (grouped_gemm.cu, grouped_gemm_wgmma.cu):
// row-tile index mt counts the tiles of expert 0 (ceil(rows_0 / BM) of them), then expert 1's, and so
// on; the offsets (E+1, device) give rows_e = offsets[e+1] - offsets[e]. No host copy of them.
#pragma once
#include <cstdint>

namespace qt::cuda {

// Called by all 32 lanes of one warp: the expert e owning row tile mt and the tile's index within
// the expert (every lane gets both); e = -1 when mt is past the last tile. The row counts of the
// first 256 experts are loaded at once (one L2 round trip), then scanned 32 at a time.
template <int BM>
__device__ __forceinline__ void warp_find_row_tile(const int64_t* offsets, int64_t E, int64_t mt, int64_t& e_out,
                                                   int64_t& tile_out) {
  constexpr int kChunks = 8;  // experts 0..255 preloaded; more are loaded chunk by chunk
  const int lane = int(threadIdx.x & 31);
  int64_t pre[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t e = c * 32 + lane;
    pre[c] = e < E ? offsets[e + 1] - offsets[e] : 0;
  }
  int64_t before = 0, found = -1, tile = 0;
  for (int64_t base = 0, c = 0; base < E; base += 32, ++c) {
    const int64_t e = base + lane;
    int64_t rows = 0;
#pragma unroll
    for (int q = 0; q < kChunks; ++q)
      if (q == c) rows = pre[q];  // a register pick (no local-memory array)
    if (c >= kChunks) rows = e < E ? offsets[e + 1] - offsets[e] : 0;
    const int64_t tiles = (rows + BM - 1) / BM;
    int64_t inc = tiles;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t v = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= o) inc += v;
    }
    const int64_t excl = before + inc - tiles;
    const unsigned hit = __ballot_sync(0xffffffffu, tiles > 0 && mt >= excl && mt < before + inc);
    if (hit) {
      const int src = __ffs(hit) - 1;
      found = base + src;
      tile = mt - __shfl_sync(0xffffffffu, excl, src);
      break;
    }
    before += __shfl_sync(0xffffffffu, inc, 31);
  }
  e_out = found;
  tile_out = tile;
}

}  // namespace qt::cuda
