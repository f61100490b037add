// Private to the OCR service: one searchable PDF for the pages of a task,
// written by Tesseract's own PDF renderer (each page's image with an
// invisible text layer) into a directory, then read back.
#pragma once

#include <memory>
#include <string>

namespace tesseract {
class TessBaseAPI;
class TessPDFRenderer;
}  // namespace tesseract

namespace taskmgr::ocr {

class PdfOutput {
 public:
  // Writes into `dir` (the task's temp directory); `font_dir` holds
  // Tesseract's pdf.ttf. Throws TaskError(kProcessingError) when the
  // renderer cannot start.
  PdfOutput(const std::string& dir, const std::string& font_dir);
  ~PdfOutput();  // removes the file
  PdfOutput(const PdfOutput&) = delete;
  PdfOutput& operator=(const PdfOutput&) = delete;

  // Adds the page `api` last recognized: its input image, at its source
  // resolution (the page's size in the PDF is pixels * 72 / dpi points).
  void add_page(tesseract::TessBaseAPI& api, int page);
  // Ends the document and returns its bytes.
  std::string finish();

 private:
  std::string base_;  // the renderer writes base_ + ".pdf"
  std::unique_ptr<tesseract::TessPDFRenderer> renderer_;
};

// The directory with Tesseract's pdf.ttf: `tessdata` when it has one, else
// TESSDATA_PREFIX's or Debian's; "" when none has.
std::string find_pdf_font_dir(const std::string& tessdata);

// Standard base64 (RFC 4648, with padding).
std::string base64_encode(const std::string& bytes);

}  // namespace taskmgr::ocr
