// The loss curve as a self-contained SVG (no scripts, fonts or external references), written at the
// end of training (and at checkpoints) to output_dir/loss.svg.
//
// Layout: a kWidth x kHeight image; the plot box spans x in [kLeft, kWidth - kRight] and y in
// [kTop, kHeight - kBottom]. x = step (linear, from the smallest to the largest step shown), y =
// loss (linear, padded to "nice" tick values 1, 2 or 5 x 10^k). Drawn: axes with tick labels, the
// training loss as one polyline (buckets of consecutive steps averaged when there are more than
// kMaxPolylinePoints), a smoothed training curve (debiased EMA with weight smoothing_weight(n) for
// n points, when there are at least 10), eval losses as circle markers joined by a dashed line, a legend and a
// title. Non-finite losses are left out.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qt {

struct LossPoint {
  int64_t step = 0;  // the optimizer step (1-based) the loss belongs to
  double loss = 0;
  bool operator==(const LossPoint&) const = default;
};

namespace loss_plot {
constexpr int kWidth = 760, kHeight = 440;
constexpr int kLeft = 72, kRight = 24, kTop = 44, kBottom = 52;
constexpr size_t kMaxPolylinePoints = 2000;
// 1 - 20/n clamped to [0.5, 0.9]: a lag of about n/20 steps on short runs, 10 steps on long ones.
double smoothing_weight(size_t n);
}  // namespace loss_plot

// The SVG text. `train` and `eval` must be in increasing step order (the trainer's order).
std::string render_loss_svg(const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                            const std::string& title);
// Renders and writes `path` atomically; throws "[loss_plot] ..." when it cannot write.
void write_loss_plot(const std::string& path, const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                     const std::string& title);

}  // namespace qt
