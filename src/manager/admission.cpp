#include "manager/admission.hpp"

#include <fmt/format.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <boost/json.hpp>
#include <cmath>
#include <utility>

#include "json_check.hpp"
#include "taskmgr/error.hpp"
#include "utf8.hpp"

namespace taskmgr::detail {

namespace json = boost::json;

void check_options(const std::string& options) {
  if (options.empty()) return;
  if (auto problem = json_document_problem(options)) {
    throw Error(ErrorCode::kInvalidArgument, "options: " + *problem);
  }
  auto v = json::parse(options);
  if (!v.is_object()) throw Error(ErrorCode::kInvalidArgument, "options must be a JSON object");
  // "timeout_seconds" is the library's own option (the attempt's deadline).
  if (const json::value* t = v.as_object().if_contains("timeout_seconds")) {
    if (!t->is_number() || !(t->to_number<double>() > 0) ||
        !std::isfinite(t->to_number<double>())) {
      throw Error(ErrorCode::kInvalidArgument,
                  "options.timeout_seconds must be a number > 0, got " + json::serialize(*t));
    }
  }
}

std::optional<double> timeout_from_options(const std::string& options) {
  if (options.empty() || options.find("timeout_seconds") == std::string::npos) return std::nullopt;
  boost::system::error_code ec;
  auto v = json::parse(options, ec);
  if (ec || !v.is_object()) return std::nullopt;
  const json::value* t = v.as_object().if_contains("timeout_seconds");
  if (t == nullptr || !t->is_number()) return std::nullopt;
  return t->to_number<double>();
}

void check_input_path(const std::string& path) {
  if (path.empty()) return;
  // stat(), never open(): opening a FIFO for reading waits for a writer.
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return;  // absent now: the task fails when it reads
  const char* what = nullptr;
  if (S_ISFIFO(st.st_mode)) what = "a FIFO";
  if (S_ISCHR(st.st_mode)) what = "a character device";
  if (S_ISBLK(st.st_mode)) what = "a block device";
  if (S_ISSOCK(st.st_mode)) what = "a socket";
  if (S_ISDIR(st.st_mode)) what = "a directory";
  if (what == nullptr && S_ISREG(st.st_mode)) {
    // /proc and /sys files say size 0 and are made as they are read.
    struct statfs fs {};
    constexpr long kProcMagic = 0x9fa0, kSysfsMagic = 0x62656572;
    if (::statfs(path.c_str(), &fs) == 0 && (static_cast<long>(fs.f_type) == kProcMagic ||
                                             static_cast<long>(fs.f_type) == kSysfsMagic)) {
      what = static_cast<long>(fs.f_type) == kProcMagic ? "a file of /proc" : "a file of /sys";
    }
  }
  if (what == nullptr && !S_ISREG(st.st_mode)) what = "not a regular file";
  if (what != nullptr) {
    throw Error(
        ErrorCode::kInvalidArgument,
        fmt::format("input path {} is {}: an input is read from a regular file", path, what));
  }
}

void check_name(const char* what, const std::string& value) {
  if (auto at = invalid_utf8_at(value)) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{} is not valid UTF-8 (byte {})", what, *at));
  }
  // A NUL would cut the messages that quote the name (they are C strings
  // to a C host), and no service, device or media type has one.
  if (const auto nul = value.find('\0'); nul != std::string::npos) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{} contains a NUL character (byte {})", what, nul));
  }
}

void validate_request(const TaskCreateRequest& req) {
  if (auto at = invalid_utf8_at(req.input.path)) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("input path is not valid UTF-8 (byte {})", *at));
  }
  check_name("service", req.service);
  check_name("device", req.device);
  check_name("media type", req.input.media_type);
  // A path is a C string to the operating system: a NUL would end it early
  // and another file would be read than the one recorded.
  if (const auto nul = req.input.path.find('\0'); nul != std::string::npos) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("input path contains a NUL character (byte {})", nul));
  }
  check_input_path(req.input.path);
  if (req.batch_size < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("batch_size must be >= 1, got {}", req.batch_size));
  }
  if (!req.input.path.empty() && !req.input.data.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "input: give a path or bytes, not both");
  }
  check_options(req.options_json);
}

void QueueAdmission::reserve(std::size_t n, bool many) {
  MutexLock g(mu_);
  const std::size_t queued = queue_.size() + reserved_.load();
  if (queued + n > max_) {
    rejected_.fetch_add(1, std::memory_order_relaxed);
    throw Error(ErrorCode::kQueueFull,
                fmt::format("queue full: {} tasks queued (tasks.max_queue_size = {}){}; {} created",
                            queued, max_, many ? fmt::format(", {} more to start", n) : "",
                            many ? "no task was" : "the task was not"));
  }
  reserved_ += n;  // room kept until the tasks are queued
}

void QueueAdmission::check_one(const std::string& id, std::string_view stays) {
  const std::size_t queued = queue_.size() + reserved_.load();
  if (queued >= max_) {
    rejected_.fetch_add(1, std::memory_order_relaxed);
    throw Error(ErrorCode::kQueueFull,
                fmt::format("queue full: {} tasks queued (tasks.max_queue_size = {}); task {} "
                            "{}",
                            queued, max_, id, stays));
  }
}

}  // namespace taskmgr::detail
