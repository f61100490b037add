// Input documents of the OCR service: Leptonica reads images (every page of a
// TIFF), poppler renders PDF pages.
#include "ocr/document.hpp"

#include <dlfcn.h>
#include <leptonica/allheaders.h>
#include <poppler/cpp/poppler-document.h>
#include <poppler/cpp/poppler-global.h>
#include <poppler/cpp/poppler-image.h>
#include <poppler/cpp/poppler-page-renderer.h>
#include <poppler/cpp/poppler-page.h>
#include <sys/stat.h>

#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>

#include "taskmgr/error.hpp"
#include "taskmgr/ocr.hpp"
#include "taskmgr/service.hpp"

namespace taskmgr::ocr {

void PixDeleter::operator()(Pix* p) const noexcept {
  if (p != nullptr) pixDestroy(&p);
}

bool png_size(const std::uint8_t* p, std::size_t n, std::int64_t* w, std::int64_t* h) {
  if (n < 24 || std::memcmp(p, "\x89PNG\r\n\x1a\n", 8) != 0 ||
      std::memcmp(p + 12, "IHDR", 4) != 0) {
    return false;
  }
  auto be32 = [&](std::size_t at) {
    return static_cast<std::int64_t>((std::uint32_t{p[at]} << 24) |
                                     (std::uint32_t{p[at + 1]} << 16) |
                                     (std::uint32_t{p[at + 2]} << 8) | std::uint32_t{p[at + 3]});
  };
  *w = be32(16);
  *h = be32(20);
  return true;
}

bool is_pdf(const std::uint8_t* p, std::size_t n) {
  return n >= 5 && std::memcmp(p, "%PDF-", 5) == 0;
}

namespace {

// libtiff (loaded by Leptonica) prints warnings and errors about corrupt
// TIFFs to stderr ("Bad file: amount too big"). Its handlers are found at
// run time: there is no build dependency on libtiff's headers.
void silence_libtiff() {
  using Handler = void (*)(const char*, const char*, va_list);
  using SetHandler = Handler (*)(Handler);
  for (const char* name : {"TIFFSetWarningHandler", "TIFFSetErrorHandler"}) {
    if (void* sym = ::dlsym(RTLD_DEFAULT, name)) {
      reinterpret_cast<SetHandler>(sym)(nullptr);
    }
  }
}

std::string media_type_of(l_int32 format) {
  if (L_FORMAT_IS_TIFF(format)) return "image/tiff";
  switch (format) {
    case IFF_PNG: return "image/png";
    case IFF_JFIF_JPEG: return "image/jpeg";
    case IFF_BMP: return "image/bmp";
    case IFF_WEBP: return "image/webp";
    case IFF_GIF: return "image/gif";
    case IFF_JP2: return "image/jp2";
    case IFF_PNM: return "image/x-portable-anymap";
    default: return "application/octet-stream";
  }
}

// One image (PNG, JPEG, BMP, WebP, ...): one page.
class ImageDocument final : public Document {
 public:
  ImageDocument(std::vector<std::uint8_t> bytes, std::string what, std::string media_type)
      : Document(std::move(bytes), std::move(what), std::move(media_type)) {}
  int page_count() const override { return 1; }
  void page_size(int, std::int64_t* w, std::int64_t* h) const override {
    if (png_size(bytes_.data(), bytes_.size(), w, h)) return;
    l_int32 format = 0, iw = 0, ih = 0, bps = 0, spp = 0, cmap = 0;
    pixReadHeaderMem(bytes_.data(), bytes_.size(), &format, &iw, &ih, &bps, &spp, &cmap);
    *w = iw;
    *h = ih;
  }
  PixPtr load(int) const override {
    PixPtr pix(pixReadMem(bytes_.data(), bytes_.size()));
    if (!pix) throw InvalidInputError("cannot decode the image (truncated or corrupt): " + what_);
    return pix;
  }
};

// A TIFF: every directory is a page, measured from its own header.
class TiffDocument final : public Document {
 public:
  TiffDocument(std::vector<std::uint8_t> bytes, std::string what)
      : Document(std::move(bytes), std::move(what), "image/tiff") {
    std::int64_t w = 0, h = 0;
    while (header(pages_, &w, &h)) ++pages_;
    if (pages_ == 0) throw InvalidInputError("cannot read the TIFF's first page header: " + what_);
  }
  int page_count() const override { return pages_; }
  void page_size(int page, std::int64_t* w, std::int64_t* h) const override {
    header(page - 1, w, h);
  }
  PixPtr load(int page) const override {
    PixPtr pix(pixReadMemTiff(bytes_.data(), bytes_.size(), page - 1));
    if (!pix) {
      throw InvalidInputError(
          (page == 1 ? std::string("cannot decode the image")
                     : "cannot decode page " + std::to_string(page) + " of the image") +
          " (truncated or corrupt): " + what_);
    }
    return pix;
  }

 private:
  bool header(int index, std::int64_t* w, std::int64_t* h) const {
    l_int32 pw = 0, ph = 0, bps = 0, spp = 0, res = 0, cmap = 0, format = 0;
    if (readHeaderMemTiff(bytes_.data(), bytes_.size(), index, &pw, &ph, &bps, &spp, &res, &cmap,
                          &format) != 0) {
      return false;
    }
    *w = pw;
    *h = ph;
    return true;
  }
  int pages_ = 0;
};

// poppler 22.12 creates a process-wide sRGB colour profile the first time
// any page is rendered (GfxState::sRGBProfile, set when it is null, with no
// lock): two documents rendered at once in a fresh process race on it, and
// one thread frees the profile the other made (ThreadSanitizer saw it in
// LittleCMS). The first render in the process is of a blank one-page PDF
// made here, once, while every other render waits for it.
void warm_poppler() {
  static std::once_flag once;
  std::call_once(once, [] {
    const std::vector<std::string> objects = {
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 8 8] >>",
    };
    std::string pdf = "%PDF-1.4\n";
    std::vector<std::size_t> offsets;
    for (std::size_t i = 0; i < objects.size(); ++i) {
      offsets.push_back(pdf.size());
      pdf += std::to_string(i + 1) + " 0 obj\n" + objects[i] + "\nendobj\n";
    }
    const std::size_t xref = pdf.size();
    pdf += "xref\n0 " + std::to_string(objects.size() + 1) + "\n0000000000 65535 f \n";
    for (const std::size_t off : offsets) {
      char line[48];
      std::snprintf(line, sizeof line, "%010zu 00000 n \n", off);
      pdf += line;
    }
    pdf += "trailer\n<< /Size " + std::to_string(objects.size() + 1) +
           " /Root 1 0 R >>\nstartxref\n" + std::to_string(xref) + "\n%%EOF\n";
    const std::unique_ptr<poppler::document> doc(
        poppler::document::load_from_raw_data(pdf.data(), static_cast<int>(pdf.size())));
    if (!doc) return;
    const std::unique_ptr<poppler::page> page(doc->create_page(0));
    if (!page) return;
    poppler::page_renderer renderer;
    (void)renderer.render_page(page.get(), 72, 72);
  });
}

// A PDF: poppler renders each page at the task's resolution.
class PdfDocument final : public Document {
 public:
  PdfDocument(std::vector<std::uint8_t> bytes, std::string what, int dpi)
      : Document(std::move(bytes), std::move(what), "application/pdf"), dpi_(dpi) {
    if (bytes_.size() > static_cast<std::size_t>(INT_MAX)) {
      throw InvalidInputError("PDF over 2 GiB: " + what_);
    }
    // poppler reads the bytes where they are: they live as long as this.
    doc_.reset(poppler::document::load_from_raw_data(reinterpret_cast<const char*>(bytes_.data()),
                                                     static_cast<int>(bytes_.size())));
    if (!doc_) throw InvalidInputError("not a readable PDF (corrupt or truncated): " + what_);
    check();
  }
  // A PDF file opened where it lies.
  PdfDocument(const std::string& path, int dpi) : Document({}, path, "application/pdf"), dpi_(dpi) {
    doc_.reset(poppler::document::load_from_file(path));
    if (!doc_) throw InvalidInputError("not a readable PDF (corrupt or truncated): " + what_);
    check();
  }
  int page_count() const override { return pages_; }
  void page_size(int page, std::int64_t* w, std::int64_t* h) const override {
    const std::unique_ptr<poppler::page> p(open_page(page));
    const poppler::rectf box = p->page_rect(poppler::crop_box);
    double pw = std::abs(box.width()), ph = std::abs(box.height());
    const auto o = p->orientation();
    if (o == poppler::page::landscape || o == poppler::page::seascape) std::swap(pw, ph);
    // As poppler's Splash output sizes its bitmap: points * dpi / 72, rounded.
    *w = static_cast<std::int64_t>(std::floor(pw * dpi_ / 72.0 + 0.5));
    *h = static_cast<std::int64_t>(std::floor(ph * dpi_ / 72.0 + 0.5));
  }
  PixPtr load(int page) const override {
    warm_poppler();
    const std::unique_ptr<poppler::page> p(open_page(page));
    poppler::page_renderer renderer;
    renderer.set_render_hint(poppler::page_renderer::antialiasing, true);
    renderer.set_render_hint(poppler::page_renderer::text_antialiasing, true);
    renderer.set_image_format(poppler::image::format_rgb24);
    const poppler::image img = renderer.render_page(p.get(), dpi_, dpi_);
    if (!img.is_valid() || img.width() <= 0 || img.height() <= 0 ||
        img.format() != poppler::image::format_rgb24) {
      throw InvalidInputError("cannot render page " + std::to_string(page) +
                              " of the PDF: " + what_);
    }
    return to_pix(img);
  }

 private:
  void check() {
    if (doc_->is_locked()) {
      throw InvalidInputError("the PDF is encrypted (a password is needed to open it): " + what_);
    }
    pages_ = doc_->pages();
    if (pages_ <= 0) throw InvalidInputError("the PDF has no pages: " + what_);
  }

  poppler::page* open_page(int page) const {
    poppler::page* p = doc_->create_page(page - 1);
    if (p == nullptr) {
      throw InvalidInputError("cannot read page " + std::to_string(page) + " of the PDF: " + what_);
    }
    return p;
  }

  // 8-bit gray when every pixel is gray (a scan, black text), else 24-bit
  // RGB (Leptonica's 32 bits per pixel); the resolution is the render's.
  PixPtr to_pix(const poppler::image& img) const {
    const int w = img.width(), h = img.height();
    const auto* data = reinterpret_cast<const std::uint8_t*>(img.const_data());
    const std::size_t stride = static_cast<std::size_t>(img.bytes_per_row());
    bool gray = true;
    for (int y = 0; y < h && gray; ++y) {
      const std::uint8_t* row = data + stride * static_cast<std::size_t>(y);
      for (int x = 0; x < w; ++x) {
        const std::uint8_t* px = row + 3 * x;
        if (px[0] != px[1] || px[1] != px[2]) {
          gray = false;
          break;
        }
      }
    }
    PixPtr pix(pixCreate(w, h, gray ? 8 : 32));
    if (!pix) throw std::bad_alloc();
    l_uint32* out = pixGetData(pix.get());
    const l_int32 wpl = pixGetWpl(pix.get());
    for (int y = 0; y < h; ++y) {
      const std::uint8_t* row = data + stride * static_cast<std::size_t>(y);
      l_uint32* line = out + static_cast<std::ptrdiff_t>(wpl) * y;
      for (int x = 0; x < w; ++x) {
        const std::uint8_t* px = row + 3 * x;
        if (gray) {
          SET_DATA_BYTE(line, x, px[0]);
        } else {
          composeRGBPixel(px[0], px[1], px[2], line + x);
        }
      }
    }
    if (!gray) pixSetSpp(pix.get(), 3);
    pixSetResolution(pix.get(), dpi_, dpi_);
    return pix;
  }

  int dpi_;
  int pages_ = 0;
  std::unique_ptr<poppler::document> doc_;
};

}  // namespace

Document::~Document() = default;

void silence_decoders() {
  static std::once_flag once;
  std::call_once(once, [] {
    setMsgSeverity(L_SEVERITY_NONE);
    leptSetStderrHandler([](const char*) {});
    silence_libtiff();
    poppler::set_debug_error_function([](const std::string&, void*) {}, nullptr);
  });
}

std::unique_ptr<Document> Document::open(std::vector<std::uint8_t> bytes, std::string what,
                                         int pdf_dpi) {
  silence_decoders();
  if (is_pdf(bytes.data(), bytes.size())) {
    return std::make_unique<PdfDocument>(std::move(bytes), std::move(what), pdf_dpi);
  }
  std::int64_t pw = 0, ph = 0;
  if (png_size(bytes.data(), bytes.size(), &pw, &ph)) {
    // Judged by its IHDR: a PNG cut after its header still has a size.
    return std::make_unique<ImageDocument>(std::move(bytes), std::move(what), "image/png");
  }
  l_int32 format = 0, w = 0, h = 0, bps = 0, spp = 0, iscmap = 0;
  if (pixReadHeaderMem(bytes.data(), bytes.size(), &format, &w, &h, &bps, &spp, &iscmap) != 0 ||
      w <= 0 || h <= 0) {
    throw InvalidInputError("not a readable image or PDF (PNG, JPEG, TIFF, BMP, WebP or PDF): " +
                            what);
  }
  if (L_FORMAT_IS_TIFF(format)) {
    return std::make_unique<TiffDocument>(std::move(bytes), std::move(what));
  }
  return std::make_unique<ImageDocument>(std::move(bytes), std::move(what), media_type_of(format));
}

std::unique_ptr<Document> Document::open_file(const std::string& path, int pdf_dpi) {
  silence_decoders();
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw InvalidInputError("cannot read " + path + ": no such file");
  if (S_ISDIR(st.st_mode)) throw InvalidInputError("cannot read " + path + ": it is a directory");
  if (!S_ISREG(st.st_mode)) {
    // A FIFO would block for good, /dev/zero never end.
    throw InvalidInputError("cannot read " + path +
                            ": not a regular file (a FIFO, socket or device)");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidInputError("cannot open " + path);
  char magic[5] = {};
  in.read(magic, sizeof magic);
  if (in.gcount() == 5 && is_pdf(reinterpret_cast<const std::uint8_t*>(magic), 5)) {
    return std::make_unique<PdfDocument>(path, pdf_dpi);
  }
  in.clear();
  in.seekg(0);
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                  std::istreambuf_iterator<char>());
  if (bytes.empty()) throw InvalidInputError(path + " is empty");
  return open(std::move(bytes), path, pdf_dpi);
}

}  // namespace taskmgr::ocr

namespace taskmgr {

DocumentInfo describe_document(const std::string& path, int pdf_dpi) {
  if (pdf_dpi < 72 || pdf_dpi > 1200) {
    throw Error(ErrorCode::kInvalidArgument,
                "describe_document: pdf_dpi must be in [72, 1200], got " + std::to_string(pdf_dpi));
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw Error(ErrorCode::kNotFound, "describe_document: no such file: " + path);
  }
  try {
    const std::unique_ptr<ocr::Document> doc = ocr::Document::open_file(path, pdf_dpi);
    DocumentInfo info;
    info.media_type = doc->media_type();
    for (int p = 1; p <= doc->page_count(); ++p) {
      PageInfo page;
      page.page = p;
      doc->page_size(p, &page.width, &page.height);
      info.pages.push_back(page);
    }
    return info;
  } catch (const InvalidInputError& e) {
    throw Error(ErrorCode::kInvalidArgument, std::string("describe_document: ") + e.what());
  }
}

}  // namespace taskmgr
