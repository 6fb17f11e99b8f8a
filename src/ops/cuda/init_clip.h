// Device-side initialisation and clipping for the CUDA decoder (init_clip.cu): no host round trip.
#pragma once
#include <cstdint>

#include "ops/cuda/runtime.h"

namespace qt::cuda {

// Clipping without a host read: coef = min(1, max_norm / (sqrt(*sum_sq) + 1e-6)) is read on the
// device (sum_sq from sum_squares) and x (n) *= float(coef); a non-finite *sum_sq leaves x untouched.
void clip_by_sum_squares(Context& ctx, float* x, int64_t n, const double* sum_sq, double max_norm);

// x[i] = mean + std * N(0,1) from a hash of (seed, i): independent of the launch shape.
// first: the index of x[0] in the hashed sequence (a tensor made in parts: the same values).
void fill_normal(Context& ctx, bf16* x, int64_t n, float mean, float std, uint64_t seed, uint64_t first = 0);
void fill_normal(Context& ctx, float* x, int64_t n, float mean, float std, uint64_t seed, uint64_t first = 0);
void fill_constant(Context& ctx, bf16* x, int64_t n, float c);

}  // namespace qt::cuda
