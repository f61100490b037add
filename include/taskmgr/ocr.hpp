// taskmgr: the built-in OCR service, kind "ocr".
//
// One instance is one tesseract::TessBaseAPI, initialised once (LSTM engine,
// ocr.languages, ocr.tessdata_path or Debian's path) and reused for every
// task; Clear() runs between tasks. Each worker thread that runs it limits
// OpenMP to one thread for itself (omp_set_num_threads(1)), so several
// engines side by side do not oversubscribe the cores; the host's own OpenMP
// use on other threads is untouched.
//
// Input: an image file path or encoded bytes (PNG, JPEG, TIFF including
// multi-page TIFF, BMP, WebP), decoded with Leptonica; each TIFF page is a
// page of the task, and batch_size pages are held and processed at once.
// Unreadable input fails the task INVALID_INPUT with the reason.
//
// Task options (JSON object, all optional):
//   "psm": 0..13                page segmentation mode (default ocr.page_segmentation_mode)
//   "output": "text"|"hocr"|"tsv"   extra per-page output besides text (default "text")
//   "words": true|false         word boxes with confidences (default true)
//   "preprocess": {"grayscale":bool, "target_dpi":int, "binarize":bool, "deskew":bool}
//                               overrides of ocr.preprocess
//   "timeout_seconds": number   the task's deadline (the manager's option, for every
//                               service): Tesseract's monitor stops at it -> TIMEOUT
//
// Result (JSON): {"text": all pages, "mean_confidence": 0..100, "pages": [
//   {"page": 1, "width": w, "height": h, "dpi": d, "text": "...",
//    "mean_confidence": c, "words": [{"text","confidence","box":[x,y,w,h]}],
//    "hocr"|"tsv": "..."}]}
// Stages recorded as task_metrics samples: "load", "preprocess", "recognize".
#pragma once

#include <memory>
#include <string_view>

#include "taskmgr/config.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/service.hpp"

namespace taskmgr {

TASKMGR_API std::shared_ptr<ServiceFactory> make_ocr_service(OcrConfig config);

// Character error rate of OCR text against a ground truth: Levenshtein
// distance / ground-truth length, over UTF-8 bytes, with every whitespace run
// normalised to one space and the ends trimmed. 0 for an empty truth.
TASKMGR_API double character_error_rate(std::string_view text, std::string_view truth);

}  // namespace taskmgr
