// What training shows a person: the live progress line (a pure function of the state and the
// width), the plain log line, the reporter's terminal handling (forced live into a file), and the
// loss-curve SVG (well-formed XML, one polyline vertex per finite point, inside the plot box,
// increasing x, atomic write).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <cctype>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "train/loss_plot.h"
#include "train/progress.h"

namespace fs = std::filesystem;
using qt::LossPoint;
using qt::ProgressState;

namespace {

ProgressState example_state() {
  ProgressState s;
  s.step = 12;
  s.total = 40;
  s.loss = 8.1234;
  s.lr = 1.9e-3;
  s.grad_norm = 0.5;
  s.tokens_per_s = 1234.4;
  s.elapsed_s = 21;
  s.eta_s = 49;
  return s;
}

TEST(ProgressLine, ExampleAt80Columns) {
  const std::string line = qt::render_progress_line(example_state(), 80);
  EXPECT_EQ(line, "step 12/40 [##......] 30% | loss 8.123 | lr 1.9e-03 | 1,234 tok/s | 00:21<00:49");
  EXPECT_LE(line.size(), 79u);
}

TEST(ProgressLine, FitsEveryWidthAndDropsFieldsFromTheRight) {
  const ProgressState s = example_state();
  for (int w = 1; w <= 200; ++w) {
    const std::string line = qt::render_progress_line(s, w);
    EXPECT_LE(line.size(), size_t(std::max(1, w - 1))) << "width " << w;
    EXPECT_EQ(line.find('\n'), std::string::npos);
    EXPECT_EQ(line.find('\r'), std::string::npos);
  }
  const std::string wide = qt::render_progress_line(s, 200);
  EXPECT_NE(wide.find("[#########......"), std::string::npos) << wide;  // 30% of 30 columns
  EXPECT_EQ(wide.find('[') + 31, wide.find(']')) << "bar capped at 30 columns: " << wide;
  // No room for a bar: all the numbers, no bar.
  const std::string mid = qt::render_progress_line(s, 79);
  EXPECT_EQ(mid, "step 12/40 30% | loss 8.123 | lr 1.9e-03 | 1,234 tok/s | 00:21<00:49");
  // Narrower: the clock goes first, then tok/s.
  EXPECT_EQ(qt::render_progress_line(s, 60), "step 12/40 30% | loss 8.123 | lr 1.9e-03 | 1,234 tok/s");
  EXPECT_EQ(qt::render_progress_line(s, 30), "step 12/40 30% | loss 8.123");
  EXPECT_EQ(qt::render_progress_line(s, 12), "step 12/40 ");
}

TEST(ProgressLine, BarFillLossPlaceholderAndLongTimes) {
  ProgressState s = example_state();
  s.step = 40;
  s.loss = std::nan("");
  s.elapsed_s = 3 * 3600 + 7 * 60 + 5;
  s.eta_s = 0;
  const std::string line = qt::render_progress_line(s, 100);
  EXPECT_NE(line.find("100% | loss - |"), std::string::npos) << line;
  EXPECT_NE(line.find("3:07:05<00:00"), std::string::npos) << line;
  EXPECT_EQ(line.find('.'), line.find("1.9e-03") + 1) << "a full bar has no '.': " << line;
  s.step = 0;
  EXPECT_NE(qt::render_progress_line(s, 100).find("[......"), std::string::npos);
}

TEST(ProgressFormat, ThousandsDurationsAndLogLine) {
  EXPECT_EQ(qt::format_thousands(0), "0");
  EXPECT_EQ(qt::format_thousands(999.4), "999");
  EXPECT_EQ(qt::format_thousands(1000), "1,000");
  EXPECT_EQ(qt::format_thousands(1234567.8), "1,234,568");
  EXPECT_EQ(qt::format_duration(65), "1m05s");
  EXPECT_EQ(qt::format_duration(7389), "2h03m09s");
  EXPECT_EQ(qt::format_clock(65), "01:05");
  EXPECT_EQ(qt::format_clock(std::nan("")), "00:00");
  ProgressState s = example_state();
  s.tokens_per_s = 211.4;
  s.elapsed_s = 4;
  s.eta_s = 28;
  EXPECT_EQ(qt::render_log_line(s),
            "step 12/40  loss 8.1234  lr 1.900e-03  grad_norm 0.5000  tok/s 211  elapsed 0m04s  eta 0m28s");
}

// Everything a reporter (mode, width 100, `total` steps) writes to its stream while `script` drives
// it, destruction included.
std::string output_of(qt::ProgressReporter::Mode mode, int64_t total,
                      const std::function<void(qt::ProgressReporter&)>& script) {
  std::FILE* f = std::tmpfile();
  EXPECT_NE(f, nullptr);
  if (!f) return "";
  {
    qt::ProgressReporter p(total, {mode, 100, f});
    EXPECT_EQ(p.live(), mode == qt::ProgressReporter::Mode::Live);
    script(p);
  }
  std::fflush(f);
  std::rewind(f);
  std::string s;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  std::fclose(f);
  return s;
}

TEST(ProgressReporter, LiveRedrawsInPlaceAndPrintsLinesAboveTheBar) {
  const std::string out = output_of(qt::ProgressReporter::Mode::Live, 3, [](qt::ProgressReporter& p) {
    p.on_step(1, 11.0, 1e-3, 1.0, 100, 0.5);
    p.print_line("eval  step 1/3  eval_loss 10.0000");
    p.on_step(2, std::nan(""), 1e-3, 1.0, 300, 0.5);  // skipped step: the last finite loss stays
    p.on_step(3, 9.0, 1e-3, 1.0, 100, 0.5);
    p.finish();
    p.print_line("saved");
  });
  const std::string erase = "\r\x1b[K";
  // Bar for step 1, erased, the eval line, the bar again; step 2 is throttled out (< 0.1 s after
  // the redraw); the last step always draws; finish erases it; "saved" is not followed by a bar.
  const std::string expect_start = erase + "step 1/3 [";
  EXPECT_EQ(out.rfind(expect_start, 0), 0u) << out;
  EXPECT_NE(out.find("00:00<00:01" + erase + "eval  step 1/3  eval_loss 10.0000\n" + erase + "step 1/3 ["),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("step 3/3 [##############################] 100% | loss 9.000"), std::string::npos) << out;
  EXPECT_EQ(out.substr(out.size() - erase.size() - 6), erase + "saved\n") << out;
  // Smoothed throughput: tokens EMA (100, 160, 142) over seconds EMA 0.5 -> 284 tok/s.
  EXPECT_NE(out.find("284 tok/s"), std::string::npos) << out;
}

TEST(ProgressReporter, PlainPrintsOnlyLines) {
  const std::string out = output_of(qt::ProgressReporter::Mode::Plain, 2, [](qt::ProgressReporter& p) {
    p.on_step(1, 5.0, 1e-3, 1.0, 10, 0.1);
    p.print_line("line one");
    p.on_step(2, 4.0, 1e-3, 1.0, 10, 0.1);
    p.print_line("line two");
  });
  EXPECT_EQ(out, "line one\nline two\n");
}

// ---- loss plot -------------------------------------------------------------------------------

// An opening or empty-element tag's inside: NAME (SPACE ATTR="VALUE")* SPACE? /?, VALUE without
// '"' or '<'. Scanned by hand: std::regex recurses per character and overflows the stack on the
// long `points` attributes (seen under ASan). Sets *name and *empty; false when malformed.
bool parse_open_tag(const std::string& t, std::string* name, bool* empty) {
  auto is_name = [](char c, bool first) {
    return std::isalpha(static_cast<unsigned char>(c)) ||
           (!first && (std::isdigit(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == ':'));
  };
  size_t i = 0;
  while (i < t.size() && is_name(t[i], i == 0)) ++i;
  if (i == 0) return false;
  *name = t.substr(0, i);
  *empty = false;
  while (i < t.size()) {
    const size_t ws = i;
    while (i < t.size() && std::isspace(static_cast<unsigned char>(t[i]))) ++i;
    if (i == t.size()) return true;
    if (t[i] == '/') {
      *empty = true;
      return i + 1 == t.size();
    }
    if (i == ws) return false;  // attributes are separated by white space
    const size_t a = i;
    while (i < t.size() && is_name(t[i], i == a)) ++i;
    if (i == a || i + 1 >= t.size() || t[i] != '=' || t[i + 1] != '"') return false;
    const size_t end = t.find('"', i + 2);
    if (end == std::string::npos || t.find('<', i + 2) < end) return false;
    i = end + 1;
  }
  return true;
}

// Well-formedness of the subset of XML the plot uses: an XML declaration, then elements with
// quoted attributes, properly nested; text without '<' or bare '&'. Returns "" or the problem.
std::string xml_problem(const std::string& s) {
  size_t i = 0;
  if (s.rfind("<?xml", 0) == 0) i = s.find("?>") + 2;
  std::vector<std::string> stack;
  bool root_done = false;
  while (i < s.size()) {
    if (s[i] != '<') {
      const size_t next = s.find('<', i);
      const std::string text = s.substr(i, next == std::string::npos ? std::string::npos : next - i);
      for (size_t a = text.find('&'); a != std::string::npos; a = text.find('&', a + 1)) {
        bool entity = false;
        for (const char* e : {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"}) entity = entity || text.compare(a, std::strlen(e), e) == 0;
        if (!entity) return "bare & in text";
      }
      if (stack.empty() && text.find_first_not_of(" \n\t") != std::string::npos) return "text outside the root";
      if (next == std::string::npos) break;
      i = next;
      continue;
    }
    const size_t close = s.find('>', i);
    if (close == std::string::npos) return "unterminated tag";
    const std::string tag = s.substr(i + 1, close - i - 1);
    i = close + 1;
    std::string name;
    bool empty = false;
    if (tag.size() && tag[0] == '/') {
      if (stack.empty() || stack.back() != tag.substr(1)) return "mismatched </" + tag.substr(1) + ">";
      stack.pop_back();
      if (stack.empty()) root_done = true;
    } else if (parse_open_tag(tag, &name, &empty)) {
      if (root_done) return "second root element";
      if (!empty) stack.push_back(name);
      else if (stack.empty()) root_done = true;
    } else {
      return "malformed tag <" + tag + ">";
    }
  }
  if (!stack.empty()) return "unclosed <" + stack.back() + ">";
  return root_done ? "" : "no root element";
}

std::vector<std::pair<double, double>> polyline_points(const std::string& svg, const std::string& cls) {
  std::vector<std::pair<double, double>> out;
  const std::string key = "<polyline class=\"" + cls + "\"";
  const size_t at = svg.find(key);
  if (at == std::string::npos) return out;
  const size_t p0 = svg.find("points=\"", at) + 8, p1 = svg.find('"', p0);
  std::istringstream is(svg.substr(p0, p1 - p0));
  std::string pair;
  while (is >> pair) {
    const size_t comma = pair.find(',');
    out.push_back({std::stod(pair.substr(0, comma)), std::stod(pair.substr(comma + 1))});
  }
  return out;
}

size_t count_of(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t i = s.find(what); i != std::string::npos; i = s.find(what, i + 1)) ++n;
  return n;
}

void expect_inside_box(const std::vector<std::pair<double, double>>& pts) {
  using namespace qt::loss_plot;
  for (const auto& [x, y] : pts) {
    EXPECT_GE(x, kLeft - 0.05);
    EXPECT_LE(x, kWidth - kRight + 0.05);
    EXPECT_GE(y, kTop - 0.05);
    EXPECT_LE(y, kHeight - kBottom + 0.05);
  }
  for (size_t i = 1; i < pts.size(); ++i) EXPECT_GT(pts[i].first, pts[i - 1].first) << "x not increasing at " << i;
}

TEST(LossPlot, TrainSmoothedAndEvalCurves) {
  std::vector<LossPoint> train, eval;
  for (int s = 1; s <= 40; ++s) train.push_back({s, 12.0 * std::exp(-s / 15.0) + 0.3 * std::sin(s)});
  train[7].loss = std::nan("");  // a skipped step is left out
  for (int s = 10; s <= 40; s += 10) eval.push_back({s, 12.0 * std::exp(-s / 15.0) + 0.5});
  const std::string svg = qt::render_loss_svg(train, eval, "run <a> & \"b\"");
  EXPECT_EQ(xml_problem(svg), "") << svg;
  EXPECT_NE(svg.find("run &lt;a&gt; &amp; &quot;b&quot;"), std::string::npos);
  const auto raw = polyline_points(svg, "train"), smooth = polyline_points(svg, "train-smooth");
  EXPECT_EQ(raw.size(), 39u);
  EXPECT_EQ(smooth.size(), 39u);
  EXPECT_EQ(polyline_points(svg, "eval-line").size(), 4u);
  EXPECT_EQ(count_of(svg, "<circle class=\"eval\""), 4u);
  expect_inside_box(raw);
  expect_inside_box(smooth);
  // The curve spans the box horizontally (first step on the left edge, last on the right), and the
  // falling loss ends lower on the page (SVG y grows downwards).
  EXPECT_NEAR(raw.front().first, qt::loss_plot::kLeft, 0.05);
  EXPECT_NEAR(raw.back().first, qt::loss_plot::kWidth - qt::loss_plot::kRight, 0.05);
  EXPECT_GT(raw.back().second, raw.front().second) << "a falling loss ends nearer the bottom";
  // Tick labels of the y axis are nice numbers covering the range: 0 and 12 appear (range 0.5..11.5).
  EXPECT_NE(svg.find(">0</text>"), std::string::npos) << svg;
  EXPECT_NE(svg.find(">12</text>"), std::string::npos) << svg;
  EXPECT_NE(svg.find("train loss (EMA 0.50)"), std::string::npos) << "39 points: weight 1 - 20/39 -> 0.5";
  EXPECT_EQ(qt::loss_plot::smoothing_weight(80), 0.75);
  EXPECT_EQ(qt::loss_plot::smoothing_weight(100000), 0.9);
}

TEST(LossPlot, XmlCheckerRejectsMalformedDocuments) {
  EXPECT_EQ(xml_problem("<svg a=\"1\"><g/></svg>"), "");
  EXPECT_NE(xml_problem("<svg><g></svg>"), "");
  EXPECT_NE(xml_problem("<svg a=\"1\"b=\"2\"/>"), "");
  EXPECT_NE(xml_problem("<svg a=1/>"), "");
  EXPECT_NE(xml_problem("<svg>a & b</svg>"), "");
  EXPECT_NE(xml_problem("<svg/><svg/>"), "");
  EXPECT_NE(xml_problem("<svg>"), "");
}

TEST(LossPlot, DegenerateInputsStayWellFormed) {
  for (const auto& train : {std::vector<LossPoint>{}, std::vector<LossPoint>{{5, 3.0}},
                            std::vector<LossPoint>{{1, 2.0}, {2, 2.0}}, std::vector<LossPoint>{{1, std::nan("")}}}) {
    const std::string svg = qt::render_loss_svg(train, {}, "t");
    EXPECT_EQ(xml_problem(svg), "") << svg;
    expect_inside_box(polyline_points(svg, "train"));
    EXPECT_EQ(svg.find("nan"), std::string::npos) << svg;
    EXPECT_EQ(svg.find("inf"), std::string::npos) << svg;
  }
  EXPECT_NE(qt::render_loss_svg({}, {}, "t").find("no finite loss yet"), std::string::npos);
  // Title control characters are dropped (not allowed in XML text).
  EXPECT_EQ(xml_problem(qt::render_loss_svg({{1, 1.0}}, {}, std::string("a\x01""b"))), "");
}

TEST(LossPlot, LongRunsAreDownsampledKeepingOrder) {
  std::vector<LossPoint> train;
  for (int s = 1; s <= 10001; ++s) train.push_back({s, 5.0 + std::cos(s * 0.01)});
  const std::string svg = qt::render_loss_svg(train, {}, "long");
  const auto raw = polyline_points(svg, "train");
  EXPECT_LE(raw.size(), qt::loss_plot::kMaxPolylinePoints);
  EXPECT_GE(raw.size(), qt::loss_plot::kMaxPolylinePoints / 2);
  expect_inside_box(raw);
  EXPECT_EQ(xml_problem(svg), "");
}

TEST(LossPlot, WriteIsAtomicAndFailsClearly) {
  const fs::path dir = fs::temp_directory_path() / ("qt_test_loss_plot_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path file = dir / "loss.svg";
  qt::write_loss_plot(file.string(), {{1, 3.0}, {2, 2.0}}, {}, "t");
  std::ifstream f(file);
  std::stringstream ss;
  ss << f.rdbuf();
  EXPECT_EQ(ss.str(), qt::render_loss_svg({{1, 3.0}, {2, 2.0}}, {}, "t"));
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++entries;
  EXPECT_EQ(entries, 1u) << "no temporary file left behind";
  try {
    qt::write_loss_plot((dir / "missing" / "loss.svg").string(), {}, {}, "t");
    ADD_FAILURE() << "no error for a missing folder";
  } catch (const qt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("[loss_plot]"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

}  // namespace
