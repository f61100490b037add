#include "manager/lifecycle.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace taskmgr::detail {

namespace {

constexpr std::uint8_t bit(Phase p) { return static_cast<std::uint8_t>(1u << static_cast<int>(p)); }

struct Row {
  std::uint8_t from;  // bit set of phases
  Phase to;
};

// Indexed by Step (the table of lifecycle.hpp).
constexpr Row kTable[kStepCount] = {
    /* kCreate         */ {bit(Phase::kNew), Phase::kPending},
    /* kCreateQueued   */ {bit(Phase::kNew), Phase::kQueued},
    /* kStart          */ {bit(Phase::kPending), Phase::kQueued},
    /* kRecoverPending */ {bit(Phase::kNew), Phase::kPending},
    /* kRecoverQueued  */ {bit(Phase::kNew), Phase::kQueued},
    /* kRecoverEnded   */ {bit(Phase::kNew), Phase::kDone},
    /* kDispatch       */ {bit(Phase::kQueued), Phase::kRunning},
    /* kEndAttempt     */ {bit(Phase::kRunning), Phase::kCleanup},
    /* kRequeue        */
    {static_cast<std::uint8_t>(bit(Phase::kCleanup) | bit(Phase::kQueued)), Phase::kQueued},
    /* kBackoff        */
    {static_cast<std::uint8_t>(bit(Phase::kCleanup) | bit(Phase::kQueued)), Phase::kBackoff},
    /* kBackoffElapsed */ {bit(Phase::kBackoff), Phase::kQueued},
    /* kFinish         */ {bit(Phase::kCleanup), Phase::kDone},
    /* kEndWaiting     */
    {static_cast<std::uint8_t>(bit(Phase::kNew) | bit(Phase::kPending) | bit(Phase::kQueued) |
                               bit(Phase::kBackoff) | bit(Phase::kCleanup)),
     Phase::kDone},
    /* kCountAttempt   */ {bit(Phase::kQueued), Phase::kQueued},
    /* kRequeueUncounted */ {bit(Phase::kCleanup), Phase::kQueued},
    /* kHostRetry      */ {bit(Phase::kDone), Phase::kQueued},
};

std::atomic<std::uint64_t> g_refused{0};

}  // namespace

const char* to_string(Phase p) noexcept {
  switch (p) {
    case Phase::kNew: return "new";
    case Phase::kPending: return "pending";
    case Phase::kQueued: return "queued";
    case Phase::kBackoff: return "backoff";
    case Phase::kRunning: return "running";
    case Phase::kCleanup: return "cleanup";
    case Phase::kDone: return "done";
  }
  return "?";
}

const char* to_string(Step s) noexcept {
  switch (s) {
    case Step::kCreate: return "create";
    case Step::kCreateQueued: return "create_queued";
    case Step::kStart: return "start";
    case Step::kRecoverPending: return "recover_pending";
    case Step::kRecoverQueued: return "recover_queued";
    case Step::kRecoverEnded: return "recover_ended";
    case Step::kDispatch: return "dispatch";
    case Step::kEndAttempt: return "end_attempt";
    case Step::kRequeue: return "requeue";
    case Step::kBackoff: return "backoff";
    case Step::kBackoffElapsed: return "backoff_elapsed";
    case Step::kFinish: return "finish";
    case Step::kEndWaiting: return "end_waiting";
    case Step::kCountAttempt: return "count_attempt";
    case Step::kRequeueUncounted: return "requeue_uncounted";
    case Step::kHostRetry: return "host_retry";
  }
  return "?";
}

bool Lifecycle::allowed(Phase from, Step step) noexcept {
  return (kTable[static_cast<int>(step)].from & bit(from)) != 0;
}

Phase Lifecycle::target(Step step) noexcept { return kTable[static_cast<int>(step)].to; }

bool Lifecycle::status_allowed(Step step, TaskStatus status) noexcept {
  switch (step) {
    case Step::kEndAttempt: return is_terminal(status) || status == TaskStatus::kQueued;
    case Step::kEndWaiting:
      return status == TaskStatus::kCancelled || status == TaskStatus::kFailed;
    default: return true;  // fixed by the step
  }
}

std::uint64_t Lifecycle::refused() noexcept { return g_refused.load(std::memory_order_relaxed); }

bool Lifecycle::apply_unshared(Record& r, Step step) NO_THREAD_SAFETY_ANALYSIS {
  return apply(r, step);
}

bool Lifecycle::apply(Record& r, Step step, TaskStatus status) {
  const Phase from = r.phase_;
  if (!allowed(from, step) || !status_allowed(step, status) ||
      ((step == Step::kFinish || step == Step::kRecoverEnded) && !is_terminal(r.task.status)) ||
      (step == Step::kHostRetry && r.task.status != TaskStatus::kFailed &&
       r.task.status != TaskStatus::kCancelled)) {
    g_refused.fetch_add(1, std::memory_order_relaxed);
#if defined(TASKMGR_INTERNAL_CHECKS)
    std::fprintf(stderr, "taskmgr: task %s: step %s refused in phase %s (status %s)\n",
                 r.task.id.c_str(), to_string(step), to_string(from),
                 std::string(to_string(status)).c_str());
    std::abort();
#else
    return false;
#endif
  }
  Task& t = r.task;
  switch (step) {
    case Step::kCreate:
    case Step::kRecoverPending: t.status = TaskStatus::kPending; break;
    case Step::kDispatch:
      t.status = TaskStatus::kRunning;
      t.attempt += 1;
      t.resource_cleanup_completed = false;  // this attempt's cleanup is still to come
      break;
    case Step::kCountAttempt:
      t.attempt += 1;
      t.status = TaskStatus::kQueued;
      break;
    case Step::kRequeueUncounted:
      t.attempt = std::max(0, t.attempt - 1);
      t.status = TaskStatus::kQueued;
      break;
    case Step::kEndAttempt:
    case Step::kEndWaiting: t.status = status; break;
    case Step::kFinish:
    case Step::kRecoverEnded: break;  // the terminal status stays
    default: t.status = TaskStatus::kQueued; break;
  }
  r.phase_ = target(step);
  return true;
}

}  // namespace taskmgr::detail
