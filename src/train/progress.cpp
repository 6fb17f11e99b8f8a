// Training progress output: see progress.h for the two modes and the line formats.
#include "train/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fmt/format.h>
#include <vector>

namespace qt {

namespace {

constexpr int kMinBar = 8, kMaxBar = 30;  // the full line with an 8-column bar fits 80 columns
constexpr double kRedrawSeconds = 0.1;  // at most 10 redraws a second (the last step always draws)
constexpr const char* kEraseLine = "\r\x1b[K";

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t whole_seconds(double s) { return std::isfinite(s) ? int64_t(std::llround(std::max(0.0, s))) : 0; }

std::string bar(double frac, int cols) {
  const int filled = std::clamp(int(std::floor(frac * cols)), 0, cols);
  std::string out(size_t(cols) + 2, '.');
  out.front() = '[';
  out.back() = ']';
  std::fill_n(out.begin() + 1, filled, '#');
  return out;
}

}  // namespace

std::string format_duration(double seconds) {
  const int64_t t = whole_seconds(seconds);
  return t >= 3600 ? fmt::format("{}h{:02}m{:02}s", t / 3600, (t / 60) % 60, t % 60)
                   : fmt::format("{}m{:02}s", t / 60, t % 60);
}

std::string format_clock(double seconds) {
  const int64_t t = whole_seconds(seconds);
  return t >= 3600 ? fmt::format("{}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60)
                   : fmt::format("{:02}:{:02}", t / 60, t % 60);
}

std::string format_thousands(double value) {
  const std::string digits = fmt::format("{}", whole_seconds(value));
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string render_progress_line(const ProgressState& s, int width) {
  const size_t max_cols = size_t(std::max(width - 1, 1));
  const double frac = s.total > 0 ? std::clamp(double(s.step) / double(s.total), 0.0, 1.0) : 0.0;
  const std::string head = fmt::format("step {}/{}", s.step, s.total);
  const std::string pct = fmt::format("{}%", int(std::floor(frac * 100)));
  const std::vector<std::string> fields = {
      std::isfinite(s.loss) ? fmt::format("loss {:.3f}", s.loss) : std::string("loss -"),
      fmt::format("lr {:.1e}", s.lr),
      format_thousands(s.tokens_per_s) + " tok/s",
      format_clock(s.elapsed_s) + "<" + format_clock(s.eta_s),
  };
  auto tail_with = [&](size_t keep) {
    std::string t = pct;
    for (size_t i = 0; i < keep; ++i) t += " | " + fields[i];
    return t;
  };
  // Every field with a bar of at least kMinBar columns; else no bar, dropping fields from the right.
  const std::string full = tail_with(fields.size());
  const size_t fixed = head.size() + 2 + 2 + full.size();  // head " [" bar "] " tail
  if (fixed + kMinBar <= max_cols) {
    const int cols = int(std::min<size_t>(max_cols - fixed, kMaxBar));
    return head + " " + bar(frac, cols) + " " + full;
  }
  for (size_t keep = fields.size() + 1; keep-- > 0;) {
    const std::string line = head + " " + tail_with(keep);
    if (line.size() <= max_cols) return line;
  }
  return (head + " " + pct).substr(0, max_cols);
}

std::string render_log_line(const ProgressState& s) {
  return fmt::format("step {}/{}  loss {:.4f}  lr {:.3e}  grad_norm {:.4f}  tok/s {:.0f}  elapsed {}  eta {}", s.step,
                     s.total, s.loss, s.lr, s.grad_norm, s.tokens_per_s, format_duration(s.elapsed_s),
                     format_duration(s.eta_s));
}

ProgressReporter::ProgressReporter(int64_t total_steps, Options opt) : total_(total_steps), opt_(opt) {
  Mode mode = opt_.mode;
  if (mode == Mode::Auto) {
    const char* env = std::getenv("QWENTUNE_PROGRESS");
    if (env && std::strcmp(env, "live") == 0) mode = Mode::Live;
    else if (env && std::strcmp(env, "plain") == 0) mode = Mode::Plain;
  }
  if (mode == Mode::Auto) {
    const char* term = std::getenv("TERM");
    mode = ::isatty(::fileno(opt_.out)) && !(term && std::strcmp(term, "dumb") == 0) ? Mode::Live : Mode::Plain;
  }
  live_ = mode == Mode::Live;
  start_ = now_seconds();
  last_.total = total_steps;
  last_.loss = std::nan("");
}

ProgressReporter::~ProgressReporter() { finish(); }

double ProgressReporter::elapsed_s() const { return now_seconds() - start_; }

double ProgressReporter::smoothed_tokens_per_s() const {
  return have_ema_ && ema_seconds_ > 0 ? ema_tokens_ / ema_seconds_ : 0.0;
}

int ProgressReporter::width() const {
  if (opt_.width > 0) return opt_.width;
  winsize ws{};
  if (::ioctl(::fileno(opt_.out), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return int(ws.ws_col);
  if (const char* cols = std::getenv("COLUMNS")) {
    const int c = std::atoi(cols);
    if (c > 0) return c;
  }
  return 80;
}

void ProgressReporter::on_step(int64_t step, double loss, double lr, double grad_norm, int64_t tokens,
                               double step_seconds) {
  const double a = kSmoothing;
  if (!have_ema_) {
    ema_tokens_ = double(tokens);
    ema_seconds_ = step_seconds;
    have_ema_ = true;
  } else {
    ema_tokens_ = a * double(tokens) + (1 - a) * ema_tokens_;
    ema_seconds_ = a * step_seconds + (1 - a) * ema_seconds_;
  }
  last_.step = step;
  if (std::isfinite(loss)) last_.loss = loss;
  last_.lr = lr;
  last_.grad_norm = grad_norm;
  last_.tokens_per_s = smoothed_tokens_per_s();
  last_.elapsed_s = elapsed_s();
  last_.eta_s = ema_seconds_ * double(std::max<int64_t>(0, total_ - step));
  finished_ = false;
  if (!live_) return;
  if (step >= total_ || !drawn_ || now_seconds() - last_draw_ >= kRedrawSeconds) draw();
}

void ProgressReporter::draw() {
  if (!live_ || finished_ || last_.step == 0) return;
  std::fputs(kEraseLine, opt_.out);
  std::fputs(render_progress_line(last_, width()).c_str(), opt_.out);
  std::fflush(opt_.out);
  drawn_ = true;
  last_draw_ = now_seconds();
}

void ProgressReporter::clear_line() {
  if (!drawn_) return;
  std::fputs(kEraseLine, opt_.out);
  std::fflush(opt_.out);
  drawn_ = false;
}

void ProgressReporter::print_line(const std::string& line) {
  clear_line();
  std::fputs(line.c_str(), opt_.out);
  std::fputc('\n', opt_.out);
  std::fflush(opt_.out);
  draw();
}

void ProgressReporter::print_error(const std::string& line) {
  clear_line();
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  draw();
}

void ProgressReporter::finish() {
  clear_line();
  finished_ = true;
}

}  // namespace qt
