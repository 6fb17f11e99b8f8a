// RMSNorm (+ fused residual add) and RoPE fused with the Qwen3 per-head q/k RMSNorm, on bf16 rows
// with fp32 math; one warp per row (rows are hidden vectors or head vectors).
//   rmsnorm: rstd = 1/sqrt(mean(x^2) + eps); y = w * (x * rstd)
//            dx += rstd*dy*w - rstd^3 * x * sum(dy*w*x)/D;  dw += sum_rows dy*x*rstd
//   rope:    [a,b] -> [a*cos1 - b*sin1, b*cos2 + a*sin2]; transpose: [da*cos1 + db*sin2, db*cos2 - da*sin1]
//   qk_norm_rope = rope(rmsnorm_head(x)) with no rounding between the two (one bf16 rounding).
// The RoPE table's inverse frequencies are computed on the host exactly as cpu::rope_table (powf
// in fp32) and passed as a kernel argument; angles and cos/sin are fp32 on the device.
#include <cmath>

#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

constexpr int kRowsPerBlock = 8;  // warps per block, one row each
constexpr int kMaxHalf = 128;     // head_dim <= 256

struct InvFreq {
  float v[kMaxHalf];
};

unsigned row_blocks(int64_t R) { return unsigned((R + kRowsPerBlock - 1) / kRowsPerBlock); }

// One warp per row: optional residual add (h = x + r, stored and normalised), then y = w * (h * rstd).
__global__ void rmsnorm_fwd_kernel(bf16* y, float* rstd, bf16* h, const bf16* x, const bf16* r, const bf16* w,
                                   int64_t R, int64_t D, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= R) return;
  const bf16* xr = x + row * D;
  float sumsq = 0;
  if (r) {
    const bf16* rr = r + row * D;
    bf16* hr = h + row * D;
    for (int64_t j = lane; j < D; j += 32) {
      const bf16 hj = to_bf(to_f(xr[j]) + to_f(rr[j]));
      hr[j] = hj;
      sumsq += to_f(hj) * to_f(hj);
    }
    xr = hr;
  } else {
    for (int64_t j = lane; j < D; j += 32) sumsq += to_f(xr[j]) * to_f(xr[j]);
  }
  sumsq = warp_sum(sumsq);
  const float rs = 1.0f / sqrtf(sumsq / float(D) + eps);
  if (lane == 0) rstd[row] = rs;
  bf16* yr = y + row * D;
  for (int64_t j = lane; j < D; j += 32) yr[j] = to_bf(to_f(w[j]) * (to_f(xr[j]) * rs));  // same lane read first
}

__global__ void rmsnorm_bwd_dx_kernel(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd,
                                      int64_t R, int64_t D) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= R) return;
  const bf16 *xr = x + row * D, *dyr = dy + row * D;
  float gx = 0;
  for (int64_t j = lane; j < D; j += 32) gx += to_f(dyr[j]) * to_f(w[j]) * to_f(xr[j]);
  gx = warp_sum(gx);
  const float rs = rstd[row];
  const float coef = rs * rs * rs * gx / float(D);
  bf16* dxr = dx + row * D;
  for (int64_t j = lane; j < D; j += 32)
    dxr[j] = to_bf(to_f(dxr[j]) + rs * to_f(dyr[j]) * to_f(w[j]) - coef * to_f(xr[j]));
}

// dw[j] += sum over rows, one thread per column, rows in order (deterministic, coalesced).
__global__ void rmsnorm_bwd_dw_kernel(float* dw, const bf16* dy, const bf16* x, const float* rstd, int64_t R,
                                      int64_t D) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  float acc = 0;
  for (int64_t r = 0; r < R; ++r) acc += to_f(dy[r * D + j]) * to_f(x[r * D + j]) * rstd[r];
  dw[j] += acc;
}

__global__ void rope_table_kernel(float* cos, float* sin, const int32_t* pos, int64_t N, int64_t hd, InvFreq f) {
  const int64_t half = hd / 2;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * half;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / half, k = i % half;
    const float angle = float(pos[n]) * f.v[k];
    const float c = cosf(angle), s = sinf(angle);
    cos[n * hd + k] = cos[n * hd + k + half] = c;
    sin[n * hd + k] = sin[n * hd + k + half] = s;
  }
}

// Row = one head vector (N*heads rows of hd); position n = row / heads.
__global__ void qk_norm_rope_fwd_kernel(bf16* y, float* rstd, const bf16* x, const bf16* w, const float* cos,
                                        const float* sin, int64_t rows, int64_t heads, int64_t hd, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t half = hd / 2, n = row / heads;
  const bf16* xr = x + row * hd;
  float rs = 1.0f;
  if (w) {
    float sumsq = 0;
    for (int64_t j = lane; j < hd; j += 32) sumsq += to_f(xr[j]) * to_f(xr[j]);
    sumsq = warp_sum(sumsq);
    rs = 1.0f / sqrtf(sumsq / float(hd) + eps);
    if (lane == 0) rstd[row] = rs;
  }
  const float *c = cos + n * hd, *s = sin + n * hd;
  bf16* yr = y + row * hd;
  for (int64_t i = lane; i < half; i += 32) {
    float a = to_f(xr[i]), b = to_f(xr[i + half]);
    if (w) {
      a = to_f(w[i]) * (a * rs);
      b = to_f(w[i + half]) * (b * rs);
    }
    yr[i] = to_bf(a * c[i] - b * s[i]);
    yr[i + half] = to_bf(b * c[i + half] + a * s[i + half]);
  }
}

__global__ void qk_norm_rope_bwd_kernel(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd,
                                        const float* cos, const float* sin, int64_t rows, int64_t heads,
                                        int64_t hd) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t half = hd / 2, n = row / heads;
  const float *c = cos + n * hd, *s = sin + n * hd;
  const bf16 *dyr = dy + row * hd, *xr = x + row * hd;
  bf16* dxr = dx + row * hd;
  // dz = rope^T(dy): the gradient at the norm's output.
  auto dz_pair = [&](int64_t i, float* da, float* db) {
    const float ya = to_f(dyr[i]), yb = to_f(dyr[i + half]);
    *da = ya * c[i] + yb * s[i + half];
    *db = yb * c[i + half] - ya * s[i];
  };
  if (!w) {
    for (int64_t i = lane; i < half; i += 32) {
      float da, db;
      dz_pair(i, &da, &db);
      dxr[i] = to_bf(to_f(dxr[i]) + da);
      dxr[i + half] = to_bf(to_f(dxr[i + half]) + db);
    }
    return;
  }
  float gx = 0;
  for (int64_t i = lane; i < half; i += 32) {
    float da, db;
    dz_pair(i, &da, &db);
    gx += da * to_f(w[i]) * to_f(xr[i]) + db * to_f(w[i + half]) * to_f(xr[i + half]);
  }
  gx = warp_sum(gx);
  const float rs = rstd[row];
  const float coef = rs * rs * rs * gx / float(hd);
  for (int64_t i = lane; i < half; i += 32) {
    float da, db;
    dz_pair(i, &da, &db);
    dxr[i] = to_bf(to_f(dxr[i]) + rs * da * to_f(w[i]) - coef * to_f(xr[i]));
    dxr[i + half] = to_bf(to_f(dxr[i + half]) + rs * db * to_f(w[i + half]) - coef * to_f(xr[i + half]));
  }
}

}  // namespace

void rmsnorm_forward(Context& ctx, bf16* y, float* rstd, const bf16* x, const bf16* w, int64_t R, int64_t D,
                     double eps) {
  QT_CUDA_ASSERT(D > 0, "rmsnorm: empty rows");
  if (R <= 0) return;
  rmsnorm_fwd_kernel<<<row_blocks(R), kRowsPerBlock * 32, 0, ctx.stream()>>>(y, rstd, nullptr, x, nullptr, w, R, D,
                                                                             float(eps));
  QT_CUDA_LAUNCH_CHECK();
}

void add_rmsnorm_forward(Context& ctx, bf16* h, bf16* y, float* rstd, const bf16* x, const bf16* r, const bf16* w,
                         int64_t R, int64_t D, double eps) {
  QT_CUDA_ASSERT(D > 0 && r != nullptr && h != nullptr, "add_rmsnorm: empty rows or missing residual");
  if (R <= 0) return;
  rmsnorm_fwd_kernel<<<row_blocks(R), kRowsPerBlock * 32, 0, ctx.stream()>>>(y, rstd, h, x, r, w, R, D, float(eps));
  QT_CUDA_LAUNCH_CHECK();
}

void rmsnorm_backward(Context& ctx, bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w,
                      const float* rstd, int64_t R, int64_t D) {
  if (R <= 0 || D <= 0) return;
  if (dx) {
    rmsnorm_bwd_dx_kernel<<<row_blocks(R), kRowsPerBlock * 32, 0, ctx.stream()>>>(dx, dy, x, w, rstd, R, D);
    QT_CUDA_LAUNCH_CHECK();
  }
  if (dw) {
    rmsnorm_bwd_dw_kernel<<<unsigned((D + 127) / 128), 128, 0, ctx.stream()>>>(dw, dy, x, rstd, R, D);
    QT_CUDA_LAUNCH_CHECK();
  }
}

void rope_table(Context& ctx, float* cos, float* sin, const int32_t* pos, int64_t N, int64_t hd, double theta) {
  QT_CUDA_ASSERT(hd > 0 && hd % 2 == 0 && hd / 2 <= kMaxHalf, "rope: head_dim must be even and <= 256");
  if (N <= 0) return;
  InvFreq f{};
  const float base = float(theta);
  for (int64_t i = 0; i < hd / 2; ++i) f.v[i] = 1.0f / std::pow(base, float(2 * i) / float(hd));
  rope_table_kernel<<<grid_for(N * hd / 2), kThreads, 0, ctx.stream()>>>(cos, sin, pos, N, hd, f);
  QT_CUDA_LAUNCH_CHECK();
}

void qk_norm_rope_forward(Context& ctx, bf16* y, float* rstd, const bf16* x, const bf16* w, const float* cos,
                          const float* sin, int64_t N, int64_t heads, int64_t hd, double eps) {
  QT_CUDA_ASSERT(hd > 0 && hd % 2 == 0, "rope: head_dim must be even");
  const int64_t rows = N * heads;
  if (rows <= 0) return;
  qk_norm_rope_fwd_kernel<<<row_blocks(rows), kRowsPerBlock * 32, 0, ctx.stream()>>>(y, rstd, x, w, cos, sin, rows,
                                                                                     heads, hd, float(eps));
  QT_CUDA_LAUNCH_CHECK();
}

void qk_norm_rope_backward(Context& ctx, bf16* dx, const bf16* dy, const bf16* x, const bf16* w,
                           const float* rstd, const float* cos, const float* sin, int64_t N, int64_t heads,
                           int64_t hd) {
  QT_CUDA_ASSERT(hd > 0 && hd % 2 == 0, "rope: head_dim must be even");
  const int64_t rows = N * heads;
  if (rows <= 0 || dx == nullptr) return;
  qk_norm_rope_bwd_kernel<<<row_blocks(rows), kRowsPerBlock * 32, 0, ctx.stream()>>>(dx, dy, x, w, rstd, cos, sin,
                                                                                     rows, heads, hd);
  QT_CUDA_LAUNCH_CHECK();
}

}  // namespace qt::cuda
