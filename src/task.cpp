#include "taskmgr/task.hpp"

#include <atomic>
#include <boost/json.hpp>
#include <cstdio>
#include <ctime>
#include <random>

#include "enum_table.hpp"
#include "json_check.hpp"
#include "utf8.hpp"

namespace taskmgr {
namespace {

constexpr std::pair<TaskStatus, std::string_view> kStatusNames[] = {
    {TaskStatus::kPending, "pending"},
    {TaskStatus::kQueued, "queued"},
    {TaskStatus::kRunning, "running"},
    {TaskStatus::kCompleted, "completed"},
    {TaskStatus::kFailed, "failed"},
    {TaskStatus::kCancelled, "cancelled"},
    {TaskStatus::kUnrecognized, "unrecognized"},
};

constexpr std::pair<TaskFailureReason, std::string_view> kReasonNames[] = {
    {TaskFailureReason::kNone, "none"},
    {TaskFailureReason::kProcessingError, "processing_error"},
    {TaskFailureReason::kInvalidInput, "invalid_input"},
    {TaskFailureReason::kTimeout, "timeout"},
    {TaskFailureReason::kQueueTimeout, "queue_timeout"},
    {TaskFailureReason::kQueueFull, "queue_full"},
    {TaskFailureReason::kCancelled, "cancelled"},
    {TaskFailureReason::kMaxAttemptsExceeded, "max_attempts_exceeded"},
    {TaskFailureReason::kServiceUnavailable, "service_unavailable"},
    {TaskFailureReason::kInterrupted, "interrupted"},
    {TaskFailureReason::kOutOfMemory, "out_of_memory"},
    {TaskFailureReason::kPoolExhausted, "pool_exhausted"},
    {TaskFailureReason::kDeviceUnavailable, "device_unavailable"},
    {TaskFailureReason::kMemoryLimitExceeded, "memory_limit_exceeded"},
    {TaskFailureReason::kHostLost, "host_lost"},
};

constexpr std::pair<TaskEvent, std::string_view> kEventNames[] = {
    {TaskEvent::kCreated, "created"},
    {TaskEvent::kQueued, "queued"},
    {TaskEvent::kStarted, "started"},
    {TaskEvent::kCompleted, "completed"},
    {TaskEvent::kFailed, "failed"},
    {TaskEvent::kRetried, "retried"},
    {TaskEvent::kCancelled, "cancelled"},
    {TaskEvent::kDeviceFallback, "device_fallback"},
    {TaskEvent::kResourceAcquired, "resource_acquired"},
    {TaskEvent::kResourceReleased, "resource_released"},
    {TaskEvent::kMemoryWarning, "memory_warning"},
    {TaskEvent::kCleanupStarted, "cleanup_started"},
    {TaskEvent::kCleanupCompleted, "cleanup_completed"},
    {TaskEvent::kPriorityChanged, "priority_changed"},
    {TaskEvent::kDeleted, "deleted"},
    {TaskEvent::kPaused, "paused"},
    {TaskEvent::kResumed, "resumed"},
    {TaskEvent::kPoolResized, "pool_resized"},
};

boost::json::value opt_ts(const std::optional<Timestamp>& t) {
  if (!t) return nullptr;
  return boost::json::string(format_timestamp(*t));
}

template <typename T>
boost::json::value opt(const std::optional<T>& v) {
  if (!v) return nullptr;
  return boost::json::value_from(*v);
}

}  // namespace

std::string_view to_string(TaskStatus s) noexcept { return detail::enum_name(kStatusNames, s); }
std::string_view to_string(TaskFailureReason r) noexcept {
  return detail::enum_name(kReasonNames, r);
}
std::string_view to_string(TaskEvent e) noexcept { return detail::enum_name(kEventNames, e); }

std::optional<TaskStatus> parse_task_status(std::string_view s) noexcept {
  return detail::enum_parse(kStatusNames, s);
}
std::optional<TaskFailureReason> parse_failure_reason(std::string_view s) noexcept {
  return detail::enum_parse(kReasonNames, s);
}
std::optional<TaskEvent> parse_task_event(std::string_view s) noexcept {
  return detail::enum_parse(kEventNames, s);
}

const std::vector<TaskStatus>& all_task_statuses() {
  static const auto v = detail::enum_values(kStatusNames);
  return v;
}
const std::vector<TaskFailureReason>& all_failure_reasons() {
  static const auto v = detail::enum_values(kReasonNames);
  return v;
}
const std::vector<TaskEvent>& all_task_events() {
  static const auto v = detail::enum_values(kEventNames);
  return v;
}

std::string format_timestamp(Timestamp t) {
  // floor, not duration_cast (toward zero): before 1970 a time keeps its
  // order ("...59.999" for a microsecond before the epoch, not "...00.000").
  const auto ms_total = std::chrono::floor<std::chrono::milliseconds>(t.time_since_epoch()).count();
  auto secs = static_cast<std::time_t>(ms_total / 1000);
  auto ms = static_cast<int>(ms_total % 1000);
  if (ms < 0) {
    ms += 1000;
    secs -= 1;
  }
  std::tm tm{};
  gmtime_r(&secs, &tm);
  const int year = tm.tm_year + 1900;
  if (year < 0 || year > 9999) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", year, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
    return buf;
  }
  // YYYY-MM-DDTHH:MM:SS.mmmZ written directly: this runs for every stored
  // event and task row, and snprintf is most of its cost.
  std::string out = "0000-00-00T00:00:00.000Z";
  auto put = [&out](std::size_t at, int v, int digits) {
    for (int i = digits - 1; i >= 0; --i) {
      out[at + static_cast<std::size_t>(i)] = static_cast<char>('0' + v % 10);
      v /= 10;
    }
  };
  put(0, year, 4);
  put(5, tm.tm_mon + 1, 2);
  put(8, tm.tm_mday, 2);
  put(11, tm.tm_hour, 2);
  put(14, tm.tm_min, 2);
  put(17, tm.tm_sec, 2);
  put(20, ms, 3);
  return out;
}

std::optional<Timestamp> parse_timestamp(std::string_view text) {
  const std::string s(text);
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0, ms = 0, n = 0;
  if (std::sscanf(s.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) != 6) {
    return std::nullopt;
  }
  std::size_t pos = static_cast<std::size_t>(n);
  if (pos < s.size() && s[pos] == '.') {
    int digits = 0;
    ++pos;
    while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
      if (digits < 3) ms = ms * 10 + (s[pos] - '0');
      ++digits;
      ++pos;
    }
    if (digits == 0) return std::nullopt;
    for (int i = digits; i < 3; ++i) ms *= 10;
  }
  if (pos != s.size() - 1 || s[pos] != 'Z') return std::nullopt;
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60) return std::nullopt;
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = sec;
  const std::time_t secs = timegm(&tm);
  return Timestamp{} + std::chrono::seconds(secs) + std::chrono::milliseconds(ms);
}

namespace {

// A stored JSON document as a value, or as a string when it is not strict
// JSON (written by an older version, or by hand into the store): the output
// parses with a strict parser whatever the store holds.
boost::json::value document_or_string(const std::string& text) {
  if (!detail::json_document_problem(text)) return boost::json::parse(text);
  return boost::json::string(detail::to_valid_utf8(text));
}

// Text from the store or a host, as valid UTF-8.
boost::json::string text(const std::string& s) {
  return boost::json::string(detail::invalid_utf8_at(s) ? detail::to_valid_utf8(s) : s);
}

}  // namespace

std::string to_json(const Task& t) {
  boost::json::object o;
  o["id"] = text(t.id);
  o["service"] = text(t.service);
  boost::json::object input;
  if (!t.input.path.empty()) {
    input["path"] = text(t.input.path);
  } else {
    input["path"] = nullptr;
  }
  input["bytes"] = t.input.bytes();
  input["media_type"] = text(t.input.media_type);
  o["input"] = std::move(input);
  if (t.options_json.empty()) {
    o["options"] = boost::json::object();
  } else {
    o["options"] = document_or_string(t.options_json);
  }
  o["priority"] = t.priority;
  o["status"] = to_string(t.status);
  o["attempt"] = t.attempt;
  o["batch_size"] = t.batch_size;
  if (t.failure_reason == TaskFailureReason::kNone) {
    o["failure_reason"] = nullptr;
  } else {
    o["failure_reason"] = to_string(t.failure_reason);
  }
  o["failure_message"] = text(t.failure_message);
  o["created_at"] = format_timestamp(t.created_at);
  o["queued_at"] = opt_ts(t.queued_at);
  o["started_at"] = opt_ts(t.started_at);
  o["finished_at"] = opt_ts(t.finished_at);
  if (t.result.empty()) {
    o["result"] = nullptr;
  } else {
    o["result"] = document_or_string(t.result);
  }
  o["estimated_memory_mb"] = opt(t.estimated_memory_mb);
  o["actual_memory_mb"] = opt(t.actual_memory_mb);
  o["assigned_device"] = opt(t.assigned_device);
  o["service_instance_id"] = opt(t.service_instance_id);
  o["resource_cleanup_completed"] = t.resource_cleanup_completed;
  o["requested_device"] = opt(t.requested_device);
  o["host"] = opt(t.host);
  boost::json::object extra;
  for (const auto& [k, v] : t.extra) extra[text(k)] = text(v);
  o["extra"] = std::move(extra);
  if (t.stored_status.empty()) {
    o["stored_status"] = nullptr;
  } else {
    o["stored_status"] = text(t.stored_status);
  }
  return boost::json::serialize(o);
}

std::string generate_task_id() {
  // RFC 9562 UUIDv7: 48-bit Unix milliseconds, version, 12 bits that act as a
  // monotonic counter within one millisecond (method 1 of section 6.2), the
  // variant, 62 random bits. Ids from one process sort in creation order,
  // which keeps B-tree inserts at the end of the index.
  static std::atomic<std::uint64_t> last{0};  // (ms << 12) | counter
  const auto now_ms =
      static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());
  std::uint64_t prev = last.load(std::memory_order_relaxed);
  std::uint64_t next;
  do {
    next = now_ms << 12;
    if (next <= prev) next = prev + 1;
  } while (!last.compare_exchange_weak(prev, next, std::memory_order_relaxed));

  thread_local std::mt19937_64 rng{std::random_device{}()};
  const std::uint64_t rand_b = rng();

  const std::uint64_t ms = next >> 12;
  const std::uint64_t counter = next & 0xFFF;
  const std::uint64_t hi = (ms << 16) | (0x7ULL << 12) | counter;
  const std::uint64_t lo = (0x2ULL << 62) | (rand_b & 0x3FFFFFFFFFFFFFFFULL);

  // 8-4-4-4-12 hex digits, written directly (snprintf costs more than the
  // rest of this function together).
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id(36, '-');
  std::size_t pos = 0;
  auto put = [&](std::uint64_t v, int digits) {
    for (int i = digits - 1; i >= 0; --i) id[pos++] = kHex[(v >> (4 * i)) & 0xF];
  };
  put(hi >> 32, 8);
  ++pos;
  put((hi >> 16) & 0xFFFF, 4);
  ++pos;
  put(hi & 0xFFFF, 4);
  ++pos;
  put(lo >> 48, 4);
  ++pos;
  put(lo & 0xFFFFFFFFFFFFULL, 12);
  return id;
}

}  // namespace taskmgr
