// Private to the OCR service: one searchable PDF for the pages of a task.
// Each page is the source image as the input showed it (its pixels, its
// orientation) at its resolution, with an invisible text layer placed on
// the words through the page's geometry (whatever preprocessing moved
// them). Written into a file in a directory as pages come, then read back.
#pragma once

#include <cstddef>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "ocr/page_geometry.hpp"

struct Pix;

namespace taskmgr::ocr {

// A word Tesseract read, in the coordinates of the image it recognized.
struct PdfWord {
  std::string text;  // UTF-8
  Box box;           // the word
  Box line;          // its line: the text layer's baseline and size
  bool last_in_line = false;
};

class PdfOutput {
 public:
  // Writes into `dir` (the task's temp directory); `font_dir` holds
  // Tesseract's pdf.ttf (a font of one invisible glyph, which every
  // character code maps to). Throws TaskError(kProcessingError) when the
  // file cannot be written or the font read.
  PdfOutput(const std::string& dir, const std::string& font_dir);
  ~PdfOutput();  // removes the file
  PdfOutput(const PdfOutput&) = delete;
  PdfOutput& operator=(const PdfOutput&) = delete;

  // Adds a page: `source` embedded as it is (1 bpp as CCITT G4, anything
  // else as JPEG, gray or RGB), pixels * 72 / dpi points in size, with
  // `words` (recognized-image coordinates) mapped through `geometry`.
  void add_page(Pix* source, int dpi, const PageGeometry& geometry,
                const std::vector<PdfWord>& words, int page);
  // Ends the document and returns its bytes.
  std::string finish();

 private:
  int reserve_object();
  void begin_object(int number);
  void write(std::string_view s);
  void write_stream(int number, const std::string& dict, std::string_view data);
  void check(int page) const;

  std::string path_;
  std::ofstream out_;
  std::size_t offset_ = 0;
  std::vector<std::size_t> offsets_;  // by object number; [0] unused
  std::vector<int> pages_;            // the page objects, in order
  int font_ = 0;
  int pages_root_ = 0;
};

// The directory with Tesseract's pdf.ttf: `tessdata` when it has one, else
// TESSDATA_PREFIX's or Debian's; "" when none has.
std::string find_pdf_font_dir(const std::string& tessdata);

// Standard base64 (RFC 4648, with padding).
std::string base64_encode(const std::string& bytes);

}  // namespace taskmgr::ocr
