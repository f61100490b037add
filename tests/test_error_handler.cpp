#include <doctest/doctest.h>

#include <cmath>
#include <new>

#include "taskmgr/error.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/service.hpp"

using namespace taskmgr;
using namespace std::chrono_literals;

namespace {

RetryConfig retry(bool fallback, int attempts = 4) {
  RetryConfig r;
  r.max_attempts = attempts;
  r.backoff_base_seconds = 2;
  r.backoff_multiplier = 2;
  r.backoff_jitter = 0;
  r.memory_reduction_factor = 0.5;
  r.cpu_fallback = fallback;
  return r;
}

MemoryState state() {
  MemoryState s;
  s.devices = {{"cpu", DeviceKind::kCpu, 16000, 0, 0, true, "", ""},
               {"cuda:0", DeviceKind::kGpu, 8000, 7000, 7900, true, "", ""}};
  s.device = "cuda:0";
  s.task_estimate_mb = 1000;
  return s;
}

Task gpu_task(int attempt, int batch) {
  Task t;
  t.id = "t";
  t.assigned_device = "cuda:0";
  t.attempt = attempt;
  t.batch_size = batch;
  t.estimated_memory_mb = 1000;
  return t;
}

template <typename F>
FailureInfo classify_throw(F thrower) {
  try {
    thrower();
  } catch (...) {
    return TaskErrorHandler::classify(std::current_exception());
  }
  FAIL("did not throw");
  return {};
}

}  // namespace

TEST_CASE("failures are classified by what the service threw") {
  auto oom = classify_throw([] { throw OutOfMemoryError("CUDA out of memory"); });
  CHECK(oom.reason == TaskFailureReason::kOutOfMemory);
  CHECK(oom.out_of_memory);
  CHECK(oom.retryable);
  CHECK(oom.instance_broken);
  CHECK(oom.message == "CUDA out of memory");

  auto bad_alloc = classify_throw([] { throw std::bad_alloc(); });
  CHECK(bad_alloc.reason == TaskFailureReason::kOutOfMemory);
  CHECK(bad_alloc.out_of_memory);

  auto invalid = classify_throw([] { throw InvalidInputError("not an image"); });
  CHECK(invalid.reason == TaskFailureReason::kInvalidInput);
  CHECK_FALSE(invalid.retryable);

  // Over the per-task limit: not an OOM and never retried, even when the
  // thrower said retryable (issue 15, item 7).
  auto limit = classify_throw(
      [] { throw TaskError(TaskFailureReason::kMemoryLimitExceeded, "over limit", true); });
  CHECK_FALSE(limit.out_of_memory);
  CHECK_FALSE(limit.retryable);

  auto flaky =
      classify_throw([] { throw TaskError(TaskFailureReason::kProcessingError, "flaky", true); });
  CHECK(flaky.retryable);
  CHECK_FALSE(flaky.out_of_memory);

  auto other = classify_throw([] { throw std::runtime_error("boom"); });
  CHECK(other.reason == TaskFailureReason::kProcessingError);
  CHECK_FALSE(other.retryable);
  CHECK(other.instance_broken);
  CHECK(other.message == "boom");

  auto pool = classify_throw([] { throw Error(ErrorCode::kPoolExhausted, "busy"); });
  CHECK(pool.reason == TaskFailureReason::kPoolExhausted);
  CHECK(pool.retryable);

  auto unknown = classify_throw([] { throw 42; });
  CHECK(unknown.reason == TaskFailureReason::kProcessingError);
}

TEST_CASE("a service's taskmgr::Error fails its task by its code, as service.hpp's table says") {
  struct Row {
    ErrorCode code;
    TaskFailureReason reason;
    bool retryable, broken;
  };
  const Row rows[] = {
      {ErrorCode::kInvalidArgument, TaskFailureReason::kInvalidInput, false, false},
      {ErrorCode::kOutOfMemory, TaskFailureReason::kOutOfMemory, true, true},
      {ErrorCode::kTimeout, TaskFailureReason::kTimeout, false, false},
      {ErrorCode::kCancelled, TaskFailureReason::kCancelled, false, false},
      {ErrorCode::kPoolExhausted, TaskFailureReason::kPoolExhausted, true, false},
      {ErrorCode::kDeviceUnavailable, TaskFailureReason::kDeviceUnavailable, true, false},
      {ErrorCode::kIoError, TaskFailureReason::kProcessingError, false, true},
      {ErrorCode::kInternal, TaskFailureReason::kProcessingError, false, true},
  };
  for (const Row& r : rows) {
    const std::string code(to_string(r.code));
    CAPTURE(code);
    const FailureInfo f = classify_throw([&] { throw Error(r.code, "from the service"); });
    CHECK(f.reason == r.reason);
    CHECK(f.retryable == r.retryable);
    CHECK(f.instance_broken == r.broken);
    CHECK(f.message == "from the service");
  }
}

TEST_CASE("an OOM on a GPU falls back to the CPU at once when configured") {
  std::vector<std::string> logged;
  TaskErrorHandler h(retry(true), [&](LogLevel, std::string_view m) { logged.emplace_back(m); });
  FailureInfo f;
  f.reason = TaskFailureReason::kOutOfMemory;
  f.out_of_memory = f.retryable = true;
  f.message = "CUDA out of memory";
  const RetryDecision d = h.handle_oom_error(gpu_task(1, 8), f, state());
  CHECK(d.retry);
  CHECK(d.cpu_fallback);
  CHECK(d.device == "cpu");
  CHECK(d.batch_size == 8);
  CHECK(d.delay == Duration::zero());
  CHECK(d.alert);
  // Step 1: the memory state at failure was logged, with the numbers.
  REQUIRE(logged.size() == 1);
  CHECK(logged[0].find("cuda:0") != std::string::npos);
  CHECK(logged[0].find("\"reserved_mb\":7000") != std::string::npos);
  CHECK(d.memory_state_json.find("\"observed_mb\":7900") != std::string::npos);
}

TEST_CASE("without fallback an OOM halves the batch with backoff b, 2b, 4b, then fails") {
  TaskErrorHandler h(retry(false, 4));
  FailureInfo f;
  f.reason = TaskFailureReason::kOutOfMemory;
  f.out_of_memory = f.retryable = true;
  f.message = "oom";
  int batch = 8;
  const Duration expected[] = {2s, 4s, 8s};
  for (int attempt = 1; attempt <= 3; ++attempt) {
    const RetryDecision d = h.handle_failure(gpu_task(attempt, batch), f, state());
    CAPTURE(attempt);
    REQUIRE(d.retry);
    CHECK_FALSE(d.cpu_fallback);
    CHECK(d.device == "cuda:0");
    CHECK(d.batch_size == batch / 2);
    CHECK(d.delay == expected[attempt - 1]);
    batch = d.batch_size;
  }
  const RetryDecision last = h.handle_failure(gpu_task(4, batch), f, state());
  CHECK_FALSE(last.retry);
  CHECK(last.final_reason == TaskFailureReason::kOutOfMemory);
  CHECK(last.final_message.find("max_attempts = 4") != std::string::npos);
  CHECK(last.alert);
}

TEST_CASE("an OOM on the CPU reduces the batch (never below 1)") {
  TaskErrorHandler h(retry(true));
  FailureInfo f;
  f.reason = TaskFailureReason::kOutOfMemory;
  f.out_of_memory = f.retryable = true;
  Task t = gpu_task(1, 1);
  t.assigned_device = "cpu";
  const RetryDecision d = h.handle_failure(t, f, state());
  CHECK(d.retry);
  CHECK_FALSE(d.cpu_fallback);
  CHECK(d.batch_size == 1);
  CHECK(d.device == "cpu");
}

TEST_CASE("fallback needs a CPU that the service supports and that can hold the task") {
  TaskErrorHandler h(retry(true));
  FailureInfo f;
  f.reason = TaskFailureReason::kOutOfMemory;
  f.out_of_memory = f.retryable = true;
  CHECK_FALSE(h.handle_failure(gpu_task(1, 4), f, state(), /*cpu_supported=*/false).cpu_fallback);
  Task huge = gpu_task(1, 4);
  huge.estimated_memory_mb = 20000;
  CHECK_FALSE(h.handle_failure(huge, f, state()).cpu_fallback);
}

TEST_CASE("a memory limit failure ends as MEMORY_LIMIT_EXCEEDED") {
  TaskErrorHandler h(retry(false, 1));
  FailureInfo f;
  f.reason = TaskFailureReason::kMemoryLimitExceeded;
  f.out_of_memory = f.retryable = true;
  const RetryDecision d = h.handle_failure(gpu_task(1, 2), f, state());
  CHECK_FALSE(d.retry);
  CHECK(d.final_reason == TaskFailureReason::kMemoryLimitExceeded);
}

TEST_CASE("only retryable failures are retried: the rest fail at once with their reason") {
  TaskErrorHandler h(retry(true, 3));
  FailureInfo invalid;
  invalid.reason = TaskFailureReason::kInvalidInput;
  invalid.message = "truncated PNG";
  const RetryDecision d = h.handle_failure(gpu_task(1, 1), invalid, state());
  CHECK_FALSE(d.retry);
  CHECK(d.final_reason == TaskFailureReason::kInvalidInput);
  CHECK(d.final_message == "truncated PNG");

  FailureInfo flaky;
  flaky.reason = TaskFailureReason::kPoolExhausted;
  flaky.retryable = true;
  flaky.message = "busy";
  const RetryDecision r = h.handle_failure(gpu_task(1, 4), flaky, state());
  CHECK(r.retry);
  CHECK(r.batch_size == 4);
  CHECK(r.delay == 2s);
  const RetryDecision give_up = h.handle_failure(gpu_task(3, 4), flaky, state());
  CHECK_FALSE(give_up.retry);
  CHECK(give_up.final_reason == TaskFailureReason::kPoolExhausted);  // the spec's reason
  CHECK(give_up.final_message.find("pool_exhausted") != std::string::npos);

  FailureInfo transient;  // any other retryable failure that repeats
  transient.reason = TaskFailureReason::kProcessingError;
  transient.retryable = true;
  transient.message = "flaky";
  const RetryDecision out = h.handle_failure(gpu_task(3, 4), transient, state());
  CHECK_FALSE(out.retry);
  CHECK(out.final_reason == TaskFailureReason::kMaxAttemptsExceeded);
}

TEST_CASE("backoff is capped and jittered within bounds") {
  RetryConfig r = retry(false);
  r.backoff_max_seconds = 5;
  r.backoff_jitter = 0.5;
  TaskErrorHandler h(r, nullptr, 1234);
  for (int attempt = 1; attempt < 10; ++attempt) {
    const double s = std::chrono::duration<double>(h.backoff_delay(attempt)).count();
    const double base = std::min(5.0, 2.0 * std::pow(2.0, attempt - 1));
    CHECK(s >= base * 0.5 - 1e-9);
    CHECK(s <= base * 1.5 + 1e-9);
  }
}
