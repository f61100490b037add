// taskmgr: what happens after a task fails (the spec's TaskErrorHandler).
//
// classify() turns what a service threw into a FailureInfo: OutOfMemoryError
// and std::bad_alloc are out-of-memory; TaskError carries its own reason;
// anything else is a processing error. handle_failure() then decides:
//
//  * out of memory (spec: handle_oom_error), in the spec's four steps:
//    1. log the memory state at failure (devices: total, reserved, observed;
//       the task's estimate and measured peak) at warn level;
//    2. CPU fallback: when tasks.retry.cpu_fallback is on, the task was not on
//       the CPU and the CPU can hold it, retry on the CPU at once;
//    3. otherwise requeue with batch_size * memory_reduction_factor (at least
//       1) after a backoff of base * multiplier^(attempt - 1), +/- jitter,
//       capped by backoff_max_seconds;
//    4. raise an alert for monitoring (RetryDecision::alert: the manager emits
//       a memory_warning event and counts it).
//    After tasks.retry.max_attempts attempts the task fails OUT_OF_MEMORY.
//  * over tasks.max_task_memory_mb (TaskError(kMemoryLimitExceeded)): a
//    limit, not a shortage: fails MEMORY_LIMIT_EXCEEDED at once.
//  * TaskError(kCancelled), from the service: the task ends cancelled.
//  * other retryable failures (TaskError with retryable = true, pool
//    exhausted): retried with the same backoff, same device and batch.
//  * everything else: fails at once with its reason.
//
// The handler never sleeps: it returns the delay, and the manager arms a
// timer. Thread-safety: every member is safe to call from any thread.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/clock.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/log.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

struct FailureInfo {
  TaskFailureReason reason = TaskFailureReason::kProcessingError;
  std::string message;
  bool retryable = false;
  bool out_of_memory = false;    // out of memory: handle_oom_error applies
  bool instance_broken = false;  // the service instance must be replaced
};

// Device memory when a task failed (the first step of handle_oom_error).
struct TASKMGR_API MemoryState {
  std::vector<DeviceInfo> devices;
  std::string device;  // the task's device
  std::int64_t task_estimate_mb = 0;
  std::optional<std::int64_t> task_peak_mb;
  std::string to_json() const;
};

struct RetryDecision {
  bool retry = false;
  std::string device;                                         // device of the next attempt
  int batch_size = 1;                                         // batch size of the next attempt
  Duration delay{};                                           // wait before requeueing
  bool cpu_fallback = false;                                  // device changed to the CPU
  bool alert = false;                                         // out-of-memory alert for monitoring
  TaskFailureReason final_reason = TaskFailureReason::kNone;  // when !retry
  std::string final_message;
  std::string memory_state_json;  // out-of-memory only
};

class TASKMGR_API TaskErrorHandler {
 public:
  explicit TaskErrorHandler(RetryConfig config, LogSink log = nullptr, unsigned seed = 0);
  ~TaskErrorHandler();
  TaskErrorHandler(const TaskErrorHandler&) = delete;
  TaskErrorHandler& operator=(const TaskErrorHandler&) = delete;

  static FailureInfo classify(std::exception_ptr error);

  // The spec's handle_oom_error(task): `task` as it failed (device, attempt,
  // batch size, estimate).
  RetryDecision handle_oom_error(const Task& task, const FailureInfo& failure,
                                 const MemoryState& state, bool cpu_supported = true);
  // Any failure: dispatches to handle_oom_error for memory failures.
  RetryDecision handle_failure(const Task& task, const FailureInfo& failure,
                               const MemoryState& state, bool cpu_supported = true);

  // Delay before retry number `attempt` (1-based: the delay after attempt 1).
  Duration backoff_delay(int attempt);

  const RetryConfig& config() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace taskmgr
