#include <doctest/doctest.h>

#include <boost/json.hpp>
#include <set>
#include <string>

#include "taskmgr/task.hpp"

using namespace taskmgr;

TEST_CASE("every TaskStatus round-trips through its string form") {
  std::set<std::string> names;
  for (TaskStatus s : all_task_statuses()) {
    const std::string name(to_string(s));
    CHECK(name != "unknown");
    CHECK(names.insert(name).second);
    REQUIRE(parse_task_status(name).has_value());
    CHECK(*parse_task_status(name) == s);
  }
  CHECK(names == std::set<std::string>{"pending", "queued", "running", "completed", "failed",
                                       "cancelled", "unrecognized"});
  CHECK_FALSE(parse_task_status("Pending").has_value());
  CHECK_FALSE(parse_task_status("").has_value());
}

TEST_CASE(
    "every TaskFailureReason round-trips: the spec's four memory reasons are spelled as in the "
    "spec") {
  std::set<std::string> names;
  for (TaskFailureReason r : all_failure_reasons()) {
    const std::string name(to_string(r));
    CHECK(name != "unknown");
    CHECK(names.insert(name).second);
    REQUIRE(parse_failure_reason(name).has_value());
    CHECK(*parse_failure_reason(name) == r);
  }
  CHECK(to_string(TaskFailureReason::kOutOfMemory) == "out_of_memory");
  CHECK(to_string(TaskFailureReason::kPoolExhausted) == "pool_exhausted");
  CHECK(to_string(TaskFailureReason::kDeviceUnavailable) == "device_unavailable");
  CHECK(to_string(TaskFailureReason::kMemoryLimitExceeded) == "memory_limit_exceeded");
  for (const char* existing : {"processing_error", "invalid_input", "timeout", "queue_timeout",
                               "queue_full", "cancelled", "max_attempts_exceeded"}) {
    CAPTURE(existing);
    CHECK(names.count(existing) == 1);
  }
  CHECK_FALSE(parse_failure_reason("OUT_OF_MEMORY").has_value());
}

TEST_CASE(
    "every TaskEvent round-trips: the spec's five resource events are spelled as in the spec") {
  std::set<std::string> names;
  for (TaskEvent e : all_task_events()) {
    const std::string name(to_string(e));
    CHECK(name != "unknown");
    CHECK(names.insert(name).second);
    REQUIRE(parse_task_event(name).has_value());
    CHECK(*parse_task_event(name) == e);
  }
  CHECK(to_string(TaskEvent::kResourceAcquired) == "resource_acquired");
  CHECK(to_string(TaskEvent::kResourceReleased) == "resource_released");
  CHECK(to_string(TaskEvent::kMemoryWarning) == "memory_warning");
  CHECK(to_string(TaskEvent::kCleanupStarted) == "cleanup_started");
  CHECK(to_string(TaskEvent::kCleanupCompleted) == "cleanup_completed");
  for (const char* lifecycle : {"created", "queued", "started", "completed", "failed", "retried",
                                "cancelled", "device_fallback"}) {
    CAPTURE(lifecycle);
    CHECK(names.count(lifecycle) == 1);
  }
  CHECK(to_string(TaskEvent::kPriorityChanged) == "priority_changed");  // operator events
  CHECK(to_string(TaskEvent::kDeleted) == "deleted");
  CHECK(to_string(TaskEvent::kPaused) == "paused");  // manager-level events
  CHECK(to_string(TaskEvent::kResumed) == "resumed");
  CHECK(to_string(TaskEvent::kPoolResized) == "pool_resized");
  CHECK(names.size() == 18);
}

TEST_CASE("is_terminal is true exactly for completed, failed, cancelled") {
  for (TaskStatus s : all_task_statuses()) {
    const bool expected =
        s == TaskStatus::kCompleted || s == TaskStatus::kFailed || s == TaskStatus::kCancelled;
    CHECK(is_terminal(s) == expected);
  }
}

TEST_CASE("generate_task_id gives distinct, time-ordered 36-char UUIDv7 strings") {
  // 8-4-4-4-12 lowercase hex, version nibble 7, variant bits 10.
  auto is_uuid7 = [](const std::string& id) {
    if (id.size() != 36) return false;
    for (std::size_t i = 0; i < id.size(); ++i) {
      const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
      const char ch = id[i];
      if (dash != (ch == '-')) return false;
      if (!dash && !((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) return false;
    }
    return id[14] == '7' && std::string("89ab").find(id[19]) != std::string::npos;
  };
  CHECK_FALSE(is_uuid7("01a21fc1-76e9-4000-b68d-d4933be21043"));  // version 4
  CHECK_FALSE(is_uuid7("01a21fc1-76e9-7000-c68d-d4933be21043"));  // wrong variant
  std::set<std::string> seen;
  std::string prev;
  for (int i = 0; i < 5000; ++i) {
    std::string id = generate_task_id();
    REQUIRE(id.size() == 36);
    REQUIRE(is_uuid7(id));
    REQUIRE(seen.insert(id).second);
    // Monotonic within the process: byte order = creation order.
    REQUIRE(id > prev);
    prev = id;
  }
}

TEST_CASE("the UUIDv7 timestamp is the creation time in Unix milliseconds") {
  const auto before = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  const std::string id = generate_task_id();
  const auto after = std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
  const std::string hex = id.substr(0, 8) + id.substr(9, 4);
  const long long ms = std::stoll(hex, nullptr, 16);
  CHECK(ms >= before);
  CHECK(ms <= after + 1);
}

TEST_CASE("format_timestamp is RFC 3339 UTC with milliseconds") {
  using namespace std::chrono;
  CHECK(format_timestamp(Timestamp{}) == "1970-01-01T00:00:00.000Z");
  const Timestamp t = Timestamp{} + seconds(1795827723) + milliseconds(456);
  CHECK(format_timestamp(t) == "2026-11-28T01:02:03.456Z");
}

TEST_CASE("to_json carries every task field with the spec's names") {
  Task t;
  t.id = generate_task_id();
  t.service = "ocr";
  t.input.path = "/tmp/page.png";
  t.priority = 5;
  t.status = TaskStatus::kFailed;
  t.attempt = 2;
  t.batch_size = 4;
  t.failure_reason = TaskFailureReason::kOutOfMemory;
  t.failure_message = "cuda:0 ran out";
  t.options_json = R"({"psm": 6})";
  t.estimated_memory_mb = 512;
  t.assigned_device = "cuda:0";
  t.service_instance_id = "ocr@cuda:0#1";
  t.result = R"({"text":"hi"})";

  const auto v = boost::json::parse(to_json(t));
  const auto& o = v.as_object();
  for (const char* key : {"id",
                          "service",
                          "input",
                          "options",
                          "priority",
                          "status",
                          "attempt",
                          "batch_size",
                          "failure_reason",
                          "failure_message",
                          "created_at",
                          "queued_at",
                          "started_at",
                          "finished_at",
                          "result",
                          "estimated_memory_mb",
                          "actual_memory_mb",
                          "assigned_device",
                          "service_instance_id",
                          "resource_cleanup_completed"}) {
    CAPTURE(key);
    CHECK(o.contains(key));
  }
  CHECK(o.at("id").as_string() == t.id);
  CHECK(o.at("status").as_string() == "failed");
  CHECK(o.at("failure_reason").as_string() == "out_of_memory");
  CHECK(o.at("estimated_memory_mb").as_int64() == 512);
  CHECK(o.at("actual_memory_mb").is_null());
  CHECK(o.at("assigned_device").as_string() == "cuda:0");
  CHECK(o.at("service_instance_id").as_string() == "ocr@cuda:0#1");
  CHECK(o.at("resource_cleanup_completed").as_bool() == false);
  CHECK(o.at("options").at("psm").as_int64() == 6);
  CHECK(o.at("result").at("text").as_string() == "hi");
  CHECK(o.at("input").at("path").as_string() == "/tmp/page.png");
  CHECK(o.at("queued_at").is_null());
}

TEST_CASE("to_json of a task with in-memory input reports its size, not its bytes") {
  Task t;
  t.input.data = {1, 2, 3, 4};
  t.input.media_type = "image/png";
  const auto v = boost::json::parse(to_json(t));
  CHECK(v.at("input").at("path").is_null());
  CHECK(v.at("input").at("bytes").as_int64() == 4);
  CHECK(v.at("failure_reason").is_null());
  CHECK(v.at("result").is_null());
}
