// Finite-difference gradient checks in float64 for the CPU ops' hand-written backward passes.
// Usage: define f(inputs) -> scalar loss (typically sum(out * R) with a fixed random R), compute the
// analytic gradient with the op's backward (dout = R), then compare with central differences.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

namespace qt::testing {

inline std::vector<double> random_vec(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

inline std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

inline double rel_error(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

// Central-difference gradient of loss() with respect to every element of x (x is perturbed in place
// and restored). h = 1e-6 relative to max(1, |x|).
inline std::vector<double> numeric_grad(std::vector<double>& x, const std::function<double()>& loss) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double x0 = x[i], h = 1e-6 * std::max(1.0, std::fabs(x0));
    x[i] = x0 + h;
    double lp = loss();
    x[i] = x0 - h;
    double lm = loss();
    x[i] = x0;
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

// Asserts ||analytic - numeric|| / ||numeric|| <= tol (default 1e-6 for smooth float64 ops).
inline void expect_grad_close(const std::vector<double>& analytic, const std::vector<double>& numeric,
                              const char* what, double tol = 1e-6) {
  ASSERT_EQ(analytic.size(), numeric.size()) << what;
  double err = rel_error(analytic, numeric);
  EXPECT_LE(err, tol) << what << ": relative error " << err;
  double n = 0;
  for (double v : numeric) n += v * v;
  EXPECT_GT(n, 0.0) << what << ": numeric gradient is all zero, the check proves nothing";
}

}  // namespace qt::testing
