#include "taskmgr/error_handler.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <cmath>
#include <new>
#include <random>

#include "forced_unwind.hpp"
#include "host_call.hpp"
#include "sync.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/service.hpp"
#include "utf8.hpp"

namespace taskmgr {

struct TaskErrorHandler::Impl {
  Impl(RetryConfig c, LogSink l, unsigned seed)
      : config(c), log(std::move(l)), rng(seed != 0 ? seed : std::random_device{}()) {}

  const RetryConfig config;
  const LogSink log;
  detail::Mutex rng_mu;
  std::mt19937_64 rng GUARDED_BY(rng_mu);
};

std::string MemoryState::to_json() const {
  boost::json::object o;
  o["device"] = device;
  o["task_estimate_mb"] = task_estimate_mb;
  if (task_peak_mb) {
    o["task_peak_mb"] = *task_peak_mb;
  } else {
    o["task_peak_mb"] = nullptr;
  }
  boost::json::object devs;
  for (const auto& d : devices) {
    devs[d.id] = {{"total_mb", d.total_mb},
                  {"reserved_mb", d.reserved_mb},
                  {"observed_mb", d.observed_mb},
                  {"free_mb", d.free_mb()},
                  {"available", d.available}};
  }
  o["devices"] = std::move(devs);
  return boost::json::serialize(o);
}

TaskErrorHandler::TaskErrorHandler(RetryConfig config, LogSink log, unsigned seed)
    : impl_(std::make_unique<Impl>(config, std::move(log), seed)) {}

TaskErrorHandler::~TaskErrorHandler() = default;

const RetryConfig& TaskErrorHandler::config() const noexcept { return impl_->config; }

FailureInfo TaskErrorHandler::classify(std::exception_ptr error) {
  FailureInfo f;
  try {
    std::rethrow_exception(error);
  } catch (const TaskError& e) {
    f.reason = e.reason();
    f.message = e.what();
    f.retryable = e.retryable();
    // Over tasks.max_task_memory_mb is a limit, not a shortage: not an
    // out-of-memory error, never retried (no smaller batch, no fallback).
    f.out_of_memory = e.reason() == TaskFailureReason::kOutOfMemory;
    f.retryable =
        (f.retryable || f.out_of_memory) && e.reason() != TaskFailureReason::kMemoryLimitExceeded;
    f.instance_broken = e.reason() == TaskFailureReason::kOutOfMemory;
  } catch (const std::bad_alloc&) {
    f.reason = TaskFailureReason::kOutOfMemory;
    f.message = "allocation failed (std::bad_alloc)";
    f.retryable = true;
    f.out_of_memory = true;
    f.instance_broken = true;
  } catch (const Error& e) {
    f.message = e.what();
    switch (e.code()) {
      case ErrorCode::kPoolExhausted:
        f.reason = TaskFailureReason::kPoolExhausted;
        f.retryable = true;
        break;
      case ErrorCode::kOutOfMemory:
        f.reason = TaskFailureReason::kOutOfMemory;
        f.retryable = f.out_of_memory = f.instance_broken = true;
        break;
      case ErrorCode::kTimeout: f.reason = TaskFailureReason::kTimeout; break;
      case ErrorCode::kCancelled: f.reason = TaskFailureReason::kCancelled; break;
      case ErrorCode::kInvalidArgument: f.reason = TaskFailureReason::kInvalidInput; break;
      case ErrorCode::kDeviceUnavailable:
        f.reason = TaskFailureReason::kDeviceUnavailable;
        f.retryable = true;
        break;
      default: f.reason = TaskFailureReason::kProcessingError; f.instance_broken = true;
    }
  } catch (const std::exception& e) {
    f.reason = TaskFailureReason::kProcessingError;
    f.message = e.what();
    f.instance_broken = true;
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    f.reason = TaskFailureReason::kProcessingError;
    f.message = "unknown exception";
    f.instance_broken = true;
  }
  if (f.message.empty()) f.message = std::string(to_string(f.reason));
  // Host text, handed on in events, the store and JSON: valid UTF-8 always.
  if (detail::invalid_utf8_at(f.message)) f.message = detail::to_valid_utf8(f.message);
  return f;
}

Duration TaskErrorHandler::backoff_delay(int attempt) {
  Impl& im = *impl_;
  const RetryConfig& config = im.config;
  const double n = std::max(0, attempt - 1);
  double secs = config.backoff_base_seconds * std::pow(config.backoff_multiplier, n);
  secs = std::min(secs, config.backoff_max_seconds);
  if (config.backoff_jitter > 0 && secs > 0) {
    detail::MutexLock g(im.rng_mu);
    std::uniform_real_distribution<double> jitter(-config.backoff_jitter, config.backoff_jitter);
    secs *= 1 + jitter(im.rng);
  }
  return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(std::max(0.0, secs)));
}

RetryDecision TaskErrorHandler::handle_oom_error(const Task& task, const FailureInfo& failure,
                                                 const MemoryState& state, bool cpu_supported) {
  const RetryConfig& config = impl_->config;
  RetryDecision d;
  d.alert = true;  // step 4: always alert monitoring
  d.memory_state_json = state.to_json();
  const std::string device = task.assigned_device.value_or("cpu");
  // Step 1: the memory state at failure.
  if (const LogSink& log = impl_->log) {
    const std::string message = "task " + task.id + " ran out of memory on " + device +
                                " (attempt " + std::to_string(task.attempt) + ", batch_size " +
                                std::to_string(task.batch_size) + "): " + failure.message +
                                "; memory state: " + d.memory_state_json;
    detail::assert_no_lock_held("TaskErrorHandler::handle_oom_error: LogSink");
    try {
      detail::HostCallScope host;
      log(LogLevel::kWarn, message);
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      // A sink must not throw (log.hpp); if it does, the message is lost.
    }
  }
  if (task.attempt >= config.max_attempts) {
    d.retry = false;
    d.final_reason = failure.reason == TaskFailureReason::kMemoryLimitExceeded
                         ? TaskFailureReason::kMemoryLimitExceeded
                         : TaskFailureReason::kOutOfMemory;
    d.final_message =
        failure.message + " (gave up after " + std::to_string(task.attempt) +
        " attempt(s), tasks.retry.max_attempts = " + std::to_string(config.max_attempts) + ")";
    return d;
  }
  d.retry = true;
  // Step 2: CPU fallback.
  const DeviceInfo* cpu = nullptr;
  for (const auto& dev : state.devices) {
    if (dev.id == "cpu") cpu = &dev;
  }
  const std::int64_t estimate = task.estimated_memory_mb.value_or(0);
  if (config.cpu_fallback && device != "cpu" && cpu_supported && cpu != nullptr && cpu->available &&
      estimate <= cpu->total_mb) {
    d.cpu_fallback = true;
    d.device = "cpu";
    d.batch_size = task.batch_size;
    d.delay = Duration::zero();
    return d;
  }
  // Step 3: smaller batch, after a backoff.
  d.device = device;
  d.batch_size =
      std::max(1, static_cast<int>(std::floor(task.batch_size * config.memory_reduction_factor)));
  d.delay = backoff_delay(task.attempt);
  return d;
}

RetryDecision TaskErrorHandler::handle_failure(const Task& task, const FailureInfo& failure,
                                               const MemoryState& state, bool cpu_supported) {
  if (failure.out_of_memory) return handle_oom_error(task, failure, state, cpu_supported);
  const RetryConfig& config = impl_->config;
  RetryDecision d;
  if (!failure.retryable) {
    d.final_reason = failure.reason;
    d.final_message = failure.message;
    return d;
  }
  if (task.attempt >= config.max_attempts) {
    // A pool that stayed stuck is named as such (the spec's POOL_EXHAUSTED);
    // other retryable failures that repeat are MAX_ATTEMPTS_EXCEEDED.
    d.final_reason = failure.reason == TaskFailureReason::kPoolExhausted
                         ? TaskFailureReason::kPoolExhausted
                         : TaskFailureReason::kMaxAttemptsExceeded;
    d.final_message =
        std::string(to_string(failure.reason)) + ": " + failure.message + " (gave up after " +
        std::to_string(task.attempt) +
        " attempt(s), tasks.retry.max_attempts = " + std::to_string(config.max_attempts) + ")";
    return d;
  }
  d.retry = true;
  d.device = task.assigned_device.value_or("cpu");
  d.batch_size = task.batch_size;
  d.delay = backoff_delay(task.attempt);
  return d;
}

}  // namespace taskmgr
