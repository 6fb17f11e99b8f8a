// HF learning-rate schedules; formulas in lr_schedule.h.
#include "train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace qt {

namespace {

constexpr struct {
  const char* name;
  LrSchedulerKind kind;
} kSchedulers[] = {
    {"cosine", LrSchedulerKind::Cosine},
    {"linear", LrSchedulerKind::Linear},
    {"constant", LrSchedulerKind::Constant},
    {"constant_with_warmup", LrSchedulerKind::ConstantWithWarmup},
};

// The warmup ramp shared by the schedules: step / max(1, W).
double warmup_ramp(int64_t step, int64_t warmup) { return double(step) / double(std::max<int64_t>(1, warmup)); }

}  // namespace

bool lr_scheduler_from_name(std::string_view name, LrSchedulerKind* out) {
  for (const auto& s : kSchedulers)
    if (name == s.name) {
      *out = s.kind;
      return true;
    }
  return false;
}

std::string_view lr_scheduler_name(LrSchedulerKind kind) {
  for (const auto& s : kSchedulers)
    if (s.kind == kind) return s.name;
  QT_ASSERT(false, "unknown scheduler kind {}", int(kind));
  return {};
}

int64_t resolve_warmup_steps(std::optional<int64_t> warmup_steps, std::optional<double> warmup_ratio,
                             int64_t total_steps) {
  const int64_t steps = warmup_steps.value_or(0);
  if (steps > 0) return steps;
  const double ratio = warmup_ratio.value_or(0.0);
  return int64_t(std::ceil(double(total_steps) * ratio));
}

double cosine_with_warmup_factor(int64_t step, int64_t warmup, int64_t total, double num_cycles) {
  if (step < warmup) return warmup_ramp(step, warmup);
  const double progress = double(step - warmup) / double(std::max<int64_t>(1, total - warmup));
  return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * num_cycles * 2.0 * progress)));
}

double linear_with_warmup_factor(int64_t step, int64_t warmup, int64_t total) {
  if (step < warmup) return warmup_ramp(step, warmup);
  return std::max(0.0, double(total - step) / double(std::max<int64_t>(1, total - warmup)));
}

double constant_with_warmup_factor(int64_t step, int64_t warmup) {
  if (step < warmup) return warmup_ramp(step, warmup);
  return 1.0;
}

LrSchedule::LrSchedule(LrSchedulerKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps)
    : kind_(kind), base_lr_(base_lr), warmup_(warmup_steps), total_(total_steps) {
  if (!(base_lr >= 0.0) || !std::isfinite(base_lr)) fail("lr_schedule", "learning rate must be finite and >= 0, got {}", base_lr);
  if (warmup_steps < 0) fail("lr_schedule", "warmup steps must be >= 0, got {}", warmup_steps);
  if (total_steps < 0) fail("lr_schedule", "total steps must be >= 0, got {}", total_steps);
}

double LrSchedule::factor(int64_t step) const {
  QT_ASSERT(step >= 0, "negative schedule step {}", step);
  switch (kind_) {
    case LrSchedulerKind::Cosine: return cosine_with_warmup_factor(step, warmup_, total_);
    case LrSchedulerKind::Linear: return linear_with_warmup_factor(step, warmup_, total_);
    case LrSchedulerKind::ConstantWithWarmup: return constant_with_warmup_factor(step, warmup_);
    case LrSchedulerKind::Constant: return 1.0;
  }
  QT_ASSERT(false, "unknown scheduler kind {}", int(kind_));
  return 0.0;
}

}  // namespace qt
