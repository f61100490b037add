// The OCR service on real pages: the shared scanned pages (present in CI;
// skipped with a message when ../shared is absent) and pages the tests
// render themselves with text2image and DejaVu fonts (always).
#include <doctest/doctest.h>

#include <boost/json.hpp>
#include <leptonica/allheaders.h>
#include <omp.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

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
  explicit Ocr(int workers = 1) {
    config.executor.worker_threads = workers;
    config.pools.devices["cpu"] = PoolSettings{0, workers, 30};
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
  const std::string cmd = "text2image --text=" + txt.string() + " --outputbase=" +
                          (dir / name).string() +
                          " --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu"
                          " --resolution=" + std::to_string(dpi) +
                          " --ptsize=12 --margin=50 --xsize=" + std::to_string(dpi * 85 / 10) +
                          " --ysize=" + std::to_string(dpi * 11) + " > /dev/null 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  const fs::path tif = dir / (name + ".tif");
  REQUIRE(fs::exists(tif));
  return tif;
}

struct TempDir {
  fs::path path = fs::temp_directory_path() /
                  ("taskmgr-ocr-test-" + std::to_string(::getpid()) + "-" + generate_task_id().substr(24));
  TempDir() { fs::create_directories(path); }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

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

TEST_CASE("the upside-down page is reported with low confidence") {
  if (!fs::exists(kShared / "phototest-rotated-180.png")) {
    MESSAGE("skipped: " << kShared.string() << " is absent");
    return;
  }
  Ocr ocr;
  const Task upright = ocr.run_path(kShared / "phototest.tif");
  const Task rotated = ocr.run_path(kShared / "phototest-rotated-180.png");
  const double up = result_of(upright).at("mean_confidence").as_double();
  const double down = result_of(rotated).at("mean_confidence").as_double();
  MESSAGE("mean confidence upright " << up << ", rotated 180 " << down);
  CHECK(down < 60);
  CHECK(down < up - 25);
  CHECK(character_error_rate(text_of(rotated), slurp(kShared / "phototest.txt")) > 0.3);
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
  const auto tsv = result_of(ocr.run_path(tif, R"({"output":"tsv","words":false})")).at("pages").as_array()[0];
  CHECK(std::string(tsv.at("tsv").as_string()).find("Hello") != std::string::npos);
  CHECK_FALSE(tsv.as_object().contains("words"));
}

TEST_CASE("bad input fails INVALID_INPUT with a clear message: the next good page still reads on the same engine") {
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
  bad.push_back({"truncated TIFF", file("trunc.tif", good_bytes.substr(0, good_bytes.size() / 3)), "image"});
  bad.push_back({"truncated PNG", file("trunc.png", png.substr(0, png.size() / 2)), "image"});
  bad.push_back({"truncated JPEG", file("trunc.jpg", jpeg.substr(0, jpeg.size() / 2)), "image"});
  bad.push_back({"random bytes", file("noise.png", random_bytes), "not a readable image"});
  bad.push_back({"huge header", file("huge.png", huge_png), "exceeds"});
  TaskInput directory;
  directory.path = dir.path.string();
  bad.push_back({"a directory", directory, "directory"});
  TaskInput missing;
  missing.path = (dir.path / "missing.png").string();
  bad.push_back({"a missing path", missing, "no such file"});
  Ocr ocr;
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

TEST_CASE("the OCR estimate reads a PNG's declared size from its header, and a page over the pixel limit costs only its bytes") {
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

TEST_CASE("a page past its deadline ends TIMEOUT (Tesseract's monitor stops it) and the engine reads the next page") {
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
  CHECK(budget.failure_message.find("400x300 pixels exceeds ocr.max_pixels = 100000") != std::string::npos);
  const Task side = run(png_header(40000, 2));  // 80,000 px, but too wide
  CHECK(side.failure_reason == TaskFailureReason::kInvalidInput);
  CHECK(side.failure_message.find("32767 pixels per side") != std::string::npos);
  // Within both: decoded (and, being only a header, found truncated).
  const Task small = run(png_header(100, 100));
  CHECK(small.failure_reason == TaskFailureReason::kInvalidInput);
  CHECK(small.failure_message.find("exceeds") == std::string::npos);
}

TEST_CASE("bad OCR options are INVALID_INPUT") {
  TempDir dir;
  const fs::path tif = render(dir.path, "o", "Options.\n", 150);
  Ocr ocr;
  for (const std::string opt : {R"({"psm":99})", R"({"output":"pdf"})", R"({"nope":1})",
                                R"({"preprocess":{"target_dpi":"x"}})"}) {
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
