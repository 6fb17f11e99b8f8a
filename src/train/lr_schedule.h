// Learning-rate schedules as HF transformers builds them (optimization.py), as a multiplier
// `factor(step)` of the base learning rate, where `step` = number of optimizer steps already taken
// (0 for the first update: HF's LambdaLR evaluates the lambda at 0 before the first step).
//
//   warmup part (all but "constant"):  step < W  ->  step / max(1, W)
//   cosine (num_cycles c = 0.5):  p = (step - W) / max(1, T - W);  max(0, 0.5 (1 + cos(pi * c * 2 p)))
//   linear:                       max(0, (T - step) / max(1, T - W))
//   constant_with_warmup:         1 after warmup
//   constant (HF get_constant_schedule): 1 always; warmup is ignored, as HF's get_scheduler does.
// W = warmup steps, T = total optimizer steps. Past T the cosine factor rises again (p > 1), exactly
// as HF's formula does; a trainer stops at T.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace qt {

enum class LrSchedulerKind { Cosine, Linear, Constant, ConstantWithWarmup };

// "cosine", "linear", "constant", "constant_with_warmup"; false when unknown.
bool lr_scheduler_from_name(std::string_view name, LrSchedulerKind* out);
std::string_view lr_scheduler_name(LrSchedulerKind kind);

// HF TrainingArguments.get_warmup_steps: warmup_steps when > 0, else ceil(total_steps * ratio)
// (computed in double as Python does). Unset values count as 0.
int64_t resolve_warmup_steps(std::optional<int64_t> warmup_steps, std::optional<double> warmup_ratio,
                             int64_t total_steps);

// The HF lr lambdas, one per schedule.
double cosine_with_warmup_factor(int64_t step, int64_t warmup, int64_t total, double num_cycles = 0.5);
double linear_with_warmup_factor(int64_t step, int64_t warmup, int64_t total);
double constant_with_warmup_factor(int64_t step, int64_t warmup);

class LrSchedule {
 public:
  // Throws "[lr_schedule] ..." on a negative base lr, warmup or total.
  LrSchedule(LrSchedulerKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps);
  double factor(int64_t step) const;
  double lr(int64_t step) const { return base_lr_ * factor(step); }  // lr of update number step+1
  LrSchedulerKind kind() const { return kind_; }
  int64_t warmup_steps() const { return warmup_; }
  int64_t total_steps() const { return total_; }

 private:
  LrSchedulerKind kind_;
  double base_lr_;
  int64_t warmup_, total_;
};

}  // namespace qt
