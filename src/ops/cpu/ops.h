// The CPU op list: plain reference implementations, each forward with a hand-written backward.
// Every later backend (src/ops/cuda) implements the same list and is checked against this one.
//
// Conventions (all ops):
//  - T is float (the engine) or double (finite-difference gradient tests).
//  - Tensors are raw row-major pointers; shapes are given in the comment of each op.
//    N = number of tokens (B*S), H = hidden size, D = a feature size, V = vocabulary.
//  - Forward outputs are OVERWRITTEN, except where a comment says "adds".
//  - Backward outputs (d*) are ACCUMULATED (+=): callers zero them first. A null d* pointer
//    means "not needed" and is skipped (frozen base weights pass nullptr for their gradients).
//  - Threads: ops parallelise internally (OpenMP); BLAS does the matrix products.
#pragma once
#include <cstdint>

namespace qt::cpu {

// ---- matrix products (BLAS) -------------------------------------------------------------
// C (M,N) = alpha * op(A) op(B) + beta * C, with op(X) = X or X^T; row-major, leading dims implied.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta,
          T* C);

// ---- embedding --------------------------------------------------------------------------
// out (N,H) = table (V,H) [ids (N)]. ids are checked in range by the caller.
template <typename T>
void embedding_forward(T* out, const int32_t* ids, const T* table, int64_t N, int64_t H);
// dtable (V,H) += scatter of dout (N,H) by ids
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t H);

// ---- RMSNorm ----------------------------------------------------------------------------
// y (R,D) = w (D) * x * rstd, rstd (R) = 1/sqrt(mean(x^2) + eps). Also the per-head q/k norm
// (R = N*heads, D = head_dim). y may alias x.
template <typename T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t R, int64_t D, double eps);
// dx (R,D) += ..., dw (D) += sum_r dy * x * rstd
template <typename T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t R, int64_t D);

// ---- RoPE (rotate-half / NeoX layout) ---------------------------------------------------
// cos, sin (N, hd): built in float32 exactly as HF: inv_freq[i] = 1 / theta^(2i/hd) (f32),
// angle = f32(pos) * inv_freq[i], emb = [angle, angle], cos/sin of emb in f32.
void rope_table(float* cos, float* sin, const int32_t* pos, int64_t N, int64_t hd, double theta);
// x (N, heads, hd) in place: x' = x*cos + rotate_half(x)*sin, rotate_half([a,b]) = [-b, a]
template <typename T>
void rope_forward(T* x, const float* cos, const float* sin, int64_t N, int64_t heads, int64_t hd);
// dx (N, heads, hd) in place: the transpose of the rotation (the gradient replaces dy).
template <typename T>
void rope_backward(T* dx, const float* cos, const float* sin, int64_t N, int64_t heads, int64_t hd);

// ---- causal self-attention with GQA -------------------------------------------------------
// q (B,S,nh,hd), k/v (B,S,nkv,hd) -> out (B,S,nh,hd); lse (B,nh,S) saved: log-sum-exp of the
// scaled scores of each query row. Query head h reads kv head h / (nh/nkv). scale = 1/sqrt(hd).
// Key j is visible to query i iff j <= i and (segment == nullptr or segment[b,j] == segment[b,i]);
// segment (B,S) marks packed documents.
template <typename T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const int32_t* segment, int64_t B,
                       int64_t S, int64_t nh, int64_t nkv, int64_t hd);
// dq (B,S,nh,hd), dk, dv (B,S,nkv,hd) += ...
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse, const T* q, const T* k,
                        const T* v, const int32_t* segment, int64_t B, int64_t S, int64_t nh, int64_t nkv,
                        int64_t hd);

// Attention of new queries against a KV cache (decoding): q (B,n,nh,hd) are the tokens at positions
// past..past+n-1 of each row; k/v (B,past+n,nkv,hd) hold keys/values of positions 0..past+n-1 (the
// new tokens' included). Query i sees keys j <= past + i; no segments. out (B,n,nh,hd); lse (B,nh,n)
// or nullptr. Same arithmetic as attention_forward, so rows equal its rows past..past+n-1.
template <typename T>
void attention_kv_forward(T* out, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t n, int64_t past,
                          int64_t nh, int64_t nkv, int64_t hd);

// ---- linear and LoRA --------------------------------------------------------------------
// y (N,out) = x (N,in) W^T + b; W (out,in), b (out) or nullptr.
template <typename T>
void linear_forward(T* y, const T* x, const T* W, const T* b, int64_t N, int64_t in, int64_t out);
// dx (N,in) += dy W; dW (out,in) += dy^T x; db (out) += sum_n dy
template <typename T>
void linear_backward(T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, int64_t N, int64_t in, int64_t out);
// LoRA adds to y: y (N,out) += scale * xa B^T, with xa (N,r) = x A^T saved. A (r,in), B (out,r).
// x is the LoRA input (after dropout when training with lora_dropout).
template <typename T>
void lora_forward(T* y, T* xa, const T* x, const T* A, const T* B, T scale, int64_t N, int64_t in, int64_t out,
                  int64_t r);
// dx (N,in) += scale (dy B) A; dA (r,in) += scale (dy B)^T x; dB (out,r) += scale dy^T xa.
template <typename T>
void lora_backward(T* dx, T* dA, T* dB, const T* dy, const T* x, const T* xa, const T* A, const T* B, T scale,
                   int64_t N, int64_t in, int64_t out, int64_t r);

// ---- LoRA dropout (inverted dropout with a counter-based mask) ----------------------------
// keep(key, row, f) = u(key, row, f) >= p, u a uniform [0,1) double from a 64-bit hash of the three
// counters; y (N,D) = x * keep(key, row_n, f) / (1 - p) with row_n = rows[n], or n when rows is
// null. y may alias x. The same (key, row, f) always gives the same mask (no stored state).
// dropout_key mixes (seed, optimizer step, micro-batch, layer, slot) into one key; the slot names
// the adapted module (and for expert modules the row is the (token, top-k slot) assignment n*k+j).
uint64_t dropout_key(uint64_t seed, int64_t step, int64_t micro_batch, int64_t layer, int64_t slot);
double dropout_uniform(uint64_t key, uint64_t row, uint64_t feature);
template <typename T>
void dropout_apply(T* y, const T* x, int64_t N, int64_t D, double p, uint64_t key, const int32_t* rows);

// ---- SwiGLU -----------------------------------------------------------------------------
// h (n) = silu(g) * u, silu(g) = g / (1 + exp(-g))
template <typename T>
void swiglu_forward(T* h, const T* g, const T* u, int64_t n);
template <typename T>
void swiglu_backward(T* dg, T* du, const T* dh, const T* g, const T* u, int64_t n);

// ---- residual ---------------------------------------------------------------------------
// y (n) += x
template <typename T>
void add_inplace(T* y, const T* x, int64_t n);

// ---- MoE routing ------------------------------------------------------------------------
// logits (N,E) -> probs (N,E) = softmax over all E, computed in float32 as HF does (stored as T);
// topk_idx (N,k) = indices of the k largest probs, descending (ties: lower index first);
// topk_w (N,k) = their probs, divided by their sum when norm_topk_prob.
template <typename T>
void moe_router_forward(int32_t* topk_idx, T* topk_w, T* probs, const T* logits, int64_t N, int64_t E, int64_t k,
                        bool norm_topk_prob);
// dlogits (N,E) += gradient through the (renormalised) top-k weights and the softmax.
template <typename T>
void moe_router_backward(T* dlogits, const T* dtopk_w, const T* probs, const int32_t* topk_idx, int64_t N, int64_t E,
                         int64_t k, bool norm_topk_prob);

// The router statistics of the load-balancing loss (model/moe_aux_loss.h), accumulated over layers:
// prob_sum (E) += sum over the N rows of probs (N,E); counts (E) += the assignments per expert.
template <typename T>
void moe_route_stats(double* prob_sum, double* counts, const T* probs, const int32_t* topk_idx, int64_t N, int64_t E,
                     int64_t k);
// The load-balancing loss through the softmax: dlogits (N,E) += scale * p (f - p.f) per row, with
// f (E) the routed fractions and scale = dloss * E / rows.
template <typename T>
void moe_aux_router_backward(T* dlogits, const T* probs, const double* f, double scale, int64_t N, int64_t E);

// Token -> expert permutation by a stable counting sort of the N*k assignments a = n*k + j:
// perm (N*k) lists assignments grouped by expert (expert e owns perm[offsets[e] .. offsets[e+1]));
// offsets (E+1).
void moe_sort(int32_t* perm, int64_t* offsets, const int32_t* topk_idx, int64_t N, int64_t k, int64_t E);
// xs (N*k, H): xs[p] = x[perm[p] / k]
template <typename T>
void moe_gather(T* xs, const T* x, const int32_t* perm, int64_t Nk, int64_t k, int64_t H);
// dx (N,H) += scatter of dxs (N*k,H) back to tokens
template <typename T>
void moe_gather_backward(T* dx, const T* dxs, const int32_t* perm, int64_t Nk, int64_t k, int64_t H);
// out (N,H) ADDS sum over assignments: out[perm[p]/k] += topk_w[perm[p]] * ys[p]
template <typename T>
void moe_combine(T* out, const T* ys, const T* topk_w, const int32_t* perm, int64_t Nk, int64_t k, int64_t H);
// dys (N*k,H) += topk_w[a] * dout[n]; dtopk_w (N*k) += dot(dout[n], ys[p]) with a = perm[p], n = a / k
template <typename T>
void moe_combine_backward(T* dys, T* dtopk_w, const T* dout, const T* ys, const T* topk_w, const int32_t* perm,
                          int64_t Nk, int64_t k, int64_t H);

// ---- loss -------------------------------------------------------------------------------
// HF causal-LM loss: logits (B,S,V) at position t predict labels (B,S) at t+1; labels == -100
// are ignored. Returns the SUM of the per-token losses; *count = number of predicted tokens.
template <typename T>
double cross_entropy_forward(const T* logits, const int32_t* labels, int64_t B, int64_t S, int64_t V,
                             int64_t* count);
// dlogits (B,S,V) += scale * (softmax - onehot) at predicting positions (scale = dloss/dsum,
// e.g. 1/count for the mean).
template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* labels, T scale, int64_t B, int64_t S,
                            int64_t V);

}  // namespace qt::cpu
