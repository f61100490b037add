// Private: one task's live state inside a manager.
//
// A Record is shared (RecordPtr) by the rooms that handle its task: the
// record table, the queue's dispatcher, the running attempt, the outbox.
// Fields marked GUARDED_BY(scheduler_lock) are read and written with the
// scheduler lock held; the atomics are written by the running attempt's
// service thread without it. `phase()` and `task.status` change only in
// lifecycle.cpp, through the transition table.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sync.hpp"
#include "taskmgr/clock.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/estimator.hpp"
#include "taskmgr/task.hpp"
#include "timer_queue.hpp"

namespace taskmgr::detail {

// Where a task is in its life (status is what the host sees; phase adds
// what the scheduler needs: a retry's backoff, an attempt's cleanup).
enum class Phase : std::uint8_t {
  kNew,      // being created or recovered, not yet visible
  kPending,  // status pending
  kQueued,   // in its device's queue; status queued
  kBackoff,  // waiting for a retry timer; status queued
  kRunning,  // an attempt runs; status running
  kCleanup,  // the attempt ended (status: its outcome, or queued for a retry); cleanup runs
  kDone,     // terminal status, cleanup finished
};

const char* to_string(Phase p) noexcept;

// What an attempt came to, decided before its cleanup (outside the lock).
struct Outcome {
  enum class Kind { kCompleted, kFailed, kCancelled, kRetry } kind = Kind::kCompleted;
  FailureInfo failure;
  RetryDecision decision;
  std::optional<std::int64_t> next_estimate_mb;  // kRetry: the next attempt's estimate
  std::string result;
  std::optional<std::int64_t> peak_mb;
  // kCancelled: this host's claim on the task was lost (a shared queue);
  // failure.message says so as it is (kLostClaimMessage, or
  // kLostClaimBeforeRunMessage when `before_run`: the service did not run).
  bool lost_claim = false;
  bool before_run = false;
};

// The message of an attempt whose claim was lost (a shared queue): the
// `cancelled` this host tells its subscribers instead of the outcome it
// could not write.
inline constexpr const char* kLostClaimMessage =
    "lost claim: another host took the task over (this host's lease ran out); the result of this "
    "attempt is discarded";
// ... lost while the task waited here (its `started` write refused): the
// service did not run, the attempt is not counted.
inline constexpr const char* kLostClaimBeforeRunMessage =
    "lost claim: another host took the task over while it waited here (this host's lease ran "
    "out); it did not run here, and its next run has the same attempt number";

// What the cleanup of an attempt found, worked out outside the lock.
struct CleanupReport {
  bool hook_ok = true;
  std::vector<std::string> problems;
};

class Record {
 public:
  // Immutable after creation, so readable without the lock: the task's id,
  // service kind and input never change. The input held here is its path
  // and media type: input bytes stay in the store while the task waits
  // (input_in_store), and its attempts read them from there when they run.
  const std::string& id() const NO_THREAD_SAFETY_ANALYSIS { return task.id; }
  const std::string& service() const NO_THREAD_SAFETY_ANALYSIS { return task.service; }
  const TaskInput& input() const NO_THREAD_SAFETY_ANALYSIS { return task.input; }
  bool input_in_store() const NO_THREAD_SAFETY_ANALYSIS { return input_in_store_; }

  // The input's bytes are in the store only (the record holds none): the
  // attempt reads them. Only while the record is unshared.
  void set_input_in_store_unshared() NO_THREAD_SAFETY_ANALYSIS { input_in_store_ = true; }

  Phase phase() const REQUIRES(scheduler_lock) { return phase_; }

  // A record no other thread can see yet (being created or recovered) is
  // filled in without the lock.
  void init_unshared(Task t, const RequestFeatures& f) NO_THREAD_SAFETY_ANALYSIS {
    task = std::move(t);
    features = f;
  }
  Task& unshared_task() NO_THREAD_SAFETY_ANALYSIS { return task; }
  RequestFeatures& unshared_features() NO_THREAD_SAFETY_ANALYSIS { return features; }

  Task task GUARDED_BY(scheduler_lock);
  RequestFeatures features GUARDED_BY(scheduler_lock);
  std::atomic<bool> cancel{false};
  // close() interrupted the running attempt after tasks.close_grace_seconds:
  // the service sees cancelled(), and an attempt it stops goes back to the
  // queue (kept in the store for the next open), not to an end.
  std::atomic<bool> close_interrupt{false};
  TimerQueue::TimerId retry_timer GUARDED_BY(scheduler_lock) = 0;
  // The backoff running was set again at recovery for a retry that was
  // waiting when the process stopped: its priority was lowered already.
  bool backoff_after_recovery GUARDED_BY(scheduler_lock) = false;
  // The host set the priority while the task waited for a retry: it is
  // queued with that priority (not one lower).
  bool priority_pinned GUARDED_BY(scheduler_lock) = false;
  SteadyTime queued_steady GUARDED_BY(scheduler_lock){};
  SteadyTime started_steady GUARDED_BY(scheduler_lock){};
  std::int64_t reserved_mb GUARDED_BY(scheduler_lock) = 0;
  std::string reserved_device GUARDED_BY(scheduler_lock);
  std::string instance_id GUARDED_BY(scheduler_lock);
  // The running attempt's deadline (timeout_s 0 = none); the sweep sets
  // timed_out once it runs past it (the attempt then ends TIMEOUT).
  SteadyTime deadline GUARDED_BY(scheduler_lock){};
  double timeout_s GUARDED_BY(scheduler_lock) = 0;
  std::atomic<bool> timed_out{false};
  // Found unfinished in the store when the manager opened: its attempts
  // start only once their `started` is in the store (Attempt::run).
  std::atomic<bool> recovered{false};
  // The host chose the device (create_task or start_task named one): an
  // out-of-memory retry stays on it (or falls back to the CPU). A device
  // taskmgr chose is chosen again for the retry's smaller estimate. A task
  // found in the store at open keeps its device (unknown who chose it).
  std::atomic<bool> device_pinned{true};
  // Memory the running attempt reported (MB; -1 = none yet).
  std::atomic<std::int64_t> last_mb{-1};
  std::atomic<std::int64_t> peak_mb{-1};
  std::atomic<bool> memory_warned{false};
  bool device_warned GUARDED_BY(scheduler_lock) = false;
  // The cleanup of attempt n is claimed once, by the worker that ran it or
  // by the watchdog: cleanup_claim holds n * 4 + state (kHookRunning, then
  // kByWorker or kByWatchdog). Tagged with the attempt so that a worker
  // still stuck in an old hook cannot claim a later attempt's cleanup.
  static constexpr std::uint64_t kHookRunning = 1, kByWorker = 2, kByWatchdog = 3;
  std::atomic<std::uint64_t> cleanup_claim{0};
  SteadyTime cleanup_started GUARDED_BY(scheduler_lock){};
  SteadyTime cleanup_deadline GUARDED_BY(scheduler_lock){};
  std::string temp_dir GUARDED_BY(scheduler_lock);  // made by the attempt, removed by its cleanup
  Outcome pending GUARDED_BY(scheduler_lock);  // the attempt's outcome, applied when cleaned up
  // Health warnings, in the order they arose (the same texts that health
  // rebuilds from the stored events of a task no longer in memory).
  std::vector<std::string> warnings GUARDED_BY(scheduler_lock);

 private:
  friend class Lifecycle;
  Phase phase_ GUARDED_BY(scheduler_lock) = Phase::kNew;
  bool input_in_store_ = false;  // set before the record is shared; never changes after
};

using RecordPtr = std::shared_ptr<Record>;

}  // namespace taskmgr::detail
