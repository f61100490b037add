// The recognized image's place in the source, and Tesseract's outputs
// rewritten into the source's coordinates.
#include "ocr/page_geometry.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace taskmgr::ocr {
namespace {

constexpr double kPi = 3.14159265358979323846;

// C-locale numbers whatever the host's locale: an integer, or a decimal
// rounded to `places` in its shortest form ("0.5", "-9", "33.25").
std::string number(double v, int places) {
  const double unit = std::pow(10.0, places);
  v = std::round(v * unit) / unit;
  if (v == 0) v = 0;  // no "-0"
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

bool parse_int(std::string_view s, int* out) {
  const auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

bool parse_double(std::string_view s, double* out) {
  const auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  std::size_t at = 0;
  while (true) {
    const std::size_t next = s.find(sep, at);
    parts.push_back(s.substr(at, next == std::string_view::npos ? next : next - at));
    if (next == std::string_view::npos) return parts;
    at = next + 1;
  }
}

// The numbers after a property's name ("bbox 1 2 3 4" -> 1 2 3 4).
std::vector<double> numbers_of(std::string_view prop) {
  std::vector<double> v;
  for (std::string_view part : split(prop, ' ')) {
    double d = 0;
    if (!part.empty() && parse_double(part, &d)) v.push_back(d);
  }
  return v;
}

std::string box_text(const Box& b) {
  return std::to_string(b.left) + " " + std::to_string(b.top) + " " + std::to_string(b.right) +
         " " + std::to_string(b.bottom);
}

// A title's properties, split at each ';' outside a double-quoted value
// (image "a&amp;b;c.png": an entity's or a file name's ';' is not a
// separator).
std::vector<std::string_view> title_properties(std::string_view title) {
  std::vector<std::string_view> out;
  bool quoted = false;
  std::size_t start = 0;
  for (std::size_t i = 0; i < title.size(); ++i) {
    if (title[i] == '"') quoted = !quoted;
    if (title[i] == ';' && !quoted) {
      out.push_back(title.substr(start, i - start));
      start = i + 1;
    }
  }
  out.push_back(title.substr(start));
  return out;
}

// One hOCR title's properties ("bbox 1 2 3 4; baseline 0.01 -5; ...").
std::string title_to_source(std::string_view title, const PageGeometry& g, int dpi) {
  const std::vector<std::string_view> props = title_properties(title);
  // The element's box as recognized: the baseline is relative to it.
  std::vector<double> bbox;
  bool has_textangle = false;
  for (std::string_view p : props) {
    p = trim(p);
    if (p.substr(0, 5) == "bbox ") bbox = numbers_of(p.substr(5));
    if (p.substr(0, 10) == "textangle ") has_textangle = true;
  }
  const int turns = g.quarter_turns();
  std::string out;
  auto add = [&](std::string_view s) {
    if (!out.empty()) out += "; ";
    out += s;
  };
  for (std::string_view raw : props) {
    const std::string_view p = trim(raw);
    const std::size_t space = p.find(' ');
    const std::string_view name = p.substr(0, space);
    const std::vector<double> v =
        space == std::string_view::npos ? std::vector<double>{} : numbers_of(p.substr(space + 1));
    if ((name == "bbox" || name == "x_bboxes") && v.size() == 4) {
      const Box b = g.to_source(Box{static_cast<int>(v[0]), static_cast<int>(v[1]),
                                    static_cast<int>(v[2]), static_cast<int>(v[3])});
      add(std::string(name) + " " + box_text(b));
    } else if (name == "baseline" && v.size() == 2) {
      if (turns != 0) {
        // Text turned by quarter turns in the source: its angle, as
        // Tesseract writes it for lines it reads turned, for the baseline.
        if (!has_textangle) add("textangle " + std::to_string(90 * turns));
        continue;
      }
      if (bbox.size() != 4) continue;
      const double left = bbox[0], right = bbox[2], bottom = bbox[3];
      const Point a = g.to_source(Point{left, bottom + v[1]});
      const Point b = g.to_source(Point{right, bottom + v[0] * (right - left) + v[1]});
      if (std::abs(b.x - a.x) < 1e-9) continue;
      const Box mapped = g.to_source(Box{static_cast<int>(bbox[0]), static_cast<int>(bbox[1]),
                                         static_cast<int>(bbox[2]), static_cast<int>(bbox[3])});
      const double slope = (b.y - a.y) / (b.x - a.x);
      const double offset = a.y + slope * (mapped.left - a.x) - mapped.bottom;
      add("baseline " + number(slope, 3) + " " + number(offset, 3));
    } else if (name == "textangle" && v.size() == 1 && turns != 0) {
      const int angle = (static_cast<int>(std::lround(v[0])) + 90 * turns) % 360;
      if (angle != 0) add("textangle " + std::to_string(angle));
    } else if ((name == "x_size" || name == "x_descenders" || name == "x_ascenders") &&
               v.size() == 1) {
      add(std::string(name) + " " + number(v[0] / g.scale_y(), 2));
    } else if (name == "scan_res" && dpi > 0) {
      add("scan_res " + std::to_string(dpi) + " " + std::to_string(dpi));
    } else {
      add(p);
    }
  }
  return out;
}

// The value of attribute `name` in one XML tag: its offset and length, or
// npos when the tag has none.
std::pair<std::size_t, std::size_t> attribute(std::string_view tag, std::string_view name) {
  std::size_t at = 0;
  while (true) {
    at = tag.find(name, at);
    if (at == std::string_view::npos) return {at, 0};
    const std::size_t eq = at + name.size();
    if (at > 0 && (tag[at - 1] == ' ' || tag[at - 1] == '\t' || tag[at - 1] == '\n') &&
        eq + 1 < tag.size() && tag[eq] == '=' && tag[eq + 1] == '"') {
      const std::size_t end = tag.find('"', eq + 2);
      if (end == std::string_view::npos) return {std::string_view::npos, 0};
      return {eq + 2, end - eq - 2};
    }
    at = eq;
  }
}

// One ALTO tag with its HPOS, VPOS, WIDTH, HEIGHT in the source.
std::string alto_tag_to_source(std::string_view tag, const PageGeometry& g) {
  const auto hpos = attribute(tag, "HPOS"), vpos = attribute(tag, "VPOS"),
             width = attribute(tag, "WIDTH"), height = attribute(tag, "HEIGHT");
  const std::size_t npos = std::string_view::npos;
  const bool page = tag.substr(0, 6) == "<Page " || tag.substr(0, 12) == "<PrintSpace ";
  std::vector<std::pair<std::pair<std::size_t, std::size_t>, std::string>> edits;
  if (page) {
    if (hpos.first != npos) edits.push_back({hpos, "0"});
    if (vpos.first != npos) edits.push_back({vpos, "0"});
    if (width.first != npos) edits.push_back({width, std::to_string(g.source_width())});
    if (height.first != npos) edits.push_back({height, std::to_string(g.source_height())});
  } else {
    int x = 0, y = 0, w = 0, h = 0;
    if (hpos.first == npos || vpos.first == npos || width.first == npos ||
        !parse_int(tag.substr(hpos.first, hpos.second), &x) ||
        !parse_int(tag.substr(vpos.first, vpos.second), &y) ||
        !parse_int(tag.substr(width.first, width.second), &w)) {
      return std::string(tag);
    }
    const bool has_height = height.first != npos;
    if (has_height && !parse_int(tag.substr(height.first, height.second), &h)) {
      return std::string(tag);
    }
    const Box b = g.to_source(Box{x, y, x + w, y + h});
    edits.push_back({hpos, std::to_string(b.left)});
    edits.push_back({vpos, std::to_string(b.top)});
    if (has_height) {
      edits.push_back({width, std::to_string(b.right - b.left)});
      edits.push_back({height, std::to_string(b.bottom - b.top)});
    } else {
      // A space: its extent along the line, which runs down or up the
      // source when the page was turned a quarter.
      edits.push_back({width, std::to_string(std::max(b.right - b.left, b.bottom - b.top))});
    }
  }
  std::sort(edits.begin(), edits.end(),
            [](const auto& a, const auto& b) { return a.first.first > b.first.first; });
  std::string out(tag);
  for (const auto& [span, value] : edits) out.replace(span.first, span.second, value);
  return out;
}

}  // namespace

PageGeometry::PageGeometry(int source_width, int source_height)
    : source_width_(source_width),
      source_height_(source_height),
      width_(source_width),
      height_(source_height) {}

void PageGeometry::then(const double s[6]) {
  const double* m = forward_;
  const double f[6] = {s[0] * m[0] + s[1] * m[3],        s[0] * m[1] + s[1] * m[4],
                       s[0] * m[2] + s[1] * m[5] + s[2], s[3] * m[0] + s[4] * m[3],
                       s[3] * m[1] + s[4] * m[4],        s[3] * m[2] + s[4] * m[5] + s[5]};
  std::copy(f, f + 6, forward_);
  const double det = f[0] * f[4] - f[1] * f[3];
  inverse_[0] = f[4] / det;
  inverse_[1] = -f[1] / det;
  inverse_[3] = -f[3] / det;
  inverse_[4] = f[0] / det;
  inverse_[2] = -(inverse_[0] * f[2] + inverse_[1] * f[5]);
  inverse_[5] = -(inverse_[3] * f[2] + inverse_[4] * f[5]);
}

void PageGeometry::turn_clockwise(int quarter_turns) {
  quarter_turns = ((quarter_turns % 4) + 4) % 4;
  for (int q = 0; q < quarter_turns; ++q) {
    // (x, y) -> (h - y, x): the top left corner goes to the top right.
    const double step[6] = {0, -1, static_cast<double>(height_), 1, 0, 0};
    then(step);
    std::swap(width_, height_);
  }
  quarter_turns_ = (quarter_turns_ + quarter_turns) % 4;
}

void PageGeometry::resize(int new_width, int new_height) {
  const double sx = static_cast<double>(new_width) / width_;
  const double sy = static_cast<double>(new_height) / height_;
  const double step[6] = {sx, 0, 0, 0, sy, 0};
  then(step);
  scale_x_ *= sx;
  scale_y_ *= sy;
  width_ = new_width;
  height_ = new_height;
}

void PageGeometry::rotate(double degrees) {
  // cv::getRotationMatrix2D maps pixel centres (index coordinates); edges
  // are half a pixel off them.
  const double a = degrees * kPi / 180;
  const double alpha = std::cos(a), beta = std::sin(a);
  const double cx = width_ / 2.0, cy = height_ / 2.0;
  const double tx = (1 - alpha) * cx - beta * cy, ty = beta * cx + (1 - alpha) * cy;
  const double step[6] = {alpha, beta,  tx + 0.5 - 0.5 * (alpha + beta),
                          -beta, alpha, ty + 0.5 - 0.5 * (alpha - beta)};
  then(step);
  rotation_degrees_ += degrees;
}

Point PageGeometry::to_source(Point p) const {
  const double* m = inverse_;
  return Point{m[0] * p.x + m[1] * p.y + m[2], m[3] * p.x + m[4] * p.y + m[5]};
}

Box PageGeometry::to_source(const Box& b) const {
  const Point corners[4] = {
      to_source(Point{static_cast<double>(b.left), static_cast<double>(b.top)}),
      to_source(Point{static_cast<double>(b.right), static_cast<double>(b.top)}),
      to_source(Point{static_cast<double>(b.left), static_cast<double>(b.bottom)}),
      to_source(Point{static_cast<double>(b.right), static_cast<double>(b.bottom)})};
  double x0 = corners[0].x, x1 = x0, y0 = corners[0].y, y1 = y0;
  for (const Point& c : corners) {
    x0 = std::min(x0, c.x);
    x1 = std::max(x1, c.x);
    y0 = std::min(y0, c.y);
    y1 = std::max(y1, c.y);
  }
  auto clamp = [](double v, int hi) {
    return static_cast<int>(std::clamp<long>(std::lround(v), 0L, static_cast<long>(hi)));
  };
  return Box{clamp(x0, source_width_), clamp(y0, source_height_), clamp(x1, source_width_),
             clamp(y1, source_height_)};
}

std::string hocr_to_source(const std::string& hocr, const PageGeometry& g, int dpi) {
  std::string out;
  out.reserve(hocr.size() + hocr.size() / 16);
  std::size_t at = 0;
  while (true) {
    const std::size_t t = hocr.find("title=", at);
    if (t == std::string::npos || t + 7 > hocr.size()) break;
    const char quote = hocr[t + 6];
    const std::size_t end =
        quote == '\'' || quote == '"' ? hocr.find(quote, t + 7) : std::string::npos;
    if (end == std::string::npos) {
      out.append(hocr, at, t + 6 - at);
      at = t + 6;
      continue;
    }
    out.append(hocr, at, t + 7 - at);
    out += title_to_source(std::string_view(hocr).substr(t + 7, end - t - 7), g, dpi);
    at = end;  // the closing quote goes with the next piece
  }
  out.append(hocr, at, std::string::npos);
  return out;
}

std::string alto_to_source(const std::string& alto, const PageGeometry& g) {
  std::string out;
  out.reserve(alto.size() + alto.size() / 16);
  std::size_t at = 0;
  while (true) {
    const std::size_t open = alto.find('<', at);
    if (open == std::string::npos) break;
    const std::size_t close = alto.find('>', open);
    if (close == std::string::npos) break;
    out.append(alto, at, open - at);
    out += alto_tag_to_source(std::string_view(alto).substr(open, close + 1 - open), g);
    at = close + 1;
  }
  out.append(alto, at, std::string::npos);
  return out;
}

std::string tsv_to_source(const std::string& tsv, const PageGeometry& g) {
  std::string out;
  out.reserve(tsv.size() + tsv.size() / 16);
  for (std::string_view line : split(tsv, '\n')) {
    std::vector<std::string_view> cols = split(line, '\t');
    int v[10] = {};
    bool numeric = cols.size() >= 12;
    for (int i = 0; numeric && i < 10; ++i) numeric = parse_int(cols[i], &v[i]);
    if (numeric) {
      const Box b = v[0] == 1 ? Box{0, 0, g.source_width(), g.source_height()}
                              : g.to_source(Box{v[6], v[7], v[6] + v[8], v[7] + v[9]});
      const std::string fields[4] = {std::to_string(b.left), std::to_string(b.top),
                                     std::to_string(b.right - b.left),
                                     std::to_string(b.bottom - b.top)};
      std::string row;
      for (std::size_t i = 0; i < cols.size(); ++i) {
        if (i > 0) row += '\t';
        row += i >= 6 && i < 10 ? std::string_view(fields[i - 6]) : cols[i];
      }
      out += row;
    } else {
      out += line;
    }
    out += '\n';
  }
  out.pop_back();  // split() gave one part more than there are newlines
  return out;
}

}  // namespace taskmgr::ocr
