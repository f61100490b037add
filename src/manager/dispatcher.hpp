// Private: the dispatcher: worker threads, and which queued task runs next.
//
// Worker threads (a Boost.Asio thread pool of executor.worker_threads) run
// worker_loop(): take the best runnable task over all devices (it fits its
// device's free memory now, its pool has a free slot; highest priority,
// then oldest), reserve its memory, lease its pool slot, run the attempt,
// finish its cleanup and take the next one in the same critical section. A
// loop is posted only for an idle worker, and not for a task a lingering
// loop will catch, so a busy pool costs no post and no thread wake-up per
// task. When tasks arrive faster than executor.worker_linger_us apart, one
// idle loop lingers that long for the next before giving its thread back.
//
// Rate limits (services.<kind>.rate_limit_per_second): a token bucket per
// limited kind. A task whose kind has no token left is not eligible (other
// kinds' tasks pass it, as they pass a task whose pool is full); a timer
// posts the dispatch again when the next token is due.
//
// It also owns what the pools' slots say about the queues: which pool
// blocks the head of a device queue, and whether that pool is merely busy
// or stuck (see take_exhausted).
#pragma once

#include <atomic>
#include <boost/asio/thread_pool.hpp>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "manager/record.hpp"
#include "manager/scheduler.hpp"
#include "manager/service_registry.hpp"
#include "sync.hpp"
#include "taskmgr/service_pool.hpp"
#include "timer_queue.hpp"

namespace taskmgr::detail {

class Attempt;

class Dispatcher {
 public:
  Dispatcher(Scheduler& scheduler, Attempt& attempt, DeviceRegistry& devices, Stats& stats,
             TimerQueue& timers, int workers, Duration linger);
  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;
  ~Dispatcher();

  // A pool tasks of `kind` can be dispatched to (at registration).
  void add_pool(const std::string& kind, ServicePool* pool) REQUIRES(scheduler_lock);
  // The kind's rate limit (services.<kind>.rate_limit_per_second), when it
  // has one, as {tokens now, rate, burst}.
  struct RateState {
    double tokens = 0;
    double per_second = 0;
    int burst = 0;
  };
  std::optional<RateState> rate_state(const std::string& kind) REQUIRES(scheduler_lock);
  // Posts loops for idle workers when tasks wait that no loop will catch
  // (`self`: the calling worker loop will take one itself).
  void dispatch(int self = 0) REQUIRES(scheduler_lock);
  // A task entered a queue (the linger heuristic's arrival rate).
  void note_enqueued() REQUIRES(scheduler_lock);
  // Joins the worker threads (after close: no loop takes a task any more).
  void join();

  int workers() const noexcept { return workers_; }
  // Called (under the lock: it must only signal) when an attempt ends and
  // frees its worker: a shared queue's Cluster claims again.
  void set_on_slot_free(std::function<void()> f) { on_slot_free_ = std::move(f); }
  int running() const REQUIRES(scheduler_lock) { return running_; }
  int running_on(const std::string& device) const REQUIRES(scheduler_lock);
  int loops() const REQUIRES(scheduler_lock) { return loops_; }
  // Loops lingering for the next task (one of them will drain the outbox).
  int lingering() const REQUIRES(scheduler_lock) { return lingering_; }

  // The running attempts (each holds a pool slot until its worker returns
  // from the cleanup hook), for the sweep.
  struct Holder {
    RecordPtr rec;
    std::string_view service;  // the pool's key in pools_
    std::string_view device;   // its id in device_ids_
    std::size_t device_index = 0;
    int attempt = 0;
  };
  const std::vector<Holder>& holders() const REQUIRES(scheduler_lock) { return holders_; }

  // The heads of device queues whose pool stayed *stuck* past its
  // acquire_timeout_seconds, removed from their queue, each with its
  // POOL_EXHAUSTED failure. A pool is stuck when one of its slots is held
  // by an attempt that should have ended: running past its deadline, or in
  // a cleanup hook past cleanup_timeout_seconds (or left to the watchdog).
  // A pool that is merely busy (every slot held by an attempt within its
  // deadline, or with none) is not: its queued tasks wait, bounded by
  // queue_timeout_seconds, and burn no attempts. The acquire timeout is
  // counted from the moment the pool became stuck.
  std::vector<std::pair<RecordPtr, FailureInfo>> take_exhausted(SteadyTime now)
      REQUIRES(scheduler_lock);

 private:
  struct Launch {
    RecordPtr rec;
    ServicePool::Lease lease;
  };
  // A token bucket: `burst` tokens at most, refilled at `per_second`.
  struct Bucket {
    double per_second = 0;
    double burst = 1;
    double tokens = 1;
    SteadyTime last{};
    void refill(SteadyTime now);
  };
  std::optional<Launch> next() REQUIRES(scheduler_lock);
  // True when a task of `kind` may start now by its rate limit; if not,
  // notes when its next token is due (rate_wake_).
  bool has_token(const std::string& kind, SteadyTime now) REQUIRES(scheduler_lock);
  // A timer for rate_wake_, unless one fires by then already.
  void arm_rate_timer() REQUIRES(scheduler_lock);
  bool stuck(const PoolKey& key, SteadyTime now) const REQUIRES(scheduler_lock);
  void worker_loop() REQUIRES(!scheduler_lock);
  void loop_body(bool& returned) REQUIRES(!scheduler_lock);
  // Runs one launched attempt (the lock is released meanwhile), then takes
  // its slot back and dispatches what it freed.
  void run_one(Launch& launch) REQUIRES(scheduler_lock);
  void attempt_ended(const RecordPtr& rec) REQUIRES(scheduler_lock);

  Scheduler& scheduler_;
  Attempt& attempt_;
  DeviceRegistry& devices_;
  Stats& stats_;
  TimerQueue& timers_;
  const int workers_;
  const Duration linger_;
  const bool tracking_;
  const std::vector<std::string> device_ids_;  // fixed at open, "cpu" first

  std::map<std::string, ServicePool*, std::less<>> pools_ GUARDED_BY(scheduler_lock);
  // Pools that blocked the head of a device queue, with the time since when
  // they are stuck (nullopt: busy, not stuck).
  std::map<PoolKey, std::optional<SteadyTime>> pool_blocked_ GUARDED_BY(scheduler_lock);
  std::vector<Holder> holders_ GUARDED_BY(scheduler_lock);
  std::map<std::string, Bucket, std::less<>> buckets_ GUARDED_BY(scheduler_lock);  // limited kinds
  std::optional<SteadyTime> rate_wake_ GUARDED_BY(scheduler_lock);  // next token due (this pass)
  std::optional<SteadyTime> rate_timer_at_ GUARDED_BY(scheduler_lock);  // the armed timer's time
  std::vector<int> running_by_device_ GUARDED_BY(scheduler_lock);       // by index in device_ids_
  std::function<void()> on_slot_free_;            // set before any attempt runs
  int running_ GUARDED_BY(scheduler_lock) = 0;    // attempts holding a worker thread
  int loops_ GUARDED_BY(scheduler_lock) = 0;      // worker_loop jobs posted and not yet returned
  int lingering_ GUARDED_BY(scheduler_lock) = 0;  // loops waiting a moment for new work
  std::atomic<std::uint64_t> enqueued_{0};        // tasks ever put in a queue
  std::int64_t last_enqueue_ns_ GUARDED_BY(scheduler_lock) = 0;
  std::atomic<std::int64_t> arrival_gap_ns_{1'000'000'000};  // mean real time between enqueues
  std::unique_ptr<boost::asio::thread_pool> threads_;
};

}  // namespace taskmgr::detail
