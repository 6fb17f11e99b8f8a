// The MoE load-balancing auxiliary loss of HF transformers (load_balancing_loss_func, Switch
// Transformer eqs. 4-6), without an attention mask, over the routers of all MoE layers of one batch.
// Rows t run over every (layer, token) pair, R = layers * N:
//   P_e = (1/R) sum_t p_t,e                      p_t = softmax(router_logits_t) (the cached probs)
//   f_e = (1/R) #{(t,j) : topk_idx_t,j = e}      (HF: mean over rows of the (k,E) one-hot, summed over k)
//   aux = E * sum_e f_e P_e                      (the training loss adds router_aux_loss_coef * aux)
// f is piecewise constant, so the gradient flows through P only:
//   d aux / d logits_t,e = (E/R) p_t,e (f_e - sum_i p_t,i f_i)
// HF applies it to raw router logits (transformers >= 5.x after PR #45131 fixed a double softmax),
// recomputing softmax and top-k; we reuse each layer's routing (same softmax, same selection).
#pragma once
#include <vector>

#include "model/moe_mlp.h"

namespace qt {

// aux (without the coefficient) for the caches of the MoE layers; all must share N, E and k.
// Throws "[moe_aux_loss] ..." when they do not. Returns 0 when there are no rows.
template <typename T>
double moe_load_balancing_loss(const std::vector<const MoeMlpCache<T>*>& layers);

// drouter_logits[l] (N,E) += dloss * d aux / d logits of layer l (dloss = coef * upstream gradient);
// null entries are skipped. Feed them to moe_mlp_backward's drouter_logits.
template <typename T>
void moe_load_balancing_loss_backward(const std::vector<T*>& drouter_logits,
                                      const std::vector<const MoeMlpCache<T>*>& layers, double dloss);

}  // namespace qt
