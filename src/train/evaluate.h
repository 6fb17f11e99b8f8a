// Loss of a model over a tokenized dataset, without gradients (training's validation pass and
// `qwentune eval`). Batches come from BatchIterator in order (no shuffle), right-padded with
// pad_id (label -100). Over all predicted tokens (label != -100 after HF's shift):
//   ce_loss = sum of per-token cross-entropies / count,  perplexity = exp(ce_loss)
//   loss    = ce_loss + the MoE router aux loss term when the config has output_router_logits
//             (each batch's coef * aux weighted by its predicted tokens), as the trainer reports it.
#pragma once
#include <cstdint>
#include <functional>

#include "data/tokenized_dataset.h"
#include "model/decoder.h"

namespace qt {

struct EvalResult {
  double ce_sum = 0;   // sum of per-token cross-entropies
  double aux_sum = 0;  // sum over batches of count * coef * aux
  int64_t count = 0;   // predicted tokens
  int64_t sequences = 0;
  double ce_loss() const { return count ? ce_sum / double(count) : 0.0; }
  double loss() const { return count ? (ce_sum + aux_sum) / double(count) : 0.0; }
  double perplexity() const;
};

// Any engine: `loss_of` returns a batch's loss_sum, count and aux terms (StepResult without logits).
EvalResult evaluate_dataset(const std::function<StepResult(const Batch&)>& loss_of, const data::TokenizedDataset& ds,
                            int64_t micro_batch_size, int32_t pad_id);
// The CPU engine.
EvalResult evaluate_dataset(QwenDecoder<float>& dec, const data::TokenizedDataset& ds, int64_t micro_batch_size,
                            int32_t pad_id);

}  // namespace qt
