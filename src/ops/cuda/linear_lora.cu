// Linear layer (frozen bf16 base) and LoRA (fp32 masters), composed from cuBLASLt GEMMs.
//   linear:  y = x W^T (+ b);  dx += dy W
//   LoRA:    A16, B16 = bf16(A), bf16(B) (scratch, per call);  xa = x A16^T;  y += scale xa B16^T
//            t = dy B16 (bf16 scratch);  dx += scale t A16;  dA += scale t^T x;  dB += scale dy^T xa
// W + BA is never formed; dA and dB accumulate into fp32 directly from the GEMM (beta = 1).
#include "ops/cuda/common.cuh"
#include "ops/cuda/ops.h"

namespace qt::cuda {

namespace {

size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// bf16 copies of the LoRA masters in the context scratch, followed by `extra` bytes.
struct LoraScratch {
  bf16 *A16, *B16;
  void* extra;
};
LoraScratch lora_scratch(Context& ctx, const float* A, const float* B, int64_t in, int64_t out, int64_t r,
                         size_t extra) {
  const size_t a_bytes = round_up(size_t(r * in) * sizeof(bf16)), b_bytes = round_up(size_t(out * r) * sizeof(bf16));
  auto* base = static_cast<unsigned char*>(ctx.scratch(a_bytes + b_bytes + extra));
  LoraScratch s{reinterpret_cast<bf16*>(base), reinterpret_cast<bf16*>(base + a_bytes), base + a_bytes + b_bytes};
  f32_to_bf16(ctx, s.A16, A, r * in);
  f32_to_bf16(ctx, s.B16, B, out * r);
  return s;
}

}  // namespace

void linear_forward(Context& ctx, bf16* y, const bf16* x, const bf16* W, const bf16* b, int64_t N, int64_t in,
                    int64_t out) {
  gemm(ctx, false, true, N, out, in, 1.0f, x, W, 0.0f, y, b);
}

void linear_backward(Context& ctx, bf16* dx, const bf16* dy, const bf16* W, int64_t N, int64_t in, int64_t out) {
  if (dx) gemm(ctx, false, false, N, in, out, 1.0f, dy, W, 1.0f, dx);
}

void lora_forward(Context& ctx, bf16* y, bf16* xa, const bf16* x, const float* A, const float* B, float scale,
                  int64_t N, int64_t in, int64_t out, int64_t r) {
  const LoraScratch s = lora_scratch(ctx, A, B, in, out, r, 0);
  gemm(ctx, false, true, N, r, in, 1.0f, x, s.A16, 0.0f, xa);
  gemm(ctx, false, true, N, out, r, scale, xa, s.B16, 1.0f, y);
}

void lora_backward(Context& ctx, bf16* dx, float* dA, float* dB, const bf16* dy, const bf16* x, const bf16* xa,
                   const float* A, const float* B, float scale, int64_t N, int64_t in, int64_t out, int64_t r) {
  const size_t t_bytes = (dx || dA) ? size_t(N * r) * sizeof(bf16) : 0;
  const LoraScratch s = lora_scratch(ctx, A, B, in, out, r, t_bytes);
  if (dx || dA) {
    bf16* t = static_cast<bf16*>(s.extra);  // (N,r) = dy B
    gemm(ctx, false, false, N, r, out, 1.0f, dy, s.B16, 0.0f, t);
    if (dx) gemm(ctx, false, false, N, in, r, scale, t, s.A16, 1.0f, dx);
    if (dA) gemm(ctx, true, false, r, in, N, scale, t, x, 1.0f, dA);
  }
  if (dB) gemm(ctx, true, false, out, r, N, scale, dy, xa, 1.0f, dB);
}

}  // namespace qt::cuda
