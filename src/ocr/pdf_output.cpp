// Tesseract's PDF renderer, for the OCR service's "pdf" output.
#include "ocr/pdf_output.hpp"

#include <sys/stat.h>
#include <tesseract/baseapi.h>
#include <tesseract/renderer.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>

#include "taskmgr/service.hpp"

namespace taskmgr::ocr {
namespace {

// Tesseract's PDF renderer dates a document through Leptonica's
// l_getFormattedDate, that is localtime(): with TZ unset, glibc re-reads the
// zone and frees and re-makes its state on every call, under a lock of its
// own that ThreadSanitizer does not see. Two pages' PDFs ended at once were
// a race report under the tsan preset (cli_batch); the renderer's document
// ends take this lock, so the calls are ordered where it can see it too.
std::mutex& renderer_date_lock() {
  static std::mutex m;
  return m;
}

}  // namespace

PdfOutput::PdfOutput(const std::string& dir, const std::string& font_dir)
    : base_(dir + "/ocr-output") {
  renderer_ = std::make_unique<tesseract::TessPDFRenderer>(base_.c_str(), font_dir.c_str(), false);
  bool begun = false;
  {
    std::lock_guard<std::mutex> g(renderer_date_lock());
    begun = renderer_->happy() && renderer_->BeginDocument("taskmgr OCR");
  }
  if (!begun) {
    throw TaskError(TaskFailureReason::kProcessingError,
                    "cannot start the PDF output in " + dir + " (Tesseract's PDF renderer)");
  }
}

PdfOutput::~PdfOutput() {
  renderer_.reset();
  ::unlink((base_ + ".pdf").c_str());
}

void PdfOutput::add_page(tesseract::TessBaseAPI& api, int page) {
  if (!renderer_->AddImage(&api)) {
    throw TaskError(TaskFailureReason::kProcessingError,
                    "Tesseract's PDF renderer could not add page " + std::to_string(page));
  }
}

std::string PdfOutput::finish() {
  bool ended = false;
  {
    std::lock_guard<std::mutex> g(renderer_date_lock());
    ended = renderer_->EndDocument();
    renderer_.reset();  // closes the file
  }
  std::ifstream in(base_ + ".pdf", std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (!ended || !in || bytes.str().empty()) {
    throw TaskError(TaskFailureReason::kProcessingError,
                    "Tesseract's PDF renderer did not write " + base_ + ".pdf");
  }
  return bytes.str();
}

std::string find_pdf_font_dir(const std::string& tessdata) {
  auto has_font = [](const std::string& dir) {
    struct stat st {};
    return !dir.empty() && ::stat((dir + "/pdf.ttf").c_str(), &st) == 0;
  };
  if (has_font(tessdata)) return tessdata;
  if (const char* env = std::getenv("TESSDATA_PREFIX"); env != nullptr && has_font(env)) return env;
  for (const char* dir : {"/usr/share/tesseract-ocr/5/tessdata",
                          "/usr/share/tesseract-ocr/4.00/tessdata", "/usr/share/tessdata"}) {
    if (has_font(dir)) return dir;
  }
  return "";
}

std::string base64_encode(const std::string& bytes) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) |
                       (static_cast<unsigned char>(bytes[i + 1]) << 8) |
                       static_cast<unsigned char>(bytes[i + 2]);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  if (i < bytes.size()) {
    unsigned v = static_cast<unsigned char>(bytes[i]) << 16;
    if (i + 1 < bytes.size()) v |= static_cast<unsigned char>(bytes[i + 1]) << 8;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? kAlphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

}  // namespace taskmgr::ocr
