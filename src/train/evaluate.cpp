// Loss over a dataset without gradients (see evaluate.h).
#include "train/evaluate.h"

#include <cmath>

#include "data/batch_iterator.h"

namespace qt {

double EvalResult::perplexity() const { return std::exp(ce_loss()); }

EvalResult evaluate_dataset(QwenDecoder<float>& dec, const data::TokenizedDataset& ds, int64_t micro_batch_size,
                            int32_t pad_id) {
  return evaluate_dataset([&](const Batch& b) { return dec.forward_backward(b, nullptr, false); }, ds, micro_batch_size,
                          pad_id);
}

EvalResult evaluate_dataset(const std::function<StepResult(const Batch&)>& loss_of, const data::TokenizedDataset& ds,
                            int64_t micro_batch_size, int32_t pad_id) {
  data::BatchOptions bo;
  bo.micro_batch_size = micro_batch_size;
  bo.shuffle = false;
  bo.pad_id = pad_id;
  EvalResult res;
  res.sequences = ds.size();
  if (ds.size() == 0) return res;
  data::BatchIterator it(ds, bo);
  Batch b;
  for (int64_t i = 0; i < it.batches_per_epoch(); ++i) {
    it.next(b);
    const StepResult r = loss_of(b);
    res.ce_sum += r.loss_sum;
    res.aux_sum += double(r.count) * r.aux_coef * r.aux_loss;
    res.count += r.count;
  }
  return res;
}

}  // namespace qt
