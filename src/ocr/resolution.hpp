// Private to the OCR service: a page's resolution, where it came from, and
// the rescale that brings its text to the size Tesseract reads best.
#pragma once

#include <functional>

struct Pix;

namespace taskmgr::ocr {

enum class DpiSource {
  kFile,       // the image's resolution tag, believed; or a PDF page rendered at a known dpi
  kAssumed,    // no believable tag and nothing measured: the tag as it is, or 300 without one
  kEstimated,  // no believable tag: measured from the height of the page's text
};

const char* dpi_source_name(DpiSource s);

// A resolution tag is believed unless it is missing (0), only an aspect
// ratio (1: JFIF's default), or a default image writers put on pixels with
// no resolution of their own (72, 96), or out of any scanner's range.
bool believable_dpi(int dpi);

// The x-height of the page's text in pixels, measured: the lower quartile of
// the heights of the ink's 8-connected components that look like letters
// (specks, dots, rules and blobs left out); 0 when there are too few to tell
// (a blank page, a photograph). A 1 bpp page is measured as it is, any other
// cut at Otsu's threshold of its gray. Leptonica's components: a 300 dpi
// letter page takes ~1 ms at 1 bpp, ~6 ms gray, ~13 ms colour, where its
// recognition takes hundreds.
double text_x_height(Pix* pix);

// The resolution at which text of that x-height would be 12-point body
// text (calibrated on DejaVu Sans rendered at 300 dpi: docs/OCR.md,
// "Resolution").
int dpi_from_text_height(double height);

struct PageResolution {
  int dpi = 300;                        // the source's, as taken
  DpiSource source = DpiSource::kFile;  // where `dpi` came from
  double scale = 1;                     // the rescale before recognition (1: none)
  double text_height = 0;               // the measured x-height (estimated only)
};

// The rules (docs/OCR.md, "Resolution"):
//  - `forced_scale` > 0 (task option preprocess.scale): that scale; the dpi
//    as the tag gives it (file, or assumed when not believable).
//  - target_dpi 0: never rescaled; the dpi likewise.
//  - a believable tag (or a PDF page): rescaled by min(4, target/dpi) when
//    the dpi is under 0.6 of the target, else not.
//  - otherwise the text is measured (`text_height`, called at most once):
//    estimated dpi = dpi_from_text_height; rescaled by min(4, target/estimate)
//    when the estimate is under 0.6 of the target (a measured size is only
//    as good as the assumption of 12-point text: a shortfall that a smaller
//    font would explain is left alone); nothing measurable, or an estimate
//    under 50 dpi (noise, a photograph's grain): assumed, not rescaled.
PageResolution choose_resolution(int tag_dpi, bool known, int target_dpi, double forced_scale,
                                 const std::function<double()>& text_height);

}  // namespace taskmgr::ocr
