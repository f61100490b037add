// taskmgr-ocr: writes what a run read, one output per input document.
//
// A document's pages are tasks of their own (they spread over the workers);
// its output is written once every page has ended, from the results the
// database holds, in page order (NAME is the file's stem; x.png.txt when
// x.png and x.tif are both given; x.png-2.txt for a second a/x.png, b/x.png):
//   text  NAME.txt    the pages' text, separated by form feeds
//   json  NAME.json   an image of one page: the task's result; several pages:
//                     the same shape ({"text", "mean_confidence", "pages"})
//                     over all of them, with "source"
//   hocr  NAME.hocr   an hOCR (XHTML) document, one ocr_page per page
//   alto  NAME.xml    an ALTO v3 document, one Page per page
//   tsv   NAME.tsv    Tesseract's TSV: a header line, then every page's rows
//                     (page_num the document's page; boxes in its pixels)
//   pdf   NAME.pdf    a searchable PDF: each page's image with its invisible
//                     text layer (the OCR service's writer), pages joined with
//                     pdfunite (poppler-utils); --sidecar also writes NAME.txt
// A document with a failed page is not written (the page is reported).
#pragma once

#include <taskmgr/taskmgr.hpp>

#include <cstddef>
#include <string>
#include <vector>

#include "pages.hpp"

namespace ocrcli {

// The OCR service's "output" option a format needs ("" for text and json).
std::string service_output_for(const std::string& format);

class OutputWriter {
 public:
  OutputWriter(taskmgr::TaskManager& tm, const Plan& plan, std::string out_dir, std::string format,
               bool sidecar);

  // Page `page` ended with `task`. Writes its document when it was the
  // last one of it; "" or a line to report (a document not written).
  std::string page_ended(std::size_t page, const taskmgr::Task& task);

  std::size_t documents_written() const { return written_; }

 private:
  std::string write(std::uint32_t doc, const std::vector<taskmgr::Task>& pages);

  taskmgr::TaskManager& tm_;
  const Plan& plan_;
  std::string out_dir_, format_;
  bool sidecar_;
  std::vector<int> left_;                           // pages not ended, per document
  std::vector<std::vector<std::size_t>> pages_of_;  // a multi-page document's pages
  std::vector<std::string> task_of_;                // a multi-page document's page -> task id
  std::vector<bool> failed_;                        // per document: a page did not complete
  std::vector<std::string> name_;                   // per document: its outputs' name
  std::size_t written_ = 0;
};

// Standard base64 (RFC 4648) decoding; throws std::invalid_argument.
std::string base64_decode(const std::string& text);

}  // namespace ocrcli
