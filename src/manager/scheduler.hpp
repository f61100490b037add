// Private: the scheduler, the core of a manager (leveldb's DBImpl role): it
// owns the scheduler lock and the state it guards (the record table, the
// per-device queues, the tasks waiting for a retry or in a cleanup), and it
// is where every task changes: each transition below applies one Lifecycle
// step, updates the task, counts it and commits its events to the outbox,
// all with the lock held. Nothing here calls host code, reads the store or
// touches the file system: the analysis refuses it (REQUIRES(!scheduler_lock)
// on all of those). What needs them is worked out before the lock is taken
// (placement, an attempt's outcome, a cleanup's file removal) and handed in.
//
// Callers drain the outbox after they release the lock.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "manager/admission.hpp"
#include "manager/outbox.hpp"
#include "manager/pauses.hpp"
#include "manager/record.hpp"
#include "manager/record_table.hpp"
#include "manager/stats.hpp"
#include "manager/task_events.hpp"
#include "sync.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/service_pool.hpp"
#include "taskmgr/task_queue.hpp"
#include "timer_queue.hpp"

namespace taskmgr::detail {

class Dispatcher;

// What start_task changes, worked out before the lock.
struct StartPlan {
  int priority = 0;
  int batch_size = 1;
  RequestFeatures features;
  std::optional<std::int64_t> estimate;
  std::string device;
  std::string options_json;  // "" = keep
};

// What a running attempt needs from its record, fixed when it starts.
struct AttemptStart {
  std::string device;
  std::string options;
  int attempt = 0;
  int batch_size = 1;
  std::int64_t estimate_mb = 0;
  SteadyTime started{};
  SteadyTime deadline{};
  double timeout_s = 0;  // 0 = no deadline
};

// What the error handler looks at, copied under the lock.
struct FailureSnapshot {
  Task task;  // id, device, attempt, batch size, estimate
  MemoryState state;
  RequestFeatures features;
};

class Scheduler {
 public:
  Scheduler(const Config& config, std::shared_ptr<const Clock> clock, DeviceRegistry& devices,
            Outbox& outbox, Stats& stats, TimerQueue& timers, TaskErrorHandler& handler);
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;
  void attach(Dispatcher& dispatcher) { dispatcher_ = &dispatcher; }

  SchedulerMutex& mutex() { return mu_; }
  std::condition_variable& done_cv() { return done_cv_; }
  TaskQueue& queue() { return *queue_; }
  QueueAdmission& admission() { return admission_; }
  RecordTable& records() REQUIRES(scheduler_lock) { return records_; }
  const Clock& clock() const { return *clock_; }
  Outbox& outbox() { return outbox_; }

  // seq_cst: TaskManager's in-flight count relies on a total order with it.
  bool closing() const noexcept { return closing_.load(std::memory_order_seq_cst); }
  // Error(kInvalidState) once close() has begun.
  void check_open() const;
  void begin_close() REQUIRES(scheduler_lock) { closing_.store(true); }
  bool closed() const REQUIRES(scheduler_lock) { return closed_; }
  void set_closed() REQUIRES(scheduler_lock) { closed_ = true; }
  // Nothing queued, backing off or running.
  bool idle() const REQUIRES(scheduler_lock);
  int backoff_count() const REQUIRES(scheduler_lock) { return backoff_; }
  int backoff_on(const std::string& device) const REQUIRES(scheduler_lock);

  // A task this host claimed from the shared queue (Cluster): queued on
  // `device` as it stands, with no event (its row has the claim).
  // False when a record of that task is held here already (an attempt of a
  // claim it lost still runs): nothing changes. A finished record of an
  // earlier run here (the task was retried since) is replaced: `dropped`
  // gets it, to be released outside the lock.
  bool adopt_claimed(const RecordPtr& rec, const std::string& device, RecordPtr& dropped)
      REQUIRES(scheduler_lock);

  // ---- the host's deletes -----------------------------------------------------
  // A delete (delete_task) holds its task's id from its check to its end:
  // a retry of that task meanwhile is refused (one of the two wins, never
  // both), another delete waits for it. deletes_done() counts the ended
  // ones: a retry that read its task from the store before one ended reads
  // it again (its row may be gone).
  bool deleting(const std::string& id) const REQUIRES(scheduler_lock) {
    return deleting_.count(id) > 0;
  }
  // The thread deleting `id` (a default id when none).
  std::thread::id deleter(const std::string& id) const REQUIRES(scheduler_lock) {
    auto it = deleting_.find(id);
    return it == deleting_.end() ? std::thread::id() : it->second;
  }
  void begin_delete(const std::string& id) REQUIRES(scheduler_lock) {
    deleting_.emplace(id, std::this_thread::get_id());
  }
  void end_delete(const std::string& id) REQUIRES(scheduler_lock) {
    deleting_.erase(id);
    ++deletes_done_;
    notify();
  }
  std::uint64_t deletes_done() const REQUIRES(scheduler_lock) { return deletes_done_; }

  // ---- creation and start -----------------------------------------------------
  // New records, stored already (insert_tasks): made visible, and those
  // created with `start` queued (their queued event is in the stored rows).
  // `starting` reserved queue slots are given back in the same admission
  // section. Evicted finished records are added to `retired`.
  void add_created(const RecordPtr* recs, const bool* start, std::size_t n,
                   std::vector<NewTask>& rows, std::size_t starting) REQUIRES(scheduler_lock);
  // kStart: Error(kQueueFull) leaves the task pending.
  Task start(const RecordPtr& rec, const StartPlan& plan) REQUIRES(scheduler_lock);
  // Cancels a pending, queued or backing-off task, or flags a running one.
  // False when it had ended already.
  bool cancel(const RecordPtr& rec) REQUIRES(scheduler_lock);
  // kHostRetry: a failed or cancelled task (its cleanup done) runs again
  // with `plan`: retried (reason host) and queued; put in the record table
  // when it was rebuilt from the store. Error(kInvalidState) for any other
  // task, Error(kQueueFull) when the queue has no room (nothing changes).
  Task retry(const RecordPtr& rec, const StartPlan& plan) REQUIRES(scheduler_lock);
  // The host's new priority for a pending, queued or backing-off task (a
  // queued one moves in its queue; one backing off is queued with it):
  // the event, and the task as it is now. Error(kInvalidState) for a task
  // that runs, is in a cleanup or has ended.
  Task set_priority(const RecordPtr& rec, int priority) REQUIRES(scheduler_lock);
  // kEndWaiting: a task that ends without running (cancelled while waiting,
  // queue timeout, no device, interrupted without attempts left).
  void end_waiting(const RecordPtr& rec, TaskStatus status, TaskFailureReason reason,
                   const std::string& message) REQUIRES(scheduler_lock);
  // A queued task whose device became unavailable: to another device
  // (device_fallback), or failed DEVICE_UNAVAILABLE (`to` empty, `why` says why).
  void move_queued(const RecordPtr& rec, const std::string& from, const std::string& to,
                   const std::string& why) REQUIRES(scheduler_lock);

  // ---- an attempt ------------------------------------------------------------------
  // kDispatch, once the dispatcher took the task from its queue with a pool
  // lease and its memory reserved: the attempt's events.
  AttemptStart begin_attempt(const RecordPtr& rec, const ServicePool::Lease& lease)
      REQUIRES(scheduler_lock);
  // kEndAttempt: the outcome's events and cleanup_started; the cleanup is
  // watched from now on (cleanup_timeout_seconds).
  void end_attempt(const RecordPtr& rec, Outcome outcome, const std::string& temp_dir)
      REQUIRES(scheduler_lock);
  // The end of a cleanup (by the worker, or by the watchdog): reservation
  // released, resource_released, the verification, cleanup_completed; then
  // the retry, or kFinish.
  void finish_cleanup(const RecordPtr& rec, const CleanupReport& report) REQUIRES(scheduler_lock);
  // The records whose cleanup hook runs now (the watchdog's list).
  std::vector<RecordPtr>& cleanups() REQUIRES(scheduler_lock) { return cleanups_; }
  // A running attempt reported memory above its estimate (memory_warning).
  void memory_above_estimate(const RecordPtr& rec, const std::string& device, std::int64_t mb,
                             std::int64_t estimate_mb) REQUIRES(scheduler_lock);
  FailureSnapshot failure_snapshot(const Record& r) const REQUIRES(scheduler_lock);
  // The device of a running attempt is nearly full (memory_warning, once per attempt).
  void device_nearly_full(const RecordPtr& rec, const std::string& device, std::int64_t used_mb,
                          std::int64_t total_mb) REQUIRES(scheduler_lock);
  // The head of a stuck pool: an attempt that could not start (kCountAttempt),
  // then retried or failed POOL_EXHAUSTED.
  void pool_exhausted(const RecordPtr& rec, const FailureInfo& f) REQUIRES(scheduler_lock);

  // ---- pauses ---------------------------------------------------------------------
  // The pauses in force: the Dispatcher does not start a task one holds,
  // the Sweeper does not time it out.
  const Pauses& pauses() const REQUIRES(scheduler_lock) { return pauses_; }
  // A pause begins (`p.since`, stored already): its `paused` event.
  void pause(const PauseState& p) REQUIRES(scheduler_lock);
  // A pause in force ends: each queued task it held alone is counted as
  // queued later by that time (queue timeout, aging), and its `resumed`
  // event. The caller dispatches.
  void resume(PauseScope scope, const std::string& name) REQUIRES(scheduler_lock);
  // The stored pauses, at open (no events: they were in force already).
  void restore_pauses(const std::vector<PauseState>& stored) REQUIRES(scheduler_lock);

  // ---- recovery -------------------------------------------------------------------
  // A task found unfinished in the store at open (kRecover*). `features` and
  // `device` were worked out before the lock (device "" = none available).
  void recover(const RecordPtr& rec, const std::string& device, const std::string& no_device_why)
      REQUIRES(scheduler_lock);

  // A task has finished: kept in the record table, waiters woken.
  void finished(const RecordPtr& rec) REQUIRES(scheduler_lock);
  // Wakes wait_task / wait_idle / close.
  void notify() { done_cv_.notify_all(); }

  const Config& config() const { return config_; }

 private:
  // The task's queued state (one priority lower for a retry) and event, and
  // into its device's queue.
  void enqueue(const RecordPtr& rec, EventBatch& b, bool retry, bool recovered, bool enforce_limit)
      REQUIRES(scheduler_lock);
  void push_queued(const RecordPtr& rec, bool retry, bool enforce_limit) REQUIRES(scheduler_lock);
  void apply_retry(const RecordPtr& rec, const RetryDecision& d,
                   std::optional<std::int64_t> next_estimate, EventBatch& b)
      REQUIRES(scheduler_lock);
  void on_backoff_elapsed(const RecordPtr& rec) REQUIRES(!scheduler_lock);
  void end_waiting(const RecordPtr& rec, TaskStatus status, TaskFailureReason reason,
                   const std::string& message, EventBatch& b) REQUIRES(scheduler_lock);
  MemoryState memory_state(const Record& r) const REQUIRES(scheduler_lock);
  void warn(Record& r, std::string text) REQUIRES(scheduler_lock);

  const Config& config_;
  std::shared_ptr<const Clock> clock_;
  DeviceRegistry& devices_;
  Outbox& outbox_;
  Stats& stats_;
  TimerQueue& timers_;
  TaskErrorHandler& handler_;
  Dispatcher* dispatcher_ = nullptr;

  SchedulerMutex mu_;
  std::condition_variable done_cv_;  // a task finished, an attempt ended, a loop returned
  RecordTable records_;
  std::unordered_map<std::string, std::thread::id> deleting_ GUARDED_BY(scheduler_lock);
  std::uint64_t deletes_done_ GUARDED_BY(scheduler_lock) = 0;
  std::unique_ptr<TaskQueue> queue_;  // its own lock, taken inside this one
  QueueAdmission admission_;
  Pauses pauses_ GUARDED_BY(scheduler_lock);
  std::vector<RecordPtr> cleanups_ GUARDED_BY(scheduler_lock);  // attempts whose cleanup hook runs
  int backoff_ GUARDED_BY(scheduler_lock) = 0;                  // tasks waiting for a retry timer
  std::map<std::string, int> backoff_by_device_ GUARDED_BY(scheduler_lock);
  std::atomic<bool> closing_{false};
  bool closed_ GUARDED_BY(scheduler_lock) = false;
};

// Why the host may not retry `t` ("" when it may): only a failed or
// cancelled task whose cleanup is over (`cleanup_over`: its record is done).
std::string not_retryable(const Task& t, bool cleanup_over);

// Seconds as the clock's duration, clamped to [0, 100 years] (a larger
// value, e.g. "timeout_seconds": 1e300, would overflow its nanoseconds).
Duration from_seconds(double s);
double seconds(Duration d);

}  // namespace taskmgr::detail
