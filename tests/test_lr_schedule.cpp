// LR schedules against HF transformers' lambdas (optimization.py), values worked out by hand here.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "core/error.h"
#include "train/lr_schedule.h"

using namespace qt;

TEST(LrSchedule, Names) {
  LrSchedulerKind k;
  for (const char* n : {"cosine", "linear", "constant", "constant_with_warmup"}) {
    ASSERT_TRUE(lr_scheduler_from_name(n, &k)) << n;
    EXPECT_EQ(lr_scheduler_name(k), n);
  }
  EXPECT_FALSE(lr_scheduler_from_name("cosine_with_restarts", &k));
  EXPECT_FALSE(lr_scheduler_from_name("Cosine", &k));
}

TEST(LrSchedule, CosineWithWarmup) {
  // W = 10, T = 110: 100 decay steps.
  LrSchedule s(LrSchedulerKind::Cosine, 2e-4, 10, 110);
  EXPECT_EQ(s.factor(0), 0.0);       // HF: the first update runs at lr 0 when warming up
  EXPECT_EQ(s.factor(1), 0.1);
  EXPECT_EQ(s.factor(9), 0.9);
  EXPECT_EQ(s.factor(10), 1.0);      // warmup done: cos(0)
  EXPECT_NEAR(s.factor(60), 0.5, 1e-15);  // half way: 0.5 (1 + cos(pi/2))
  EXPECT_NEAR(s.factor(35), 0.5 * (1 + std::cos(std::numbers::pi * 0.25)), 1e-15);
  EXPECT_NEAR(s.factor(110), 0.0, 1e-15);  // end: 0.5 (1 + cos(pi))
  EXPECT_NEAR(s.lr(60), 1e-4, 1e-19);
  EXPECT_NEAR(s.lr(5), 1e-4, 1e-19);
  // Monotone decay after warmup.
  for (int64_t t = 10; t < 110; ++t) EXPECT_GT(s.factor(t), s.factor(t + 1)) << t;
}

TEST(LrSchedule, LinearWithWarmup) {
  LrSchedule s(LrSchedulerKind::Linear, 1.0, 4, 20);
  EXPECT_EQ(s.factor(0), 0.0);
  EXPECT_EQ(s.factor(2), 0.5);
  EXPECT_EQ(s.factor(3), 0.75);
  EXPECT_EQ(s.factor(4), 1.0);    // (20 - 4) / 16
  EXPECT_EQ(s.factor(12), 0.5);   // (20 - 12) / 16
  EXPECT_EQ(s.factor(19), 1.0 / 16);
  EXPECT_EQ(s.factor(20), 0.0);
  EXPECT_EQ(s.factor(25), 0.0);   // clamped at 0
}

TEST(LrSchedule, ConstantKinds) {
  LrSchedule cw(LrSchedulerKind::ConstantWithWarmup, 3.0, 3, 100);
  EXPECT_EQ(cw.lr(0), 0.0);
  EXPECT_EQ(cw.factor(1), 1.0 / 3.0);
  EXPECT_EQ(cw.factor(3), 1.0);
  EXPECT_EQ(cw.factor(99), 1.0);
  // HF's plain "constant" ignores warmup.
  LrSchedule c(LrSchedulerKind::Constant, 3.0, 3, 100);
  EXPECT_EQ(c.lr(0), 3.0);
  EXPECT_EQ(c.lr(50), 3.0);
}

TEST(LrSchedule, NoWarmupAndDegenerateTotals) {
  LrSchedule cos0(LrSchedulerKind::Cosine, 1.0, 0, 4);
  EXPECT_EQ(cos0.factor(0), 1.0);
  EXPECT_NEAR(cos0.factor(2), 0.5, 1e-15);
  LrSchedule lin0(LrSchedulerKind::Linear, 1.0, 0, 4);
  EXPECT_EQ(lin0.factor(0), 1.0);
  EXPECT_EQ(lin0.factor(1), 0.75);
  // Warmup as long as training: max(1, T - W) keeps the division finite.
  LrSchedule all(LrSchedulerKind::Linear, 1.0, 5, 5);
  EXPECT_EQ(all.factor(4), 0.8);
  EXPECT_EQ(all.factor(5), 0.0);
  EXPECT_EQ(cosine_with_warmup_factor(1, 1, 1), 1.0);
}

TEST(LrSchedule, WarmupRatioIsCeiledAsHf) {
  EXPECT_EQ(resolve_warmup_steps(10, std::nullopt, 1000), 10);
  EXPECT_EQ(resolve_warmup_steps(std::nullopt, 0.03, 1000), 30);
  EXPECT_EQ(resolve_warmup_steps(std::nullopt, 0.15, 7), 2);   // ceil(1.05)
  // Python: 100 * 0.07 == 7.000000000000001, so math.ceil gives 8; the same double arithmetic here.
  EXPECT_EQ(resolve_warmup_steps(std::nullopt, 0.07, 100), 8);
  EXPECT_EQ(resolve_warmup_steps(std::nullopt, 0.1, 30), 3);   // 30 * 0.1 == 3.0 exactly in double
  EXPECT_EQ(resolve_warmup_steps(0, 0.5, 9), 5);               // warmup_steps 0 defers to the ratio
  EXPECT_EQ(resolve_warmup_steps(std::nullopt, std::nullopt, 9), 0);
}

TEST(LrSchedule, RejectsBadArguments) {
  EXPECT_THROW(LrSchedule(LrSchedulerKind::Cosine, -1e-4, 0, 10), Error);
  EXPECT_THROW(LrSchedule(LrSchedulerKind::Cosine, std::nan(""), 0, 10), Error);
  EXPECT_THROW(LrSchedule(LrSchedulerKind::Cosine, 1e-4, -1, 10), Error);
  EXPECT_THROW(LrSchedule(LrSchedulerKind::Cosine, 1e-4, 0, -10), Error);
}
