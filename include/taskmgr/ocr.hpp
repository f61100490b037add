// taskmgr: the built-in OCR service, kind "ocr".
//
// One instance is one tesseract::TessBaseAPI, initialised once (LSTM engine,
// ocr.languages, ocr.tessdata_path or Debian's path) and reused for every
// task; Clear() runs between tasks. The instance also holds a second, small
// engine with Tesseract's orientation model (osd.traineddata), made with it
// when ocr.orientation is "always", otherwise by the first page that needs
// orientation detection, and kept warm. Each worker thread that runs it limits
// OpenMP to one thread for itself (omp_set_num_threads(1)), so several
// engines side by side do not oversubscribe the cores; the host's own OpenMP
// use on other threads is untouched.
//
// Input: a file path or encoded bytes. Images (PNG, JPEG, TIFF including
// multi-page TIFF, BMP, WebP) are decoded with Leptonica; each TIFF page is
// a page of the task. A PDF (bytes starting "%PDF-") is rendered page by
// page with poppler at the task's "dpi" (default ocr.pdf_dpi), to 8-bit
// gray, or 24-bit RGB when the page has colour. batch_size pages are held
// and processed at once. Every page's size is checked from its header (a
// PDF's: its page box at the dpi) against ocr.max_pixels before decoding.
// Unreadable input (truncated, corrupt, an encrypted PDF, a PDF of no
// pages) fails the task INVALID_INPUT with the reason; nothing is printed.
//
// Task options (JSON object, all optional):
//   "psm": 0..13                page segmentation mode (default ocr.page_segmentation_mode)
//   "output": "text"|"hocr"|"tsv"|"alto"|"pdf"
//                               extra output besides text (default "text"): per page
//                               "hocr"/"tsv"/"alto"; "pdf": one searchable PDF of the
//                               task's pages (each the source image as the input has
//                               it, pixels * 72 / dpi points, with an invisible text
//                               layer on its words)
//   "words": true|false         word boxes with confidences (default true)
//   "dpi": 72..1200             resolution PDF pages are rendered at (default ocr.pdf_dpi)
//   "page": N | "pages": [first, last]
//                               the pages of a PDF or multi-page TIFF to read (1-based,
//                               inclusive; default all); a page past the document's
//                               end fails INVALID_INPUT naming it and the page count
//   "orientation": "auto"|"off"|"always"
//                               Tesseract's orientation detection (default
//                               ocr.orientation): "always" before every page, "auto"
//                               when a page's first reading has a mean confidence under
//                               70; a page found turned 90/180/270 degrees is turned
//                               back and read (again) the right way up
//   "preprocess": {"grayscale":bool, "target_dpi":int, "binarize":bool, "deskew":bool,
//                  "scale":number}
//                               overrides of ocr.preprocess; "scale" (0.25..4) forces
//                               the rescale instead of the resolution rule below
//   "source": string            the host's name for the input (e.g. taskmgr-ocr's page
//                               identity); kept with the task, not used by the service
//   "timeout_seconds": number   the task's deadline (the manager's option, for every
//                               service): Tesseract's monitor stops at it -> TIMEOUT
// Any other key, or a value of the wrong type or out of range, fails the
// task INVALID_INPUT.
//
// Result (JSON): {"text": all pages, "mean_confidence": 0..100, "pages": [
//   {"page": n (the document's page number), "width": w, "height": h,
//    "dpi": d, "dpi_source": "file"|"estimated"|"assumed",
//    "preprocess": {"scale": s, "rotated": 0|90|180|270, "deskew_degrees": a},
//    "text": "...", "mean_confidence": c,
//    "words": [{"text","confidence","box":[x,y,w,h]}],
//    "orientation": {"checked": bool, "angle": 0|90|180|270, "confidence": c,
//                    "applied": bool},
//    "hocr"|"tsv"|"alto": "..."}],
//  "pdf_base64": "..." (output "pdf" only)}
// Every geometry is in the source page's pixels (the image as the input has
// it; a PDF page as rendered): width/height are the source's, and word
// boxes, hOCR bbox/baseline, ALTO and TSV positions and the PDF's text layer
// are mapped back through every preprocessing step that moved pixels.
// "preprocess" says which ran: "scale" the rescale factor (1 = none),
// "rotated" the clockwise turn after orientation detection, "deskew_degrees"
// the deskew rotation (counter-clockwise).
// "dpi" is the source's resolution (never the rescaled one) and
// "dpi_source" where it came from: "file" (a believable tag, or the dpi a
// PDF page was rendered at), "estimated" (the tag was missing, 0/1, 72 or
// 96, writers' defaults: measured from the height of the page's text),
// "assumed" (no believable tag and nothing measured: the tag, or 300
// without one). The page is rescaled toward ocr.preprocess.target_dpi
// only when that resolution is believable (file or estimated) and under
// 0.6 of the target (180 dpi for 300), by at most 4.
// hOCR's ocr_page title names the input's path as its "image" ("unknown"
// for bytes; a control character in it, or a byte that is not UTF-8, as
// U+FFFD). "angle" is the page's clockwise rotation OSD found (0 when
// not checked); hOCR's ocr_page title then carries "x_orientation_angle",
// "x_orientation_confidence" and "x_orientation_applied", and the lines of
// a page turned back for recognition "textangle". docs/OCR.md, "Results",
// "Coordinates" and "Resolution", has the details.
// Stages recorded as task_metrics samples: "load", "preprocess",
// "recognize", and "orientation" when OSD runs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "taskmgr/config.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/service.hpp"

namespace taskmgr {

TASKMGR_API std::shared_ptr<ServiceFactory> make_ocr_service(OcrConfig config);

// One page of a document, as the OCR service would see it.
struct PageInfo {
  int page = 0;             // 1-based, as in the "page"/"pages" options and the result
  std::int64_t width = 0;   // pixels; a PDF page: rendered at the dpi asked for
  std::int64_t height = 0;  // pixels
};

struct DocumentInfo {
  std::string media_type;  // "application/pdf", "image/tiff", "image/png", "image/jpeg", ...
  std::vector<PageInfo> pages;
};

// The pages of a document before any task is made (one task per page, the
// largest first, ...). Nothing is decoded: images are measured from their
// headers (every page of a TIFF), PDF pages from their crop box (points *
// pdf_dpi / 72, rounded, width and height swapped for pages turned 90 or
// 270 degrees): the sizes the service's pages will have. Thread-safe.
// Throws Error(kInvalidArgument) for pdf_dpi outside [72, 1200] or a file
// that is not a readable image or PDF (encrypted, corrupt, no pages), and
// Error(kNotFound) for a missing file; the message names the file.
TASKMGR_API DocumentInfo describe_document(const std::string& path, int pdf_dpi = 300);

// Character error rate of OCR text against a ground truth: Levenshtein
// distance / ground-truth length, over UTF-8 bytes, with every whitespace run
// normalised to one space and the ends trimmed. 0 for an empty truth.
TASKMGR_API double character_error_rate(std::string_view text, std::string_view truth);

}  // namespace taskmgr
