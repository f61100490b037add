// taskmgr: services, the work a task does.
//
// A ServiceFactory makes Service instances for one service kind ("ocr", or a
// host's own, e.g. a GPU model). An instance is one warm engine on one device:
// the ServicePool creates it once and reuses it for task after task, never
// from two threads at once. The library's own OCR service is one of these;
// hosts register theirs with TaskManager::register_service and get the same
// placement, pooling, OOM recovery and cleanup.
//
// A service reports how a task failed by throwing:
//   OutOfMemoryError      (or std::bad_alloc)  -> OUT_OF_MEMORY, retried per tasks.retry
//   InvalidInputError                           -> INVALID_INPUT, not retried
//   TaskError(reason, message, retryable)       -> that reason
//   Error (error.hpp), by its code:
//     kInvalidArgument                          -> INVALID_INPUT, not retried
//     kOutOfMemory                              -> OUT_OF_MEMORY, retried per tasks.retry
//     kTimeout, kCancelled                      -> TIMEOUT, CANCELLED, not retried
//     kPoolExhausted, kDeviceUnavailable        -> POOL_EXHAUSTED, DEVICE_UNAVAILABLE, retried
//     any other code                            -> PROCESSING_ERROR, not retried
//   any other exception                         -> PROCESSING_ERROR, not retried
// After an out-of-memory failure (OutOfMemoryError, std::bad_alloc,
// Error(kOutOfMemory)), an Error of a code not listed above, or any other
// exception that is not a TaskError, the instance is destroyed and replaced
// (it may hold broken state).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

#include "taskmgr/device.hpp"
#include "taskmgr/estimator.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

// What a service sees of the task it processes. Valid only during process();
// used only from the thread that called process().
class TASKMGR_API TaskContext {
 public:
  virtual ~TaskContext();
  virtual const std::string& task_id() const = 0;
  virtual const std::string& service() const = 0;
  virtual const TaskInput& input()
      const = 0;  // with its bytes, read from the store for this attempt
  virtual const std::string& options_json() const = 0;
  virtual int batch_size() const = 0;  // shrinks after an out-of-memory retry
  virtual int attempt() const = 0;     // 1 for the first run
  virtual const std::string& device() const = 0;
  virtual const std::string& service_instance_id() const = 0;
  virtual std::int64_t estimated_memory_mb() const = 0;

  // Cooperative cancellation: true once the host cancelled the task.
  virtual bool cancelled() const = 0;
  // The attempt's deadline (tasks.task_timeout_seconds, or the task's
  // "timeout_seconds" option): true once it has passed. The attempt then
  // ends TIMEOUT whatever process() does; stop early when you see it.
  virtual bool deadline_exceeded() const;
  // Seconds left before the deadline (infinity when there is none).
  virtual double seconds_left() const;
  // Throws TaskError(kCancelled) when cancelled(), TaskError(kTimeout) when
  // deadline_exceeded().
  void throw_if_cancelled() const;

  // A directory private to this task, created on first call and removed with
  // everything in it when the task's cleanup runs.
  virtual const std::string& temp_dir() = 0;

  // Marks the start of a processing stage ("load", "recognize", ...): a
  // task_metrics sample with the memory last reported. Throws
  // Error(kInvalidArgument) for a name that is not UTF-8.
  virtual void stage(std::string_view name) = 0;
  // Reports memory the task uses now (MB). The peak becomes actual_memory_mb.
  // Throws TaskError(kMemoryLimitExceeded) past tasks.max_task_memory_mb (the
  // task fails MEMORY_LIMIT_EXCEEDED, not retried), and OutOfMemoryError past
  // the device's total (retried as out of memory).
  virtual void report_memory(std::int64_t mb) = 0;

  // The result document. Empty is allowed; anything else must be strict
  // JSON in UTF-8 with finite numbers (every reader parses it back), or
  // this throws Error(kInvalidArgument) naming the byte or the number's
  // JSON Pointer, and the result set before stays. (Let it escape and the
  // task fails INVALID_INPUT, as every Error(kInvalidArgument) does.)
  virtual void set_result(std::string result_json) = 0;
};

class TASKMGR_API TaskError : public std::runtime_error {
 public:
  TaskError(TaskFailureReason reason, const std::string& message, bool retryable = false);
  ~TaskError() override;
  TaskError(const TaskError&) = default;
  TaskError& operator=(const TaskError&) = default;
  TaskFailureReason reason() const noexcept { return reason_; }
  bool retryable() const noexcept { return retryable_; }

 private:
  TaskFailureReason reason_;
  bool retryable_;
};

class TASKMGR_API OutOfMemoryError : public TaskError {
 public:
  explicit OutOfMemoryError(const std::string& message);
  ~OutOfMemoryError() override;
  OutOfMemoryError(const OutOfMemoryError&) = default;
  OutOfMemoryError& operator=(const OutOfMemoryError&) = default;
};

class TASKMGR_API InvalidInputError : public TaskError {
 public:
  explicit InvalidInputError(const std::string& message);
  ~InvalidInputError() override;
  InvalidInputError(const InvalidInputError&) = default;
  InvalidInputError& operator=(const InvalidInputError&) = default;
};

class TASKMGR_API Service {
 public:
  virtual ~Service();
  // Processes one task. Throws to fail it (see the top of this header).
  virtual void process(TaskContext& ctx) = 0;
  // Clears caches held for one task; part of the task's cleanup, bounded by
  // tasks.cleanup_timeout_seconds. Must not throw.
  virtual void cleanup_task(const std::string& task_id) noexcept;
  // False when the instance should be destroyed and replaced.
  virtual bool healthy() const noexcept;
};

class TASKMGR_API ServiceFactory {
 public:
  virtual ~ServiceFactory();
  virtual std::string kind() const = 0;
  // Creates one instance on a device (may be slow: loads an engine). Throws
  // on failure; the task that needed it fails with its message.
  virtual std::unique_ptr<Service> create(const std::string& device) = 0;
  // Devices the service can run on (default: all).
  virtual bool supports(const DeviceInfo& device) const;
  // The service's memory model (default: none, the estimator's linear one).
  virtual std::shared_ptr<const MemoryModel> memory_model() const;
};

// A factory whose instances all run `fn` (tests, benchmarks, simple hosts).
TASKMGR_API std::shared_ptr<ServiceFactory> make_function_service(
    std::string kind, std::function<void(TaskContext&)> fn,
    std::shared_ptr<const MemoryModel> model = nullptr);

}  // namespace taskmgr
