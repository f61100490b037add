// The OCR service on real pages: the shared scanned pages (present in CI;
// skipped with a message when ../shared is absent) and pages the tests
// render themselves with text2image and DejaVu fonts (always).
#include <doctest/doctest.h>

#include <fcntl.h>
#include <leptonica/allheaders.h>
#include <omp.h>
#include <sys/stat.h>
#include <unistd.h>
#include <boost/json.hpp>

#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

#include "ocr/document.hpp"
#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const fs::path kShared = fs::path(TASKMGR_SHARED_DATA_DIR) / "ocr";

struct Ocr {
  Config config = test_config();
  std::unique_ptr<TaskManager> tm;
  // isolated: the engines run in worker processes (services.ocr.isolation).
  explicit Ocr(int workers = 1, bool isolated = false) {
    config.executor.worker_threads = workers;
    config.pools.devices["cpu"] = PoolSettings{0, workers, 30};
    if (isolated) {
      config.services["ocr"].isolation = "process";
      config.services["ocr"].worker_executable = TASKMGR_WORKER_EXECUTABLE;
    }
    TaskManagerOptions o;
    o.log_sink = [](LogLevel, std::string_view) {};
    tm = std::make_unique<TaskManager>(config, o);
  }
  Task run(TaskInput input, const std::string& options = "") {
    TaskCreateRequest r;
    r.service = "ocr";
    r.input = std::move(input);
    r.options_json = options;
    const Task t = tm->create_task(r);
    tm->start_task(t.id);
    auto done = tm->wait_task(t.id, 120s);
    REQUIRE(done.has_value());
    return *done;
  }
  Task run_path(const fs::path& p, const std::string& options = "") {
    TaskInput in;
    in.path = p.string();
    return run(in, options);
  }
};

json::object result_of(const Task& t) {
  REQUIRE(t.status == TaskStatus::kCompleted);
  return json::parse(t.result).as_object();
}

std::string text_of(const Task& t) { return std::string(result_of(t).at("text").as_string()); }

// Renders `text` with text2image at `dpi`; returns the .tif path.
fs::path render(const fs::path& dir, const std::string& name, const std::string& text, int dpi) {
  const fs::path txt = dir / (name + ".txt");
  std::ofstream(txt) << text;
  const std::string cmd =
      "text2image --text=" + txt.string() + " --outputbase=" + (dir / name).string() +
      " --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu"
      " --resolution=" +
      std::to_string(dpi) + " --ptsize=12 --margin=50 --xsize=" + std::to_string(dpi * 85 / 10) +
      " --ysize=" + std::to_string(dpi * 11) + " > /dev/null 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  const fs::path tif = dir / (name + ".tif");
  REQUIRE(fs::exists(tif));
  return tif;
}

// The signature and IHDR chunk (correct CRC) of a PNG declaring w x h
// 8-bit gray pixels, and nothing else.
std::string png_header(std::uint32_t w, std::uint32_t h) {
  std::string png("\x89PNG\r\n\x1a\n", 8);
  unsigned char ihdr[] = {'I', 'H', 'D', 'R', 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0};
  for (int k = 0; k < 4; ++k) {
    ihdr[4 + k] = static_cast<unsigned char>(w >> (24 - 8 * k));
    ihdr[8 + k] = static_cast<unsigned char>(h >> (24 - 8 * k));
  }
  std::uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char byte : ihdr) {
    crc ^= byte;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  crc ^= 0xFFFFFFFFu;
  png += std::string("\0\0\0\x0d", 4);
  png.append(reinterpret_cast<const char*>(ihdr), sizeof ihdr);
  for (int shift = 24; shift >= 0; shift -= 8) png += static_cast<char>((crc >> shift) & 0xFF);
  return png;
}

// An image-only PDF (one page per image, at the image's resolution), made
// by the project's own tools/img2pdf.
fs::path make_pdf(const fs::path& out, const std::vector<fs::path>& images) {
  std::string cmd = std::string(TASKMGR_IMG2PDF) + " " + out.string();
  for (const auto& i : images) cmd += " " + i.string();
  REQUIRE(std::system(cmd.c_str()) == 0);
  return out;
}

// Runs a shell command; returns its stdout, and its stderr in *err.
std::string run_command(const std::string& cmd, const fs::path& dir, std::string* err) {
  const fs::path out = dir / "cmd.out", errf = dir / "cmd.err";
  const int rc = std::system((cmd + " > " + out.string() + " 2> " + errf.string()).c_str());
  CHECK(rc == 0);
  if (err != nullptr) *err = slurp(errf);
  return slurp(out);
}

// Everything the process writes to stderr while it lives (fd 2, all threads).
class StderrCapture {
 public:
  explicit StderrCapture(fs::path file) : file_(std::move(file)) {
    std::fflush(stderr);
    saved_ = ::dup(2);
    const int fd = ::open(file_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    REQUIRE(fd >= 0);
    ::dup2(fd, 2);
    ::close(fd);
  }
  ~StderrCapture() { restore(); }
  std::string finish() {
    restore();
    return slurp(file_);
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, 2);
    ::close(saved_);
    saved_ = -1;
  }
  fs::path file_;
  int saved_ = -1;
};

// A page rendered by text2image, turned clockwise by quarter turns, as PNG.
fs::path rotated(const fs::path& tif, int quarter_turns, const fs::path& out) {
  Pix* pix = pixRead(tif.string().c_str());
  REQUIRE(pix != nullptr);
  Pix* turned = pixRotateOrth(pix, quarter_turns);
  REQUIRE(turned != nullptr);
  REQUIRE(pixWrite(out.string().c_str(), turned, IFF_PNG) == 0);
  pixDestroy(&turned);
  pixDestroy(&pix);
  return out;
}

const char* kRenderedText =
    "The quick brown fox jumps over the lazy dog.\n"
    "Pack my box with five dozen liquor jugs.\n"
    "Sphinx of black quartz, judge my vow: 1234567890.\n";

}  // namespace

TEST_CASE("phototest.tif and eurotext.tif match their ground truth") {
  if (!fs::exists(kShared / "phototest.tif")) {
    MESSAGE("skipped: " << kShared.string() << " is absent (the shared test pages)");
    return;
  }
  Ocr ocr;
  const Task photo = ocr.run_path(kShared / "phototest.tif");
  const double photo_cer = character_error_rate(text_of(photo), slurp(kShared / "phototest.txt"));
  MESSAGE("phototest.tif CER " << photo_cer * 100 << "%");
  CHECK(photo_cer <= 0.01);
  const Task euro = ocr.run_path(kShared / "eurotext.tif");
  const double euro_cer = character_error_rate(text_of(euro), slurp(kShared / "eurotext.txt"));
  MESSAGE("eurotext.tif CER " << euro_cer * 100 << "%");
  CHECK(euro_cer <= 0.05);
  const auto page = result_of(photo).at("pages").as_array().at(0).as_object();
  CHECK(page.at("width").as_int64() == 640);
  CHECK(page.at("height").as_int64() == 480);
  CHECK(page.at("mean_confidence").as_double() > 80);
  CHECK(page.at("words").as_array().size() > 20);
  CHECK(photo.actual_memory_mb.value_or(0) > 0);
  CHECK(photo.service_instance_id == "ocr@cpu#1");
  CHECK(euro.service_instance_id == "ocr@cpu#1");  // the same warm engine
  const auto samples = ocr.tm->get_task_samples(photo.id);
  std::vector<std::string> stages;
  for (const auto& s : samples) stages.push_back(s.processing_stage);
  CHECK(stages == std::vector<std::string>{"load", "preprocess", "recognize"});
}

TEST_CASE(
    "the upside-down page is read with low confidence without orientation detection, and right "
    "with it") {
  if (!fs::exists(kShared / "phototest-rotated-180.png")) {
    MESSAGE("skipped: " << kShared.string() << " is absent");
    return;
  }
  Ocr ocr;
  const Task upright = ocr.run_path(kShared / "phototest.tif");
  const Task rotated =
      ocr.run_path(kShared / "phototest-rotated-180.png", R"({"orientation":"off"})");
  const double up = result_of(upright).at("mean_confidence").as_double();
  const double down = result_of(rotated).at("mean_confidence").as_double();
  MESSAGE("mean confidence upright " << up << ", rotated 180 " << down);
  CHECK(down < 60);
  CHECK(down < up - 25);
  CHECK(character_error_rate(text_of(rotated), slurp(kShared / "phototest.txt")) > 0.3);
  // The default (ocr.orientation: auto) finds it doubtful, detects the
  // orientation and reads it turned back.
  const Task fixed = ocr.run_path(kShared / "phototest-rotated-180.png");
  CHECK(character_error_rate(text_of(fixed), slurp(kShared / "phototest.txt")) <= 0.01);
  const auto o = result_of(fixed).at("pages").as_array()[0].at("orientation");
  CHECK(o.at("angle").as_int64() == 180);
  CHECK(o.at("applied").as_bool());
}

TEST_CASE("pages rendered at 150 and 300 dpi are read back, from a path and from bytes") {
  TempDir dir;
  Ocr ocr;
  for (int dpi : {150, 300}) {
    CAPTURE(dpi);
    const fs::path tif = render(dir.path, "page" + std::to_string(dpi), kRenderedText, dpi);
    const Task by_path = ocr.run_path(tif);
    const double c = character_error_rate(text_of(by_path), kRenderedText);
    MESSAGE(dpi << " dpi rendered page CER " << c * 100 << "%");
    CHECK(c <= 0.02);
    TaskInput bytes;
    const std::string raw = slurp(tif);
    bytes.data.assign(raw.begin(), raw.end());
    const Task by_bytes = ocr.run(bytes);
    CHECK(text_of(by_bytes) == text_of(by_path));
  }
}

TEST_CASE("each page of a multi-page TIFF is a page of the task, batch_size pages at a time") {
  TempDir dir;
  const fs::path a = render(dir.path, "a", "First page says alpha.\n", 200);
  const fs::path b = render(dir.path, "b", "Second page says bravo.\n", 200);
  const fs::path c = render(dir.path, "c", "Third page says charlie.\n", 200);
  const fs::path multi = dir.path / "multi.tif";
  int i = 0;
  for (const auto& p : {a, b, c}) {
    Pix* pix = pixRead(p.string().c_str());
    REQUIRE(pix != nullptr);
    REQUIRE(pixWriteTiff(multi.string().c_str(), pix, IFF_TIFF_G4, i++ == 0 ? "w" : "a") == 0);
    pixDestroy(&pix);
  }
  Ocr ocr;
  TaskCreateRequest r;
  r.service = "ocr";
  r.input.path = multi.string();
  r.batch_size = 2;
  const Task t = ocr.tm->create_task(r);
  ocr.tm->start_task(t.id);
  const auto done = ocr.tm->wait_task(t.id, 120s);
  REQUIRE(done.has_value());
  const auto pages = result_of(*done).at("pages").as_array();
  REQUIRE(pages.size() == 3);
  CHECK(std::string(pages[0].at("text").as_string()).find("alpha") != std::string::npos);
  CHECK(std::string(pages[1].at("text").as_string()).find("bravo") != std::string::npos);
  CHECK(std::string(pages[2].at("text").as_string()).find("charlie") != std::string::npos);
  CHECK(pages[2].at("page").as_int64() == 3);
}

TEST_CASE("hOCR and TSV output on request") {
  TempDir dir;
  const fs::path tif = render(dir.path, "h", "Hello hOCR world.\n", 200);
  Ocr ocr;
  const auto hocr = result_of(ocr.run_path(tif, R"({"output":"hocr"})")).at("pages").as_array()[0];
  CHECK(std::string(hocr.at("hocr").as_string()).find("ocrx_word") != std::string::npos);
  const auto tsv =
      result_of(ocr.run_path(tif, R"({"output":"tsv","words":false})")).at("pages").as_array()[0];
  CHECK(std::string(tsv.at("tsv").as_string()).find("Hello") != std::string::npos);
  CHECK_FALSE(tsv.as_object().contains("words"));
  // hOCR's ocr_page names its image: the input's path; bytes are "unknown"
  // (on the same engine: the path read before does not show).
  const std::string named = std::string(hocr.at("hocr").as_string());
  CHECK(named.find("title='image \"" + tif.string() + "\"; bbox ") != std::string::npos);
  TaskInput bytes;
  const std::string raw = slurp(tif);
  bytes.data.assign(raw.begin(), raw.end());
  const auto from_bytes =
      result_of(ocr.run(bytes, R"({"output":"hocr"})")).at("pages").as_array()[0];
  CHECK(std::string(from_bytes.at("hocr").as_string()).find("title='image \"unknown\"; bbox ") !=
        std::string::npos);
  // A name with ';', '&' and a tab, on a rescaled page (its titles are
  // rewritten): the name intact, escaped; the tab as U+FFFD.
  const fs::path odd = dir.path / "a&b;c\td.tif";
  fs::copy_file(tif, odd);
  const auto scaled =
      result_of(ocr.run_path(odd, R"({"output":"hocr","preprocess":{"scale":2}})")).at("pages");
  const std::string odd_hocr(scaled.as_array()[0].at("hocr").as_string());
  CHECK(odd_hocr.find("title='image \"" +
                      (dir.path / "a&amp;b;c\xEF\xBF\xBD"
                                  "d.tif")
                          .string() +
                      "\"; bbox ") != std::string::npos);
}

TEST_CASE(
    "bad input fails INVALID_INPUT with a clear message: the next good page still reads on the "
    "same engine") {
  TempDir dir;
  const fs::path good = render(dir.path, "good", "Good page after a bad one.\n", 200);
  const std::string good_bytes = slurp(good);
  std::mt19937 rng(7);
  std::string random_bytes(4096, '\0');
  for (auto& ch : random_bytes) ch = static_cast<char>(rng());
  // A valid PNG header (correct CRC) that declares 100000 x 100000 pixels.
  const std::string huge_png = png_header(100000, 100000);
  // The good page as PNG and JPEG bytes, to truncate.
  auto encode = [&](int format) {
    Pix* pix = pixRead(good.string().c_str());
    REQUIRE(pix != nullptr);
    l_uint8* data = nullptr;
    size_t size = 0;
    REQUIRE(pixWriteMem(&data, &size, pix, format) == 0);
    std::string out(reinterpret_cast<const char*>(data), size);
    lept_free(data);
    pixDestroy(&pix);
    return out;
  };
  const std::string png = encode(IFF_PNG);
  const std::string jpeg = encode(IFF_JFIF_JPEG);
  struct Bad {
    const char* name;
    TaskInput input;
    const char* expect;
  };
  std::vector<Bad> bad;
  auto file = [&](const char* name, const std::string& content) {
    const fs::path p = dir.path / name;
    std::ofstream(p, std::ios::binary) << content;
    TaskInput in;
    in.path = p.string();
    return in;
  };
  bad.push_back({"zero bytes", file("empty.png", ""), "empty"});
  bad.push_back(
      {"truncated TIFF", file("trunc.tif", good_bytes.substr(0, good_bytes.size() / 3)), "image"});
  bad.push_back({"truncated PNG", file("trunc.png", png.substr(0, png.size() / 2)), "image"});
  bad.push_back({"truncated JPEG", file("trunc.jpg", jpeg.substr(0, jpeg.size() / 2)), "image"});
  bad.push_back({"random bytes", file("noise.png", random_bytes), "not a readable image"});
  bad.push_back({"huge header", file("huge.png", huge_png), "exceeds"});
  TaskInput missing;
  missing.path = (dir.path / "missing.png").string();
  bad.push_back({"a missing path", missing, "no such file"});
  Ocr ocr;
  // Paths that are no regular file are refused by create_task itself, found
  // by stat() alone: a FIFO opened for reading would wait for a writer, a
  // device never ends, a /proc file says size 0.
  const std::string fifo = (dir.path / "pipe.png").string();
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  const std::pair<std::string, const char*> refused[] = {
      {dir.path.string(), "is a directory"},
      {"/dev/zero", "is a character device"},
      {fifo, "is a FIFO"},
      {"/proc/self/status", "is a file of /proc"},
      {"/sys/kernel/mm/transparent_hugepage/enabled", "is a file of /sys"},
  };
  for (const auto& r : refused) {
    const std::string& path = r.first;  // not a structured binding: CAPTURE is a lambda
    const char* says = r.second;
    CAPTURE(path);
    if (!fs::exists(path)) continue;  // a /sys file this kernel lacks
    TaskInput in;
    in.path = path;
    try {
      ocr.run(in);
      FAIL("expected kInvalidArgument");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kInvalidArgument);
      CHECK(std::string(e.what()).find(says) != std::string::npos);
    }
  }
  for (const auto& b : bad) {
    const std::string name = b.name;
    CAPTURE(name);
    const Task t = ocr.run(b.input);
    CAPTURE(t.failure_message);
    CHECK(t.status == TaskStatus::kFailed);
    CHECK(t.failure_reason == TaskFailureReason::kInvalidInput);
    CHECK(t.failure_message.find(b.expect) != std::string::npos);
    const Task ok = ocr.run_path(good);
    CHECK(text_of(ok).find("Good page after a bad one") != std::string::npos);
    CHECK(ok.service_instance_id == "ocr@cpu#1");
  }
}

TEST_CASE(
    "the OCR estimate reads a PNG's declared size from its header, and a page over the pixel limit "
    "costs only its bytes") {
  const auto model = make_ocr_service(OcrConfig{})->memory_model();
  REQUIRE(model != nullptr);
  TaskCreateRequest req;
  const std::string header = png_header(5000, 4000);  // cut after its header
  req.input.data.assign(header.begin(), header.end());
  const RequestFeatures f = model->features(req);
  CHECK(f.pixels == 20'000'000);
  const double mb = model->estimate_mb(f);
  CHECK(mb > 150);  // ~10 bytes per pixel
  CHECK(mb < 400);
  // 100000 x 100000 is refused from its header before any decoding: it is
  // estimated at its bytes, so it runs (and fails INVALID_INPUT) instead of
  // finding no device.
  const std::string bomb = png_header(100000, 100000);
  req.input.data.assign(bomb.begin(), bomb.end());
  CHECK(model->estimate_mb(model->features(req)) < 60);
}

TEST_CASE(
    "a page past its deadline ends TIMEOUT (Tesseract's monitor stops it) and the engine reads the "
    "next page") {
  TempDir dir;
  const fs::path page = render(dir.path, "deadline", kRenderedText, 300);
  Ocr ocr;
  const Task late = ocr.run_path(page, R"({"timeout_seconds":0.002})");
  CHECK(late.status == TaskStatus::kFailed);
  CHECK(late.failure_reason == TaskFailureReason::kTimeout);
  CHECK(late.failure_message.find("deadline") != std::string::npos);
  const Task next = ocr.run_path(page, R"({"timeout_seconds":60})");
  INFO(next.failure_message);
  REQUIRE(next.status == TaskStatus::kCompleted);
  CHECK(character_error_rate(text_of(next), kRenderedText) <= 0.02);
  CHECK(next.service_instance_id == late.service_instance_id);  // it stopped cleanly: kept
}

TEST_CASE("pages over ocr.max_pixels or 32767 pixels a side fail INVALID_INPUT from their header") {
  Config c = test_config();
  c.executor.worker_threads = 1;
  c.ocr.max_pixels = 100'000;
  TaskManagerOptions o;
  o.log_sink = [](LogLevel, std::string_view) {};
  TaskManager tm(c, o);
  auto run = [&](const std::string& bytes) {
    TaskCreateRequest r;
    r.input.data.assign(bytes.begin(), bytes.end());
    const Task t = tm.create_task(r);
    tm.start_task(t.id);
    return *tm.wait_task(t.id, 60s);
  };
  const Task budget = run(png_header(400, 300));  // 120,000 px
  CHECK(budget.failure_reason == TaskFailureReason::kInvalidInput);
  CHECK(budget.failure_message.find("400x300 pixels exceeds ocr.max_pixels = 100000") !=
        std::string::npos);
  const Task side = run(png_header(40000, 2));  // 80,000 px, but too wide
  CHECK(side.failure_reason == TaskFailureReason::kInvalidInput);
  CHECK(side.failure_message.find("32767 pixels per side") != std::string::npos);
  // Within both: decoded (and, being only a header, found truncated).
  const Task small = run(png_header(100, 100));
  CHECK(small.failure_reason == TaskFailureReason::kInvalidInput);
  CHECK(small.failure_message.find("exceeds") == std::string::npos);
}

TEST_CASE("ocr.languages without their language data is a ConfigError naming the key") {
  for (const std::string langs : {"xyz", "eng+xyz", "eng+", "../eng"}) {
    CAPTURE(langs);
    OcrConfig c;
    c.languages = langs;
    try {
      make_ocr_service(c);
      FAIL("accepted");
    } catch (const ConfigError& e) {
      CHECK(e.code() == ErrorCode::kInvalidConfig);
      CHECK(e.key_path() == "ocr.languages");
      CHECK(std::string(e.what()).find("no language data for") != std::string::npos);
      CHECK(std::string(e.what()).find("installed: ") != std::string::npos);
    }
  }
  OcrConfig ok;
  ok.languages = "eng";
  CHECK_NOTHROW(make_ocr_service(ok));
  // Through the manager, which makes the built-in service when it opens.
  Config c;
  c.storage.path = ":memory:";
  c.ocr.languages = "xyz";
  CHECK_THROWS_AS(TaskManager{c}, ConfigError);
}

TEST_CASE("bad OCR options are INVALID_INPUT") {
  TempDir dir;
  const fs::path tif = render(dir.path, "o", "Options.\n", 150);
  Ocr ocr;
  for (const std::string opt :
       {R"({"psm":99})", R"({"output":"docx"})", R"({"nope":1})",
        R"({"preprocess":{"target_dpi":"x"}})", R"({"dpi":71})", R"({"dpi":1201})",
        R"({"dpi":"300"})", R"({"page":0})", R"({"page":1.5})", R"({"page":"1"})",
        R"({"pages":[2,1]})", R"({"pages":[1]})", R"({"pages":[1,"2"]})", R"({"pages":1})",
        R"({"page":1,"pages":[1,1]})", R"({"orientation":"sideways"})",
        R"({"orientation":true})"}) {
    CAPTURE(opt);
    const Task t = ocr.run_path(tif, opt);
    CHECK(t.status == TaskStatus::kFailed);
    CHECK(t.failure_reason == TaskFailureReason::kInvalidInput);
  }
}

TEST_CASE("the OpenMP limit stays on the workers: the host thread keeps its own setting") {
  TempDir dir;
  const fs::path tif = render(dir.path, "omp", "OpenMP check.\n", 150);
  const int before = omp_get_max_active_levels();
  Ocr ocr;
  CHECK(text_of(ocr.run_path(tif)).find("OpenMP") != std::string::npos);
  CHECK(omp_get_max_active_levels() == before);
}

TEST_CASE("character_error_rate: edit distance over the truth's length, whitespace normalised") {
  CHECK(character_error_rate("hello world", "hello world") == 0.0);
  CHECK(character_error_rate("  hello \n\n world ", "hello world") == 0.0);
  CHECK(character_error_rate("hallo world", "hello world") == doctest::Approx(1.0 / 11));
  CHECK(character_error_rate("hello", "hello world") == doctest::Approx(6.0 / 11));
  CHECK(character_error_rate("", "abcd") == 1.0);
  CHECK(character_error_rate("anything", "") == 0.0);
}

namespace {

const char* kSecondPageText =
    "Second page of the document.\n"
    "How vexingly quick daft zebras jump!\n"
    "The five boxing wizards jump quickly.\n";

// Two pages rendered at 300 dpi (US letter) and an image-only PDF of them.
struct TwoPagePdf {
  fs::path first, second, pdf;
  explicit TwoPagePdf(const fs::path& dir) {
    first = render(dir, "pdfpage1", kRenderedText, 300);
    second = render(dir, "pdfpage2", kSecondPageText, 300);
    pdf = make_pdf(dir / "two.pdf", {first, second});
  }
};

}  // namespace

TEST_CASE("a PDF's pages are rendered at the task's dpi and read, from a path and from bytes") {
  TempDir dir;
  const TwoPagePdf doc(dir.path);
  Ocr ocr;
  const Task t = ocr.run_path(doc.pdf);
  const auto r = result_of(t);
  const auto& pages = r.at("pages").as_array();
  REQUIRE(pages.size() == 2);
  for (int i = 0; i < 2; ++i) {
    const auto& p = pages[i].as_object();
    CHECK(p.at("page").as_int64() == i + 1);
    CHECK(p.at("dpi").as_int64() == 300);  // ocr.pdf_dpi
    CHECK(p.at("width").as_int64() == 2550);
    CHECK(p.at("height").as_int64() == 3300);
  }
  const double c1 = character_error_rate(pages[0].at("text").as_string(), kRenderedText);
  const double c2 = character_error_rate(pages[1].at("text").as_string(), kSecondPageText);
  MESSAGE("PDF page CER " << c1 * 100 << "%, " << c2 * 100 << "%");
  CHECK(c1 <= 0.02);
  CHECK(c2 <= 0.02);
  TaskInput bytes;
  const std::string raw = slurp(doc.pdf);
  bytes.data.assign(raw.begin(), raw.end());
  CHECK(text_of(ocr.run(bytes)) == text_of(t));

  // "dpi" renders at another resolution; "page" and "pages" select pages,
  // numbered as in the document.
  const auto low = result_of(ocr.run_path(doc.pdf, R"({"dpi":150,"page":2})"));
  REQUIRE(low.at("pages").as_array().size() == 1);
  const auto& p2 = low.at("pages").as_array()[0].as_object();
  CHECK(p2.at("page").as_int64() == 2);
  // Rendered at 150 (the page's resolution, known), read 2x rescaled
  // (ocr.preprocess.target_dpi 300).
  CHECK(p2.at("dpi").as_int64() == 150);
  CHECK(p2.at("dpi_source").as_string() == "file");
  CHECK(p2.at("preprocess").at("scale").to_number<double>() == 2);
  CHECK(p2.at("width").as_int64() == 1275);
  CHECK(p2.at("height").as_int64() == 1650);
  CHECK(std::string(p2.at("text").as_string()).find("zebras") != std::string::npos);
  const auto raw150 = result_of(
      ocr.run_path(doc.pdf, R"({"dpi":150,"pages":[1,1],"preprocess":{"target_dpi":0}})"));
  CHECK(raw150.at("pages").as_array()[0].at("dpi").as_int64() == 150);
  CHECK(raw150.at("pages").as_array()[0].at("page").as_int64() == 1);
  const auto both = result_of(ocr.run_path(doc.pdf, R"({"pages":[1,2]})"));
  CHECK(both.at("pages").as_array().size() == 2);
}

// Each test case runs in a process of its own (doctest_discover_tests), so
// these are the process's first PDF renders: poppler sets a process-wide
// colour profile on its first render, with no lock, and two first renders
// at once raced on it (ThreadSanitizer, in the tsan preset: a profile made
// by one thread was freed by the other).
TEST_CASE("two PDFs rendered at once as the process's first renders") {
  TempDir dir;
  const TwoPagePdf doc(dir.path);
  std::mutex m;
  std::condition_variable cv;
  int ready = 0;
  std::vector<std::string> failures(2);
  std::vector<std::int64_t> widths(2, 0);
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      try {
        const auto d = ocr::Document::open_file(doc.pdf.string(), 100 + 50 * i);
        {
          std::unique_lock<std::mutex> lock(m);
          ++ready;
          cv.notify_all();
          cv.wait(lock, [&] { return ready == 2; });
        }
        const ocr::PixPtr pix = d->load(i + 1);
        widths[i] = pixGetWidth(pix.get());
      } catch (const std::exception& e) {
        failures[i] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(failures[0] == "");
  CHECK(failures[1] == "");
  CHECK(widths[0] == 850);   // 8.5 in at 100 dpi
  CHECK(widths[1] == 1275);  // at 150 dpi
}

// The pids of this process's children named taskmgr-worker.
std::vector<int> worker_children() {
  std::vector<int> out;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(e.path() / "stat");
    std::string stat;
    std::getline(in, stat);
    const auto open = stat.find('('), close = stat.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 2));
    char state = 0;
    int ppid = 0;
    rest >> state >> ppid;
    if (ppid == ::getpid() && stat.substr(open + 1, close - open - 1) == "taskmgr-worker") {
      out.push_back(std::stoi(name));
    }
  }
  return out;
}

std::int64_t status_kb(int pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return -1;
}

TEST_CASE(
    "OCR in a worker process: the same text, and actual_memory_mb is the worker's measured "
    "peak, larger for a larger page") {
  TempDir dir;
  const fs::path small = render(dir.path, "p150", kRenderedText, 150);
  const fs::path large = render(dir.path, "p300", kRenderedText, 300);
  Ocr local;
  Ocr isolated(1, /*isolated=*/true);
  std::vector<std::int64_t> actual;
  for (const auto& page : {small, large}) {
    CAPTURE(page);
    const Task in_proc = local.run_path(page);
    const Task t = isolated.run_path(page);
    CHECK(text_of(t) == text_of(in_proc));
    const auto workers = worker_children();
    REQUIRE(workers.size() == 1);
    // Read here, independently: the worker's VmHWM, reset when the task
    // started and untouched since it ended.
    const double hwm_mb = static_cast<double>(status_kb(workers[0], "VmHWM")) / 1024.0;
    REQUIRE(t.actual_memory_mb.has_value());
    MESSAGE(page.filename() << ": actual_memory_mb " << *t.actual_memory_mb << ", worker VmHWM "
                            << hwm_mb << " MB; in process: "
                            << in_proc.actual_memory_mb.value_or(-1) << " MB reported");
    CHECK(static_cast<double>(*t.actual_memory_mb) >= 0.9 * hwm_mb);
    CHECK(static_cast<double>(*t.actual_memory_mb) <= 1.1 * hwm_mb);
    actual.push_back(*t.actual_memory_mb);
  }
  CHECK(actual[1] > actual[0]);
  // Bytes in memory reach the worker through a memfd.
  TaskInput bytes;
  const std::string raw = slurp(large);
  bytes.data.assign(raw.begin(), raw.end());
  CHECK(text_of(isolated.run(bytes)) == text_of(isolated.run_path(large)));
}

TEST_CASE(
    "a page larger than the worker's memory limit: OUT_OF_MEMORY naming the refused "
    "allocation, not a decoding failure") {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  MESSAGE("skipped: a sanitized worker cannot run under RLIMIT_DATA");
#else
  TempDir dir;
  // 14000 x 14000 grey: 196 MB decoded, Tesseract's copies on top.
  const fs::path big = dir.path / "big.png";
  {
    PIX* p = pixCreate(14000, 14000, 8);
    REQUIRE(p != nullptr);
    pixSetAll(p);
    REQUIRE(pixWrite(big.string().c_str(), p, IFF_PNG) == 0);
    pixDestroy(&p);
  }
  Config c = test_config();
  c.executor.worker_threads = 1;
  c.services["ocr"].isolation = "process";
  c.services["ocr"].worker_executable = TASKMGR_WORKER_EXECUTABLE;
  c.services["ocr"].memory_limit_mb = 300;
  c.tasks.retry.max_attempts = 1;
  c.tasks.retry.cpu_fallback = false;
  TaskManagerOptions o;
  o.log_sink = [](LogLevel, std::string_view) {};
  TaskManager tm(c, o);
  TaskCreateRequest r;
  r.service = "ocr";
  r.input.path = big.string();
  const Task t = tm.create_task(r);
  tm.start_task(t.id);
  const auto done = tm.wait_task(t.id, 120s);
  REQUIRE(done.has_value());
  MESSAGE(done->failure_message);
  CHECK(done->status == TaskStatus::kFailed);
  CHECK(done->failure_reason == TaskFailureReason::kOutOfMemory);
  CHECK(done->failure_message.find("was refused under the worker's memory limit of 300 MB") !=
        std::string::npos);
#endif
}

TEST_CASE(
    "services.ocr.isolation auto (the default): OCR in a worker when taskmgr-worker is "
    "found, else in process with a warning") {
  CHECK(ServiceConfig{}.isolation == "auto");
  TempDir dir;
  const fs::path page = render(dir.path, "auto", kRenderedText, 150);
  for (const bool found : {true, false}) {
    CAPTURE(found);
    Config c = test_config();
    c.services["ocr"] = ServiceConfig{};  // auto
    c.services["ocr"].worker_executable =
        found ? std::string(TASKMGR_WORKER_EXECUTABLE) : (dir.path / "no-such-worker").string();
    std::vector<std::string> warnings;
    std::mutex m;
    TaskManagerOptions o;
    o.log_sink = [&](LogLevel level, std::string_view text) {
      std::lock_guard<std::mutex> g(m);
      if (level == LogLevel::kWarn) warnings.emplace_back(text);
    };
    TaskManager tm(c, o);
    TaskCreateRequest r;
    r.input.path = page.string();
    const Task t = tm.create_task(r);
    tm.start_task(t.id);
    const auto done = tm.wait_task(t.id, 120s);
    REQUIRE(done.has_value());
    CHECK(std::string(result_of(*done).at("text").as_string()).find("quick brown fox") !=
          std::string::npos);
    CHECK(worker_children().size() == (found ? 1u : 0u));
    bool warned = false;
    {
      std::lock_guard<std::mutex> g(m);
      for (const auto& w : warnings) {
        warned = warned || w.find("the OCR engines run in this process") != std::string::npos;
      }
    }
    CHECK(warned == !found);
  }
}

TEST_CASE("ocr.pdf_dpi is the default resolution of PDF pages") {
  TempDir dir;
  const fs::path page = render(dir.path, "dpi", "Resolution check.\n", 300);
  const fs::path pdf = make_pdf(dir.path / "one.pdf", {page});
  Config c = test_config();
  c.executor.worker_threads = 1;
  c.ocr.pdf_dpi = 200;
  c.ocr.preprocess.target_dpi = 0;
  TaskManagerOptions o;
  o.log_sink = [](LogLevel, std::string_view) {};
  TaskManager tm(c, o);
  TaskCreateRequest r;
  r.input.path = pdf.string();
  const Task t = tm.create_task(r);
  tm.start_task(t.id);
  const auto done = tm.wait_task(t.id, 120s);
  REQUIRE(done.has_value());
  const auto p = result_of(*done).at("pages").as_array()[0].as_object();
  CHECK(p.at("dpi").as_int64() == 200);
  CHECK(p.at("width").as_int64() == 1700);
  CHECK(p.at("height").as_int64() == 2200);
}

TEST_CASE("\"pages\" selects pages of a multi-page TIFF, numbered as in the document") {
  TempDir dir;
  const fs::path multi = dir.path / "multi.tif";
  int i = 0;
  for (const char* text : {"Page one alpha.\n", "Page two bravo.\n", "Page three charlie.\n"}) {
    const fs::path p = render(dir.path, "t" + std::to_string(i), text, 150);
    Pix* pix = pixRead(p.string().c_str());
    REQUIRE(pix != nullptr);
    REQUIRE(pixWriteTiff(multi.string().c_str(), pix, IFF_TIFF_G4, i++ == 0 ? "w" : "a") == 0);
    pixDestroy(&pix);
  }
  Ocr ocr;
  const auto pages = result_of(ocr.run_path(multi, R"({"pages":[2,3]})")).at("pages").as_array();
  REQUIRE(pages.size() == 2);
  CHECK(pages[0].at("page").as_int64() == 2);
  CHECK(std::string(pages[0].at("text").as_string()).find("bravo") != std::string::npos);
  CHECK(pages[1].at("page").as_int64() == 3);
  CHECK(std::string(pages[1].at("text").as_string()).find("charlie") != std::string::npos);
  const Task out = ocr.run_path(multi, R"({"page":4})");
  CHECK(out.failure_reason == TaskFailureReason::kInvalidInput);
  CHECK(out.failure_message.find("page 4 is out of range: the document has 3 pages") !=
        std::string::npos);
}

TEST_CASE(
    "bad PDFs and pages out of range fail INVALID_INPUT, print nothing, and the engine reads on") {
  TempDir dir;
  const TwoPagePdf doc(dir.path);
  const std::string pdf = slurp(doc.pdf);
  auto file = [&](const char* name, const std::string& content) {
    const fs::path p = dir.path / name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  };
  const std::string encrypted =
      "%PDF-1.4\n1 0 obj <</Type/Catalog/Pages 2 0 R>> endobj\n"
      "2 0 obj <</Type/Pages/Kids[3 0 R]/Count 1>> endobj\n"
      "3 0 obj <</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>> endobj\n"
      "4 0 obj <</Filter/Standard/V 1/R 2/Length 40"
      "/O <00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff>"
      "/U <00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff>/P -4>> endobj\n"
      "trailer <</Root 1 0 R/Encrypt 4 0 R/ID[<0123456789abcdef0123456789abcdef>"
      "<0123456789abcdef0123456789abcdef>]/Size 5>>\n%%EOF\n";
  const std::string no_pages =
      "%PDF-1.4\n1 0 obj <</Type/Catalog/Pages 2 0 R>> endobj\n"
      "2 0 obj <</Type/Pages/Kids[]/Count 0>> endobj\ntrailer <</Root 1 0 R/Size 3>>\n%%EOF\n";
  struct Bad {
    std::string name;
    fs::path path;
    std::string options;
    std::string expect;
  };
  const std::vector<Bad> bad = {
      {"truncated", file("trunc.pdf", pdf.substr(0, pdf.size() / 3)), "", "not a readable PDF"},
      {"header only", file("header.pdf", "%PDF-1.7\n"), "", "not a readable PDF"},
      {"garbage after the header", file("garbage.pdf", "%PDF-1.4\n" + std::string(5000, '\x07')),
       "", "not a readable PDF"},
      {"encrypted", file("encrypted.pdf", encrypted), "", "encrypted"},
      {"no pages", file("zero.pdf", no_pages), "", "the PDF has no pages"},
      {"page out of range", doc.pdf, R"({"page":3})",
       "page 3 is out of range: the document has 2 pages"},
      {"last page out of range", doc.pdf, R"({"pages":[2,9]})",
       "page 9 is out of range: the document has 2 pages"},
      {"dpi out of range", doc.pdf, R"({"dpi":5000})", "dpi"},
      {"a non-integer page", doc.pdf, R"({"page":1.5})", "page"},
  };
  Ocr ocr;
  for (const auto& b : bad) {
    CAPTURE(b.name);
    StderrCapture err(dir.path / "stderr.txt");
    const Task t = ocr.run_path(b.path, b.options);
    const std::string printed = err.finish();
    CAPTURE(t.failure_message);
    CHECK(t.status == TaskStatus::kFailed);
    CHECK(t.failure_reason == TaskFailureReason::kInvalidInput);
    CHECK(t.failure_message.find(b.expect) != std::string::npos);
    CHECK(printed == "");
    const Task ok = ocr.run_path(doc.pdf, R"({"page":2})");
    CHECK(text_of(ok).find("zebras") != std::string::npos);
    CHECK(ok.service_instance_id == "ocr@cpu#1");
  }
  // A page out of range of a one-page image names the count too.
  const Task one = ocr.run_path(doc.first, R"({"page":2})");
  CHECK(one.failure_message.find("page 2 is out of range: the document has 1 page") !=
        std::string::npos);
}

TEST_CASE("output \"pdf\": one searchable PDF of the task's pages, the input's page size") {
  TempDir dir;
  const TwoPagePdf doc(dir.path);
  Ocr ocr;
  const auto r = result_of(ocr.run_path(doc.pdf, R"({"output":"pdf"})"));
  REQUIRE(r.contains("pdf_base64"));
  const std::string b64(r.at("pdf_base64").as_string());
  // Decode with the standard library's counterpart: coreutils' base64.
  const fs::path b64file = dir.path / "out.b64", out = dir.path / "out.pdf";
  std::ofstream(b64file) << b64;
  REQUIRE(std::system(("base64 -d " + b64file.string() + " > " + out.string()).c_str()) == 0);
  CHECK(slurp(out).substr(0, 5) == "%PDF-");
  std::string err;
  const std::string info = run_command("pdfinfo " + out.string(), dir.path, &err);
  const std::string input_info = run_command("pdfinfo " + doc.pdf.string(), dir.path, nullptr);
  CHECK(err == "");
  CHECK(info.find("Pages:           2\n") != std::string::npos);
  CHECK(info.find("Page size:       612 x 792 pts (letter)") != std::string::npos);
  CHECK(input_info.find("Page size:       612 x 792 pts (letter)") != std::string::npos);
  const std::string text = run_command("pdftotext " + out.string() + " -", dir.path, &err);
  CHECK(err == "");
  const std::string truth = std::string(kRenderedText) + kSecondPageText;
  const double pdf_cer = character_error_rate(text, truth);
  const double text_cer = character_error_rate(r.at("text").as_string(), truth);
  MESSAGE("CER: pdftotext of the PDF output " << pdf_cer * 100 << "%, text output "
                                              << text_cer * 100 << "%");
  CHECK(std::abs(pdf_cer - text_cer) <= 0.005);
  // The pages selected are the PDF's pages.
  const auto one = result_of(ocr.run_path(doc.pdf, R"({"output":"pdf","page":2})"));
  std::ofstream(b64file) << std::string(one.at("pdf_base64").as_string());
  REQUIRE(std::system(("base64 -d " + b64file.string() + " > " + out.string()).c_str()) == 0);
  CHECK(run_command("pdfinfo " + out.string(), dir.path, nullptr).find("Pages:           1\n") !=
        std::string::npos);
  CHECK(run_command("pdftotext " + out.string() + " -", dir.path, nullptr).find("zebras") !=
        std::string::npos);
  // Only on request.
  CHECK_FALSE(result_of(ocr.run_path(doc.first)).contains("pdf_base64"));
}

TEST_CASE("output \"pdf\" of a 150 dpi image keeps its physical size") {
  TempDir dir;
  // text2image's TIFFs always say 300 dpi: scale a 300 dpi page by half and
  // say 150.
  const fs::path full = render(dir.path, "p300", "A page at 150 dpi.\n", 300);
  Pix* pix = pixRead(full.string().c_str());
  REQUIRE(pix != nullptr);
  Pix* half = pixScale(pix, 0.5, 0.5);
  pixSetResolution(half, 150, 150);
  const fs::path page = dir.path / "p150.png";
  REQUIRE(pixWrite(page.string().c_str(), half, IFF_PNG) == 0);
  pixDestroy(&half);
  pixDestroy(&pix);
  Ocr ocr;
  const auto r = result_of(ocr.run_path(page, R"({"output":"pdf"})"));
  const fs::path b64file = dir.path / "out.b64", out = dir.path / "out.pdf";
  std::ofstream(b64file) << std::string(r.at("pdf_base64").as_string());
  REQUIRE(std::system(("base64 -d " + b64file.string() + " > " + out.string()).c_str()) == 0);
  // Upscaled to 300 dpi for recognition (ocr.preprocess.target_dpi): still 8.5 x 11 in.
  CHECK(run_command("pdfinfo " + out.string(), dir.path, nullptr)
            .find("Page size:       612 x 792 pts (letter)") != std::string::npos);
}

TEST_CASE("output \"alto\": ALTO XML per page") {
  TempDir dir;
  const fs::path tif = render(dir.path, "alto", "Hello ALTO world.\n", 200);
  Ocr ocr;
  const auto page = result_of(ocr.run_path(tif, R"({"output":"alto"})")).at("pages").as_array()[0];
  const std::string alto(page.at("alto").as_string());
  CHECK(alto.find("<String") != std::string::npos);
  CHECK(alto.find("CONTENT=\"ALTO\"") != std::string::npos);
  CHECK_FALSE(page.as_object().contains("hocr"));
}

TEST_CASE(
    "describe_document: media type and page sizes before any task, as the service sees them") {
  TempDir dir;
  const TwoPagePdf doc(dir.path);
  const DocumentInfo pdf = describe_document(doc.pdf.string(), 300);
  CHECK(pdf.media_type == "application/pdf");
  REQUIRE(pdf.pages.size() == 2);
  CHECK(pdf.pages[1].page == 2);
  CHECK(pdf.pages[1].width == 2550);
  CHECK(pdf.pages[1].height == 3300);
  const DocumentInfo low = describe_document(doc.pdf.string(), 72);
  CHECK(low.pages[0].width == 612);
  CHECK(low.pages[0].height == 792);
  // The sizes the service renders (no preprocessing rescale).
  Ocr ocr;
  const auto rendered = result_of(ocr.run_path(
      doc.pdf, R"({"dpi":97,"page":1,"preprocess":{"target_dpi":0},"orientation":"off"})"));
  const DocumentInfo odd = describe_document(doc.pdf.string(), 97);
  CHECK(rendered.at("pages").as_array()[0].at("width").as_int64() == odd.pages[0].width);
  CHECK(rendered.at("pages").as_array()[0].at("height").as_int64() == odd.pages[0].height);

  // Not a regular file: refused at once (a FIFO would block, /dev/zero never end).
  CHECK_THROWS_WITH_AS(describe_document("/dev/zero"), doctest::Contains("not a regular file"),
                       Error);
  const DocumentInfo tif = describe_document(doc.first.string());
  CHECK(tif.media_type == "image/tiff");
  REQUIRE(tif.pages.size() == 1);
  CHECK(tif.pages[0].width == 2550);
  const fs::path multi = dir.path / "multi.tif";
  Pix* a = pixRead(doc.first.string().c_str());
  Pix* b = pixScale(a, 0.5, 0.5);
  REQUIRE(pixWriteTiff(multi.string().c_str(), a, IFF_TIFF_G4, "w") == 0);
  REQUIRE(pixWriteTiff(multi.string().c_str(), b, IFF_TIFF_G4, "a") == 0);
  const fs::path png = dir.path / "page.png";
  REQUIRE(pixWrite(png.string().c_str(), b, IFF_PNG) == 0);
  pixDestroy(&a);
  pixDestroy(&b);
  const DocumentInfo two = describe_document(multi.string());
  REQUIRE(two.pages.size() == 2);
  CHECK(two.pages[1].width == 1275);
  CHECK(two.pages[1].height == 1650);
  const DocumentInfo p = describe_document(png.string());
  CHECK(p.media_type == "image/png");
  CHECK(p.pages.size() == 1);
  CHECK(p.pages[0].width == 1275);

  auto code_of = [](const std::string& path, int dpi) {
    try {
      describe_document(path, dpi);
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find(path) != std::string::npos);
      return e.code();
    }
    return ErrorCode::kOk;
  };
  CHECK(code_of((dir.path / "missing.pdf").string(), 300) == ErrorCode::kNotFound);
  const fs::path junk = dir.path / "junk.bin";
  std::ofstream(junk) << "not an image at all";
  CHECK(code_of(junk.string(), 300) == ErrorCode::kInvalidArgument);
  const fs::path trunc = dir.path / "trunc.pdf";
  std::ofstream(trunc) << slurp(doc.pdf).substr(0, 100);
  CHECK(code_of(trunc.string(), 300) == ErrorCode::kInvalidArgument);
  CHECK(code_of(dir.path.string(), 300) == ErrorCode::kInvalidArgument);
  CHECK_THROWS_AS(describe_document(doc.pdf.string(), 71), Error);
  CHECK_THROWS_AS(describe_document(doc.pdf.string(), 1201), Error);
}

TEST_CASE("the OCR estimate of a PDF: its largest page at the task's dpi, no rendering") {
  TempDir dir;
  const TwoPagePdf doc(dir.path);
  const auto model = make_ocr_service(OcrConfig{})->memory_model();
  TaskCreateRequest req;
  req.input.path = doc.pdf.string();
  RequestFeatures f = model->features(req);
  CHECK(f.pixels == 2550 * 3300);
  CHECK(f.pages == 2);
  req.options_json = R"({"dpi":150,"page":2})";
  f = model->features(req);
  CHECK(f.pixels == 1275 * 1650);
  CHECK(f.pages == 1);
}

TEST_CASE(
    "the OCR estimate of a multi-page TIFF counts its pages: a smaller batch is a smaller "
    "estimate") {
  TempDir dir;
  const fs::path page = render(dir.path, "p", "A page of a multi-page TIFF.\n", 200);
  const fs::path multi = dir.path / "three.tif";
  Pix* pix = pixRead(page.string().c_str());
  REQUIRE(pix != nullptr);
  for (int i = 0; i < 3; ++i) {
    REQUIRE(pixWriteTiff(multi.string().c_str(), pix, IFF_TIFF_G4, i == 0 ? "w" : "a") == 0);
  }
  const std::int64_t pixels = static_cast<std::int64_t>(pixGetWidth(pix)) * pixGetHeight(pix);
  pixDestroy(&pix);
  const auto model = make_ocr_service(OcrConfig{})->memory_model();
  TaskCreateRequest req;
  req.input.path = multi.string();
  RequestFeatures f = model->features(req);
  CHECK(f.pages == 3);
  CHECK(f.pixels == pixels);
  // From bytes too, and as the "pages" option selects them.
  const std::string raw = slurp(multi);
  TaskCreateRequest bytes;
  bytes.input.data.assign(raw.begin(), raw.end());
  CHECK(model->features(bytes).pages == 3);
  req.options_json = R"({"pages":[2,3]})";
  CHECK(model->features(req).pages == 2);
  req.options_json = R"({"page":3})";
  CHECK(model->features(req).pages == 1);
  // The estimate holds min(batch_size, pages) pages: halving the batch (an
  // out-of-memory retry) lowers it; past the page count it does not grow.
  req.options_json.clear();
  f = model->features(req);
  std::vector<double> by_batch;
  for (int b : {1, 2, 3, 8}) {
    f.batch_size = b;
    by_batch.push_back(model->estimate_mb(f));
  }
  CHECK(by_batch[0] < by_batch[1]);
  CHECK(by_batch[1] < by_batch[2]);
  CHECK(by_batch[2] == by_batch[3]);
  // A single-page image: one page whatever the batch.
  TaskCreateRequest single;
  single.input.path = page.string();
  CHECK(model->features(single).pages == 1);
}

TEST_CASE("pages turned 90, 180 and 270 degrees are read the right way up") {
  TempDir dir;
  const std::string truth = std::string(kRenderedText) + kSecondPageText;
  const fs::path upright = render(dir.path, "upright", truth, 300);
  Ocr ocr;
  const Task plain = ocr.run_path(upright, R"({"orientation":"off"})");
  const double plain_cer = character_error_rate(text_of(plain), truth);
  CHECK(plain_cer <= 0.01);
  for (const char* mode : {"auto", "always"}) {
    CAPTURE(mode);
    const std::string opt = std::string(R"({"orientation":")") + mode + "\"}";
    for (int q = 1; q <= 3; ++q) {
      CAPTURE(q);
      const fs::path page =
          rotated(upright, q, dir.path / ("turned" + std::to_string(q * 90) + ".png"));
      const auto r = result_of(ocr.run_path(page, opt));
      const double cer = character_error_rate(r.at("text").as_string(), truth);
      MESSAGE(std::string(mode) << ": page turned " << q * 90 << " degrees, CER " << cer * 100
                                << "%");
      CHECK(cer <= 0.01);
      const auto& o = r.at("pages").as_array()[0].at("orientation").as_object();
      // "auto" checks only what a first reading found doubtful: Tesseract's
      // layout analysis itself reads some pages turned 90 or 270 degrees
      // (vertical text lines) with full confidence.
      if (o.at("checked").as_bool() || std::string(mode) == "always") {
        CHECK(o.at("checked").as_bool());
        CHECK(o.at("angle").as_int64() == q * 90);
        CHECK(o.at("applied").as_bool());
        CHECK(o.at("confidence").as_double() > 1.5);
        // The page's size as the input has it (the boxes too: "pages turned
        // by orientation detection" below); turned back for recognition.
        const auto& p = r.at("pages").as_array()[0].as_object();
        CHECK(p.at("width").as_int64() == (q % 2 ? 3300 : 2550));
        CHECK(p.at("height").as_int64() == (q % 2 ? 2550 : 3300));
        CHECK(p.at("preprocess").at("rotated").as_int64() == 360 - 90 * q);
      }
      if (q == 2) CHECK(o.at("applied").as_bool());  // upside down: never read without OSD
    }
    // The upright page keeps its error rate (and text).
    const auto up = result_of(ocr.run_path(upright, opt));
    CHECK(character_error_rate(up.at("text").as_string(), truth) <= plain_cer);
    const auto& o = up.at("pages").as_array()[0].at("orientation").as_object();
    CHECK_FALSE(o.at("applied").as_bool());
    CHECK(o.at("angle").as_int64() == 0);
    // "auto" checks only a page read with low confidence; "always" every page.
    CHECK(o.at("checked").as_bool() == (std::string(mode) == "always"));
  }
  // OSD is a stage of its own in the task's samples.
  const Task down_task = ocr.run_path(rotated(upright, 2, dir.path / "down-auto.png"));
  std::vector<std::string> stages;
  for (const auto& sample : ocr.tm->get_task_samples(down_task.id)) {
    stages.push_back(sample.processing_stage);
  }
  CHECK(stages == std::vector<std::string>{"load", "preprocess", "recognize", "orientation",
                                           "preprocess", "recognize"});
  // "off": the page is read as it is (badly, upside down), and not checked.
  const fs::path down = rotated(upright, 2, dir.path / "down.png");
  const auto off = result_of(ocr.run_path(down, R"({"orientation":"off"})"));
  CHECK(character_error_rate(off.at("text").as_string(), truth) > 0.3);
  CHECK_FALSE(off.at("pages").as_array()[0].at("orientation").at("checked").as_bool());
  // hOCR carries what OSD found in the ocr_page's title.
  const fs::path side = rotated(upright, 1, dir.path / "side.png");
  const auto hocr = result_of(ocr.run_path(side, R"({"output":"hocr","orientation":"always"})"));
  const std::string h(hocr.at("pages").as_array()[0].at("hocr").as_string());
  CHECK(h.find("x_orientation_angle 90; x_orientation_confidence ") != std::string::npos);
  CHECK(h.find("x_orientation_applied 1'") != std::string::npos);
}

TEST_CASE("an empty page: orientation detection finds nothing and the page is read as it is") {
  TempDir dir;
  Pix* blank = pixCreate(850, 1100, 8);
  pixSetAllArbitrary(blank, 255);
  pixSetResolution(blank, 100, 100);
  const fs::path png = dir.path / "blank.png";
  REQUIRE(pixWrite(png.string().c_str(), blank, IFF_PNG) == 0);
  pixDestroy(&blank);
  Ocr ocr;
  for (const char* opt : {R"({"orientation":"auto"})", R"({"orientation":"always"})"}) {
    CAPTURE(opt);
    const auto r = result_of(ocr.run_path(png, opt));
    const auto& o = r.at("pages").as_array()[0].at("orientation").as_object();
    CHECK(o.at("checked").as_bool());
    CHECK_FALSE(o.at("applied").as_bool());
  }
}

// ---- geometry in the source's pixels, and the resolution each page is taken at

namespace {

// `image` written as PNG with resolution `dpi`, or with none for 0
// (Leptonica writes a pHYs chunk of 300 ppi for a resolution of 0: the
// chunk is taken out).
fs::path tagged_png(const fs::path& image, int dpi, const fs::path& out) {
  Pix* pix = pixRead(image.string().c_str());
  REQUIRE(pix != nullptr);
  pixSetResolution(pix, dpi, dpi);
  l_uint8* data = nullptr;
  size_t size = 0;
  REQUIRE(pixWriteMemPng(&data, &size, pix, 0) == 0);
  const std::string png(reinterpret_cast<const char*>(data), size);
  lept_free(data);
  pixDestroy(&pix);
  std::string bytes = png.substr(0, 8);
  for (std::size_t at = 8; at + 12 <= png.size();) {
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(png[i]); };
    const std::size_t len =
        (std::size_t{byte(at)} << 24) | (byte(at + 1) << 16) | (byte(at + 2) << 8) | byte(at + 3);
    if (dpi != 0 || png.compare(at + 4, 4, "pHYs") != 0) bytes += png.substr(at, len + 12);
    at += len + 12;
  }
  std::ofstream(out, std::ios::binary) << bytes;
  return out;
}

struct WordBox {
  std::string text;
  double x0, y0, x1, y1;  // edges, right and bottom exclusive
};

std::string unescape_xml(std::string s) {
  for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
           {"&lt;", "<"}, {"&gt;", ">"}, {"&quot;", "\""}, {"&#39;", "'"}, {"&amp;", "&"}}) {
    for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + 1)) {
      s.replace(at, from.size(), to);
    }
  }
  return s;
}

std::vector<WordBox> json_words(const json::value& page) {
  std::vector<WordBox> out;
  for (const auto& w : page.at("words").as_array()) {
    const auto& b = w.at("box").as_array();
    const double x = b[0].to_number<double>(), y = b[1].to_number<double>();
    out.push_back({std::string(w.at("text").as_string()), x, y, x + b[2].to_number<double>(),
                   y + b[3].to_number<double>()});
  }
  return out;
}

std::vector<WordBox> hocr_words(const std::string& hocr) {
  static const std::regex word(
      "<span class='ocrx_word' id='[^']*' title='bbox (\\d+) (\\d+) (\\d+) (\\d+);[^']*'[^>]*>"
      "(.*?)</span>");
  static const std::regex tag("<[^>]*>");
  std::vector<WordBox> out;
  for (std::sregex_iterator it(hocr.begin(), hocr.end(), word), end; it != end; ++it) {
    const auto& m = *it;
    out.push_back({unescape_xml(std::regex_replace(m[5].str(), tag, "")), std::stod(m[1]),
                   std::stod(m[2]), std::stod(m[3]), std::stod(m[4])});
  }
  return out;
}

std::vector<WordBox> alto_words(const std::string& alto) {
  static const std::regex string(
      "<String ID=\"[^\"]*\" HPOS=\"(\\d+)\" VPOS=\"(\\d+)\" WIDTH=\"(\\d+)\" HEIGHT=\"(\\d+)\" "
      "WC=\"[^\"]*\" CONTENT=\"([^\"]*)\"");
  std::vector<WordBox> out;
  for (std::sregex_iterator it(alto.begin(), alto.end(), string), end; it != end; ++it) {
    const auto& m = *it;
    const double x = std::stod(m[1]), y = std::stod(m[2]);
    out.push_back({unescape_xml(m[5].str()), x, y, x + std::stod(m[3]), y + std::stod(m[4])});
  }
  return out;
}

// pdftotext -bbox: each word's box in points.
std::vector<WordBox> pdf_words(const std::string& xhtml) {
  static const std::regex word(
      "<word xMin=\"([0-9.]+)\" yMin=\"([0-9.]+)\" xMax=\"([0-9.]+)\" yMax=\"([0-9.]+)\">"
      "([^<]*)</word>");
  std::vector<WordBox> out;
  for (std::sregex_iterator it(xhtml.begin(), xhtml.end(), word), end; it != end; ++it) {
    const auto& m = *it;
    out.push_back({unescape_xml(m[5].str()), std::stod(m[1]), std::stod(m[2]), std::stod(m[3]),
                   std::stod(m[4])});
  }
  return out;
}

// The same words in the same order, each box within `tolerance` pixels of
// the expected one on every side; returns the largest difference. (Their
// texts are not compared: hOCR and ALTO spell a word from its symbols, which
// can differ from the word's own text.)
double check_boxes(const std::vector<WordBox>& got, const std::vector<WordBox>& want,
                   double tolerance) {
  REQUIRE(!want.empty());
  REQUIRE(got.size() == want.size());
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CAPTURE(got[i].text);
    CAPTURE(want[i].text);
    for (const double d : {got[i].x0 - want[i].x0, got[i].y0 - want[i].y0, got[i].x1 - want[i].x1,
                           got[i].y1 - want[i].y1}) {
      CHECK(std::abs(d) <= tolerance);
      worst = std::max(worst, std::abs(d));
    }
  }
  return worst;
}

// A box of a w x h page in the coordinates of the page turned clockwise by
// quarter turns (pixRotateOrth).
WordBox turned_box(WordBox b, int quarter_turns, double w, double h) {
  for (int q = 0; q < quarter_turns; ++q) {
    // (x, y) -> (h - y, x)
    b = {b.text, h - b.y1, b.x0, h - b.y0, b.x1};
    std::swap(w, h);
  }
  return b;
}

// A page turned clockwise by quarter turns, keeping its resolution tag.
fs::path turned_png(const fs::path& png, int quarter_turns, const fs::path& out) {
  Pix* pix = pixRead(png.string().c_str());
  REQUIRE(pix != nullptr);
  Pix* turned = pixRotateOrth(pix, quarter_turns);
  REQUIRE(turned != nullptr);
  pixSetResolution(turned, pixGetXRes(pix), pixGetYRes(pix));
  REQUIRE(pixWrite(out.string().c_str(), turned, IFF_PNG) == 0);
  pixDestroy(&turned);
  pixDestroy(&pix);
  return out;
}

json::object first_page(const Task& t) {
  return result_of(t).at("pages").as_array()[0].as_object();
}

const std::string kTwoPageText = std::string(kRenderedText) + kSecondPageText;

}  // namespace

TEST_CASE(
    "rescaled pages: word boxes, hOCR and ALTO are in the source's pixels (within 2 px of an "
    "unscaled reading)") {
  TempDir dir;
  // 12-point text at 150 dpi, tagged 150: Tesseract reads it unscaled too.
  const fs::path page =
      tagged_png(render(dir.path, "scaled", kTwoPageText, 150), 150, dir.path / "p150.png");
  Ocr ocr;
  const std::string plain = R"("orientation":"off","preprocess":{"target_dpi":0})";
  const auto ref = first_page(ocr.run_path(page, "{\"output\":\"hocr\"," + plain + "}"));
  CHECK(ref.at("preprocess").at("scale").to_number<double>() == 1);
  const auto ref_alto = first_page(ocr.run_path(page, "{\"output\":\"alto\"," + plain + "}"));
  const std::vector<WordBox> want = json_words(ref);
  CHECK(want.size() >= 25);
  // The same words as hOCR and ALTO give them, unscaled.
  check_boxes(hocr_words(std::string(ref.at("hocr").as_string())), want, 0);
  check_boxes(alto_words(std::string(ref_alto.at("alto").as_string())), want, 0);
  // A forced scale (the rounding of 2.5 and 0.8 included), and the scale the
  // default rule chooses for a believable 150 dpi tag (2).
  for (const std::string scale : {"2.5", "0.8", ""}) {
    CAPTURE(scale);
    const std::string pre = scale.empty() ? "{}" : "{\"scale\":" + scale + "}";
    const std::string opt = R"("orientation":"off","preprocess":)" + pre;
    const auto hocr_run = first_page(ocr.run_path(page, "{\"output\":\"hocr\"," + opt + "}"));
    const auto alto_run = first_page(ocr.run_path(page, "{\"output\":\"alto\"," + opt + "}"));
    const double expect = scale.empty() ? 2.0 : std::stod(scale);
    CHECK(hocr_run.at("preprocess").at("scale").to_number<double>() == doctest::Approx(expect));
    CHECK(hocr_run.at("preprocess").at("rotated").as_int64() == 0);
    CHECK(hocr_run.at("dpi").as_int64() == 150);  // the source's, not the scaled one
    CHECK(hocr_run.at("dpi_source").as_string() == "file");
    CHECK(hocr_run.at("width").as_int64() == 1275);
    CHECK(hocr_run.at("height").as_int64() == 1650);
    if (expect < 1) {
      // Read at 120 dpi: some words read otherwise; those read the same lie
      // where the unscaled reading has them.
      std::size_t matched = 0;
      for (const WordBox& got : json_words(hocr_run)) {
        for (const WordBox& r : want) {
          if (got.text == r.text && std::abs(got.x0 - r.x0) < 20 && std::abs(got.y0 - r.y0) < 20) {
            ++matched;
            check_boxes({got}, {r}, 2);
          }
        }
      }
      CHECK(matched >= want.size() / 2);
      continue;
    }
    MESSAGE("scale " << expect << ": JSON boxes within "
                     << check_boxes(json_words(hocr_run), want, 2) << " px of the unscaled ones");
    const std::string hocr(hocr_run.at("hocr").as_string());
    check_boxes(hocr_words(hocr), want, 2);
    CHECK(hocr.find("bbox 0 0 1275 1650; ppageno 0; scan_res 150 150") != std::string::npos);
    const std::string alto(alto_run.at("alto").as_string());
    check_boxes(alto_words(alto), want, 2);
    CHECK(alto.find("<Page WIDTH=\"1275\" HEIGHT=\"1650\"") != std::string::npos);
  }
}

TEST_CASE(
    "pages turned by orientation detection: word boxes and hOCR are in the turned source's "
    "pixels") {
  TempDir dir;
  const fs::path upright =
      tagged_png(render(dir.path, "upright", kTwoPageText, 150), 150, dir.path / "upright.png");
  Ocr ocr;
  const auto ref =
      first_page(ocr.run_path(upright, R"({"orientation":"off","preprocess":{"target_dpi":0}})"));
  const std::vector<WordBox> upright_words = json_words(ref);
  for (int q = 1; q <= 3; ++q) {
    CAPTURE(q);
    const fs::path page =
        turned_png(upright, q, dir.path / ("turned" + std::to_string(q) + ".png"));
    const auto p = first_page(ocr.run_path(page, R"({"orientation":"always","output":"hocr"})"));
    CHECK(p.at("orientation").at("applied").as_bool());
    CHECK(p.at("orientation").at("angle").as_int64() == 90 * q);
    // Turned back clockwise by 360 - 90q degrees, then rescaled 2x (150 dpi).
    CHECK(p.at("preprocess").at("rotated").as_int64() == 360 - 90 * q);
    CHECK(p.at("preprocess").at("scale").to_number<double>() == 2);
    // The page as the input has it.
    CHECK(p.at("width").as_int64() == (q % 2 ? 1650 : 1275));
    CHECK(p.at("height").as_int64() == (q % 2 ? 1275 : 1650));
    std::vector<WordBox> want;
    for (const WordBox& w : upright_words) want.push_back(turned_box(w, q, 1275, 1650));
    MESSAGE("turned " << 90 * q << ": JSON boxes within " << check_boxes(json_words(p), want, 2)
                      << " px of the upright reading's, turned");
    const std::string hocr(p.at("hocr").as_string());
    check_boxes(hocr_words(hocr), want, 2);
    // The lines run as the source has them: textangle (counter-clockwise:
    // turned clockwise by 90q), no baseline.
    CHECK(hocr.find("textangle " + std::to_string(360 - 90 * q) + ";") != std::string::npos);
    CHECK(hocr.find("baseline") == std::string::npos);
  }
}

TEST_CASE("a deskewed page: word boxes are mapped back through the rotation") {
  TempDir dir;
  const fs::path upright = render(dir.path, "straight", kTwoPageText, 150);
  Ocr ocr;
  const auto ref =
      first_page(ocr.run_path(tagged_png(upright, 150, dir.path / "straight.png"),
                              R"({"orientation":"off","preprocess":{"target_dpi":0}})"));
  // The page turned 3 degrees clockwise about its centre, nearest pixel,
  // white outside: every point p of the page goes to c + R (p - c).
  const double angle = 3 * 3.14159265358979323846 / 180, cs = std::cos(angle), sn = std::sin(angle);
  Pix* src = pixRead(upright.string().c_str());
  REQUIRE(src != nullptr);
  Pix* gray = pixConvertTo8(src, 0);
  const int w = static_cast<int>(pixGetWidth(gray)), h = static_cast<int>(pixGetHeight(gray));
  const double cx = w / 2.0, cy = h / 2.0;
  Pix* skewed = pixCreate(w, h, 8);
  pixSetResolution(skewed, 150, 150);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      // The source point of pixel centre (x, y): the inverse turn.
      const double dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      const double sx = cx + cs * dx + sn * dy, sy = cy - sn * dx + cs * dy;
      l_uint32 v = 255;
      if (sx >= 0 && sy >= 0 && sx < w && sy < h) {
        pixGetPixel(gray, static_cast<l_int32>(sx), static_cast<l_int32>(sy), &v);
      }
      pixSetPixel(skewed, x, y, v);
    }
  }
  const fs::path page = dir.path / "skewed.png";
  REQUIRE(pixWrite(page.string().c_str(), skewed, IFF_PNG) == 0);
  pixDestroy(&skewed);
  pixDestroy(&gray);
  pixDestroy(&src);
  const auto p = first_page(
      ocr.run_path(page, R"({"orientation":"off","preprocess":{"deskew":true,"target_dpi":0}})"));
  const double applied = p.at("preprocess").at("deskew_degrees").to_number<double>();
  MESSAGE("deskew applied " << applied << " degrees");
  CHECK(std::abs(applied) > 2);
  CHECK(std::abs(applied) < 4);
  // The reference boxes turned the same way: the box around the turned
  // rectangle.
  std::vector<WordBox> want;
  for (const WordBox& b : json_words(ref)) {
    double x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
    for (const double x : {b.x0, b.x1}) {
      for (const double y : {b.y0, b.y1}) {
        const double dx = x - cx, dy = y - cy;
        const double tx = cx + cs * dx - sn * dy, ty = cy + sn * dx + cs * dy;
        x0 = std::min(x0, tx);
        x1 = std::max(x1, tx);
        y0 = std::min(y0, ty);
        y1 = std::max(y1, ty);
      }
    }
    want.push_back({b.text, x0, y0, x1, y1});
  }
  MESSAGE("deskewed: JSON boxes within " << check_boxes(json_words(p), want, 2)
                                         << " px of the straight reading's, turned");
}

TEST_CASE(
    "output \"pdf\": the source image at its size, the text layer on its words, rescaled or "
    "turned") {
  TempDir dir;
  const fs::path upright =
      tagged_png(render(dir.path, "pdfsrc", kTwoPageText, 150), 150, dir.path / "pdfsrc.png");
  Ocr ocr;
  for (const int q : {0, 1}) {
    CAPTURE(q);
    const fs::path page = q == 0 ? upright : turned_png(upright, q, dir.path / "pdfturned.png");
    const auto r = result_of(ocr.run_path(page, R"({"output":"pdf","orientation":"always"})"));
    const auto& p = r.at("pages").as_array()[0];
    CHECK(p.at("preprocess").at("scale").to_number<double>() == 2);  // read at 300 dpi
    CHECK(p.at("orientation").at("applied").as_bool() == (q != 0));
    const fs::path b64 = dir.path / "out.b64", pdf = dir.path / "out.pdf";
    std::ofstream(b64) << std::string(r.at("pdf_base64").as_string());
    REQUIRE(std::system(("base64 -d " + b64.string() + " > " + pdf.string()).c_str()) == 0);
    if (std::system("qpdf --version > /dev/null 2>&1") == 0) {
      std::string err;
      CHECK(run_command("qpdf --check " + pdf.string(), dir.path, &err)
                .find("No syntax or stream encoding errors found") != std::string::npos);
      CHECK(err == "");
    } else {
      MESSAGE("qpdf is not installed (scripts/setup.sh installs it): qpdf --check skipped");
    }
    std::string err;
    // The source's size at 150 dpi, as the input has it (turned: landscape).
    CHECK(run_command("pdfinfo " + pdf.string(), dir.path, &err)
              .find(q == 0 ? "Page size:       612 x 792 pts" : "Page size:       792 x 612 pts") !=
          std::string::npos);
    CHECK(err == "");
    // The image embedded is the source's pixels (1 bpp, losslessly).
    const std::string images = run_command("pdfimages -list " + pdf.string(), dir.path, nullptr);
    CHECK(images.find(q == 0 ? "image    1275  1650  gray    1   1  ccitt"
                             : "image    1650  1275  gray    1   1  ccitt") != std::string::npos);
    // Each word of the text layer, in pixels, on the word's box: along the
    // line within 2 px; across it, the line's extent, which holds the word.
    std::vector<WordBox> layer =
        pdf_words(run_command("pdftotext -bbox " + pdf.string() + " -", dir.path, nullptr));
    for (WordBox& w : layer) {
      for (double* v : {&w.x0, &w.y0, &w.x1, &w.y1}) *v *= 150.0 / 72;
    }
    const std::vector<WordBox> words = json_words(p);
    REQUIRE(layer.size() == words.size());
    double worst = 0;
    for (std::size_t i = 0; i < words.size(); ++i) {
      CAPTURE(words[i].text);
      CHECK(layer[i].text == words[i].text);
      const WordBox& a = layer[i];
      const WordBox& b = words[i];
      // q 0: the line runs along x; q 1: down the page (turned clockwise).
      const double along[2] = {q == 0 ? a.x0 - b.x0 : a.y0 - b.y0,
                               q == 0 ? a.x1 - b.x1 : a.y1 - b.y1};
      for (const double d : along) {
        CHECK(std::abs(d) <= 2);
        worst = std::max(worst, std::abs(d));
      }
      if (q == 0) {
        CHECK(a.y0 <= b.y0 + 2);
        CHECK(a.y1 >= b.y1 - 2);
      } else {
        CHECK(a.x0 <= b.x0 + 2);
        CHECK(a.x1 >= b.x1 - 2);
      }
    }
    MESSAGE("text layer within " << worst << " px of the word boxes along the lines");
    const std::string text = run_command("pdftotext " + pdf.string() + " -", dir.path, nullptr);
    CHECK(character_error_rate(text, kTwoPageText) <= 0.02);
  }
}

TEST_CASE(
    "the resolution each page is taken at: a believable tag, an estimate from the text, or an "
    "assumption") {
  TempDir dir;
  Ocr ocr;
  const fs::path r300 = render(dir.path, "r300", kRenderedText, 300);
  const fs::path r100 = render(dir.path, "r100", kRenderedText, 100);
  struct Case {
    std::string name;
    fs::path page;
    std::string source;
    int dpi_min, dpi_max;
    bool rescaled;
  };
  const std::vector<Case> cases = {
      // 300 dpi pages that say 72 or nothing: measured, and not upscaled.
      {"300 dpi tagged 72", tagged_png(r300, 72, dir.path / "r300-72.png"), "estimated", 250, 360,
       false},
      {"300 dpi untagged", tagged_png(r300, 0, dir.path / "r300-none.png"), "estimated", 250, 360,
       false},
      {"300 dpi tagged 96", tagged_png(r300, 96, dir.path / "r300-96.png"), "estimated", 250, 360,
       false},
      // A true 100 dpi page, untagged: measured, and upscaled.
      {"100 dpi untagged", tagged_png(r100, 0, dir.path / "r100-none.png"), "estimated", 80, 125,
       true},
      // Believed tags: as before.
      {"100 dpi tagged 100", tagged_png(r100, 100, dir.path / "r100-100.png"), "file", 100, 100,
       true},
      {"300 dpi tagged 300", tagged_png(r300, 300, dir.path / "r300-300.png"), "file", 300, 300,
       false},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    const Task t = ocr.run_path(c.page);
    const auto p = first_page(t);
    const auto dpi = p.at("dpi").as_int64();
    const double scale = p.at("preprocess").at("scale").to_number<double>();
    MESSAGE(c.name << ": dpi " << dpi << " (" << p.at("dpi_source").as_string() << "), scale "
                   << scale);
    CHECK(p.at("dpi_source").as_string() == c.source);
    CHECK(dpi >= c.dpi_min);
    CHECK(dpi <= c.dpi_max);
    CHECK((scale > 1) == c.rescaled);
    CHECK(character_error_rate(text_of(t), kRenderedText) <= 0.02);
  }
  // A blank page: nothing to measure. Its tag is kept, but not believed.
  Pix* blank = pixCreate(850, 1100, 8);
  pixSetAllArbitrary(blank, 255);
  const fs::path blank_png = dir.path / "blank.png";
  REQUIRE(pixWrite(blank_png.string().c_str(), blank, IFF_PNG) == 0);
  pixDestroy(&blank);
  for (const int tag : {72, 0}) {
    CAPTURE(tag);
    const auto p = first_page(ocr.run_path(
        tagged_png(blank_png, tag, dir.path / ("blank" + std::to_string(tag) + ".png")),
        R"({"orientation":"off"})"));
    CHECK(p.at("dpi_source").as_string() == "assumed");
    CHECK(p.at("dpi").as_int64() == (tag == 0 ? 300 : 72));
    CHECK(p.at("preprocess").at("scale").to_number<double>() == 1);
  }
  // Noise (a photograph's grain): many components, all tiny. Not text: was
  // "estimated" at 21 dpi and read at 4x (70x the time). Nor is the image
  // block Tesseract rates 95 a word: no words, no confidence.
  Pix* noise = pixCreate(600, 600, 8);
  std::mt19937 rng(7);
  for (int y = 0; y < 600; ++y) {
    for (int x = 0; x < 600; ++x) pixSetPixel(noise, x, y, rng() % 256);
  }
  const fs::path noise_png = dir.path / "noise.png";
  REQUIRE(pixWrite(noise_png.string().c_str(), noise, IFF_PNG) == 0);
  pixDestroy(&noise);
  const Task nt = ocr.run_path(noise_png, R"({"orientation":"off"})");
  const auto np = first_page(nt);
  CHECK(np.at("dpi_source").as_string() == "assumed");
  CHECK(np.at("preprocess").at("scale").to_number<double>() == 1);
  for (const auto& w : np.at("words").as_array()) {
    const std::string t(w.at("text").as_string());
    CHECK(t.find_first_not_of(" \t\r\n\f") != std::string::npos);
  }
  if (std::string(np.at("text").as_string()).find_first_not_of(" \t\r\n\f") == std::string::npos) {
    CHECK(np.at("mean_confidence").as_double() == 0);
  }
}
