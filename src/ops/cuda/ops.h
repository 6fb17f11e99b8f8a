// The CUDA op list: the ops of ops/cpu/ops.h on the GPU, checked against them by
// tests/test_cuda_ops.cpp (the op-parity harness).
//
// Conventions (as on the CPU, plus precision and streams):
//  - Activations, base weights and their gradients are bf16 in memory; every reduction and every
//    GEMM accumulates in fp32. LoRA masters, their gradients, AdamW states, norm statistics (rstd,
//    lse) and the RoPE tables are fp32.
//  - Forward outputs are OVERWRITTEN except where a comment says "adds"; backward outputs (d*) are
//    ACCUMULATED (+=, computed in fp32 and rounded once when stored as bf16). A null d* is skipped.
//  - All pointers are device pointers; shapes as in ops/cpu/ops.h. Every op is enqueued on
//    ctx.stream() and returns without synchronising. Shapes are trusted (internal invariants);
//    ids and labels must have been validated on the host (Batch::validate); kernels still never
//    read outside a table for an out-of-range id (they skip it).
#pragma once
#include <cstdint>

#include "ops/cuda/runtime.h"

namespace qt::cuda {

// ---- GEMM (cuBLASLt, fp32 accumulation) ---------------------------------------------------
// C (M,N) = alpha * op(A) op(B) + beta * C, row-major, op(X) = X or X^T as in cpu::gemm.
// A, B bf16; C bf16 or fp32 (the overload). beta = 0 overwrites (C may hold NaN).
// A bf16 C is rounded once: with beta != 0 or a bias (N, added to every row), the product goes
// through fp32 staging and one kernel stores bf16(alpha AB + beta C + bias) (cuBLASLt's own bf16
// epilogue with beta != 0 was measured on an H100 to round twice, up to one bf16 ulp off).
void gemm(Context& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          const bf16* B, float beta, bf16* C, const bf16* bias = nullptr);
void gemm(Context& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          const bf16* B, float beta, float* C);

// ---- conversions -------------------------------------------------------------------------
void f32_to_bf16(Context& ctx, bf16* dst, const float* src, int64_t n);
void bf16_to_f32(Context& ctx, float* dst, const bf16* src, int64_t n);

// ---- embedding (the table is frozen: no backward) -----------------------------------------
// out (N,H) = table (V,H) [ids (N)]; a row with an id outside [0,V) is left untouched.
void embedding_forward(Context& ctx, bf16* out, const int32_t* ids, const bf16* table, int64_t N, int64_t V,
                       int64_t H);

// ---- RMSNorm -----------------------------------------------------------------------------
// y (R,D) = w * (x * rstd), rstd (R) = 1/sqrt(mean(x^2) + eps) in fp32. y may alias x.
void rmsnorm_forward(Context& ctx, bf16* y, float* rstd, const bf16* x, const bf16* w, int64_t R, int64_t D,
                     double eps);
// Fused residual add + RMSNorm: h (R,D) = x + r (bf16), then y = rmsnorm(h). h may alias x or r.
// The backward is rmsnorm_backward into the residual gradient (the add passes dh to both inputs).
void add_rmsnorm_forward(Context& ctx, bf16* h, bf16* y, float* rstd, const bf16* x, const bf16* r, const bf16* w,
                         int64_t R, int64_t D, double eps);
// dx (R,D) += ...; dw (D) += sum_r dy * x * rstd (fp32; the base norm weights are frozen, so
// training passes nullptr).
void rmsnorm_backward(Context& ctx, bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w,
                      const float* rstd, int64_t R, int64_t D);

// ---- RoPE, fused with the Qwen3 per-head q/k RMSNorm ----------------------------------------
// cos, sin (N, hd) fp32, built on the device with the formulas of cpu::rope_table.
void rope_table(Context& ctx, float* cos, float* sin, const int32_t* pos, int64_t N, int64_t hd, double theta);
// y (N,heads,hd) = rope(w ? rmsnorm_head(x) : x), rstd (N*heads) saved when w (may be null
// otherwise). y may alias x.
void qk_norm_rope_forward(Context& ctx, bf16* y, float* rstd, const bf16* x, const bf16* w, const float* cos,
                          const float* sin, int64_t N, int64_t heads, int64_t hd, double eps);
// dx (N,heads,hd) += the gradient through the rotation and (when w) the per-head norm, from
// dy and the forward input x. dx must not alias dy.
void qk_norm_rope_backward(Context& ctx, bf16* dx, const bf16* dy, const bf16* x, const bf16* w,
                           const float* rstd, const float* cos, const float* sin, int64_t N, int64_t heads,
                           int64_t hd);

// ---- elementwise -------------------------------------------------------------------------
// h (n) = silu(g) * u
void swiglu_forward(Context& ctx, bf16* h, const bf16* g, const bf16* u, int64_t n);
// dg (n) += dh * d(silu(g) u)/dg, du (n) += dh * silu(g); either may be nullptr.
void swiglu_backward(Context& ctx, bf16* dg, bf16* du, const bf16* dh, const bf16* g, const bf16* u, int64_t n);
// The same gradients written over their inputs (g <- dg, u <- du; no accumulation): the dense
// MLP's backward needs no separate (N, I) dg and du buffers.
void swiglu_backward_inplace(Context& ctx, bf16* g, bf16* u, const bf16* dh, int64_t n);
// y (n) += x
void add_inplace(Context& ctx, bf16* y, const bf16* x, int64_t n);
// Test support: the stream waits about `us` microseconds on the device (a sleeping one-thread kernel),
// widening the window in which a missing cross-stream dependency shows up as a wrong result.
void delay_stream(cudaStream_t stream, int64_t us);

// ---- linear and LoRA ---------------------------------------------------------------------
// y (N,out) = x (N,in) W^T + b; W (out,in) bf16, b (out) bf16 or nullptr.
void linear_forward(Context& ctx, bf16* y, const bf16* x, const bf16* W, const bf16* b, int64_t N, int64_t in,
                    int64_t out);
// dx (N,in) += dy W (accumulate false: dx = dy W, one rounding, no fp32 staging pass; dx may hold
// anything before). The base W and b are frozen: no dW, db.
void linear_backward(Context& ctx, bf16* dx, const bf16* dy, const bf16* W, int64_t N, int64_t in, int64_t out,
                     bool accumulate = true);
// LoRA with fp32 masters A (r,in), B (out,r), never forming W + BA: the GEMMs run on bf16 copies
// of A and B with fp32 accumulation. xa (N,r) = x A^T (bf16, saved); y (N,out) += scale xa B^T.
void lora_forward(Context& ctx, bf16* y, bf16* xa, const bf16* x, const float* A, const float* B, float scale,
                  int64_t N, int64_t in, int64_t out, int64_t r);
// t = dy B (bf16 scratch): dx += scale t A; dA (fp32) += scale t^T x; dB (fp32) += scale dy^T xa.
void lora_backward(Context& ctx, bf16* dx, float* dA, float* dB, const bf16* dy, const bf16* x, const bf16* xa,
                   const float* A, const float* B, float scale, int64_t N, int64_t in, int64_t out, int64_t r);
// The rank-r update of the two functions above: Y (N,M) = bf16(Y + alpha P Q), P (N,r) bf16, Q (M,r)
// when q_rows_m (Y += alpha P Q^T) else (r,M). `fused`: one kernel, fp32 sums, Y read and written
// once (what lora_forward / lora_backward use); `via_gemm`: the reference composition (cuBLASLt
// with beta = 1 and the fp32 staging pass of gemm()).
void rank_update_fused(Context& ctx, bf16* Y, const bf16* P, const bf16* Q, bool q_rows_m, int64_t N, int64_t M,
                       int64_t r, float alpha);
void rank_update_via_gemm(Context& ctx, bf16* Y, const bf16* P, const bf16* Q, bool q_rows_m, int64_t N, int64_t M,
                          int64_t r, float alpha);

// ---- loss --------------------------------------------------------------------------------
// HF causal-LM loss over logits (B,S,V) bf16 and labels (B,S) (shift inside, -100 ignored), as
// cpu::cross_entropy_forward: *loss_sum (device, fp64) = the sum of the per-token losses and
// *count (device) = the number of predicted tokens; both are overwritten. Row reductions in fp32,
// the final sum in fp64 in a fixed order (deterministic).
void cross_entropy_forward(Context& ctx, double* loss_sum, int64_t* count, const bf16* logits, const int32_t* labels,
                           int64_t B, int64_t S, int64_t V);
// dlogits (B,S,V) += scale * (softmax - onehot) at predicting positions. dlogits may alias
// logits (each row is read completely before it is written).
void cross_entropy_backward(Context& ctx, bf16* dlogits, const bf16* logits, const int32_t* labels, float scale,
                            int64_t B, int64_t S, int64_t V);

// The lm_head GEMM fused with the loss, chunk by chunk, never holding the (B*S, V) logits:
// logits = bf16(h W^T) for C rows at a time, the loss as cross_entropy_forward, and when dh is not
// null dh (B*S,H) += bf16(scale (softmax - onehot)) W (scale = dloss/dsum, e.g. 1/count, known on the
// host from the labels). h (B*S,H), W (V,H) bf16. The chunks live in logits_buf (logits_elems
// elements of a caller's buffer idle meanwhile) when it holds a row, else in the context's scratch
// (256 MiB). C = chunk_rows when > 0, else as many rows as fit, whole 128-row tiles when at least
// 128: the dh product of a chunk (C x H outputs, K = V) under-fills the GPU when C is small.
void fused_linear_cross_entropy(Context& ctx, double* loss_sum, int64_t* count, bf16* dh, const bf16* h,
                                const bf16* W, const int32_t* labels, float scale, int64_t B, int64_t S, int64_t H,
                                int64_t V, int64_t chunk_rows = 0, bf16* logits_buf = nullptr,
                                int64_t logits_elems = 0);

// ---- LoRA dropout (cpu::dropout_apply's counter-hash mask, bit for bit) ---------------------
// y (N,D) = keep(row_n, f) ? x * float(1/(1-p)) : 0, keep = cpu::dropout_uniform(key, row_n, f) >= p,
// row_n = rows ? rows[n] : n (experts: rows = the assignment ids perm, as the CPU's moe_mlp).
void dropout_forward(Context& ctx, bf16* y, const bf16* x, int64_t N, int64_t D, double p, uint64_t key,
                     const int32_t* rows = nullptr);
// dx (N,D) += keep(row_n, f) ? dy * float(1/(1-p)) : 0 (the same mask: dropout's backward). row_lo /
// row_hi (device scalars, may be null): only rows [*row_lo, *row_hi) (the rows of a chunk of experts).
void dropout_backward(Context& ctx, bf16* dx, const bf16* dy, int64_t N, int64_t D, double p, uint64_t key,
                      const int32_t* rows = nullptr, const int64_t* row_lo = nullptr, const int64_t* row_hi = nullptr);

// ---- optimizer ---------------------------------------------------------------------------
// One fused AdamW update of n fp32 parameters, arithmetic in fp64 and rounded exactly as
// train/optimizer.cpp (bitwise equal results): p = p*decay_mul - step_size*m/(sqrt(v)/bc2_sqrt + eps).
// skip (device, may be null): when *skip != 0 nothing changes (the trainer's non-finite step skip,
// decided on the device by step_guard without a host round trip).
void adamw_step(Context& ctx, float* p, const float* g, float* m, float* v, int64_t n, double decay_mul,
                double beta1, double beta2, double step_size, double bc2_sqrt, double eps, const int* skip = nullptr);
// *skip = !(isfinite(*a) && isfinite(*b)) (device scalars, e.g. the gradient sum of squares and the loss).
void step_guard(Context& ctx, int* skip, const double* a, const double* b);
// *acc += *x (device fp64 scalars; one thread: the loss of a step summed over its micro-batches).
void add_f64(Context& ctx, double* acc, const double* x);

// Gradient norm and clipping (as train/optimizer.h's grad_global_norm / clip_grad_norm):
// *sum_sq (device fp64) ADDS sum(x^2) over n fp32 values, in fp64 with a fixed reduction order
// (deterministic), so the trainer accumulates every LoRA gradient into one scalar and reads it once.
// The sum is NaN or inf exactly when some value is (fp32 squares cannot overflow fp64), which
// doubles as the finite check.
void sum_squares(Context& ctx, double* sum_sq, const float* x, int64_t n);
// *out ADDS x[0] + x[1] + ... + x[n-1] (device fp64, summed left to right by one thread): per-layer
// sums of squares combined into the global one in a fixed order.
void sum_f64(Context& ctx, double* out, const double* x, int64_t n);
// x (n) *= c (fp32 multiply, as the CPU's clipping)
void scale_inplace(Context& ctx, float* x, int64_t n, float c);

// ---- causal GQA attention with packed-document segments -----------------------------------
// As cpu::attention_forward: q (B,S,nh,hd), k/v (B,S,nkv,hd) bf16 -> out (B,S,nh,hd) bf16,
// lse (B,nh,S) fp32. Flash-style: key tiles with an online softmax; S x S is never stored.
// segment (B,S) or nullptr. hd <= 256. head_dim 64 and 128 run on tensor cores (attention_tc.cu:
// P and dS rounded to bf16 before their products), other head dims on the fp32 SIMT kernels.
void attention_forward(Context& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                       const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd);
// dq (B,S,nh,hd), dk, dv (B,S,nkv,hd) += ... (P recomputed from q, k and lse; deterministic: no
// atomics; dq and dk/dv come from two kernels).
void attention_backward(Context& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                        const float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* segment,
                        int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd);
// The fp32 SIMT kernels (any hd <= 256): the reference the tensor-core kernels are tested against.
void attention_forward_simt(Context& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                            const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd);
void attention_backward_simt(Context& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                             const float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* segment,
                             int64_t B, int64_t S, int64_t nh, int64_t nkv, int64_t hd);

// Attention of n new queries over a KV cache (decoding), as cpu::attention_kv_forward with B = 1:
// q (n,nh,hd) are the tokens at positions past..past+n-1, k/v (past+n,nkv,hd) the cached keys and
// values (the new tokens' included) -> out (n,nh,hd) bf16; query i sees keys j <= past+i (no
// segments, no lse). fp32 SIMT, one block per (query row, head), online softmax over the cache
// (attention_kv.cu); hd <= 256.
void attention_kv_forward(Context& ctx, bf16* out, const bf16* q, const bf16* k, const bf16* v, int64_t n,
                          int64_t past, int64_t nh, int64_t nkv, int64_t hd);

// ---- MoE routing (as cpu::moe_*; E <= 256) -------------------------------------------------
// logits (N,E) bf16 (the router GEMM's output) -> probs (N,E) fp32 = softmax in fp32; topk_idx
// (N,k) descending (ties: lower index first; NaN last); topk_w (N,k) fp32, renormalised when
// norm_topk_prob. One warp per token.
void moe_router_forward(Context& ctx, int32_t* topk_idx, float* topk_w, float* probs, const bf16* logits, int64_t N,
                        int64_t E, int64_t k, bool norm_topk_prob);
// dlogits (N,E) bf16 += the gradient through the top-k weights and the softmax (fp32 math), plus
// with aux_f (E) the load-balancing loss's aux_scale * p (f - p.f) (cpu::moe_aux_router_backward),
// added before the one rounding to bf16.
void moe_router_backward(Context& ctx, bf16* dlogits, const float* dtopk_w, const float* probs,
                         const int32_t* topk_idx, int64_t N, int64_t E, int64_t k, bool norm_topk_prob,
                         const float* aux_f = nullptr, float aux_scale = 0.f);
// The load-balancing loss's statistics (cpu::moe_route_stats), accumulated over layers: prob_sum (E)
// += column sums of probs (N,E) (fixed-order reduction); counts (E), and layer_counts (E) when not
// null, += offsets[e+1] - offsets[e] (moe_sort's offsets of the same layer).
void moe_route_stats(Context& ctx, float* prob_sum, int64_t* counts, int64_t* layer_counts, const float* probs,
                     const int64_t* offsets, int64_t N, int64_t E);
// f (E) = counts / R and *aux = E * sum_e f_e * prob_sum_e / R (double) over R = layers * N rows;
// *add_to += add_factor * aux when add_to is not null (the training loss total).
void moe_aux_loss(Context& ctx, double* aux, float* f, double* add_to, double add_factor, const float* prob_sum,
                  const int64_t* counts, int64_t E, int64_t R);
// Stable counting sort of the N*k assignments by expert: perm (N*k), offsets (E+1) int64, both
// on the device (same result as cpu::moe_sort). Expert ids are trusted (the router wrote them).
void moe_sort(Context& ctx, int32_t* perm, int64_t* offsets, const int32_t* topk_idx, int64_t N, int64_t k, int64_t E);
// xs (N*k,H) = x[perm[p] / k]
void moe_gather(Context& ctx, bf16* xs, const bf16* x, const int32_t* perm, int64_t Nk, int64_t k, int64_t H);
// dx (N,H) += sum_j dxs[inv[n*k+j]] in order j (deterministic; inv built in scratch)
void moe_gather_backward(Context& ctx, bf16* dx, const bf16* dxs, const int32_t* perm, int64_t Nk, int64_t k,
                         int64_t H);
// out (N,H) ADDS sum_j topk_w[n*k+j] * ys[inv[n*k+j]]
void moe_combine(Context& ctx, bf16* out, const bf16* ys, const float* topk_w, const int32_t* perm, int64_t Nk,
                 int64_t k, int64_t H);
// dys (N*k,H) += topk_w[a] dout[n] (accumulate false: =); dtopk_w (N*k) fp32 += dout[n] . ys[p]
// (a = perm[p], n = a / k). With accumulate false dys may be ys (the gradient written over the output).
void moe_combine_backward(Context& ctx, bf16* dys, float* dtopk_w, const bf16* dout, const bf16* ys,
                          const float* topk_w, const int32_t* perm, int64_t Nk, int64_t k, int64_t H,
                          bool accumulate = true);

}  // namespace qt::cuda
