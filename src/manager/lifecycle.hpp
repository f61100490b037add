// Private: the task state machine, the only writer of a task's phase and
// status.
//
// Every change goes through Lifecycle::apply(record, step): the table below
// says from which phases a step may be taken and where it leads; a step
// from any other phase is refused (a bug in the caller: it aborts in check
// builds, and is counted and ignored in release builds). The steps:
//
// clang-format off
//   step             from                    to       status     when
//   kCreate          New                     Pending  pending
//   kCreateQueued    New                     Queued   queued     create with start
//   kStart           Pending                 Queued   queued
//   kRecoverPending  New                     Pending  pending
//   kRecoverQueued   New                     Queued   queued     found queued, or interrupted
//                                                                and retried
//   kRecoverEnded    New                     Done     (kept)     ended; its cleanup redone
//   kDispatch        Queued                  Running  running    attempt + 1, cleanup flag reset
//   kEndAttempt      Running                 Cleanup  outcome    completed|failed|cancelled, or
//                                                                queued to retry
//   kRequeue         Cleanup, Queued         Queued   queued     retry at once; a queued task
//                                                                moved, or retried after its pool
//                                                                stayed stuck
//   kBackoff         Cleanup, Queued         Backoff  queued
//   kBackoffElapsed  Backoff                 Queued   queued
//   kFinish          Cleanup                 Done     (kept)     the cleanup of a terminal outcome
//                                                                finished
//   kEndWaiting      New, Pending, Queued,   Done     cancelled  never ran this attempt, or
//                    Backoff, Cleanup                 |failed    cancelled while the cleanup of an
//                                                                attempt to be retried ran
//   kCountAttempt    Queued                  Queued   queued     an attempt that could not start:
//                                                                attempt + 1
//   kRequeueUncounted Cleanup                Queued   queued     an attempt close() interrupted:
//                                                                attempt - 1 (not charged)
//   kHostRetry       Done                    Queued   queued     the host retries a failed or
//                                                                cancelled task (retry_task)
// clang-format on
#pragma once

#include <cstdint>
#include <string>

#include "manager/record.hpp"

namespace taskmgr::detail {

enum class Step : std::uint8_t {
  kCreate,
  kCreateQueued,
  kStart,
  kRecoverPending,
  kRecoverQueued,
  kRecoverEnded,
  kDispatch,
  kEndAttempt,
  kRequeue,
  kBackoff,
  kBackoffElapsed,
  kFinish,
  kEndWaiting,
  kCountAttempt,
  kRequeueUncounted,
  kHostRetry,
};
inline constexpr int kStepCount = 16;

const char* to_string(Step s) noexcept;

class Lifecycle {
 public:
  // Whether the table has `step` from `from`.
  static bool allowed(Phase from, Step step) noexcept;
  // Where `step` leads.
  static Phase target(Step step) noexcept;
  // Whether `status` may be the result of `step` (the steps that end
  // something take the outcome's status; the others have a fixed one).
  static bool status_allowed(Step step, TaskStatus status) noexcept;

  // Applies `step` to the record: phase, status and what the step implies
  // (kDispatch, kCountAttempt: attempt + 1; kDispatch: cleanup flag reset).
  // `status` is the outcome for kEndAttempt and kEndWaiting (ignored
  // otherwise). False, with nothing changed, when the step is not allowed.
  static bool apply(Record& r, Step step, TaskStatus status = TaskStatus::kPending)
      REQUIRES(scheduler_lock);

  // The same for a record no other thread can see yet (being created or
  // recovered): no lock needed.
  static bool apply_unshared(Record& r, Step step);

  // Transitions refused so far (release builds; check builds abort).
  static std::uint64_t refused() noexcept;
};

}  // namespace taskmgr::detail
