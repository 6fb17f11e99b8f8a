// Greedy choice and HF-ordered sampling warpers (see sampling.h).
#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace qt {

namespace {
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

template <typename T>
int32_t argmax_of(const T* x, int64_t V) {
  QT_ASSERT(V >= 1, "argmax over {} values", V);
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (x[i] > x[best]) best = i;
  return int32_t(best);
}
}  // namespace

void SamplingOptions::validate() const {
  if (!do_sample) return;
  if (!(temperature > 0) || !std::isfinite(temperature))
    fail("generate", "temperature {} must be > 0 when sampling (use --greedy for greedy decoding)", temperature);
  if (top_k < 0) fail("generate", "top_k {} must be >= 0 (0 turns it off)", top_k);
  if (!(top_p > 0 && top_p <= 1)) fail("generate", "top_p {} must be in (0, 1]", top_p);
}

void apply_temperature(std::vector<double>& scores, double temperature) {
  if (temperature == 1.0) return;
  for (double& s : scores) s /= temperature;
}

void top_k_filter(std::vector<double>& scores, int64_t k) {
  const int64_t V = int64_t(scores.size());
  if (k <= 0 || k >= V) return;
  std::vector<double> sorted = scores;
  std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<double>());
  const double threshold = sorted[size_t(k - 1)];
  for (double& s : scores)
    if (s < threshold) s = kNegInf;
}

void top_p_filter(std::vector<double>& scores, double p) {
  if (p >= 1.0 || scores.empty()) return;
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[size_t(a)] < scores[size_t(b)]; });
  const double m = scores[size_t(order.back())];
  double total = 0;
  for (double s : scores) total += std::exp(s - m);
  double cum = 0;
  for (size_t r = 0; r + 1 < order.size(); ++r) {  // the last (most likely) token always stays
    double& s = scores[size_t(order[r])];
    cum += std::exp(s - m) / total;
    if (cum <= 1.0 - p) s = kNegInf;
  }
}

int32_t argmax_token(const float* logits, int64_t V) { return argmax_of(logits, V); }
int32_t argmax_token(const double* logits, int64_t V) { return argmax_of(logits, V); }

Sampler::Sampler(const SamplingOptions& opts, uint64_t seed) : opts_(opts), rng_(seed) { opts_.validate(); }

template <typename T>
int32_t Sampler::pick(const T* logits, int64_t V) {
  if (!opts_.do_sample) return argmax_of(logits, V);
  scores_.assign(logits, logits + V);
  apply_temperature(scores_, opts_.temperature);
  top_k_filter(scores_, opts_.top_k);
  top_p_filter(scores_, opts_.top_p);
  const double m = *std::max_element(scores_.begin(), scores_.end());
  double total = 0;
  for (double& s : scores_) {
    s = std::exp(s - m);  // exp(-inf) = 0 for removed tokens
    total += s;
  }
  const double u = double(rng_() >> 11) * 0x1.0p-53 * total;
  double cum = 0;
  int32_t last_kept = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (scores_[size_t(i)] == 0) continue;
    cum += scores_[size_t(i)];
    last_kept = int32_t(i);
    if (u < cum) return int32_t(i);
  }
  return last_kept;  // u within rounding of the total
}

int32_t Sampler::next(const float* logits, int64_t V) { return pick(logits, V); }
int32_t Sampler::next(const double* logits, int64_t V) { return pick(logits, V); }

}  // namespace qt
