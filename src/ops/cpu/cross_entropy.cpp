// HF causal-LM cross entropy with the shift inside: logits (B,S,V) at position t predict labels[b,t+1]
// (t < S-1); labels == -100 are ignored; the last position of each row predicts nothing.
//   loss_t = logsumexp(logits_t) - logits_t[label]       (log-sum-exp in double, max-shifted)
//   forward returns sum_t loss_t and the count of predicted tokens
//   dlogits_t += scale * (softmax(logits_t) - onehot(label))
// A label outside [0, V) other than -100 is a user error (qt::Error), checked before any work.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace qt::cpu {

namespace {

constexpr int32_t kIgnoreIndex = -100;

// Validates the predicted labels (positions 1..S-1) and returns how many are not ignored.
int64_t check_labels(const int32_t* labels, int64_t B, int64_t S, int64_t V) {
  int64_t count = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 1; t < S; ++t) {
      const int32_t y = labels[b * S + t];
      if (y == kIgnoreIndex) continue;
      if (y < 0 || y >= V) fail("cross_entropy", "label {} at batch {} position {} is outside [0, {})", y, b, t, V);
      ++count;
    }
  return count;
}

// Max and log of sum(exp(row - max)) of one row.
template <typename T>
void row_logsumexp(const T* row, int64_t V, double* max_out, double* log_sum_out) {
  double m = -INFINITY;
  for (int64_t v = 0; v < V; ++v) m = std::max(m, double(row[v]));
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - m);
  *max_out = m;
  *log_sum_out = std::log(sum);
}

}  // namespace

template <typename T>
double cross_entropy_forward(const T* logits, const int32_t* labels, int64_t B, int64_t S, int64_t V,
                             int64_t* count) {
  QT_ASSERT(V > 0, "cross_entropy: empty vocabulary");
  const int64_t n = check_labels(labels, B, S, V);
  if (count) *count = n;
  std::vector<double> row_loss(size_t(B * S), 0.0);  // summed serially afterwards: deterministic
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * S; ++bt) {
    const int64_t t = bt % S;
    if (t == S - 1) continue;
    const int32_t y = labels[bt + 1];
    if (y == kIgnoreIndex) continue;
    const T* row = logits + bt * V;
    double m, log_sum;
    row_logsumexp(row, V, &m, &log_sum);
    row_loss[size_t(bt)] = m + log_sum - double(row[y]);
  }
  double total = 0;
  for (double l : row_loss) total += l;
  return total;
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* labels, T scale, int64_t B, int64_t S,
                            int64_t V) {
  if (dlogits == nullptr) return;
  check_labels(labels, B, S, V);
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * S; ++bt) {
    const int64_t t = bt % S;
    if (t == S - 1) continue;
    const int32_t y = labels[bt + 1];
    if (y == kIgnoreIndex) continue;
    const T* row = logits + bt * V;
    T* drow = dlogits + bt * V;
    double m, log_sum;
    row_logsumexp(row, V, &m, &log_sum);
    const double shift = m + log_sum;
    const double sc = double(scale);
    for (int64_t v = 0; v < V; ++v) drow[v] += T(sc * std::exp(double(row[v]) - shift));
    drow[y] -= scale;
  }
}

template double cross_entropy_forward<float>(const float*, const int32_t*, int64_t, int64_t, int64_t, int64_t*);
template double cross_entropy_forward<double>(const double*, const int32_t*, int64_t, int64_t, int64_t, int64_t*);
template void cross_entropy_backward<float>(float*, const float*, const int32_t*, float, int64_t, int64_t, int64_t);
template void cross_entropy_backward<double>(double*, const double*, const int32_t*, double, int64_t, int64_t,
                                             int64_t);

}  // namespace qt::cpu
