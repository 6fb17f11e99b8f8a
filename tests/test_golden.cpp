// Golden tests: the CPU engine against HF transformers + PEFT evaluated in float64.
//
// Fixtures (tests/golden/<case>/, made by tools/make_golden.py, see tests/golden/README.md):
//   config.json + model.safetensors (Hub layout, F32), optional model_v5fused/ and model_moefused/
//   (the same weights in the other expert layouts), adapter/ (PEFT, F32), batch.json, and
//   expected.safetensors (F64): "loss" [1], "logits" (B,S,V), "<PEFT adapter name>.grad" for every
//   LoRA tensor.
// Each (case, model layout) runs
//   qwentune debug grads --model M --adapter CASE/adapter --batch CASE/batch.json --out OUT
// and compares OUT with the expectation by relative error ||x - ref|| / ||ref||:
//   loss and logits <= 1e-5, each LoRA gradient <= 1e-4; the gradient name sets must be equal.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_files.h"

using namespace qt;
namespace fs = std::filesystem;

namespace {

using qt::test::TempDir;

constexpr double kLogitsTol = 1e-5;  // loss and logits
constexpr double kGradTol = 1e-4;    // every LoRA gradient

const fs::path kGoldenRoot = fs::path(QT_SOURCE_DIR) / "tests" / "golden";

struct GoldenCase {
  std::string name;    // case directory name
  std::string layout;  // "hub", "v5fused" or "moefused"
  fs::path dir;        // the case directory
  fs::path model_dir;  // the directory passed to --model
};

// Every case directory (one holding expected.safetensors) and each model layout it provides.
std::vector<GoldenCase> find_cases() {
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

std::string quoted(const fs::path& p) {  // single-quoted for /bin/sh
  std::string s = "'";
  for (char c : p.string()) s += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return s + "'";
}

std::string read_text(const fs::path& p) {
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
Comparison compare(const Tensor& x, const Tensor& ref) {
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

bool is_float(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16 || t == DType::F16; }

std::set<std::string> grad_names(const SafetensorsFile& f) {
  std::set<std::string> s;
  const std::string suffix = ".grad";
  for (const SafetensorsEntry& e : f.entries())
    if (e.name.size() > suffix.size() && e.name.compare(e.name.size() - suffix.size(), suffix.size(), suffix) == 0)
      s.insert(e.name);
  return s;
}

class GoldenTest : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(GoldenTest, MatchesTransformersFloat64) {
  const GoldenCase& gc = GetParam();
  TempDir tmp(gc.name + "_" + gc.layout);
  const fs::path out = tmp.path / "out.safetensors", log = tmp.path / "log.txt";
  const std::string cmd = std::string(quoted(QT_BINARY)) + " debug grads --model " + quoted(gc.model_dir) +
                          " --adapter " + quoted(gc.dir / "adapter") + " --batch " + quoted(gc.dir / "batch.json") +
                          " --out " + quoted(out) + " > " + quoted(log) + " 2>&1";
  const int rc = std::system(cmd.c_str());
  ASSERT_EQ(rc, 0) << cmd << "\n" << read_text(log);
  ASSERT_TRUE(fs::exists(out)) << cmd << "\n" << read_text(log);

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
    EXPECT_LE(c.rel, kLogitsTol) << key << ": relative error " << c.rel << " (||ref|| " << c.ref_norm << ")";
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
    EXPECT_TRUE(c.finite) << name << " has non-finite values";
    EXPECT_LE(c.rel, kGradTol) << name << ": relative error " << c.rel << " (||ref|| " << c.ref_norm << ")";
    if (c.rel > worst) worst = c.rel, worst_name = name;
  }
  std::printf("[golden] %s/%s: loss rel %.2g, logits rel %.2g; %zu gradients, worst rel %.2g (%s)\n",
              gc.name.c_str(), gc.layout.c_str(), loss_rel, logits_rel, want_names.size(), worst, worst_name.c_str());
}

std::string case_label(const ::testing::TestParamInfo<GoldenCase>& info) {
  std::string s = info.param.name + "_" + info.param.layout;
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenTest, ::testing::ValuesIn(find_cases()), case_label);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(GoldenTest);

// The fixtures must be present: a checkout without them would otherwise pass vacuously.
TEST(GoldenFixtures, ArePresent) {
  const std::vector<GoldenCase> cases = find_cases();
  EXPECT_GE(cases.size(), 7u) << "expected the golden cases under " << kGoldenRoot;
  std::set<std::string> layouts;
  for (const GoldenCase& c : cases) layouts.insert(c.layout);
  EXPECT_EQ(layouts, (std::set<std::string>{"hub", "v5fused", "moefused"}));
}

}  // namespace
