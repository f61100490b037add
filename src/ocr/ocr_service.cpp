// The built-in OCR service: Leptonica decodes, OpenCV preprocesses,
// Tesseract recognizes, on an engine initialised once per instance.
#include <leptonica/allheaders.h>
#include <omp.h>
#include <sys/stat.h>
#include <tesseract/baseapi.h>
#include <tesseract/ocrclass.h>
#include <tesseract/resultiterator.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#include <optional>
#include <sstream>

#include "input_requirement.hpp"
#include "ocr/document.hpp"
#include "ocr/page_geometry.hpp"
#include "ocr/pdf_output.hpp"
#include "ocr/resolution.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/ocr.hpp"
#include "utf8.hpp"

namespace taskmgr {
namespace {

namespace json = boost::json;

constexpr std::int64_t kMaxSide = 32767;  // Tesseract's limit per side

using ocr::PixPtr;

struct TextDeleter {
  void operator()(char* p) const noexcept { delete[] p; }
};
using TextPtr = std::unique_ptr<char[], TextDeleter>;

std::string find_tessdata(const std::string& configured) {
  if (!configured.empty()) return configured;
  if (const char* env = std::getenv("TESSDATA_PREFIX"); env != nullptr && *env != '\0') return env;
  for (const char* dir : {"/usr/share/tesseract-ocr/5/tessdata",
                          "/usr/share/tesseract-ocr/4.00/tessdata", "/usr/share/tessdata"}) {
    struct stat st {};
    if (::stat(dir, &st) == 0) return dir;
  }
  return "";
}

enum class Orientation { kAuto, kOff, kAlways };

Orientation parse_orientation(std::string_view s) {
  if (s == "off") return Orientation::kOff;
  if (s == "always") return Orientation::kAlways;
  return Orientation::kAuto;
}

// Options of one task, over the service's defaults.
struct TaskOptions {
  int psm = 3;
  std::string output = "text";
  bool words = true;
  PreprocessConfig pre;
  double scale = 0;    // preprocess.scale: a fixed rescale (0: chosen per page)
  int dpi = 300;       // PDF pages are rendered at this resolution
  int first_page = 0;  // 1-based, inclusive; 0 = the document's first
  int last_page = 0;   // 0 = the document's last
  Orientation orientation = Orientation::kAuto;
};

TaskOptions parse_options(const std::string& text, const OcrConfig& defaults) {
  TaskOptions o;
  o.psm = defaults.page_segmentation_mode;
  o.pre = defaults.preprocess;
  o.dpi = defaults.pdf_dpi;
  o.orientation = parse_orientation(defaults.orientation);
  if (text.empty()) return o;
  boost::system::error_code ec;
  const json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) throw InvalidInputError("options are not a JSON object");
  const auto& obj = v.as_object();
  auto get_bool = [](const json::value& x, const char* what) {
    if (!x.is_bool())
      throw InvalidInputError(std::string("option ") + what + " must be true or false");
    return x.as_bool();
  };
  auto get_int = [](const json::value& x, const char* what, int lo, int hi) {
    if (!x.is_int64() || x.as_int64() < lo || x.as_int64() > hi) {
      throw InvalidInputError(std::string("option ") + what + " must be an integer in [" +
                              std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return static_cast<int>(x.as_int64());
  };
  auto get_scale = [](const json::value& x) {
    const double s = x.is_int64()    ? static_cast<double>(x.as_int64())
                     : x.is_double() ? x.as_double()
                                     : 0;
    if (!(s >= 0.25 && s <= 4)) {
      throw InvalidInputError("option preprocess.scale must be a number in [0.25, 4]");
    }
    return s;
  };
  constexpr int kMaxPage = 1'000'000'000;
  for (const auto& [key, val] : obj) {
    if (key == "psm") {
      o.psm = get_int(val, "psm", 0, 13);
    } else if (key == "output") {
      static constexpr std::string_view kOutputs[] = {"text", "hocr", "tsv", "alto", "pdf"};
      if (!val.is_string() || std::find(std::begin(kOutputs), std::end(kOutputs),
                                        std::string_view(val.as_string())) == std::end(kOutputs)) {
        throw InvalidInputError(
            "option output must be \"text\", \"hocr\", \"tsv\", \"alto\" or \"pdf\"");
      }
      o.output = std::string(val.as_string());
    } else if (key == "words") {
      o.words = get_bool(val, "words");
    } else if (key == "dpi") {
      o.dpi = get_int(val, "dpi", 72, 1200);
    } else if (key == "page") {
      if (obj.contains("pages"))
        throw InvalidInputError("options page and pages exclude each other");
      o.first_page = o.last_page = get_int(val, "page", 1, kMaxPage);
    } else if (key == "pages") {
      if (!val.is_array() || val.as_array().size() != 2) {
        throw InvalidInputError("option pages must be [first, last] (1-based, inclusive)");
      }
      o.first_page = get_int(val.as_array()[0], "pages[0]", 1, kMaxPage);
      o.last_page = get_int(val.as_array()[1], "pages[1]", 1, kMaxPage);
      if (o.first_page > o.last_page) {
        throw InvalidInputError("option pages: the first page (" + std::to_string(o.first_page) +
                                ") is after the last (" + std::to_string(o.last_page) + ")");
      }
    } else if (key == "orientation") {
      if (!val.is_string() ||
          (val.as_string() != "auto" && val.as_string() != "off" && val.as_string() != "always")) {
        throw InvalidInputError("option orientation must be \"auto\", \"off\" or \"always\"");
      }
      o.orientation = parse_orientation(val.as_string());
    } else if (key == "preprocess") {
      if (!val.is_object()) throw InvalidInputError("option preprocess must be an object");
      for (const auto& [pk, pv] : val.as_object()) {
        if (pk == "grayscale")
          o.pre.grayscale = get_bool(pv, "preprocess.grayscale");
        else if (pk == "binarize")
          o.pre.binarize = get_bool(pv, "preprocess.binarize");
        else if (pk == "deskew")
          o.pre.deskew = get_bool(pv, "preprocess.deskew");
        else if (pk == "target_dpi")
          o.pre.target_dpi = get_int(pv, "preprocess.target_dpi", 0, 1200);
        else if (pk == "scale")
          o.scale = get_scale(pv);
        else
          throw InvalidInputError("unknown option preprocess." + std::string(pk));
      }
    } else if (key == "source") {
      // The host's name for what the task reads (taskmgr-ocr: the page's
      // identity, by which it resumes); kept with the task, not used here.
      if (!val.is_string()) throw InvalidInputError("option source must be a string");
    } else if (key == "timeout_seconds") {
      // The library's own option (the attempt's deadline): the manager reads it.
    } else if (key != "mb") {  // "mb" is read by test estimators; ignored here
      throw InvalidInputError("unknown option '" + std::string(key) + "'");
    }
  }
  return o;
}

std::vector<std::uint8_t> read_input(const TaskInput& in) {
  if (!in.data.empty()) return in.data;
  if (in.path.empty()) throw InvalidInputError("the task has no input (no path, no bytes)");
  struct stat st {};
  if (::stat(in.path.c_str(), &st) != 0)
    throw InvalidInputError("cannot read " + in.path + ": no such file");
  if (S_ISDIR(st.st_mode))
    throw InvalidInputError("cannot read " + in.path + ": it is a directory");
  if (!S_ISREG(st.st_mode)) {
    // A FIFO would block the worker for good, /dev/zero never end.
    throw InvalidInputError("cannot read " + in.path +
                            ": not a regular file (a FIFO, socket or device)");
  }
  std::ifstream f(in.path, std::ios::binary);
  if (!f) throw InvalidInputError("cannot open " + in.path);
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)),
                                  std::istreambuf_iterator<char>());
  if (bytes.empty()) throw InvalidInputError(in.path + " is empty");
  return bytes;
}

std::string describe(const TaskInput& in) {
  return in.path.empty() ? std::to_string(in.data.size()) + " bytes in memory" : in.path;
}

// An 8-bit gray cv::Mat copy of a Pix (Leptonica keeps bytes in 32-bit
// words, swapped on little-endian machines).
cv::Mat to_gray_mat(Pix* pix) {
  PixPtr gray(pixConvertTo8(pix, 0));
  if (!gray) throw InvalidInputError("cannot convert the page to 8-bit gray");
  PixPtr swapped(pixEndianByteSwapNew(gray.get()));
  const int w = static_cast<int>(pixGetWidth(swapped.get()));
  const int h = static_cast<int>(pixGetHeight(swapped.get()));
  const std::size_t stride = static_cast<std::size_t>(pixGetWpl(swapped.get())) * 4;
  cv::Mat view(h, w, CV_8UC1, pixGetData(swapped.get()), stride);
  return view.clone();
}

double estimate_skew_degrees(const cv::Mat& gray) {
  cv::Mat ink;
  cv::threshold(gray, ink, 0, 255, cv::THRESH_BINARY_INV | cv::THRESH_OTSU);
  std::vector<cv::Point> points;
  cv::findNonZero(ink, points);
  if (points.size() < 100) return 0;
  const cv::RotatedRect box = cv::minAreaRect(points);
  double angle = box.angle;
  if (angle < -45) angle += 90;
  if (angle > 45) angle -= 90;
  return angle;
}

// Orientation detection (Tesseract's OSD) of one page.
struct PageOrientation {
  bool checked = false;  // OSD ran on the page
  int angle = 0;         // the page's clockwise rotation, as detected: 0, 90, 180, 270
  double confidence = 0;
  bool applied = false;  // the page was rotated back before the recognition reported
};

// "auto": a first recognition whose mean confidence is under this runs OSD
// (upright pages measured 86..96, pages turned 90/180/270 degrees 30..47:
// docs/OCR.md).
constexpr double kAutoOsdBelowConfidence = 70;
// OSD's orientation confidence needed to rotate a page (a page of a few
// words measured 1.5..4, a page of text 9..10; an empty page fails OSD).
constexpr double kMinOsdConfidence = 1.5;

class OcrService final : public Service {
 public:
  OcrService(const OcrConfig& config, const std::string& device) : config_(config) {
    (void)device;
    tessdata_ = find_tessdata(config.tessdata_path);
    if (api_.Init(tessdata_.empty() ? nullptr : tessdata_.c_str(), config.languages.c_str(),
                  tesseract::OEM_LSTM_ONLY) != 0) {
      throw std::runtime_error("cannot initialise Tesseract with languages '" + config.languages +
                               "' and tessdata '" + (tessdata_.empty() ? "(default)" : tessdata_) +
                               "': is the language data installed (tesseract-ocr-eng)?");
    }
    // The orientation engine is warm from the start when every page uses
    // it ("always"); with "auto" most pages never do (upright ones read
    // well), so it is loaded by the first page that needs it.
    if (parse_orientation(config.orientation) == Orientation::kAlways) init_osd();
  }

  void process(TaskContext& ctx) override {
    limit_openmp();
    const TaskOptions opt = parse_options(ctx.options_json(), config_);
    ctx.stage("load");
    const std::unique_ptr<ocr::Document> doc =
        ocr::Document::open(read_input(ctx.input()), describe(ctx.input()), opt.dpi);
    const int count = doc->page_count();
    const int first = opt.first_page > 0 ? opt.first_page : 1;
    const int last = opt.last_page > 0 ? opt.last_page : count;
    for (const int p : {first, last}) {
      if (p > count) {
        throw InvalidInputError("page " + std::to_string(p) +
                                " is out of range: the document has " + std::to_string(count) +
                                (count == 1 ? " page: " : " pages: ") + doc->what());
      }
    }
    // Every page's declared size is checked before it is decoded (a header
    // of 100000 x 100000 pixels never gets as far as an allocation).
    check_size(*doc, first);
    std::unique_ptr<ocr::PdfOutput> pdf;
    if (opt.output == "pdf") {
      const std::string fonts = ocr::find_pdf_font_dir(tessdata_);
      if (fonts.empty()) {
        throw TaskError(TaskFailureReason::kProcessingError,
                        "output \"pdf\" needs Tesseract's pdf.ttf (tesseract-ocr's tessdata)");
      }
      pdf = std::make_unique<ocr::PdfOutput>(ctx.temp_dir(), fonts);
    }
    // A PDF page is rendered at a resolution the task chose: known, not a tag.
    const bool known_dpi = doc->media_type() == "application/pdf";
    json::array pages;
    std::string all_text;
    double conf_sum = 0;
    const int batch = std::max(1, ctx.batch_size());
    for (int next = first; next <= last;) {
      // Decode up to batch_size pages, then recognize them: the batch is what
      // an out-of-memory retry shrinks.
      std::vector<std::pair<int, PixPtr>> held;
      for (; next <= last && static_cast<int>(held.size()) < batch; ++next) {
        ctx.throw_if_cancelled();
        check_size(*doc, next);
        held.emplace_back(next, doc->load(next));
      }
      std::int64_t held_bytes = static_cast<std::int64_t>(doc->byte_size());
      for (const auto& [no, p] : held) {
        held_bytes += static_cast<std::int64_t>(pixGetWpl(p.get())) * 4 * pixGetHeight(p.get());
      }
      ctx.report_memory(std::max<std::int64_t>(1, held_bytes >> 20) + engine_mb());
      for (auto& [page_no, pix] : held) {
        ctx.throw_if_cancelled();
        pages.push_back(
            read_page(ctx, opt, std::move(pix), page_no, known_dpi, held_bytes, pdf.get()));
        const auto& pg = pages.back().as_object();
        all_text += std::string(pg.at("text").as_string());
        conf_sum += pg.at("mean_confidence").as_double();
      }
    }
    json::object result;
    result["text"] = all_text;
    result["mean_confidence"] = pages.empty() ? 0.0 : conf_sum / static_cast<double>(pages.size());
    result["pages"] = std::move(pages);
    if (pdf) result["pdf_base64"] = ocr::base64_encode(pdf->finish());
    ctx.set_result(json::serialize(result));
  }

  void cleanup_task(const std::string&) noexcept override {
    try {
      api_.Clear();
      if (osd_) osd_->Clear();
    } catch (...) {
    }
  }

 private:
  // Before any decoding: a page's declared size against Tesseract's limit per
  // side and ocr.max_pixels.
  void check_size(const ocr::Document& doc, int page) const {
    std::int64_t w = 0, h = 0;
    doc.page_size(page, &w, &h);
    const std::string what = "page " + std::to_string(page) + " of " + std::to_string(w) + "x" +
                             std::to_string(h) + " pixels";
    if (w > kMaxSide || h > kMaxSide) {
      throw InvalidInputError(what + " exceeds Tesseract's limit of " + std::to_string(kMaxSide) +
                              " pixels per side: " + doc.what());
    }
    if (w * h > config_.max_pixels) {
      throw InvalidInputError(what + " exceeds ocr.max_pixels = " +
                              std::to_string(config_.max_pixels) + ": " + doc.what());
    }
  }

  static void limit_openmp() {
    thread_local bool done = false;
    if (!done) {
      // Tesseract asks for threads explicitly (num_threads clauses), which
      // omp_set_num_threads cannot override; with no active levels allowed,
      // every parallel region on this thread runs on this thread alone.
      omp_set_max_active_levels(0);
      omp_set_num_threads(1);
      if (omp_get_max_active_levels() != 0) {
        throw std::runtime_error("could not limit OpenMP on this worker thread");
      }
      done = true;
    }
  }

  static std::int64_t engine_mb() {
    // The engine's own working set is part of what the task uses: measured
    // once per process as the resident size an initialised engine adds is
    // not cheap to isolate; a fixed allowance stands for it.
    return 40;
  }

  // A second, small engine with Tesseract's legacy OSD model: the LSTM-only
  // recognition engine cannot detect orientation itself.
  void init_osd() {
    if (osd_) return;
    auto osd = std::make_unique<tesseract::TessBaseAPI>();
    if (osd->Init(tessdata_.empty() ? nullptr : tessdata_.c_str(), "osd",
                  tesseract::OEM_TESSERACT_ONLY) != 0) {
      throw std::runtime_error(
          "cannot initialise Tesseract's orientation detection from tessdata '" +
          (tessdata_.empty() ? "(default)" : tessdata_) +
          "': is osd.traineddata installed (tesseract-ocr-osd)? "
          "ocr.orientation: off does without it");
    }
    osd->SetPageSegMode(tesseract::PSM_OSD_ONLY);
    osd_ = std::move(osd);
  }

  PageOrientation detect_orientation(TaskContext& ctx, Pix* pix) {
    ctx.stage("orientation");
    if (!osd_) {
      try {
        init_osd();
      } catch (const std::exception& e) {
        throw TaskError(TaskFailureReason::kProcessingError, e.what());
      }
    }
    PageOrientation o;
    o.checked = true;
    const int dpi = static_cast<int>(pixGetYRes(pix));
    osd_->SetImage(pix);
    osd_->SetSourceResolution(dpi > 0 ? dpi : 300);
    int deg = 0;
    float orient_conf = 0, script_conf = 0;
    const char* script = nullptr;
    if (osd_->DetectOrientationScript(&deg, &orient_conf, &script, &script_conf) &&
        (deg == 0 || deg == 90 || deg == 180 || deg == 270) && std::isfinite(orient_conf)) {
      o.angle = deg;
      o.confidence = orient_conf;
    }
    osd_->Clear();
    return o;
  }

  // One page: recognition, orientation detection when the mode asks for it
  // (then the page turned the right way up is what is recognized), the
  // requested outputs, every geometry in the source page's pixels.
  json::object read_page(TaskContext& ctx, const TaskOptions& opt, PixPtr pix, int page_no,
                         bool known_dpi, std::int64_t held_bytes, ocr::PdfOutput* pdf) {
    const PixPtr source = std::move(pix);  // the page as the input shows it
    PixPtr turned;                         // turned the right way up, when OSD says so
    int quarter_turns = 0;                 // clockwise, source -> turned
    PageOrientation orientation;
    auto upright = [&] {
      if (orientation.angle != 0 && orientation.confidence >= kMinOsdConfidence) {
        // OSD reports the page's clockwise rotation; turn it back.
        quarter_turns = (360 - orientation.angle) / 90;
        turned.reset(pixRotateOrth(source.get(), quarter_turns));
        if (!turned) throw std::bad_alloc();
        orientation.applied = true;
      }
      return orientation.applied;
    };
    const PageInput in{source.get(), known_dpi};
    if (opt.orientation == Orientation::kAlways) {
      orientation = detect_orientation(ctx, source.get());
      upright();
    }
    Recognition r = recognize(ctx, opt, in, turned ? turned.get() : source.get(), quarter_turns,
                              page_no, held_bytes, pdf != nullptr);
    if (opt.orientation == Orientation::kAuto &&
        r.page.at("mean_confidence").as_double() < kAutoOsdBelowConfidence) {
      orientation = detect_orientation(ctx, source.get());
      if (upright()) {
        r = recognize(ctx, opt, in, turned.get(), quarter_turns, page_no, held_bytes,
                      pdf != nullptr);
      }
    }
    turned.reset();
    json::object& page = r.page;
    page["orientation"] = json::object{{"checked", orientation.checked},
                                       {"angle", orientation.angle},
                                       {"confidence", orientation.confidence},
                                       {"applied", orientation.applied}};
    const bool moved = !r.geometry.is_identity();
    if (opt.output == "hocr") {
      TextPtr hocr(api_.GetHOCRText(page_no - 1));
      std::string h = hocr ? hocr.get() : "";
      if (moved) h = ocr::hocr_to_source(h, r.geometry, r.resolution.dpi);
      page["hocr"] = with_orientation(std::move(h), orientation);
    } else if (opt.output == "tsv") {
      TextPtr tsv(api_.GetTSVText(page_no - 1));
      std::string t = tsv ? tsv.get() : "";
      page["tsv"] = moved ? ocr::tsv_to_source(t, r.geometry) : t;
    } else if (opt.output == "alto") {
      TextPtr alto(api_.GetAltoText(page_no - 1));
      std::string a = alto ? alto.get() : "";
      page["alto"] = moved ? ocr::alto_to_source(a, r.geometry) : a;
    } else if (pdf != nullptr) {
      pdf->add_page(source.get(), r.resolution.dpi, r.geometry, r.layout, page_no);
    }
    return std::move(r.page);
  }

  // hOCR: the orientation OSD found goes in the ocr_page's title, as
  // engine-specific (x_) properties; the boxes are the source page's (lines
  // of a page turned for recognition carry "textangle").
  static std::string with_orientation(std::string hocr, const PageOrientation& o) {
    if (!o.checked) return hocr;
    const std::size_t div = hocr.find("class='ocr_page'");
    if (div == std::string::npos) return hocr;
    const std::size_t title = hocr.find("title='", div);
    const std::size_t end = title == std::string::npos ? title : hocr.find('\'', title + 7);
    if (end == std::string::npos) return hocr;
    char conf[32];
    std::snprintf(conf, sizeof conf, "%.2f", o.confidence);
    hocr.insert(end, "; x_orientation_angle " + std::to_string(o.angle) +
                         "; x_orientation_confidence " + conf + "; x_orientation_applied " +
                         (o.applied ? "1" : "0"));
    return hocr;
  }

  // The page as decoded, before any turn: its resolution tag and size.
  struct PageInput {
    Pix* source;
    bool known_dpi;  // a PDF page rendered at the task's dpi
  };

  // One recognition: the page object (source coordinates), where the
  // recognized image lies in the source, and the words with their lines
  // (recognized coordinates) for the PDF output.
  struct Recognition {
    json::object page;
    ocr::PageGeometry geometry{0, 0};
    ocr::PageResolution resolution;
    std::vector<ocr::PdfWord> layout;
  };

  // The largest scale Tesseract can take for a w x h image (its limit per
  // side, ocr.max_pixels), at most `scale`.
  double bounded_scale(double scale, int w, int h) const {
    const double side = static_cast<double>(kMaxSide) / std::max(w, h);
    const double area =
        std::sqrt(static_cast<double>(config_.max_pixels) / (static_cast<double>(w) * h));
    return std::max(std::min({scale, side, area}), 1e-3);
  }

  // Recognizes `pix` (the source, or the source turned clockwise by
  // `quarter_turns`).
  Recognition recognize(TaskContext& ctx, const TaskOptions& opt, const PageInput& in, Pix* pix,
                        int quarter_turns, int page_no, std::int64_t held_bytes, bool layout) {
    ctx.stage("preprocess");
    Recognition out;
    out.geometry = ocr::PageGeometry(static_cast<int>(pixGetWidth(in.source)),
                                     static_cast<int>(pixGetHeight(in.source)));
    out.geometry.turn_clockwise(quarter_turns);
    out.resolution = ocr::choose_resolution(static_cast<int>(pixGetXRes(in.source)), in.known_dpi,
                                            opt.pre.target_dpi, opt.scale,
                                            [pix] { return ocr::text_x_height(pix); });
    const ocr::PageResolution& res = out.resolution;
    const int cols = static_cast<int>(pixGetWidth(pix)), rows = static_cast<int>(pixGetHeight(pix));
    const double scale = bounded_scale(res.scale, cols, rows);
    const cv::Size scaled(std::max(1, static_cast<int>(std::lround(cols * scale))),
                          std::max(1, static_cast<int>(std::lround(rows * scale))));
    const bool rescale = scaled.width != cols || scaled.height != rows;
    const bool need_cv = opt.pre.grayscale || opt.pre.binarize || opt.pre.deskew || rescale;
    cv::Mat img;
    if (need_cv) {
      img = to_gray_mat(pix);
      if (rescale) {
        cv::resize(img, img, scaled, 0, 0, scale > 1 ? cv::INTER_CUBIC : cv::INTER_AREA);
        out.geometry.resize(scaled.width, scaled.height);
      }
      if (opt.pre.deskew) {
        const double angle = estimate_skew_degrees(img);
        if (std::abs(angle) > 0.3 && std::abs(angle) < 10) {
          const cv::Mat rot =
              cv::getRotationMatrix2D(cv::Point2f(img.cols / 2.0f, img.rows / 2.0f), angle, 1.0);
          cv::warpAffine(img, img, rot, img.size(), cv::INTER_LINEAR, cv::BORDER_CONSTANT,
                         cv::Scalar(255));
          out.geometry.rotate(angle);
        }
      }
      if (opt.pre.binarize) cv::threshold(img, img, 0, 255, cv::THRESH_BINARY | cv::THRESH_OTSU);
      ctx.report_memory(
          std::max<std::int64_t>(1, (held_bytes + static_cast<std::int64_t>(img.total())) >> 20) +
          engine_mb());
    }

    ctx.stage("recognize");
    api_.SetPageSegMode(static_cast<tesseract::PageSegMode>(opt.psm));
    // hOCR's ocr_page "image": the input's path (valid UTF-8: it goes into
    // JSON and XML), "unknown" for bytes. Set on every page: the engine is
    // reused, and a previous task's path must not show.
    const std::string path = ctx.input().data.empty() ? ctx.input().path : std::string();
    std::string image_name = detail::to_valid_utf8(path);
    // A control character (a tab, a newline) would be normalised to a space
    // by an XML parser: shown as U+FFFD instead.
    for (std::size_t i = 0; i < image_name.size(); ++i) {
      if (static_cast<unsigned char>(image_name[i]) < 0x20 || image_name[i] == 0x7f) {
        image_name.replace(i, 1, "\xEF\xBF\xBD");
        i += 2;
      }
    }
    api_.SetInputName(image_name.empty() ? nullptr : image_name.c_str());
    if (need_cv) {
      api_.SetImage(img.data, img.cols, img.rows, 1, static_cast<int>(img.step));
    } else {
      api_.SetImage(pix);
    }
    // The resolution of the image recognized, within what Tesseract takes
    // (70..2400: outside it, it prints a warning and guesses 70).
    api_.SetSourceResolution(
        std::clamp(static_cast<int>(std::lround(res.dpi * out.geometry.scale_y())), 70, 2400));
    // Tesseract's monitor stops the recognition at the task's deadline or
    // when the host cancels it.
    tesseract::ETEXT_DESC monitor;
    monitor.cancel = [](void* data, int) -> bool {
      const auto* c = static_cast<const TaskContext*>(data);
      return c->cancelled() || c->deadline_exceeded();
    };
    monitor.cancel_this = &ctx;
    if (const double left = ctx.seconds_left(); std::isfinite(left)) {
      monitor.set_deadline_msecs(static_cast<std::int32_t>(std::clamp(left * 1000.0, 1.0, 2e9)));
    }
    const int rc = api_.Recognize(&monitor);
    ctx.throw_if_cancelled();  // TIMEOUT or CANCELLED, whatever Recognize returned
    if (monitor.deadline_exceeded()) {
      throw TaskError(TaskFailureReason::kTimeout,
                      "OCR of page " + std::to_string(page_no) + " ran past the task's deadline");
    }
    if (rc != 0) {
      throw TaskError(TaskFailureReason::kProcessingError,
                      "Tesseract could not recognize page " + std::to_string(page_no));
    }
    json::object& page = out.page;
    page["page"] = page_no;
    page["width"] = out.geometry.source_width();
    page["height"] = out.geometry.source_height();
    page["dpi"] = res.dpi;
    page["dpi_source"] = ocr::dpi_source_name(res.source);
    page["preprocess"] =
        json::object{{"scale", std::round(out.geometry.scale_x() * 1000) / 1000},
                     {"rotated", 90 * out.geometry.quarter_turns()},
                     {"deskew_degrees", std::round(out.geometry.rotation_degrees() * 100) / 100}};
    TextPtr text(api_.GetUTF8Text());
    const std::string_view read = text ? std::string_view(text.get()) : std::string_view();
    const bool blank = read.find_first_not_of(" \t\r\n\f") == std::string_view::npos;
    page["text"] = read;
    // No text, no confidence: Tesseract rates an image block it read as
    // nothing (a photograph) 95.
    page["mean_confidence"] = blank ? 0.0 : static_cast<double>(api_.MeanTextConf());
    if (opt.words || layout) {
      json::array words;
      std::unique_ptr<tesseract::ResultIterator> it(api_.GetIterator());
      if (it) {
        do {
          TextPtr word(it->GetUTF8Text(tesseract::RIL_WORD));
          // A "word" of spaces only is an image block Tesseract found no text in.
          if (!word ||
              std::string_view(word.get()).find_first_not_of(" \t\r\n\f") == std::string_view::npos)
            continue;
          ocr::Box box;
          it->BoundingBox(tesseract::RIL_WORD, &box.left, &box.top, &box.right, &box.bottom);
          if (layout) {
            ocr::PdfWord w;
            w.text = word.get();
            w.box = box;
            it->BoundingBox(tesseract::RIL_TEXTLINE, &w.line.left, &w.line.top, &w.line.right,
                            &w.line.bottom);
            w.last_in_line = it->IsAtFinalElement(tesseract::RIL_TEXTLINE, tesseract::RIL_WORD);
            out.layout.push_back(std::move(w));
          }
          const ocr::Box b = out.geometry.to_source(box);
          words.push_back(json::object{
              {"text", word.get()},
              {"confidence", static_cast<double>(it->Confidence(tesseract::RIL_WORD))},
              {"box", json::array{b.left, b.top, b.right - b.left, b.bottom - b.top}}});
        } while (it->Next(tesseract::RIL_WORD));
      }
      if (opt.words) page["words"] = std::move(words);
    }
    return out;
  }

  OcrConfig config_;
  std::string tessdata_;
  tesseract::TessBaseAPI api_;
  std::unique_ptr<tesseract::TessBaseAPI> osd_;  // orientation detection, made once
};

// Memory model: the engine, plus per page held at once its decoded pixels
// (bytes per pixel from the header) and the preprocessing copies.
class OcrMemoryModel final : public MemoryModel {
 public:
  explicit OcrMemoryModel(OcrConfig config) : config_(std::move(config)) {}
  std::string name() const override { return "ocr"; }
  RequestFeatures features(const TaskCreateRequest& request) const override {
    RequestFeatures f = MemoryModel::features(request);
    std::vector<std::uint8_t> head;
    try {
      if (!request.input.data.empty()) {
        head.assign(request.input.data.begin(),
                    request.input.data.begin() + static_cast<std::ptrdiff_t>(std::min<std::size_t>(
                                                     request.input.data.size(), 1 << 20)));
      } else if (struct stat st{}; !request.input.path.empty() &&
                                   ::stat(request.input.path.c_str(), &st) == 0 &&
                                   S_ISREG(st.st_mode)) {
        // Only a regular file: opening a FIFO here would block create_task
        // (the host's thread) until a writer came.
        std::ifstream in(request.input.path, std::ios::binary);
        head.resize(1 << 20);
        in.read(reinterpret_cast<char*>(head.data()), static_cast<std::streamsize>(head.size()));
        head.resize(static_cast<std::size_t>(std::max<std::streamsize>(0, in.gcount())));
      }
      l_int32 format = 0, w = 0, h = 0, bps = 0, spp = 0, iscmap = 0;
      std::int64_t pw = 0, ph = 0;
      if (ocr::is_pdf(head.data(), head.size())) {
        pdf_features(request, &f);
      } else if (is_tiff(head)) {
        // Every directory of a TIFF is a page: the batch the estimate holds
        // is min(batch_size, pages) of them. Counted by walking the
        // directories (libtiff reads their headers only), the largest page
        // measured from the first 1 MB as any image.
        tiff_pages(request, &f);
        if (pixReadHeaderMem(head.data(), head.size(), &format, &w, &h, &bps, &spp, &iscmap) == 0) {
          f.pixels = static_cast<std::int64_t>(w) * h;
        }
      } else if (ocr::png_size(head.data(), head.size(), &pw, &ph)) {
        // Straight from IHDR: a PNG cut after its header (or a decompression
        // bomb) still gets the estimate its declared size deserves.
        f.pixels = pw * ph;
      } else if (!head.empty() && pixReadHeaderMem(head.data(), head.size(), &format, &w, &h, &bps,
                                                   &spp, &iscmap) == 0) {
        f.pixels = static_cast<std::int64_t>(w) * h;
      }
    } catch (...) {
      // features are a hint: unreadable input is reported when the task runs
    }
    return f;
  }
  double estimate_mb(const RequestFeatures& f) const override {
    const double batch =
        static_cast<double>(std::max<std::int64_t>(1, std::min(f.batch_size, f.pages)));
    // A page over the pixel limit is refused by process() from its header,
    // before any decoding: it costs no more than its bytes (and so fails
    // INVALID_INPUT when it runs, rather than finding no device).
    const std::int64_t pixels = f.pixels > config_.max_pixels ? 0 : f.pixels;
    // gray 8-bit page + cv copy + Tesseract's own page structures (~8 bytes/px)
    const double per_page = static_cast<double>(pixels) * 10.0 / (1024.0 * 1024.0) + 2;
    return 40 + batch * per_page + static_cast<double>(f.bytes) / (1024.0 * 1024.0);
  }

 private:
  static bool is_tiff(const std::vector<std::uint8_t>& h) {
    return h.size() >= 4 && ((h[0] == 'I' && h[1] == 'I' && h[2] == 42 && h[3] == 0) ||
                             (h[0] == 'M' && h[1] == 'M' && h[2] == 0 && h[3] == 42));
  }

  // A TIFF's pages, as the task's "page"/"pages" options select them.
  void tiff_pages(const TaskCreateRequest& request, RequestFeatures* f) const {
    TaskOptions opt;
    try {
      opt = parse_options(request.options_json, config_);
    } catch (...) {
      return;  // the task fails INVALID_INPUT when it runs
    }
    std::FILE* fp = request.input.data.empty()
                        ? std::fopen(request.input.path.c_str(), "rb")
                        : fmemopen(const_cast<std::uint8_t*>(request.input.data.data()),
                                   request.input.data.size(), "rb");
    if (fp == nullptr) return;
    l_int32 n = 0;
    const bool ok = tiffGetCount(fp, &n) == 0;
    std::fclose(fp);
    if (!ok || n < 1) return;
    const int first = std::max(1, opt.first_page);
    const int last = std::min<int>(n, opt.last_page > 0 ? opt.last_page : 1 << 30);
    f->pages = std::max(1, last - first + 1);
  }

  // A PDF: the largest of the task's pages at the task's resolution (poppler
  // reads the page boxes, nothing is rendered), and how many pages it has.
  void pdf_features(const TaskCreateRequest& request, RequestFeatures* f) const {
    TaskOptions opt;
    try {
      opt = parse_options(request.options_json, config_);
    } catch (...) {
      return;  // the task fails INVALID_INPUT when it runs
    }
    const std::unique_ptr<ocr::Document> doc =
        request.input.data.empty() ? ocr::Document::open_file(request.input.path, opt.dpi)
                                   : ocr::Document::open(request.input.data, "the input", opt.dpi);
    const int first = std::max(1, opt.first_page);
    const int last = std::min(doc->page_count(), opt.last_page > 0 ? opt.last_page : 1 << 30);
    f->pages = std::max(1, last - first + 1);
    // At most the first 1000 pages are measured: a hint, kept cheap.
    for (int p = first; p <= last && p < first + 1000; ++p) {
      std::int64_t w = 0, h = 0;
      doc->page_size(p, &w, &h);
      f->pixels = std::max(f->pixels, w * h);
    }
  }

  OcrConfig config_;
};

class OcrFactory final : public ServiceFactory, public detail::InputRequirement {
 public:
  bool needs_input() const override { return true; }  // a page to read
  explicit OcrFactory(OcrConfig config) : config_(std::move(config)) {
    check_languages(config_);
    // Leptonica, libtiff and poppler: no stderr noise about corrupt inputs
    // (process-wide; the failure is the task's INVALID_INPUT with its reason).
    ocr::silence_decoders();
  }

  // Every language asked for has its model in the tessdata directory:
  // Tesseract itself would print to stderr and fail every engine (or, for
  // "eng+xyz", leave xyz out without a word).
  static void check_languages(const OcrConfig& c) {
    const std::string dir = find_tessdata(c.tessdata_path);
    if (dir.empty()) return;  // no directory to look in: Init reports it
    std::string installed;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".traineddata") {
        installed += (installed.empty() ? "" : ", ") + e.path().stem().string();
      }
    }
    std::size_t at = 0;
    while (at <= c.languages.size()) {
      const std::size_t plus = std::min(c.languages.find('+', at), c.languages.size());
      const std::string lang = c.languages.substr(at, plus - at);
      if (lang.empty() || lang.find('/') != std::string::npos ||
          !std::filesystem::exists(std::filesystem::path(dir) / (lang + ".traineddata"), ec)) {
        throw ConfigError("ocr.languages", 0,
                          "ocr.languages: no language data for '" + lang + "' in " + dir +
                              " (installed: " + (installed.empty() ? "none" : installed) +
                              "; Debian: apt-get install tesseract-ocr-<lang>)");
      }
      at = plus + 1;
    }
  }
  std::string kind() const override { return "ocr"; }
  std::unique_ptr<Service> create(const std::string& device) override {
    return std::make_unique<OcrService>(config_, device);
  }
  bool supports(const DeviceInfo& device) const override { return device.kind == DeviceKind::kCpu; }
  std::shared_ptr<const MemoryModel> memory_model() const override { return model_; }

 private:
  OcrConfig config_;
  std::shared_ptr<const MemoryModel> model_ = std::make_shared<OcrMemoryModel>(config_);
};

}  // namespace

namespace {
std::string normalize_spaces(std::string_view s) {
  std::string out;
  bool space = false;
  for (const unsigned char c : s) {
    if (std::isspace(c)) {
      space = !out.empty();
    } else {
      if (space) out += ' ';
      space = false;
      out += static_cast<char>(c);
    }
  }
  return out;
}
}  // namespace

double character_error_rate(std::string_view text, std::string_view truth) {
  const std::string a = normalize_spaces(text), b = normalize_spaces(truth);
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      cur[j] =
          std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return b.empty() ? 0 : static_cast<double>(prev[b.size()]) / static_cast<double>(b.size());
}

std::shared_ptr<ServiceFactory> make_ocr_service(OcrConfig config) {
  return std::make_shared<OcrFactory>(std::move(config));
}

}  // namespace taskmgr
