// Training progress for people: a live one-line bar on a terminal, plain log lines otherwise.
//
// Live (stdout is a TTY and TERM is not "dumb", or forced): after every optimizer step the line
//   step 12/40 [#####.....] 30% | loss 8.123 | lr 1.9e-03 | 1,234 tok/s | 00:21<00:49
// is redrawn in place ("\r" + line + erase-to-end-of-line), fitted to the terminal width
// (TIOCGWINSZ, else $COLUMNS, else 80); every other message (log lines, eval lines, warnings) first
// erases the bar, is printed on its own line, and the bar is drawn again below it.
// Plain (not a TTY): only the log lines, every logging_steps, in a stable grep-able format:
//   step 5/40  loss 11.9149  lr 2.000e-03  grad_norm 1.5931  tok/s 211  elapsed 0m04s  eta 0m28s
// QWENTUNE_PROGRESS=live|plain overrides the detection.
//
// Throughput is smoothed: tok/s = EMA(tokens per step) / EMA(seconds per step) with weight
// kSmoothing on the newest step; the ETA is EMA(seconds per step) * steps left.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

namespace qt {

// What one progress line shows. loss is NaN when no step has a finite loss yet.
struct ProgressState {
  int64_t step = 0, total = 0;
  double loss = 0, lr = 0, grad_norm = 0;
  double tokens_per_s = 0;
  double elapsed_s = 0, eta_s = 0;
};

// "1m05s" / "2h03m09s" (used in log lines and summaries).
std::string format_duration(double seconds);
// "01:05" / "2:03:09" (the bar's compact clock).
std::string format_clock(double seconds);
// 1234.6 -> "1,235"
std::string format_thousands(double value);

// The live bar line, at most `width` - 1 columns (the last column is left free so that terminals
// never wrap); fields are dropped from the right and the bar shrinks when the width is small.
// A pure function of its arguments.
std::string render_progress_line(const ProgressState& s, int width);
// The plain log line (no newline).
std::string render_log_line(const ProgressState& s);

class ProgressReporter {
 public:
  static constexpr double kSmoothing = 0.3;
  enum class Mode { Auto, Live, Plain };
  struct Options {
    Mode mode = Mode::Auto;  // Auto: QWENTUNE_PROGRESS, else live iff `out` is a terminal
    int width = 0;           // 0: the terminal's width (fallback 80)
    std::FILE* out = stdout;
  };
  ProgressReporter(int64_t total_steps, Options opt);
  ~ProgressReporter();  // finishes the live line
  ProgressReporter(const ProgressReporter&) = delete;
  ProgressReporter& operator=(const ProgressReporter&) = delete;

  bool live() const { return live_; }
  // One optimizer step finished: `tokens` processed in `step_seconds`; loss NaN for a skipped step.
  // Redraws the bar when live.
  void on_step(int64_t step, double loss, double lr, double grad_norm, int64_t tokens, double step_seconds);
  // A logging step: the plain line in both modes (with the mean loss since the last log line and
  // the smoothed throughput). Returns the state it printed, for metrics.
  ProgressState log(int64_t step, double mean_loss, double lr, double grad_norm);
  // Prints one line (eval results, notes) above the bar.
  void print_line(const std::string& line);
  // Prints to stderr (warnings), erasing the bar first when stdout and stderr share the terminal.
  void print_error(const std::string& line);
  // Erases the bar for good (before the end-of-training summary); later on_step calls redraw it.
  void finish();

  double elapsed_s() const;
  double smoothed_tokens_per_s() const;

 private:
  void clear_line();
  void draw();
  int width() const;

  int64_t total_;
  Options opt_;
  bool live_ = false;
  bool drawn_ = false;     // the bar is on screen
  bool finished_ = false;  // finish() called and no step since: print_line does not redraw
  double start_ = 0;       // steady-clock seconds at construction
  double last_draw_ = 0;
  double ema_tokens_ = 0, ema_seconds_ = 0;
  bool have_ema_ = false;
  ProgressState last_;
};

}  // namespace qt
