#include "manager/dispatcher.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <cmath>

#include "forced_unwind.hpp"
#include "host_call.hpp"
#include "manager/attempt.hpp"

namespace taskmgr::detail {

Dispatcher::Dispatcher(Scheduler& scheduler, Attempt& attempt, DeviceRegistry& devices,
                       Stats& stats, TimerQueue& timers, int workers, Duration linger)
    : scheduler_(scheduler),
      attempt_(attempt),
      devices_(devices),
      stats_(stats),
      timers_(timers),
      workers_(workers),
      linger_(linger),
      tracking_(scheduler.config().tasks.enable_resource_tracking),
      device_ids_(devices.ids()),
      running_by_device_(device_ids_.size(), 0),
      threads_(std::make_unique<boost::asio::thread_pool>(static_cast<std::size_t>(workers))) {}

Dispatcher::~Dispatcher() { join(); }

void Dispatcher::join() {
  if (threads_) threads_->join();
}

void Dispatcher::add_pool(const std::string& kind, ServicePool* pool) {
  pools_[kind] = pool;
  const auto& services = scheduler_.config().services;
  auto sc = services.find(kind);
  if (sc == services.end() || sc->second.rate_limit_per_second <= 0) return;
  Bucket b;
  b.per_second = sc->second.rate_limit_per_second;
  b.burst = sc->second.rate_limit_burst > 0 ? sc->second.rate_limit_burst
                                            : std::max(1.0, std::ceil(b.per_second));
  b.tokens = b.burst;  // a quiet spell before the first task
  b.last = scheduler_.clock().steady_now();
  buckets_.insert_or_assign(kind, b);
}

void Dispatcher::Bucket::refill(SteadyTime now) {
  if (now <= last) return;
  const double elapsed = std::chrono::duration<double>(now - last).count();
  tokens = std::min(burst, tokens + elapsed * per_second);
  last = now;
}

bool Dispatcher::has_token(const std::string& kind, SteadyTime now) {
  auto it = buckets_.find(kind);
  if (it == buckets_.end()) return true;
  Bucket& b = it->second;
  b.refill(now);
  if (b.tokens >= 1) return true;
  // Due when the missing fraction has refilled (rounded up to the next
  // microsecond, so that the refill at that time reaches a whole token).
  const double wait_s = (1 - b.tokens) / b.per_second;
  const SteadyTime due =
      now + std::chrono::duration_cast<Duration>(std::chrono::duration<double>(wait_s)) +
      std::chrono::microseconds(1);
  if (!rate_wake_ || due < *rate_wake_) rate_wake_ = due;
  return false;
}

void Dispatcher::arm_rate_timer() {
  if (!rate_wake_) return;
  const SteadyTime at = *rate_wake_;
  rate_wake_.reset();
  if (rate_timer_at_ && *rate_timer_at_ <= at) return;  // an earlier one looks again
  rate_timer_at_ = at;
  timers_.schedule(at, [this, at]() REQUIRES(!scheduler_lock) {
    SchedulerLock lock(scheduler_.mutex());
    if (rate_timer_at_ == at) rate_timer_at_.reset();
    dispatch();
  });
}

std::optional<Dispatcher::RateState> Dispatcher::rate_state(const std::string& kind) {
  auto it = buckets_.find(kind);
  if (it == buckets_.end()) return std::nullopt;
  it->second.refill(scheduler_.clock().steady_now());
  return RateState{it->second.tokens, it->second.per_second, static_cast<int>(it->second.burst)};
}

int Dispatcher::running_on(const std::string& device) const {
  for (std::size_t d = 0; d < device_ids_.size(); ++d) {
    if (device_ids_[d] == device) return running_by_device_[d];
  }
  return 0;
}

void Dispatcher::note_enqueued() {
  enqueued_.fetch_add(1, std::memory_order_release);
  // Running mean of the real time between enqueues (the linger heuristic).
  const std::int64_t now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now().time_since_epoch())
                                  .count();
  const std::int64_t gap = now_ns - last_enqueue_ns_;
  last_enqueue_ns_ = now_ns;
  const std::int64_t avg = arrival_gap_ns_.load(std::memory_order_relaxed);
  arrival_gap_ns_.store(avg + (std::min<std::int64_t>(gap, 1'000'000'000) - avg) / 8,
                        std::memory_order_relaxed);
}

void Dispatcher::dispatch(int self) {
  if (scheduler_.closing()) return;
  const int idle = workers_ - loops_;
  // A lingering loop takes the next task itself (it watches enqueued_), and
  // so does the calling loop (`self`): posting another loop for that task
  // would only wake a thread for nothing.
  const std::size_t waiting = scheduler_.queue().size();
  const std::size_t catching = static_cast<std::size_t>(lingering_ + self);
  const std::size_t uncaught = waiting > catching ? waiting - catching : 0;
  const int want = static_cast<int>(
      std::min<std::size_t>(static_cast<std::size_t>(std::max(idle, 0)), uncaught));
  for (int i = 0; i < want; ++i) {
    ++loops_;
    boost::asio::post(*threads_, [this]() REQUIRES(!scheduler_lock) { worker_loop(); });
  }
}

void Dispatcher::worker_loop() {
  HostCallScope host;  // services and log sinks run here
  bool returned = false;
  try {
    loop_body(returned);
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    // Nothing the loop does throws by design (the attempt catches what a
    // service throws); an allocation failure here must not end the thread
    // (a Boost.Asio handler that throws ends the process).
    Stats::add(stats_.internal_errors);
    if (!returned) {
      SchedulerLock lock(scheduler_.mutex());
      --loops_;
      scheduler_.notify();
    }
  }
}

void Dispatcher::loop_body(bool& returned) {
  SchedulerLock lock(scheduler_.mutex());
  const auto linger_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(linger_).count();
  while (!scheduler_.closing()) {
    std::optional<Launch> launch = next();
    // Linger only when tasks arrive faster than the linger lasts: spinning
    // while the host is slow to submit would only take CPU from it.
    if (!launch && lingering_ == 0 && linger_ns > 0 &&
        arrival_gap_ns_.load(std::memory_order_relaxed) < linger_ns) {
      // Linger a moment for the next task before giving the thread back: a
      // host that submits a stream of short tasks then needs no post and no
      // thread wake-up per task. Only new work (enqueues) ends the linger
      // early; real time, as this is CPU scheduling, not a task timeout.
      const std::uint64_t seen = enqueued_.load(std::memory_order_acquire);
      ++lingering_;  // one lingering worker is enough to catch the next task
      lock.unlock();
      scheduler_.outbox().drain();
      const auto until = std::chrono::steady_clock::now() + linger_;
      bool more = false;
      for (unsigned spin = 1;; ++spin) {
        if (enqueued_.load(std::memory_order_acquire) != seen) {
          more = true;
          break;
        }
        if (spin % 64 == 0 && std::chrono::steady_clock::now() >= until) break;
        cpu_relax();
      }
      lock.lock();
      --lingering_;
      if (more) continue;
      if (scheduler_.closing()) break;  // close() leaves queued tasks queued
      // A task queued after the linger timed out but before this loop took
      // the lock again counted on it (dispatch() posts no loop for a task a
      // lingering one will catch): look once more.
      launch = next();
      if (!launch) break;
    }
    if (!launch) break;
    run_one(*launch);
  }
  // The last drain (store, events, log lines: host code) happens before the
  // loop counts as returned: close() waits for the loops, so no host code
  // of this loop runs after close() returned. A task queued during that
  // drain counted on this loop (dispatch() saw it among loops_ and posted
  // none for it): the loop takes it instead of returning.
  for (;;) {
    lock.unlock();
    scheduler_.outbox().drain();
    lock.lock();
    if (scheduler_.closing()) break;
    std::optional<Launch> late = next();
    if (!late) break;
    run_one(*late);
  }
  --loops_;
  returned = true;
  scheduler_.notify();
}

void Dispatcher::run_one(Launch& launch) {
  const RecordPtr rec = launch.rec;
  const AttemptStart a = scheduler_.begin_attempt(rec, launch.lease);
  std::optional<CleanupReport> report;
  {
    SchedulerUnlock unlocked(scheduler_.mutex());
    scheduler_.outbox().drain();
    report = attempt_.run(rec, std::move(launch.lease), a);
  }
  attempt_ended(rec);
  if (report) scheduler_.finish_cleanup(rec, *report);
  // The cleanup may have queued a retry and freed a slot: this loop takes
  // the next task, idle workers take the others.
  dispatch(/*self=*/1);
}

void Dispatcher::attempt_ended(const RecordPtr& rec) {
  for (auto it = holders_.begin(); it != holders_.end(); ++it) {
    if (it->rec == rec) {
      --running_by_device_[it->device_index];
      holders_.erase(it);
      break;
    }
  }
  --running_;
  scheduler_.notify();
  if (on_slot_free_) on_slot_free_();
}

// The best runnable task over all devices: fits its device's free memory now
// (TaskQueue::peek_next_task), has a pool slot, highest priority then oldest.
// Reserves its memory and leases its pool slot.
std::optional<Dispatcher::Launch> Dispatcher::next() {
  TaskQueue& queue = scheduler_.queue();
  if (queue.size() == 0) return std::nullopt;
  // Paused: the manager (nothing starts), a device (its queue is skipped),
  // a service (its tasks are hidden in every queue).
  const Pauses& pauses = scheduler_.pauses();
  if (pauses.manager()) return std::nullopt;
  const bool any_paused = !pauses.empty();
  TaskQueue::Eligible hidden;
  if (any_paused) hidden = [&pauses](const QueuedTask& q) { return pauses.service(q.service); };
  const SteadyTime now = buckets_.empty() ? SteadyTime{} : scheduler_.clock().steady_now();
  std::optional<QueuedTask> best;
  std::size_t best_device = 0;
  decltype(pools_)::const_iterator best_pool;
  for (std::size_t d = 0; d < device_ids_.size(); ++d) {
    const std::string& id = device_ids_[d];
    if (queue.size(id) == 0) continue;
    if (any_paused && pauses.device(id)) continue;
    auto head = queue.peek_next_task(id, nullptr, hidden);  // none: unavailable, nothing fits
    if (!head) continue;
    std::optional<QueuedTask> cand = std::move(head);
    auto pool = pools_.find(cand->service);
    const bool pool_free = pool != pools_.end() && pool->second->has_capacity(id);
    if (!pool_free || !has_token(cand->service, now)) {
      if (pool != pools_.end() && !pool_free) {
        pool_blocked_.try_emplace(PoolKey{cand->service, id});
      }
      cand = queue.peek_next_task(
          id,
          [this, &id, now](const QueuedTask& q) REQUIRES(scheduler_lock) {
            auto p = pools_.find(q.service);  // a recovered task may wait for its service
            return p != pools_.end() && p->second->has_capacity(id) && has_token(q.service, now);
          },
          hidden);
      if (cand) pool = pools_.find(cand->service);
    }
    if (!cand) continue;
    const bool better = !best || queue.precedes(*cand, *best);
    if (better) {
      best = std::move(cand);
      best_device = d;
      best_pool = pool;
    }
  }
  arm_rate_timer();  // a task held back by its rate limit: look again when a token is due
  if (!best) return std::nullopt;
  const QueuedTask& qt = *best;
  RecordPtr rec = scheduler_.records().find(qt.task_id);
  if (!rec) {  // a queue entry without a record: a bug, never a crash
    queue.remove(qt.task_id);
    Stats::add(stats_.internal_errors);
    return std::nullopt;
  }
  // Before a lease is taken: one dropped here would be given back under the
  // lock (its release may call the service's healthy(), host code).
  auto lease = best_pool->second->try_acquire(qt.device);
  if (!lease) return std::nullopt;  // cannot happen: capacity was checked under the lock
  queue.remove(qt.task_id);
  if (auto b = buckets_.find(qt.service); b != buckets_.end()) b->second.tokens -= 1;
  if (!pool_blocked_.empty()) pool_blocked_.erase(PoolKey{qt.service, qt.device});
  if (tracking_) {
    devices_.reserve(qt.device, qt.estimated_memory_mb, /*force=*/true);
    rec->reserved_mb = qt.estimated_memory_mb;
    rec->reserved_device = qt.device;
  }
  // The holder views the pool's key and the device's id: both stay put.
  holders_.push_back(
      Holder{rec, best_pool->first, device_ids_[best_device], best_device, rec->task.attempt + 1});
  ++running_;
  ++running_by_device_[best_device];
  return Launch{std::move(rec), std::move(*lease)};
}

bool Dispatcher::stuck(const PoolKey& key, SteadyTime now) const {
  for (const Holder& h : holders_) {
    if (h.service != key.service || h.device != key.device) continue;
    const Record& r = *h.rec;
    if (r.task.attempt != h.attempt) return true;  // its cleanup was left to the watchdog
    if (r.timed_out.load()) return true;           // running past its deadline
    const std::uint64_t claim = r.cleanup_claim.load();
    if (claim == static_cast<std::uint64_t>(h.attempt) * 4 + Record::kByWatchdog) return true;
    if (r.phase() == Phase::kCleanup && now >= r.cleanup_deadline) return true;
  }
  return false;
}

std::vector<std::pair<RecordPtr, FailureInfo>> Dispatcher::take_exhausted(SteadyTime now) {
  std::vector<std::pair<RecordPtr, FailureInfo>> out;
  TaskQueue& queue = scheduler_.queue();
  for (auto it = pool_blocked_.begin(); it != pool_blocked_.end();) {
    const PoolKey& key = it->first;
    auto p = pools_.find(key.service);
    if (p == pools_.end() || p->second->has_capacity(key.device)) {
      it = pool_blocked_.erase(it);
      continue;
    }
    if (!stuck(key, now)) {
      it->second.reset();  // busy, not stuck: the timeout does not run
      ++it;
      continue;
    }
    if (!it->second) {
      it->second = now;
      ++it;
      continue;
    }
    const PoolSettings settings = p->second->settings(key.device);
    const Duration limit = from_seconds(settings.acquire_timeout_seconds);
    if (now - *it->second < limit) {
      ++it;
      continue;
    }
    const PoolKey k = key;
    it = pool_blocked_.erase(it);
    auto head = queue.peek_next_task(k.device);
    if (!head || head->service != k.service) continue;
    if (scheduler_.pauses().holds(head->device, head->service)) continue;  // it is not waiting
    RecordPtr rec = scheduler_.records().find(head->task_id);
    if (!rec) continue;
    queue.remove(head->task_id);
    FailureInfo f;
    f.reason = TaskFailureReason::kPoolExhausted;
    f.retryable = true;
    f.message = fmt::format(
        "no '{}' instance on {} became free within {} s: the pool (max {}) is held by attempts "
        "past their deadline or cleanup timeout",
        k.service, k.device, settings.acquire_timeout_seconds, settings.max_instances);
    out.emplace_back(std::move(rec), std::move(f));
  }
  return out;
}

}  // namespace taskmgr::detail
