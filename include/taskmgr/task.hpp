// taskmgr: the task model.
//
// Plain data and string conversions only; nothing here does I/O. The field
// names follow the spec (spec/task-management-delta.md) so that a reader can
// map spec to code: estimated_memory_mb, actual_memory_mb, assigned_device,
// service_instance_id, resource_cleanup_completed.
//
// Every enum has a stable string form (the spec's, e.g. "out_of_memory",
// "resource_acquired") used in JSON, in the database and in the C ABI.
// to_string() and the parse_*() functions round-trip exactly; parsing an
// unknown string returns std::nullopt.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "taskmgr/export.hpp"

namespace taskmgr {

// Wall-clock time of task records (UTC). Deadlines use steady time (clock.hpp).
using Timestamp = std::chrono::system_clock::time_point;

enum class TaskStatus {
  kPending,    // created, not started
  kQueued,     // waiting in a device queue (also while backing off a retry)
  kRunning,    // a service instance is processing it
  kCompleted,  // terminal: result is set
  kFailed,     // terminal: failure_reason and failure_message are set
  kCancelled,  // terminal: cancelled by the host
  // A status word taskmgr does not know, read from a table it adopted
  // (docs/STORAGE.md, "Adopting an existing database") and not mapped by
  // storage.adopt.status_map: the word is Task::stored_status, kept as it is
  // in the database. Such a task is never started, recovered or changed;
  // its health says why.
  kUnrecognized,  // "unrecognized"
};

enum class TaskFailureReason {
  kNone,
  // Existing reasons.
  kProcessingError,      // the service failed for a reason not listed below
  kInvalidInput,         // the input cannot be read or decoded
  kTimeout,              // processing ran past its deadline
  kQueueTimeout,         // waited longer than tasks.queue_timeout_seconds
  kQueueFull,            // tasks.max_queue_size was reached
  kCancelled,            // cancelled by the host
  kMaxAttemptsExceeded,  // a retryable failure repeated tasks.retry.max_attempts times
  kServiceUnavailable,   // no service of the task's kind is registered
  kInterrupted,          // the process died while the task ran, no attempts left
  // New memory-related reasons (spec section 5).
  kOutOfMemory,          // "out_of_memory"
  kPoolExhausted,        // "pool_exhausted"
  kDeviceUnavailable,    // "device_unavailable"
  kMemoryLimitExceeded,  // "memory_limit_exceeded"
  // Several hosts (docs/SCALING.md): the host running the task stopped
  // renewing its lease, and its attempts ran out ("host_lost").
  kHostLost,
};

enum class TaskEvent {
  // Lifecycle events.
  kCreated,
  kQueued,
  kStarted,
  kCompleted,
  kFailed,
  kRetried,
  kCancelled,
  kDeviceFallback,
  // New resource events (spec section 6).
  kResourceAcquired,  // "resource_acquired"
  kResourceReleased,  // "resource_released"
  kMemoryWarning,     // "memory_warning"
  kCleanupStarted,    // "cleanup_started"
  kCleanupCompleted,  // "cleanup_completed"
  // Operator events.
  kPriorityChanged,  // "priority_changed": the host changed a waiting task's priority
  kDeleted,          // "deleted": the host deleted the ended task (TaskManager::delete_task)
  // Manager-level events (task_id ""): delivered to subscribers, not stored
  // (the store keeps the pauses themselves).
  kPaused,   // "paused": the host paused the manager, a device or a service (TaskManager::pause)
  kResumed,  // "resumed": the host resumed it (TaskManager::resume)
  kPoolResized,  // "pool_resized": the host resized a pool (TaskManager::resize_pool)
};

TASKMGR_API std::string_view to_string(TaskStatus status) noexcept;
TASKMGR_API std::string_view to_string(TaskFailureReason reason) noexcept;
TASKMGR_API std::string_view to_string(TaskEvent event) noexcept;

TASKMGR_API std::optional<TaskStatus> parse_task_status(std::string_view s) noexcept;
TASKMGR_API std::optional<TaskFailureReason> parse_failure_reason(std::string_view s) noexcept;
TASKMGR_API std::optional<TaskEvent> parse_task_event(std::string_view s) noexcept;

// All values of each enum, in declaration order (for tests, docs, bindings).
TASKMGR_API const std::vector<TaskStatus>& all_task_statuses();
TASKMGR_API const std::vector<TaskFailureReason>& all_failure_reasons();
TASKMGR_API const std::vector<TaskEvent>& all_task_events();

// True for completed, failed and cancelled.
constexpr bool is_terminal(TaskStatus s) noexcept {
  return s == TaskStatus::kCompleted || s == TaskStatus::kFailed || s == TaskStatus::kCancelled;
}

// What a task works on: a file path, or encoded bytes held in memory (so C
// and Python hosts can pass an image they already have), or nothing (for
// services that need no input). Exactly one of path/data is used.
struct TaskInput {
  std::string path;                // a file; empty when data is used
  std::vector<std::uint8_t> data;  // encoded bytes (e.g. a PNG); empty when path is used
  std::string media_type;          // optional hint, e.g. "image/png"
  // The length of the input's bytes where they are left out (a task's
  // snapshot or a listing keeps them in the store: data is empty there).
  // Set by taskmgr; ignored in a request.
  std::uint64_t left_out_bytes = 0;

  bool empty() const noexcept { return path.empty() && data.empty(); }
  // The input's bytes: data's, or those left out.
  std::uint64_t bytes() const noexcept { return data.empty() ? left_out_bytes : data.size(); }
  // Leaves the bytes out, keeping their length.
  void leave_out_data() {
    if (data.empty()) return;
    left_out_bytes = data.size();
    data = {};
  }
};

// What the host asks for when it creates a task (the spec's TaskCreateRequest).
struct TaskCreateRequest {
  std::string service = "ocr";  // service kind; must be registered
  TaskInput input;
  int priority = 0;          // larger runs first
  int batch_size = 1;        // pages held and processed at once (>= 1)
  std::string device;        // requested device ("cpu", "cuda:0"); empty = any
  std::string options_json;  // service options as a JSON object; empty = none
  // Queue the task at once, as start_task(id) would, in the same step: it is
  // stored already queued (one commit for both), and a full queue refuses
  // the creation (QUEUE_FULL) instead of leaving the task pending.
  bool start = false;
};

// A task. Copies are snapshots: the manager owns the live state.
struct Task {
  // Existing fields.
  std::string id;       // 36-char UUID (version 7: time-ordered)
  std::string service;  // service kind, e.g. "ocr"
  TaskInput input;
  std::string options_json;  // service options as given at creation/start
  int priority = 0;
  TaskStatus status = TaskStatus::kPending;
  int attempt = 0;  // attempts started so far (first run = 1)
  int batch_size = 1;
  TaskFailureReason failure_reason = TaskFailureReason::kNone;
  std::string failure_message;
  Timestamp created_at{};
  std::optional<Timestamp> queued_at;
  std::optional<Timestamp> started_at;
  std::optional<Timestamp> finished_at;
  std::string result;  // service-defined result document (JSON); empty until completed

  // New resource-tracking fields (spec section 1).
  std::optional<std::int64_t> estimated_memory_mb;
  std::optional<std::int64_t> actual_memory_mb;
  std::optional<std::string> assigned_device;
  std::optional<std::string> service_instance_id;
  bool resource_cleanup_completed = false;

  // Several hosts sharing one queue (docs/SCALING.md): the device the host
  // named at create or start (unset: the host that runs it chooses), and
  // the host name of the host that claimed it (assigned_device is one of
  // that host's devices). Unset on a single host.
  std::optional<std::string> requested_device;
  std::optional<std::string> host;

  // Only for a table taskmgr adopted (docs/STORAGE.md, "Adopting an existing
  // database"): its columns taskmgr has no field for, by name, with their
  // values as text (NULL ones left out). Read, never written by taskmgr.
  std::map<std::string, std::string> extra;
  // The status word as stored when status is kUnrecognized; "" otherwise.
  std::string stored_status;
};

// The task as a JSON object with every field above (snake_case keys, the
// spec's names; timestamps as RFC 3339 UTC strings with milliseconds, absent
// optionals as null, bytes input as its length only, result embedded as JSON
// when it parses, else as a string), plus "extra" (an object of strings, {}
// unless adopted) and "stored_status" (null unless unrecognized).
TASKMGR_API std::string to_json(const Task& task);

// RFC 3339 UTC with milliseconds, e.g. "2026-11-28T01:02:03.456Z".
TASKMGR_API std::string format_timestamp(Timestamp t);
// The inverse of format_timestamp (milliseconds optional); nullopt when malformed.
TASKMGR_API std::optional<Timestamp> parse_timestamp(std::string_view s);

// A new random, time-ordered UUID (RFC 9562 version 7) in its 36-char form.
TASKMGR_API std::string generate_task_id();

}  // namespace taskmgr
