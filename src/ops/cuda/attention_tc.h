// Tensor-core attention kernels (attention_tc.cu), called by attention_forward/backward in
// attention.cu for head_dim 64 and 128. Same layouts and contract as ops.h's attention; the
// backward takes Drow (B,nh,S) = dO . O per query row, computed by the caller.
#pragma once
#include <cstdint>

#include "ops/cuda/ops.h"

namespace qt::cuda {

bool attention_tc_supported(int64_t hd);
void attention_tc_forward(Context& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                          const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd);
// part: attention_tc_backward_scratch_floats(...) fp32 of scratch (16-byte aligned; none without
// GQA) for the per-query-head partial dK, dV.
size_t attention_tc_backward_scratch_floats(int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd);
void attention_tc_backward(Context& ctx, const float* Drow, float* part, bf16* dq, bf16* dk, bf16* dv,
                           const bf16* dout, const float* lse, const bf16* q, const bf16* k, const bf16* v,
                           const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd);

}  // namespace qt::cuda
