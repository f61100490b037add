// The built-in OCR service: Leptonica decodes, OpenCV preprocesses,
// Tesseract recognizes, on an engine initialised once per instance.
#include <leptonica/allheaders.h>
#include <dlfcn.h>
#include <omp.h>
#include <sys/stat.h>
#include <tesseract/baseapi.h>
#include <tesseract/ocrclass.h>
#include <tesseract/resultiterator.h>

#include <algorithm>
#include <cctype>
#include <cstdarg>
#include <boost/json.hpp>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <mutex>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#include <sstream>

#include "taskmgr/device.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/ocr.hpp"

namespace taskmgr {
namespace {

namespace json = boost::json;

constexpr std::int64_t kMaxSide = 32767;  // Tesseract's limit per side

struct PixDeleter {
  void operator()(Pix* p) const noexcept {
    if (p != nullptr) pixDestroy(&p);
  }
};
using PixPtr = std::unique_ptr<Pix, PixDeleter>;

struct TextDeleter {
  void operator()(char* p) const noexcept { delete[] p; }
};
using TextPtr = std::unique_ptr<char[], TextDeleter>;

std::string find_tessdata(const std::string& configured) {
  if (!configured.empty()) return configured;
  if (const char* env = std::getenv("TESSDATA_PREFIX"); env != nullptr && *env != '\0') return env;
  for (const char* dir : {"/usr/share/tesseract-ocr/5/tessdata", "/usr/share/tesseract-ocr/4.00/tessdata",
                          "/usr/share/tessdata"}) {
    struct stat st {};
    if (::stat(dir, &st) == 0) return dir;
  }
  return "";
}

// Options of one task, over the service's defaults.
struct TaskOptions {
  int psm = 3;
  std::string output = "text";
  bool words = true;
  PreprocessConfig pre;
};

TaskOptions parse_options(const std::string& text, const OcrConfig& defaults) {
  TaskOptions o;
  o.psm = defaults.page_segmentation_mode;
  o.pre = defaults.preprocess;
  if (text.empty()) return o;
  boost::system::error_code ec;
  const json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) throw InvalidInputError("options are not a JSON object");
  const auto& obj = v.as_object();
  auto get_bool = [](const json::value& x, const char* what) {
    if (!x.is_bool()) throw InvalidInputError(std::string("option ") + what + " must be true or false");
    return x.as_bool();
  };
  auto get_int = [](const json::value& x, const char* what, int lo, int hi) {
    if (!x.is_int64() || x.as_int64() < lo || x.as_int64() > hi) {
      throw InvalidInputError(std::string("option ") + what + " must be an integer in [" +
                              std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return static_cast<int>(x.as_int64());
  };
  for (const auto& [key, val] : obj) {
    if (key == "psm") {
      o.psm = get_int(val, "psm", 0, 13);
    } else if (key == "output") {
      if (!val.is_string() || (val.as_string() != "text" && val.as_string() != "hocr" &&
                               val.as_string() != "tsv")) {
        throw InvalidInputError("option output must be \"text\", \"hocr\" or \"tsv\"");
      }
      o.output = std::string(val.as_string());
    } else if (key == "words") {
      o.words = get_bool(val, "words");
    } else if (key == "preprocess") {
      if (!val.is_object()) throw InvalidInputError("option preprocess must be an object");
      for (const auto& [pk, pv] : val.as_object()) {
        if (pk == "grayscale") o.pre.grayscale = get_bool(pv, "preprocess.grayscale");
        else if (pk == "binarize") o.pre.binarize = get_bool(pv, "preprocess.binarize");
        else if (pk == "deskew") o.pre.deskew = get_bool(pv, "preprocess.deskew");
        else if (pk == "target_dpi") o.pre.target_dpi = get_int(pv, "preprocess.target_dpi", 0, 1200);
        else throw InvalidInputError("unknown option preprocess." + std::string(pk));
      }
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
  if (::stat(in.path.c_str(), &st) != 0) throw InvalidInputError("cannot read " + in.path + ": no such file");
  if (S_ISDIR(st.st_mode)) throw InvalidInputError("cannot read " + in.path + ": it is a directory");
  std::ifstream f(in.path, std::ios::binary);
  if (!f) throw InvalidInputError("cannot open " + in.path);
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
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

// The width and height a PNG declares in its first chunk (IHDR), read
// without a decoder; nullopt when the bytes are not a PNG.
std::optional<std::pair<std::int64_t, std::int64_t>> png_size(const std::uint8_t* p, std::size_t n) {
  if (n < 24 || std::memcmp(p, "\x89PNG\r\n\x1a\n", 8) != 0 || std::memcmp(p + 12, "IHDR", 4) != 0) {
    return std::nullopt;
  }
  auto be32 = [&](std::size_t at) {
    return static_cast<std::int64_t>((std::uint32_t{p[at]} << 24) | (std::uint32_t{p[at + 1]} << 16) |
                                     (std::uint32_t{p[at + 2]} << 8) | std::uint32_t{p[at + 3]});
  };
  return std::make_pair(be32(16), be32(20));
}

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
  }

  void process(TaskContext& ctx) override {
    limit_openmp();
    const TaskOptions opt = parse_options(ctx.options_json(), config_);
    ctx.stage("load");
    const std::vector<std::uint8_t> bytes = read_input(ctx.input());
    l_int32 format = 0, w = 0, h = 0, bps = 0, spp = 0, iscmap = 0;
    // PNG declares its size in the first chunk: check it before any decoder
    // (a 100000x100000 header must not get as far as an allocation).
    if (const auto png = png_size(bytes.data(), bytes.size())) {
      check_size(png->first, png->second, ctx.input());
    }
    if (pixReadHeaderMem(bytes.data(), bytes.size(), &format, &w, &h, &bps, &spp, &iscmap) != 0 ||
        w <= 0 || h <= 0) {
      throw InvalidInputError("not a readable image (PNG, JPEG, TIFF, BMP or WebP): " +
                              describe(ctx.input()));
    }
    check_size(w, h, ctx.input());
    const bool tiff = L_FORMAT_IS_TIFF(format);
    json::array pages;
    std::string all_text;
    double conf_sum = 0;
    int page_no = 0;
    const int batch = std::max(1, ctx.batch_size());
    bool more = true;
    while (more) {
      // Decode up to batch_size pages, then recognize them: the batch is what
      // an out-of-memory retry shrinks.
      std::vector<PixPtr> held;
      for (int i = 0; i < batch; ++i) {
        if (tiff && page_no + i > 0) {
          // Each further page of a TIFF declares its own size: check it first.
          l_int32 pw = 0, ph = 0, pbps = 0, pspp = 0, pres = 0, pcmap = 0, pformat = 0;
          if (readHeaderMemTiff(bytes.data(), bytes.size(), page_no + i, &pw, &ph, &pbps, &pspp,
                                &pres, &pcmap, &pformat) != 0) {
            more = false;  // no such page: the document ended
            break;
          }
          check_size(pw, ph, ctx.input(), page_no + i + 1);
        }
        PixPtr pix(tiff ? pixReadMemTiff(bytes.data(), bytes.size(), page_no + i)
                        : (page_no + i == 0 ? pixReadMem(bytes.data(), bytes.size()) : nullptr));
        if (!pix) {
          more = false;
          break;
        }
        held.push_back(std::move(pix));
      }
      if (held.empty() && page_no == 0) {
        throw InvalidInputError("cannot decode the image (truncated or corrupt): " + describe(ctx.input()));
      }
      std::int64_t held_bytes = static_cast<std::int64_t>(bytes.size());
      for (const auto& p : held) {
        held_bytes += static_cast<std::int64_t>(pixGetWpl(p.get())) * 4 * pixGetHeight(p.get());
      }
      ctx.report_memory(std::max<std::int64_t>(1, held_bytes >> 20) + engine_mb());
      for (auto& pix : held) {
        ctx.throw_if_cancelled();
        ++page_no;
        pages.push_back(recognize(ctx, opt, pix.get(), page_no, held_bytes));
        const auto& pg = pages.back().as_object();
        all_text += std::string(pg.at("text").as_string());
        conf_sum += pg.at("mean_confidence").as_double();
      }
      if (!tiff) more = false;
    }
    json::object result;
    result["text"] = all_text;
    result["mean_confidence"] = pages.empty() ? 0.0 : conf_sum / static_cast<double>(pages.size());
    result["pages"] = std::move(pages);
    ctx.set_result(json::serialize(result));
  }

  void cleanup_task(const std::string&) noexcept override {
    try {
      api_.Clear();
    } catch (...) {
    }
  }

 private:
  // Before any decoding: a page's declared size against Tesseract's limit per
  // side and ocr.max_pixels.
  void check_size(std::int64_t w, std::int64_t h, const TaskInput& in, int page = 1) const {
    const std::string what = "page " + std::to_string(page) + " of " + std::to_string(w) + "x" +
                             std::to_string(h) + " pixels";
    if (w > kMaxSide || h > kMaxSide) {
      throw InvalidInputError(what + " exceeds Tesseract's limit of " + std::to_string(kMaxSide) +
                              " pixels per side: " + describe(in));
    }
    if (w * h > config_.max_pixels) {
      throw InvalidInputError(what + " exceeds ocr.max_pixels = " +
                              std::to_string(config_.max_pixels) + ": " + describe(in));
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

  json::object recognize(TaskContext& ctx, const TaskOptions& opt, Pix* pix, int page_no,
                         std::int64_t held_bytes) {
    ctx.stage("preprocess");
    const int width = static_cast<int>(pixGetWidth(pix));
    const int height = static_cast<int>(pixGetHeight(pix));
    int dpi = static_cast<int>(pixGetXRes(pix));
    cv::Mat img;
    const bool need_cv = opt.pre.grayscale || opt.pre.binarize || opt.pre.deskew ||
                         (opt.pre.target_dpi > 0 && dpi > 0 && dpi < opt.pre.target_dpi);
    if (need_cv) {
      img = to_gray_mat(pix);
      if (opt.pre.target_dpi > 0 && dpi > 0 && dpi < opt.pre.target_dpi) {
        const double f = std::min(4.0, static_cast<double>(opt.pre.target_dpi) / dpi);
        cv::resize(img, img, cv::Size(), f, f, cv::INTER_CUBIC);
        dpi = static_cast<int>(std::lround(dpi * f));
      }
      if (opt.pre.deskew) {
        const double angle = estimate_skew_degrees(img);
        if (std::abs(angle) > 0.3 && std::abs(angle) < 10) {
          const cv::Mat rot =
              cv::getRotationMatrix2D(cv::Point2f(img.cols / 2.0f, img.rows / 2.0f), angle, 1.0);
          cv::warpAffine(img, img, rot, img.size(), cv::INTER_LINEAR, cv::BORDER_CONSTANT,
                         cv::Scalar(255));
        }
      }
      if (opt.pre.binarize) cv::threshold(img, img, 0, 255, cv::THRESH_BINARY | cv::THRESH_OTSU);
      ctx.report_memory(std::max<std::int64_t>(
          1, (held_bytes + static_cast<std::int64_t>(img.total())) >> 20) + engine_mb());
    }

    ctx.stage("recognize");
    api_.SetPageSegMode(static_cast<tesseract::PageSegMode>(opt.psm));
    if (need_cv) {
      api_.SetImage(img.data, img.cols, img.rows, 1, static_cast<int>(img.step));
    } else {
      api_.SetImage(pix);
    }
    api_.SetSourceResolution(dpi > 0 ? dpi : 300);
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
      throw TaskError(TaskFailureReason::kProcessingError, "Tesseract could not recognize page " +
                                                               std::to_string(page_no));
    }
    json::object page;
    page["page"] = page_no;
    page["width"] = width;
    page["height"] = height;
    page["dpi"] = dpi;
    TextPtr text(api_.GetUTF8Text());
    page["text"] = text ? text.get() : "";
    page["mean_confidence"] = static_cast<double>(api_.MeanTextConf());
    if (opt.words) {
      json::array words;
      std::unique_ptr<tesseract::ResultIterator> it(api_.GetIterator());
      if (it) {
        do {
          TextPtr word(it->GetUTF8Text(tesseract::RIL_WORD));
          if (!word) continue;
          int x1 = 0, y1 = 0, x2 = 0, y2 = 0;
          it->BoundingBox(tesseract::RIL_WORD, &x1, &y1, &x2, &y2);
          words.push_back(json::object{{"text", word.get()},
                                       {"confidence", static_cast<double>(it->Confidence(tesseract::RIL_WORD))},
                                       {"box", json::array{x1, y1, x2 - x1, y2 - y1}}});
        } while (it->Next(tesseract::RIL_WORD));
      }
      page["words"] = std::move(words);
    }
    if (opt.output == "hocr") {
      TextPtr hocr(api_.GetHOCRText(page_no - 1));
      page["hocr"] = hocr ? hocr.get() : "";
    } else if (opt.output == "tsv") {
      TextPtr tsv(api_.GetTSVText(page_no - 1));
      page["tsv"] = tsv ? tsv.get() : "";
    }
    return page;
  }

  OcrConfig config_;
  std::string tessdata_;
  tesseract::TessBaseAPI api_;
};

// Memory model: the engine, plus per page held at once its decoded pixels
// (bytes per pixel from the header) and the preprocessing copies.
class OcrMemoryModel final : public MemoryModel {
 public:
  explicit OcrMemoryModel(std::int64_t max_pixels) : max_pixels_(max_pixels) {}
  std::string name() const override { return "ocr"; }
  RequestFeatures features(const TaskCreateRequest& request) const override {
    RequestFeatures f = MemoryModel::features(request);
    std::vector<std::uint8_t> head;
    try {
      if (!request.input.data.empty()) {
        head.assign(request.input.data.begin(),
                    request.input.data.begin() +
                        static_cast<std::ptrdiff_t>(std::min<std::size_t>(request.input.data.size(), 1 << 20)));
      } else if (!request.input.path.empty()) {
        std::ifstream in(request.input.path, std::ios::binary);
        head.resize(1 << 20);
        in.read(reinterpret_cast<char*>(head.data()), static_cast<std::streamsize>(head.size()));
        head.resize(static_cast<std::size_t>(std::max<std::streamsize>(0, in.gcount())));
      }
      l_int32 format = 0, w = 0, h = 0, bps = 0, spp = 0, iscmap = 0;
      if (const auto png = png_size(head.data(), head.size())) {
        // Straight from IHDR: a PNG cut after its header (or a decompression
        // bomb) still gets the estimate its declared size deserves.
        f.pixels = png->first * png->second;
      } else if (!head.empty() &&
                 pixReadHeaderMem(head.data(), head.size(), &format, &w, &h, &bps, &spp, &iscmap) == 0) {
        f.pixels = static_cast<std::int64_t>(w) * h;
      }
    } catch (...) {
      // features are a hint: unreadable input is reported when the task runs
    }
    return f;
  }
  double estimate_mb(const RequestFeatures& f) const override {
    const double batch = static_cast<double>(std::max<std::int64_t>(1, std::min(f.batch_size, f.pages)));
    // A page over the pixel limit is refused by process() from its header,
    // before any decoding: it costs no more than its bytes (and so fails
    // INVALID_INPUT when it runs, rather than finding no device).
    const std::int64_t pixels = f.pixels > max_pixels_ ? 0 : f.pixels;
    // gray 8-bit page + cv copy + Tesseract's own page structures (~8 bytes/px)
    const double per_page = static_cast<double>(pixels) * 10.0 / (1024.0 * 1024.0) + 2;
    return 40 + batch * per_page + static_cast<double>(f.bytes) / (1024.0 * 1024.0);
  }

 private:
  std::int64_t max_pixels_;
};

// libtiff (loaded by Leptonica) prints warnings and errors about corrupt
// TIFFs to stderr ("Bad file: amount too big"); a library must not write to
// its host's stderr, and the failure is reported as the task's
// INVALID_INPUT anyway. The handlers are found at run time: there is no
// build dependency on libtiff's headers.
void silence_libtiff() {
  using Handler = void (*)(const char*, const char*, va_list);
  using SetHandler = Handler (*)(Handler);
  for (const char* name : {"TIFFSetWarningHandler", "TIFFSetErrorHandler"}) {
    if (void* sym = ::dlsym(RTLD_DEFAULT, name)) {
      reinterpret_cast<SetHandler>(sym)(nullptr);
    }
  }
}

class OcrFactory final : public ServiceFactory {
 public:
  explicit OcrFactory(OcrConfig config) : config_(std::move(config)) {
    static std::once_flag quiet;
    std::call_once(quiet, [] {
      // Leptonica and libtiff: no stderr noise about corrupt inputs (process-
      // wide; the failure is the task's INVALID_INPUT with its reason).
      setMsgSeverity(L_SEVERITY_NONE);
      leptSetStderrHandler([](const char*) {});
      silence_libtiff();
    });
  }
  std::string kind() const override { return "ocr"; }
  std::unique_ptr<Service> create(const std::string& device) override {
    return std::make_unique<OcrService>(config_, device);
  }
  bool supports(const DeviceInfo& device) const override { return device.kind == DeviceKind::kCpu; }
  std::shared_ptr<const MemoryModel> memory_model() const override { return model_; }

 private:
  OcrConfig config_;
  std::shared_ptr<const MemoryModel> model_ = std::make_shared<OcrMemoryModel>(config_.max_pixels);
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
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return b.empty() ? 0 : static_cast<double>(prev[b.size()]) / static_cast<double>(b.size());
}

std::shared_ptr<ServiceFactory> make_ocr_service(OcrConfig config) {
  return std::make_shared<OcrFactory>(std::move(config));
}

}  // namespace taskmgr
