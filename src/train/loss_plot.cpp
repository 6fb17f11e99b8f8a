// The loss-curve SVG (layout and contents in loss_plot.h).
#include "train/loss_plot.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>

#include "core/error.h"
#include "io/atomic_file.h"

namespace qt {

namespace {

using namespace loss_plot;

struct Pt {
  double x, y;
};

// Finite points only.
std::vector<Pt> finite_points(const std::vector<LossPoint>& v) {
  std::vector<Pt> out;
  for (const LossPoint& p : v)
    if (std::isfinite(p.loss)) out.push_back({double(p.step), p.loss});
  return out;
}

// Debiased exponential moving average (as TensorBoard's smoothing): s_i = m_i / (1 - w^(i+1)),
// m_i = w m_{i-1} + (1 - w) y_i.
std::vector<Pt> smoothed(const std::vector<Pt>& v, double w) {
  std::vector<Pt> out;
  double m = 0, wpow = 1;
  for (const Pt& p : v) {
    m = w * m + (1 - w) * p.y;
    wpow *= w;
    out.push_back({p.x, m / (1 - wpow)});
  }
  return out;
}

// At most `max_points`: consecutive buckets of equal size averaged (x stays increasing).
std::vector<Pt> downsampled(const std::vector<Pt>& v, size_t max_points) {
  if (v.size() <= max_points) return v;
  const size_t per = (v.size() + max_points - 1) / max_points;
  std::vector<Pt> out;
  for (size_t i = 0; i < v.size(); i += per) {
    const size_t end = std::min(v.size(), i + per);
    double sx = 0, sy = 0;
    for (size_t j = i; j < end; ++j) sx += v[j].x, sy += v[j].y;
    out.push_back({sx / double(end - i), sy / double(end - i)});
  }
  return out;
}

// A tick spacing of 1, 2 or 5 x 10^k giving about `target` intervals over `span` (> 0).
double nice_step(double span, int target) {
  const double raw = span / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double n = raw / mag;
  return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
}

std::string xml_escaped(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default:
        // Control characters are not allowed in XML 1.0 text.
        if (static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n') out += c;
    }
  }
  return out;
}

std::string tick_label(double v, double step) {
  const int decimals = std::max(0, int(-std::floor(std::log10(step) + 1e-9)));
  return fmt::format("{:.{}f}", std::abs(v) < step * 1e-6 ? 0.0 : v, decimals);
}

}  // namespace

double loss_plot::smoothing_weight(size_t n) { return std::clamp(1.0 - 20.0 / double(std::max<size_t>(n, 1)), 0.5, 0.9); }

std::string render_loss_svg(const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                            const std::string& title) {
  const std::vector<Pt> tr = finite_points(train), ev = finite_points(eval);
  // Data ranges.
  double x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  bool any = false;
  for (const auto* v : {&tr, &ev})
    for (const Pt& p : *v) {
      if (!any) x0 = x1 = p.x, y0 = y1 = p.y, any = true;
      x0 = std::min(x0, p.x), x1 = std::max(x1, p.x), y0 = std::min(y0, p.y), y1 = std::max(y1, p.y);
    }
  if (x1 - x0 < 1) x1 = x0 + 1;
  if (y1 - y0 < 1e-9 * std::max(1.0, std::abs(y0))) y0 -= 0.5, y1 += 0.5;
  const double ystep = nice_step(y1 - y0, 5);
  y0 = std::floor(y0 / ystep) * ystep;
  y1 = std::ceil(y1 / ystep) * ystep;
  const double xstep = std::max(1.0, std::round(nice_step(x1 - x0, 6)));

  const double bx0 = kLeft, bx1 = kWidth - kRight, by0 = kTop, by1 = kHeight - kBottom;
  auto px = [&](double x) { return bx0 + (x - x0) / (x1 - x0) * (bx1 - bx0); };
  auto py = [&](double y) { return by1 - (y - y0) / (y1 - y0) * (by1 - by0); };
  auto polyline = [&](const std::vector<Pt>& v, const char* cls, const char* style) {
    std::string s = fmt::format(R"(<polyline class="{}" fill="none" {} points=")", cls, style);
    for (size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{:.1f},{:.1f}", i ? " " : "", px(v[i].x), py(v[i].y));
    return s + "\"/>\n";
  };

  std::string s;
  s += R"(<?xml version="1.0" encoding="UTF-8"?>)" "\n";
  s += fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{0}" height="{1}" viewBox="0 0 {0} {1}" )"
                   R"(font-family="sans-serif" font-size="12">)" "\n",
                   kWidth, kHeight);
  s += R"(<rect width="100%" height="100%" fill="white"/>)" "\n";
  s += fmt::format(R"(<text x="{:.1f}" y="26" text-anchor="middle" font-size="15">{}</text>)" "\n", kWidth / 2.0,
                   xml_escaped(title));
  // Grid, ticks and labels.
  s += R"(<g class="grid" stroke="#e6e6e6" stroke-width="1">)" "\n";
  for (double y = y0; y <= y1 + ystep * 1e-6; y += ystep)
    s += fmt::format(R"(<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}"/>)" "\n", bx0, py(y), bx1, py(y));
  const double xfirst = std::ceil(x0 / xstep) * xstep;
  for (double x = xfirst; x <= x1 + 1e-9; x += xstep)
    s += fmt::format(R"(<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}"/>)" "\n", px(x), by0, px(x), by1);
  s += "</g>\n";
  s += R"(<g class="labels" fill="#333">)" "\n";
  for (double y = y0; y <= y1 + ystep * 1e-6; y += ystep)
    s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="end">{}</text>)" "\n", bx0 - 6, py(y) + 4,
                     tick_label(y, ystep));
  for (double x = xfirst; x <= x1 + 1e-9; x += xstep)
    s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="middle">{}</text>)" "\n", px(x), by1 + 18,
                     tick_label(x, xstep));
  s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="middle">step</text>)" "\n", (bx0 + bx1) / 2,
                   double(kHeight) - 10);
  s += fmt::format(R"svg(<text x="16" y="{0:.1f}" text-anchor="middle" transform="rotate(-90 16 {0:.1f})">loss</text>)svg" "\n",
                   (by0 + by1) / 2);
  s += "</g>\n";
  s += fmt::format(R"(<rect class="plot-box" x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#333"/>)" "\n",
                   bx0, by0, bx1 - bx0, by1 - by0);

  // Curves.
  const bool smooth = tr.size() >= 10;
  std::vector<std::pair<std::string, std::string>> legend;  // (style, label)
  if (!tr.empty()) {
    const char* raw_style = smooth ? R"(stroke="#9ecae1" stroke-width="1")" : R"(stroke="#1f77b4" stroke-width="1.5")";
    s += polyline(downsampled(tr, kMaxPolylinePoints), "train", raw_style);
    legend.push_back({raw_style, "train loss"});
    if (smooth) {
      const char* st = R"(stroke="#1f77b4" stroke-width="2")";
      const double w = smoothing_weight(tr.size());
      s += polyline(downsampled(smoothed(tr, w), kMaxPolylinePoints), "train-smooth", st);
      legend.push_back({st, fmt::format("train loss (EMA {:.2f})", w)});
    }
  }
  if (!ev.empty()) {
    const char* st = R"(stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3")";
    if (ev.size() > 1) s += polyline(ev, "eval-line", st);
    for (const Pt& p : ev)
      s += fmt::format(R"(<circle class="eval" cx="{:.1f}" cy="{:.1f}" r="3.5" fill="#d62728"/>)" "\n", px(p.x),
                       py(p.y));
    legend.push_back({st, "eval loss"});
  }
  if (!any)
    s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="middle" fill="#888">no finite loss yet</text>)" "\n",
                     (bx0 + bx1) / 2, (by0 + by1) / 2);
  // Legend, top right inside the box, on a translucent white panel.
  const double lx = bx1 - 196;
  if (!legend.empty())
    s += fmt::format(R"(<rect class="legend" x="{:.1f}" y="{:.1f}" width="188" height="{:.1f}" fill="white" )"
                     R"(fill-opacity="0.85" stroke="#ccc"/>)" "\n",
                     lx - 6, by0 + 4, 16.0 * double(legend.size()) + 8);
  for (size_t i = 0; i < legend.size(); ++i) {
    const double ly = by0 + 16 + 16 * double(i);
    s += fmt::format(R"(<line class="legend" x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" {}/>)" "\n", lx, ly - 4,
                     lx + 24, ly - 4, legend[i].first);
    s += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" fill="#333">{}</text>)" "\n", lx + 30, ly, legend[i].second);
  }
  s += "</svg>\n";
  return s;
}

void write_loss_plot(const std::string& path, const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                     const std::string& title) {
  write_file_atomically(path, render_loss_svg(train, eval, title), "loss_plot");
}

}  // namespace qt
