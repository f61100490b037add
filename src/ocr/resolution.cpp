// A page's resolution: believed from its tag, or measured from its text.
#include "ocr/resolution.hpp"

#include <leptonica/allheaders.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace taskmgr::ocr {
namespace {

// text_x_height of 12-point DejaVu Sans rendered at 300 dpi (29 on each of
// the project's sample texts; 20 at 200 dpi, 15 at 150, 10..11 at 100, 8 at
// 72: an estimate within ~10% down to 100 dpi).
constexpr double kBodyTextHeightAt300 = 29;
// A resolution (a believable tag or an estimate) under this fraction of the
// target is rescaled: 180 dpi for 300, between 150 (Tesseract reads
// 12-point text at 150 dpi without errors, but smaller text not:
// docs/OCR.md) and 200 (read without errors either way, 10- and 12-point:
// a 1.5x rescale there cost 1.7x the time and gained nothing).
constexpr double kRescaleUnderFraction = 0.6;
constexpr double kMaxScale = 4;
// The lowest resolution an estimate may give (the lowest believable tag).
constexpr int kMinEstimatedDpi = 50;
// Fewer components than this are no evidence of a text size.
constexpr std::size_t kMinComponents = 20;

struct PixFree {
  void operator()(Pix* p) const noexcept { pixDestroy(&p); }
};
struct BoxaFree {
  void operator()(Boxa* b) const noexcept { boxaDestroy(&b); }
};

// The element at `fraction` of the way through v sorted.
double quantile(std::vector<int>& v, double fraction) {
  const auto at = v.begin() + static_cast<std::ptrdiff_t>(static_cast<double>(v.size()) * fraction);
  std::nth_element(v.begin(), at, v.end());
  return *at;
}

// Otsu's threshold of an 8-bit gray page: the value that best splits its
// histogram (sampled on about a quarter of a million pixels) into dark and
// light.
int otsu_threshold(Pix* gray) {
  const double pixels = static_cast<double>(pixGetWidth(gray)) * pixGetHeight(gray);
  const int factor = std::max(1, static_cast<int>(std::sqrt(pixels / 2.5e5)));
  Numa* raw = pixGetGrayHistogram(gray, factor);
  if (raw == nullptr) return 127;
  double hist[256] = {}, total = 0, sum = 0;
  for (int i = 0; i < 256 && i < numaGetCount(raw); ++i) {
    l_float32 v = 0;
    numaGetFValue(raw, i, &v);
    hist[i] = v;
    total += v;
    sum += i * static_cast<double>(v);
  }
  numaDestroy(&raw);
  double below = 0, below_sum = 0, best = -1;
  int threshold = 127;
  for (int t = 0; t < 255; ++t) {
    below += hist[t];
    below_sum += t * hist[t];
    const double above = total - below;
    if (below == 0 || above == 0) continue;
    const double diff = below_sum / below - (sum - below_sum) / above;
    const double between = below * above * diff * diff;
    if (between > best) {
      best = between;
      threshold = t;
    }
  }
  return threshold;
}

}  // namespace

const char* dpi_source_name(DpiSource s) {
  switch (s) {
    case DpiSource::kFile: return "file";
    case DpiSource::kAssumed: return "assumed";
    case DpiSource::kEstimated: return "estimated";
  }
  return "assumed";
}

bool believable_dpi(int dpi) { return dpi >= 50 && dpi <= 4800 && dpi != 72 && dpi != 96; }

double text_x_height(Pix* pix) {
  if (pix == nullptr) return 0;
  // The ink as 1 bpp: a 1 bpp page as it is; anything else as 8-bit gray
  // (colour: its green, Leptonica's fast conversion) cut at Otsu's
  // threshold.
  std::unique_ptr<Pix, PixFree> gray, binary;
  if (pixGetDepth(pix) != 1) {
    Pix* g = pix;
    if (pixGetDepth(pix) == 32) {
      gray.reset(pixConvertRGBToGrayFast(pix));
      g = gray.get();
    } else if (pixGetDepth(pix) != 8 || pixGetColormap(pix) != nullptr) {
      gray.reset(pixConvertTo8(pix, 0));
      g = gray.get();
    }
    if (g == nullptr) return 0;
    binary.reset(pixThresholdToBinary(g, otsu_threshold(g) + 1));  // 1: under the threshold
    if (!binary) return 0;
  }
  Pix* ink = binary ? binary.get() : pix;
  const std::unique_ptr<Boxa, BoxaFree> boxes(pixConnCompBB(ink, 8));
  if (!boxes) return 0;
  const int n = boxaGetCount(boxes.get());
  std::vector<int> heights;
  heights.reserve(static_cast<std::size_t>(std::max(0, n)));
  const int max_height = std::max(4, static_cast<int>(pixGetHeight(ink)) / 8);
  for (int i = 0; i < n; ++i) {
    l_int32 x = 0, y = 0, w = 0, h = 0;
    if (boxaGetBoxGeometry(boxes.get(), i, &x, &y, &w, &h) != 0) continue;
    // Specks, rules (long and flat) and blobs larger than any letter out.
    if (h < 2 || h > max_height || w > 4 * h) continue;
    heights.push_back(h);
  }
  if (heights.size() < kMinComponents) return 0;
  // Punctuation, i's dots and joined letters out: within half to twice the
  // median. Of the letters left, the lower quartile: the height of letters
  // without ascenders (x-height) whatever the mix of capitals and digits
  // (a page of capitals gives their height: the estimate errs high, towards
  // not rescaling).
  const double mid = quantile(heights, 0.5);
  std::vector<int> letters;
  for (int h : heights) {
    if (h >= mid / 2 && h <= mid * 2) letters.push_back(h);
  }
  if (letters.size() < kMinComponents) return 0;
  return quantile(letters, 0.25);
}

int dpi_from_text_height(double height) {
  return static_cast<int>(std::lround(300.0 * height / kBodyTextHeightAt300));
}

PageResolution choose_resolution(int tag_dpi, bool known, int target_dpi, double forced_scale,
                                 const std::function<double()>& text_height) {
  PageResolution r;
  const bool believed = known || believable_dpi(tag_dpi);
  r.source = believed ? DpiSource::kFile : DpiSource::kAssumed;
  r.dpi = believed || tag_dpi > 1 ? tag_dpi : 300;
  if (forced_scale > 0) {
    r.scale = forced_scale;
    return r;
  }
  if (target_dpi <= 0) return r;
  if (believed) {
    if (r.dpi < kRescaleUnderFraction * target_dpi) {
      r.scale = std::min(kMaxScale, static_cast<double>(target_dpi) / r.dpi);
    }
    return r;
  }
  r.text_height = text_height();
  if (r.text_height <= 0) return r;  // nothing to measure: assumed, as it is
  // Components as small as text under 50 dpi (an x-height under ~5 px) are
  // not text Tesseract could read at any scale: noise, a photograph's
  // grain. Nothing measured: assumed, not rescaled.
  const int estimate = dpi_from_text_height(r.text_height);
  if (estimate < kMinEstimatedDpi) {
    r.text_height = 0;
    return r;
  }
  r.source = DpiSource::kEstimated;
  r.dpi = estimate;
  if (r.dpi < kRescaleUnderFraction * target_dpi) {
    r.scale = std::min(kMaxScale, static_cast<double>(target_dpi) / r.dpi);
  }
  return r;
}

}  // namespace taskmgr::ocr
