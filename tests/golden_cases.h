// Shared by the golden tests (test_golden.cpp: the CPU engine; test_cuda_golden.cpp: the CUDA
// engine): the fixture cases under tests/golden/, running `qwentune debug grads` on one, and the
// relative-error comparison.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace qt::test {

namespace fs = std::filesystem;

inline const fs::path kGoldenRoot = fs::path(QT_SOURCE_DIR) / "tests" / "golden";

struct GoldenCase {
  std::string name;    // case directory name
  std::string layout;  // "hub", "v5fused" or "moefused"
  fs::path dir;        // the case directory
  fs::path model_dir;  // the directory passed to --model
};

// Every case directory (one holding expected.safetensors) and each model layout it provides.
inline std::vector<GoldenCase> find_cases() {
  std::vector<GoldenCase> cases;
  std::error_code ec;
  if (!fs::is_directory(kGoldenRoot, ec)) return cases;
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(kGoldenRoot, ec))
    if (e.is_directory() && fs::exists(e.path() / "expected.safetensors")) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  for (const fs::path& d : dirs) {
    const std::string name = d.filename().string();
    cases.push_back({name, "hub", d, d});
    for (const char* layout : {"v5fused", "moefused"}) {
      fs::path m = d / (std::string("model_") + layout);
      if (fs::exists(m / "model.safetensors")) cases.push_back({name, layout, d, m});
    }
  }
  return cases;
}

inline std::string quoted(const fs::path& p) {  // single-quoted for /bin/sh
  std::string s = "'";
  for (char c : p.string()) s += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return s + "'";
}

inline std::string read_text(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct Comparison {
  double rel = 0;       // ||x - ref|| / ||ref|| (0 / 0 = 0; x / 0 = inf)
  double ref_norm = 0;
  bool finite = true;   // every element of x is finite
};

// x and ref: same shape (checked by the caller), any float dtype; compared in double.
inline Comparison compare(const Tensor& x, const Tensor& ref) {
  Tensor a = x.to(DType::F64), b = ref.to(DType::F64);
  const double* pa = a.data<double>();
  const double* pb = b.data<double>();
  double diff2 = 0, ref2 = 0;
  Comparison c;
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (!std::isfinite(pa[i])) c.finite = false;
    diff2 += (pa[i] - pb[i]) * (pa[i] - pb[i]);
    ref2 += pb[i] * pb[i];
  }
  c.ref_norm = std::sqrt(ref2);
  const double diff = std::sqrt(diff2);
  c.rel = c.ref_norm > 0 ? diff / c.ref_norm : (diff == 0 ? 0.0 : INFINITY);
  return c;
}

inline bool is_float(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16 || t == DType::F16; }

inline std::set<std::string> grad_names(const SafetensorsFile& f) {
  std::set<std::string> s;
  const std::string suffix = ".grad";
  for (const SafetensorsEntry& e : f.entries())
    if (e.name.size() > suffix.size() && e.name.compare(e.name.size() - suffix.size(), suffix.size(), suffix) == 0)
      s.insert(e.name);
  return s;
}


// x . ref, |x|^2 and |ref|^2 added in double (the cosine over all gradients).
inline void accumulate_dot(const Tensor& x, const Tensor& ref, double& dot, double& n_x, double& n_ref) {
  Tensor a = x.to(DType::F64), b = ref.to(DType::F64);
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double u = a.data<double>()[i], v = b.data<double>()[i];
    dot += u * v, n_x += u * u, n_ref += v * v;
  }
}

// Compares a debug-grads output with the case's expected.safetensors (gtest assertions): loss and
// logits by relative error <= kLossTol and kLogitsTol, every LoRA gradient <= kGradTol, equal gradient
// name sets.
// Prints one "[golden<tag>] ..." line; *cosine = the cosine between all gradients taken as one
// vector and the expected ones.
inline void check_against_expected(const fs::path& out, const GoldenCase& gc, double kLossTol, double kLogitsTol,
                                   double kGradTol,
                                   const char* tag, double* cosine) {
  double dot = 0, n_got = 0, n_want = 0;
  SafetensorsFile got(out.string());
  SafetensorsFile want((gc.dir / "expected.safetensors").string());

  double logits_rel = 0, loss_rel = 0;
  for (const char* key : {"loss", "logits"}) {
    ASSERT_TRUE(got.contains(key)) << "output lacks '" << key << "'";
    Tensor x = got.view(key), ref = want.view(key);
    ASSERT_TRUE(is_float(x.dtype())) << key << " has dtype " << dtype_name(x.dtype());
    ASSERT_EQ(shape_str(x.shape()), shape_str(ref.shape())) << key;
    Comparison c = compare(x, ref);
    EXPECT_TRUE(c.finite) << key << " has non-finite values";
    EXPECT_LE(c.rel, std::string(key) == "loss" ? kLossTol : kLogitsTol)
        << key << ": relative error " << c.rel << " (||ref|| " << c.ref_norm << ")";
    (std::string(key) == "loss" ? loss_rel : logits_rel) = c.rel;
  }

  const std::set<std::string> want_names = grad_names(want), got_names = grad_names(got);
  ASSERT_FALSE(want_names.empty()) << "fixture without gradients";
  std::vector<std::string> missing, extra;
  std::set_difference(want_names.begin(), want_names.end(), got_names.begin(), got_names.end(),
                      std::back_inserter(missing));
  std::set_difference(got_names.begin(), got_names.end(), want_names.begin(), want_names.end(),
                      std::back_inserter(extra));
  EXPECT_TRUE(missing.empty()) << missing.size() << " gradients missing, first: " << (missing.empty() ? "" : missing[0]);
  EXPECT_TRUE(extra.empty()) << extra.size() << " unexpected gradients, first: " << (extra.empty() ? "" : extra[0]);

  double worst = 0;
  std::string worst_name;
  for (const std::string& name : want_names) {
    if (!got_names.count(name)) continue;
    Tensor x = got.view(name), ref = want.view(name);
    ASSERT_TRUE(is_float(x.dtype())) << name << " has dtype " << dtype_name(x.dtype());
    ASSERT_EQ(shape_str(x.shape()), shape_str(ref.shape())) << name;
    Comparison c = compare(x, ref);
    accumulate_dot(x, ref, dot, n_got, n_want);
    EXPECT_TRUE(c.finite) << name << " has non-finite values";
    EXPECT_LE(c.rel, kGradTol) << name << ": relative error " << c.rel << " (||ref|| " << c.ref_norm << ")";
    if (c.rel > worst) worst = c.rel, worst_name = name;
  }
  std::printf("[golden%s] %s/%s: loss rel %.2g, logits rel %.2g; %zu gradients, worst rel %.2g (%s)\n", tag,
              gc.name.c_str(), gc.layout.c_str(), loss_rel, logits_rel, want_names.size(), worst, worst_name.c_str());
  *cosine = dot / std::sqrt(n_got * n_want);
}

// Runs `qwentune debug grads` on a case (extra_args e.g. " --device cuda") into dir/out.safetensors;
// returns its path (the gtest assertion has failed when it does not exist).
inline fs::path run_debug_grads(const GoldenCase& gc, const fs::path& dir, const std::string& extra_args = "") {
  const fs::path out = dir / "out.safetensors", log = dir / "log.txt";
  const std::string cmd = std::string(quoted(QT_BINARY)) + " debug grads --model " + quoted(gc.model_dir) +
                          " --adapter " + quoted(gc.dir / "adapter") + " --batch " + quoted(gc.dir / "batch.json") +
                          " --out " + quoted(out) + extra_args + " > " + quoted(log) + " 2>&1";
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << cmd << "\n" << read_text(log);
  EXPECT_TRUE(fs::exists(out)) << cmd << "\n" << read_text(log);
  return out;
}

inline std::string case_label(const ::testing::TestParamInfo<GoldenCase>& info) {
  std::string s = info.param.name + "_" + info.param.layout;
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

}  // namespace qt::test
