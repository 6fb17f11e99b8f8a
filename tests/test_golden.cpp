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
#include "golden_cases.h"
#include "test_files.h"

using namespace qt;
namespace fs = std::filesystem;

namespace {

using namespace qt::test;

constexpr double kLogitsTol = 1e-5;  // loss and logits
constexpr double kGradTol = 1e-4;    // every LoRA gradient

class GoldenTest : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(GoldenTest, MatchesTransformersFloat64) {
  const GoldenCase& gc = GetParam();
  TempDir tmp(gc.name + "_" + gc.layout);
  const fs::path out = run_debug_grads(gc, tmp.path);
  if (::testing::Test::HasFailure()) return;

  double cosine = 0;
  check_against_expected(out, gc, kLogitsTol, kLogitsTol, kGradTol, "", &cosine);
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
