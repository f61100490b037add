// libFuzzer harness: the OCR service's input path. The input is
// "<options JSON>\n<encoded image bytes>": the options parser, then decode
// (Leptonica), header checks, preprocessing (OpenCV) and recognition
// (Tesseract) on one warm engine, with a small pixel budget (ocr.max_pixels
// = 65,536) so that each run stays fast. Any input must end in success or a
// TaskError (INVALID_INPUT, ...), never a crash or a leak, and must not
// poison the engine: every 256 runs a known page must still read.
//
// With TASKMGR_FUZZ_WORKER=<path of taskmgr-worker> the same inputs go
// through the worker-process path instead (services.ocr.isolation:
// process): the engine is a child process, the bytes pass in a memfd. A
// crash there must come back as a handled TaskError ("worker crashed ..."),
// the host goes on, and the next known page must read on the replacement.
#include <taskmgr/config.hpp>
#include <taskmgr/ocr.hpp>
#include <taskmgr/service.hpp>
#include <taskmgr/worker.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

namespace {

class FuzzContext final : public taskmgr::TaskContext {
 public:
  FuzzContext(taskmgr::TaskInput in, std::string options)
      : input_(std::move(in)), options_(std::move(options)) {}
  const std::string& task_id() const override { return id_; }
  const std::string& service() const override { return service_; }
  const taskmgr::TaskInput& input() const override { return input_; }
  const std::string& options_json() const override { return options_; }
  int batch_size() const override { return 2; }
  int attempt() const override { return 1; }
  const std::string& device() const override { return device_; }
  const std::string& service_instance_id() const override { return instance_; }
  std::int64_t estimated_memory_mb() const override { return 64; }
  bool cancelled() const override { return false; }
  const std::string& temp_dir() override { return temp_; }
  void stage(std::string_view) override {}
  void report_memory(std::int64_t) override {}
  void set_result(std::string r) override { result_ = std::move(r); }
  const std::string& result() const { return result_; }

 private:
  std::string id_ = "01890000-0000-7000-8000-000000000000", service_ = "ocr", device_ = "cpu",
              instance_ = "ocr@cpu#1", temp_ = "/tmp";
  taskmgr::TaskInput input_;
  std::string options_, result_;
};

const char* worker_path() { return std::getenv("TASKMGR_FUZZ_WORKER"); }

taskmgr::Service& engine() {
  static const std::unique_ptr<taskmgr::Service> svc = [] {
    taskmgr::Config c;
    c.ocr.max_pixels = 65'536;
    if (worker_path() != nullptr && *worker_path() != '\0') {
      c.services["ocr"].isolation = "process";
      c.services["ocr"].worker_executable = worker_path();
      return taskmgr::make_process_service("ocr", c)->create("cpu");
    }
    return taskmgr::make_ocr_service(c.ocr)->create("cpu");
  }();
  return *svc;
}

// A 64x16 white PNG: the engine must keep reading it (no text, no error).
const unsigned char kKnownPng[] = {
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x10, 0x08, 0x00, 0x00, 0x00, 0x00, 0x83, 0x8c, 0x26,
    0xf5, 0x00, 0x00, 0x00, 0x16, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0xf8, 0x4f, 0x21, 0x60,
    0x18, 0x35, 0x60, 0xd4, 0x80, 0x51, 0x03, 0x86, 0x8b, 0x01, 0x00, 0x5d, 0x78, 0xfc, 0x2e, 0xad,
    0x21, 0xa9, 0x5e, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82};

bool crashed = false;

bool run(const std::uint8_t* bytes, std::size_t n, std::string options) {
  taskmgr::TaskInput in;
  in.data.assign(bytes, bytes + n);
  FuzzContext ctx(std::move(in), std::move(options));
  try {
    engine().process(ctx);
    engine().cleanup_task(ctx.task_id());
    return true;
  } catch (const taskmgr::TaskError& e) {
    engine().cleanup_task(ctx.task_id());
    // In worker mode a crash is the worker's, handled: the host is here,
    // and the known page must read on the replacement at once.
    if (worker_path() != nullptr && std::strncmp(e.what(), "worker crashed", 14) == 0) {
      crashed = true;
    }
    return false;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static unsigned runs = 0;
  const auto* nl = static_cast<const std::uint8_t*>(std::memchr(data, '\n', size));
  std::string options;
  const std::uint8_t* image = data;
  std::size_t image_size = size;
  if (nl != nullptr) {
    options.assign(reinterpret_cast<const char*>(data), static_cast<std::size_t>(nl - data));
    image = nl + 1;
    image_size = size - static_cast<std::size_t>(nl - data) - 1;
  }
  run(image, image_size, options);
  const bool check = ++runs % 256 == 0 || crashed;
  crashed = false;
  if (check && (!run(kKnownPng, sizeof kKnownPng, "") || !engine().healthy())) {
    std::abort();  // a bad input poisoned the engine (or its worker was not replaced)
  }
  return 0;
}
