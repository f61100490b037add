// A page's resolution: believed from its tag, or measured from its text.
#include "ocr/resolution.hpp"

#include <leptonica/allheaders.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#include <vector>

namespace taskmgr::ocr {
namespace {

// text_x_height of 12-point DejaVu Sans rendered at 300 dpi (29 on each of
// the project's sample texts at full size, 30 on the copy reduced 2x it is
// measured on; 20..22 at 200 dpi, 15 at 150, 10..11 at 100, 8 at 72).
constexpr double kBodyTextHeightAt300 = 29;
// An estimate under this fraction of the target is rescaled: 180 dpi for
// 300, between the renders at 150 (estimated 155: Tesseract reads 12-point
// text at 150 dpi without errors, but smaller text not: docs/OCR.md) and
// at 200 (estimated 207..228, read without errors either way).
constexpr double kMinEstimatedFraction = 0.6;
constexpr double kMaxScale = 4;
// Fewer components than this are no evidence of a text size.
constexpr std::size_t kMinComponents = 20;
// Larger pages are measured reduced by a whole factor (x-height 29 at 300
// dpi: 14.5 on a letter page reduced 2x).
constexpr double kMaxMeasuredPixels = 2.5e6;

struct PixFree {
  void operator()(Pix* p) const noexcept { pixDestroy(&p); }
};

// The element at `fraction` of the way through v sorted.
double quantile(std::vector<int>& v, double fraction) {
  const auto at = v.begin() + static_cast<std::ptrdiff_t>(static_cast<double>(v.size()) * fraction);
  std::nth_element(v.begin(), at, v.end());
  return *at;
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
  // Reduced first (Leptonica's reductions straight from 1 bpp or colour
  // are cheaper than a full-size gray copy), then made 8-bit gray.
  const double pixels = static_cast<double>(pixGetWidth(pix)) * pixGetHeight(pix);
  const int reduce = pixels > kMaxMeasuredPixels
                         ? static_cast<int>(std::ceil(std::sqrt(pixels / kMaxMeasuredPixels)))
                         : 1;
  std::unique_ptr<Pix, PixFree> reduced;
  if (reduce > 1) {
    const float f = 1.0f / static_cast<float>(reduce);
    const int depth = pixGetDepth(pix);
    if (depth == 1) {
      reduced.reset(pixScaleToGray(pix, f));
    } else if (depth == 2 || depth == 4 || depth == 8 || depth == 32) {
      reduced.reset(pixScaleAreaMap(pix, f, f));
    } else {
      const std::unique_ptr<Pix, PixFree> eight(pixConvertTo8(pix, 0));
      if (eight) reduced.reset(pixScaleAreaMap(eight.get(), f, f));
    }
    if (!reduced) return 0;
  }
  const std::unique_ptr<Pix, PixFree> gray(pixConvertTo8(reduced ? reduced.get() : pix, 0));
  if (!gray || pixEndianByteSwap(gray.get()) != 0) return 0;  // bytes in memory order
  const cv::Mat img(static_cast<int>(pixGetHeight(gray.get())),
                    static_cast<int>(pixGetWidth(gray.get())), CV_8UC1, pixGetData(gray.get()),
                    static_cast<std::size_t>(pixGetWpl(gray.get())) * 4);
  cv::Mat ink, labels, stats, centroids;
  cv::threshold(img, ink, 0, 255, cv::THRESH_BINARY_INV | cv::THRESH_OTSU);
  const int n = cv::connectedComponentsWithStats(ink, labels, stats, centroids, 8, CV_32S);
  std::vector<int> heights;
  heights.reserve(static_cast<std::size_t>(std::max(0, n - 1)));
  const int max_height = std::max(4, img.rows / 8);
  for (int i = 1; i < n; ++i) {
    const int w = stats.at<int>(i, cv::CC_STAT_WIDTH);
    const int h = stats.at<int>(i, cv::CC_STAT_HEIGHT);
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
  return quantile(letters, 0.25) * reduce;
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
    if (r.dpi < target_dpi) r.scale = std::min(kMaxScale, static_cast<double>(target_dpi) / r.dpi);
    return r;
  }
  r.text_height = text_height();
  if (r.text_height <= 0) return r;  // nothing to measure: assumed, as it is
  r.source = DpiSource::kEstimated;
  r.dpi = std::max(1, dpi_from_text_height(r.text_height));
  if (r.dpi < kMinEstimatedFraction * target_dpi) {
    r.scale = std::min(kMaxScale, static_cast<double>(target_dpi) / r.dpi);
  }
  return r;
}

}  // namespace taskmgr::ocr
