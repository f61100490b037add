// The OCR service's "pdf" output: a searchable PDF written directly (PDF
// 1.5), the page image as the input showed it and the text layer mapped
// onto it. Tesseract's own TessPDFRenderer places its text on the image it
// recognized, which after a rescale, a turn or a deskew is not the source.
//
// The text layer follows the technique of Tesseract's renderer: one font
// (Tesseract's pdf.ttf, a single invisible glyph) with a CIDToGIDMap that
// sends every character code to that glyph, character codes that are the
// text's UTF-16 units, and a ToUnicode map that reads them back as they
// are; text drawn in rendering mode 3 (invisible), each word stretched
// (Tz) over its box.
#include "ocr/pdf_output.hpp"

#include <leptonica/allheaders.h>
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <sstream>

#include "taskmgr/service.hpp"
#include "utf8.hpp"

namespace taskmgr::ocr {
namespace {

// A number as PDF writes one: C locale, fixed, at most 3 decimals, no "-0".
std::string num(double v) {
  v = std::round(v * 1000) / 1000;
  if (v == 0 || !std::isfinite(v)) v = 0;
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed, 3);
  std::string s(buf, r.ptr);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s;
}

struct LeptFree {
  void operator()(l_uint8* p) const noexcept { lept_free(p); }
};

std::string deflate(std::string_view data) {
  size_t n = 0;
  std::unique_ptr<l_uint8, LeptFree> z(
      zlibCompress(reinterpret_cast<const l_uint8*>(data.data()), data.size(), &n));
  if (!z) throw std::bad_alloc();
  return std::string(reinterpret_cast<const char*>(z.get()), n);
}

// UTF-8 (made valid) as big-endian UTF-16 code units in hex.
std::string utf16_hex(const std::string& utf8, int* units) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  const std::string s = detail::to_valid_utf8(utf8);
  std::string out;
  *units = 0;
  auto unit = [&](unsigned u) {
    for (int shift = 12; shift >= 0; shift -= 4) out += kHex[(u >> shift) & 0xF];
    ++*units;
  };
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const int len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    unsigned cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    i += static_cast<std::size_t>(len);
    if (cp < 0x10000) {
      unit(cp);
    } else {
      cp -= 0x10000;
      unit(0xD800 + (cp >> 10));
      unit(0xDC00 + (cp & 0x3FF));
    }
  }
  return out;
}

constexpr char kToUnicode[] =
    "/CIDInit /ProcSet findresource begin\n"
    "12 dict begin\n"
    "begincmap\n"
    "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
    "/CMapName /Adobe-Identity-UCS def\n"
    "/CMapType 2 def\n"
    "1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n"
    "1 beginbfrange\n<0000> <FFFF> <0000>\nendbfrange\n"
    "endcmap\n"
    "CMapName currentdict /CMap defineresource pop\n"
    "end\n"
    "end\n";

struct CidDeleter {
  void operator()(L_COMP_DATA* p) const noexcept { l_CIDataDestroy(&p); }
};
struct PixDestroy {
  void operator()(Pix* p) const noexcept { pixDestroy(&p); }
};

}  // namespace

PdfOutput::PdfOutput(const std::string& dir, const std::string& font_dir)
    : path_(dir + "/ocr-output.pdf") {
  std::ifstream font_in(font_dir + "/pdf.ttf", std::ios::binary);
  std::ostringstream font_bytes;
  if (font_in) font_bytes << font_in.rdbuf();
  const std::string font = font_bytes.str();
  if (font.empty()) {
    throw TaskError(TaskFailureReason::kProcessingError,
                    "cannot read " + font_dir + "/pdf.ttf for the PDF output");
  }
  out_.open(path_, std::ios::binary | std::ios::trunc);
  write("%PDF-1.5\n%\xE2\xE3\xCF\xD3\n");
  offsets_.push_back(0);
  const int catalog = reserve_object();
  pages_root_ = reserve_object();
  font_ = reserve_object();
  const int cid_font = reserve_object(), gid_map = reserve_object(), to_unicode = reserve_object(),
            descriptor = reserve_object(), font_file = reserve_object();
  begin_object(catalog);
  write("<< /Type /Catalog /Pages " + std::to_string(pages_root_) + " 0 R >>\nendobj\n");
  begin_object(font_);
  write(
      "<< /Type /Font /Subtype /Type0 /BaseFont /GlyphLessFont /Encoding /Identity-H"
      " /DescendantFonts [" +
      std::to_string(cid_font) + " 0 R] /ToUnicode " + std::to_string(to_unicode) +
      " 0 R >>\nendobj\n");
  begin_object(cid_font);
  write(
      "<< /Type /Font /Subtype /CIDFontType2 /BaseFont /GlyphLessFont"
      " /CIDSystemInfo << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >>"
      " /FontDescriptor " +
      std::to_string(descriptor) + " 0 R /CIDToGIDMap " + std::to_string(gid_map) +
      " 0 R /DW 500 >>\nendobj\n");
  // Every CID (two bytes) to glyph 1, the font's one glyph.
  std::string map(65536 * 2, '\0');
  for (std::size_t i = 1; i < map.size(); i += 2) map[i] = '\x01';
  write_stream(gid_map, "/Filter /FlateDecode", deflate(map));
  write_stream(to_unicode, "", kToUnicode);
  begin_object(descriptor);
  // Ascent 1 em, descent ~0: a word's text spans its line's box.
  write(
      "<< /Type /FontDescriptor /FontName /GlyphLessFont /Flags 5 /FontBBox [0 0 500 1000]"
      " /ItalicAngle 0 /Ascent 1000 /Descent -1 /CapHeight 1000 /StemV 80 /FontFile2 " +
      std::to_string(font_file) + " 0 R >>\nendobj\n");
  write_stream(font_file, "/Length1 " + std::to_string(font.size()), font);
  check(0);
}

PdfOutput::~PdfOutput() {
  out_.close();
  ::unlink(path_.c_str());
}

int PdfOutput::reserve_object() {
  offsets_.push_back(0);
  return static_cast<int>(offsets_.size() - 1);
}

void PdfOutput::begin_object(int number) {
  offsets_[static_cast<std::size_t>(number)] = offset_;
  write(std::to_string(number) + " 0 obj\n");
}

void PdfOutput::write(std::string_view s) {
  out_.write(s.data(), static_cast<std::streamsize>(s.size()));
  offset_ += s.size();
}

void PdfOutput::write_stream(int number, const std::string& dict, std::string_view data) {
  begin_object(number);
  write("<< " + dict + (dict.empty() ? "" : " ") + "/Length " + std::to_string(data.size()) +
        " >>\nstream\n");
  write(data);
  write("\nendstream\nendobj\n");
}

void PdfOutput::check(int page) const {
  if (!out_) {
    throw TaskError(TaskFailureReason::kProcessingError,
                    "cannot write the PDF output " + path_ +
                        (page > 0 ? " (page " + std::to_string(page) + ")" : std::string()));
  }
}

void PdfOutput::add_page(Pix* source, int dpi, const PageGeometry& geometry,
                         const std::vector<PdfWord>& words, int page) {
  // The image: 1 bpp losslessly as G4, anything else as JPEG (8-bit gray or
  // RGB), as Tesseract's renderer embeds pages.
  std::unique_ptr<Pix, PixDestroy> converted;
  Pix* pix = source;
  if (pixGetColormap(pix) != nullptr) {
    converted.reset(pixRemoveColormap(pix, REMOVE_CMAP_BASED_ON_SRC));
    pix = converted.get();
  }
  if (pix != nullptr && pixGetDepth(pix) != 1 && pixGetDepth(pix) != 8 && pixGetDepth(pix) != 32) {
    converted.reset(pixConvertTo8(pix, 0));
    pix = converted.get();
  }
  if (pix == nullptr) throw std::bad_alloc();
  const bool bilevel = pixGetDepth(pix) == 1;
  L_COMP_DATA* raw = nullptr;
  if (pixGenerateCIData(pix, bilevel ? L_G4_ENCODE : L_JPEG_ENCODE, 85, 0, &raw) != 0 ||
      raw == nullptr) {
    throw TaskError(TaskFailureReason::kProcessingError,
                    "cannot encode page " + std::to_string(page) + " for the PDF output");
  }
  const std::unique_ptr<L_COMP_DATA, CidDeleter> cid(raw);
  const int w = static_cast<int>(pixGetWidth(source)), h = static_cast<int>(pixGetHeight(source));
  const int image = reserve_object(), contents = reserve_object(), page_obj = reserve_object();
  std::string dict = "/Type /XObject /Subtype /Image /Width " + std::to_string(cid->w) +
                     " /Height " + std::to_string(cid->h);
  if (bilevel) {
    dict +=
        " /ColorSpace /DeviceGray /BitsPerComponent 1 /Filter /CCITTFaxDecode"
        " /DecodeParms << /K -1 /Columns " +
        std::to_string(cid->w) + " /Rows " + std::to_string(cid->h) +
        (cid->minisblack ? " /BlackIs1 true" : "") + " >>";
  } else {
    dict += std::string(" /ColorSpace ") + (cid->spp == 1 ? "/DeviceGray" : "/DeviceRGB") +
            " /BitsPerComponent 8 /Filter /DCTDecode";
  }
  write_stream(image, dict,
               std::string_view(reinterpret_cast<const char*>(cid->datacomp), cid->nbytescomp));

  // The page is the source's size at its resolution; its image fills it.
  const double k = 72.0 / (dpi > 0 ? dpi : 300);
  const double page_w = w * k, page_h = h * k;
  std::string text = "q " + num(page_w) + " 0 0 " + num(page_h) + " 0 0 cm /Im1 Do Q\n";
  text += "BT\n3 Tr\n";
  double font_size = -1;
  auto to_pdf = [&](double x, double y) {
    const Point p = geometry.to_source(Point{x, y});
    return Point{p.x * k, page_h - p.y * k};
  };
  for (const PdfWord& word : words) {
    int units = 0;
    std::string hex = utf16_hex(word.text, &units);
    if (units == 0) continue;
    // The word's baseline runs along its line's bottom from its left to
    // its right edge; its height is the line's. Mapped as points, so a turn
    // or a deskew turns the text with the words.
    const Point p0 = to_pdf(word.box.left, word.line.bottom);
    const Point p1 = to_pdf(word.box.right, word.line.bottom);
    const Point pu = to_pdf(word.box.left, word.line.top);
    const double dx = p1.x - p0.x, dy = p1.y - p0.y, ux = pu.x - p0.x, uy = pu.y - p0.y;
    const double length = std::hypot(dx, dy), size = std::hypot(ux, uy);
    if (length < 0.01 || size < 0.01) continue;
    if (std::abs(size - font_size) > 0.0005) {
      text += "/F1 " + num(size) + " Tf\n";
      font_size = size;
    }
    // Each glyph advances half an em (the font's /DW 500): stretch the word
    // over its box.
    const double stretch = 100 * length / (units * 0.5 * size);
    if (!word.last_in_line) hex += "0020";
    text += num(dx / length) + " " + num(dy / length) + " " + num(ux / size) + " " +
            num(uy / size) + " " + num(p0.x) + " " + num(p0.y) + " Tm " + num(stretch) + " Tz <" +
            hex + "> Tj\n";
  }
  text += "ET\n";
  write_stream(contents, "/Filter /FlateDecode", deflate(text));
  begin_object(page_obj);
  write("<< /Type /Page /Parent " + std::to_string(pages_root_) + " 0 R /MediaBox [0 0 " +
        num(page_w) + " " + num(page_h) + "] /Resources << /XObject << /Im1 " +
        std::to_string(image) + " 0 R >> /Font << /F1 " + std::to_string(font_) +
        " 0 R >> >> /Contents " + std::to_string(contents) + " 0 R >>\nendobj\n");
  pages_.push_back(page_obj);
  check(page);
}

std::string PdfOutput::finish() {
  begin_object(pages_root_);
  std::string kids;
  for (const int p : pages_) kids += (kids.empty() ? "" : " ") + std::to_string(p) + " 0 R";
  write("<< /Type /Pages /Kids [" + kids + "] /Count " + std::to_string(pages_.size()) +
        " >>\nendobj\n");
  const int info = reserve_object();
  begin_object(info);
  write("<< /Producer (taskmgr OCR) >>\nendobj\n");
  const std::size_t xref = offset_;
  std::string table = "xref\n0 " + std::to_string(offsets_.size()) + "\n0000000000 65535 f \n";
  for (std::size_t i = 1; i < offsets_.size(); ++i) {
    char entry[32];
    std::snprintf(entry, sizeof entry, "%010zu 00000 n \n", offsets_[i]);
    table += entry;
  }
  table += "trailer\n<< /Size " + std::to_string(offsets_.size()) + " /Root 1 0 R /Info " +
           std::to_string(info) + " 0 R >>\nstartxref\n" + std::to_string(xref) + "\n%%EOF\n";
  write(table);
  out_.close();
  check(0);
  std::ifstream in(path_, std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (!in || bytes.str().empty()) {
    throw TaskError(TaskFailureReason::kProcessingError, "cannot read back " + path_);
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
