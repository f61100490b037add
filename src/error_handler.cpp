#include "taskmgr/error_handler.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <cmath>
#include <new>

#include "taskmgr/error.hpp"
#include "taskmgr/service.hpp"

namespace taskmgr {

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
    : config_(config), log_(std::move(log)), rng_(seed != 0 ? seed : std::random_device{}()) {}

FailureInfo TaskErrorHandler::classify(std::exception_ptr error) {
  FailureInfo f;
  try {
    std::rethrow_exception(error);
  } catch (const TaskError& e) {
    f.reason = e.reason();
    f.message = e.what();
    f.retryable = e.retryable();
    f.out_of_memory = e.reason() == TaskFailureReason::kOutOfMemory ||
                      e.reason() == TaskFailureReason::kMemoryLimitExceeded;
    f.retryable = f.retryable || f.out_of_memory;
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
      case ErrorCode::kTimeout:
        f.reason = TaskFailureReason::kTimeout;
        break;
      case ErrorCode::kCancelled:
        f.reason = TaskFailureReason::kCancelled;
        break;
      case ErrorCode::kInvalidArgument:
        f.reason = TaskFailureReason::kInvalidInput;
        break;
      case ErrorCode::kDeviceUnavailable:
        f.reason = TaskFailureReason::kDeviceUnavailable;
        f.retryable = true;
        break;
      default:
        f.reason = TaskFailureReason::kProcessingError;
        f.instance_broken = true;
    }
  } catch (const std::exception& e) {
    f.reason = TaskFailureReason::kProcessingError;
    f.message = e.what();
    f.instance_broken = true;
  } catch (...) {
    f.reason = TaskFailureReason::kProcessingError;
    f.message = "unknown exception";
    f.instance_broken = true;
  }
  if (f.message.empty()) f.message = std::string(to_string(f.reason));
  return f;
}

Duration TaskErrorHandler::backoff_delay(int attempt) {
  const double n = std::max(0, attempt - 1);
  double secs = config_.backoff_base_seconds * std::pow(config_.backoff_multiplier, n);
  secs = std::min(secs, config_.backoff_max_seconds);
  if (config_.backoff_jitter > 0 && secs > 0) {
    std::lock_guard<std::mutex> g(rng_mu_);
    std::uniform_real_distribution<double> jitter(-config_.backoff_jitter, config_.backoff_jitter);
    secs *= 1 + jitter(rng_);
  }
  return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(std::max(0.0, secs)));
}

RetryDecision TaskErrorHandler::handle_oom_error(const Task& task, const FailureInfo& failure,
                                                 const MemoryState& state, bool cpu_supported) {
  RetryDecision d;
  d.alert = true;  // step 4: always alert monitoring
  d.memory_state_json = state.to_json();
  const std::string device = task.assigned_device.value_or("cpu");
  // Step 1: the memory state at failure.
  if (log_) {
    log_(LogLevel::kWarn, "task " + task.id + " ran out of memory on " + device + " (attempt " +
                              std::to_string(task.attempt) + ", batch_size " +
                              std::to_string(task.batch_size) + "): " + failure.message +
                              "; memory state: " + d.memory_state_json);
  }
  if (task.attempt >= config_.max_attempts) {
    d.retry = false;
    d.final_reason = failure.reason == TaskFailureReason::kMemoryLimitExceeded
                         ? TaskFailureReason::kMemoryLimitExceeded
                         : TaskFailureReason::kOutOfMemory;
    d.final_message = failure.message + " (gave up after " + std::to_string(task.attempt) +
                      " attempt(s), tasks.retry.max_attempts = " +
                      std::to_string(config_.max_attempts) + ")";
    return d;
  }
  d.retry = true;
  // Step 2: CPU fallback.
  const DeviceInfo* cpu = nullptr;
  for (const auto& dev : state.devices) {
    if (dev.id == "cpu") cpu = &dev;
  }
  const std::int64_t estimate = task.estimated_memory_mb.value_or(0);
  if (config_.cpu_fallback && device != "cpu" && cpu_supported && cpu != nullptr &&
      cpu->available && estimate <= cpu->total_mb) {
    d.cpu_fallback = true;
    d.device = "cpu";
    d.batch_size = task.batch_size;
    d.delay = Duration::zero();
    return d;
  }
  // Step 3: smaller batch, after a backoff.
  d.device = device;
  d.batch_size = std::max(
      1, static_cast<int>(std::floor(task.batch_size * config_.memory_reduction_factor)));
  d.delay = backoff_delay(task.attempt);
  return d;
}

RetryDecision TaskErrorHandler::handle_failure(const Task& task, const FailureInfo& failure,
                                               const MemoryState& state, bool cpu_supported) {
  if (failure.out_of_memory) return handle_oom_error(task, failure, state, cpu_supported);
  RetryDecision d;
  if (!failure.retryable) {
    d.final_reason = failure.reason;
    d.final_message = failure.message;
    return d;
  }
  if (task.attempt >= config_.max_attempts) {
    d.final_reason = TaskFailureReason::kMaxAttemptsExceeded;
    d.final_message = std::string(to_string(failure.reason)) + ": " + failure.message +
                      " (gave up after " + std::to_string(task.attempt) +
                      " attempt(s), tasks.retry.max_attempts = " +
                      std::to_string(config_.max_attempts) + ")";
    return d;
  }
  d.retry = true;
  d.device = task.assigned_device.value_or("cpu");
  d.batch_size = task.batch_size;
  d.delay = backoff_delay(task.attempt);
  return d;
}

}  // namespace taskmgr
