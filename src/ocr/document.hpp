// Private to the OCR service: an input document (an image, a multi-page TIFF
// or a PDF) held as its encoded bytes, whose pages are measured from their
// headers (or the PDF's page boxes) and decoded one at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct Pix;

namespace taskmgr::ocr {

struct PixDeleter {
  void operator()(Pix* p) const noexcept;
};
using PixPtr = std::unique_ptr<Pix, PixDeleter>;

// The width and height a PNG declares in its first chunk (IHDR), read
// without a decoder; false when the bytes are not a PNG.
bool png_size(const std::uint8_t* p, std::size_t n, std::int64_t* w, std::int64_t* h);

class Document {
 public:
  // Takes the bytes (a PDF keeps pointing into them). `what` names the input
  // in messages (a path, or "N bytes in memory"); `pdf_dpi` is the
  // resolution PDF pages are rendered at (images keep their own). Throws
  // InvalidInputError naming `what` and the reason: not an image or a PDF,
  // an encrypted, corrupt or empty PDF, a TIFF whose first page is unreadable.
  static std::unique_ptr<Document> open(std::vector<std::uint8_t> bytes, std::string what,
                                        int pdf_dpi);
  // As open(), reading a file: a PDF is opened by poppler where it lies
  // (pages are read when measured or rendered), anything else is read whole.
  // Throws InvalidInputError (a missing file or a directory included).
  static std::unique_ptr<Document> open_file(const std::string& path, int pdf_dpi);
  virtual ~Document();

  // "application/pdf", "image/tiff", "image/png", ...
  const std::string& media_type() const { return media_type_; }
  const std::string& what() const { return what_; }
  std::size_t byte_size() const { return bytes_.size(); }
  virtual int page_count() const = 0;
  // The pixel size of page `page` (1-based) from its header or page box,
  // without decoding it.
  virtual void page_size(int page, std::int64_t* w, std::int64_t* h) const = 0;
  // Decodes (renders) page `page` (1-based). Throws InvalidInputError.
  virtual PixPtr load(int page) const = 0;

 protected:
  Document(std::vector<std::uint8_t> bytes, std::string what, std::string media_type)
      : bytes_(std::move(bytes)), what_(std::move(what)), media_type_(std::move(media_type)) {}
  std::vector<std::uint8_t> bytes_;
  std::string what_;
  std::string media_type_;
};

// The first bytes of a PDF ("%PDF-").
bool is_pdf(const std::uint8_t* p, std::size_t n);

// Makes poppler, Leptonica and libtiff silent (process-wide, once): their
// messages about corrupt files would go to the host's stderr; the failure
// is reported as INVALID_INPUT with its reason instead.
void silence_decoders();

}  // namespace taskmgr::ocr
