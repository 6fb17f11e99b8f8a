// Choosing the next token from logits, as HF transformers' generate() does.
//   greedy (do_sample false): argmax, the first index among equal maxima (torch.argmax).
//   sampling: scores = logits / temperature (when != 1), then top-k (when k > 0), then top-p (when
//   p < 1), min_tokens_to_keep = 1; removed tokens get -inf; then a draw from softmax(scores).
//   top-k keeps every token whose score is >= the k-th largest (ties at the threshold stay, as HF's
//   `scores < topk(scores, k).values[-1]`). top-p sorts ascending, removes the tokens whose
//   cumulative probability is <= 1 - p and always keeps the most likely one.
// The draw: u in [0,1) from a 53-bit mt19937_64 output, then the first token whose cumulative
// probability exceeds u (scores in double), so a seed gives the same tokens everywhere.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace qt {

struct SamplingOptions {
  bool do_sample = false;
  double temperature = 1.0;  // > 0 when sampling
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off; in (0, 1]
  void validate() const;     // throws "[generate] ..." on out-of-range values
};

// The warpers on scores (double), in place.
void apply_temperature(std::vector<double>& scores, double temperature);
void top_k_filter(std::vector<double>& scores, int64_t k);
void top_p_filter(std::vector<double>& scores, double p);

int32_t argmax_token(const float* logits, int64_t V);
int32_t argmax_token(const double* logits, int64_t V);

class Sampler {
 public:
  Sampler(const SamplingOptions& opts, uint64_t seed);
  int32_t next(const float* logits, int64_t V);
  int32_t next(const double* logits, int64_t V);
  const SamplingOptions& options() const { return opts_; }

 private:
  template <typename T>
  int32_t pick(const T* logits, int64_t V);
  SamplingOptions opts_;
  std::mt19937_64 rng_;
  std::vector<double> scores_;
};

}  // namespace qt
