// Private: timers on one thread, driven by the injectable Clock. Used for
// retry backoff and the manager's periodic sweep (queue timeouts, pool
// exhaustion, cleanup deadlines, device memory). Callbacks run on the timer
// thread without the timer lock held; they must be short. A callback that
// throws is caught and counted (callback_errors) and the next timers still
// fire: an exception never ends the timer thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <thread>
#include <unordered_map>

#include "sync.hpp"
#include "taskmgr/clock.hpp"

namespace taskmgr::detail {

class TimerQueue {
 public:
  using TimerId = std::uint64_t;

  explicit TimerQueue(std::shared_ptr<const Clock> clock);
  ~TimerQueue();  // stop()
  // Joins the timer thread; pending timers never fire. Idempotent; not from a callback.
  void stop() REQUIRES(!mu_);
  TimerQueue(const TimerQueue&) = delete;
  TimerQueue& operator=(const TimerQueue&) = delete;

  TimerId schedule(SteadyTime deadline, std::function<void()> fn) REQUIRES(!mu_);
  TimerId schedule_after(Duration delay, std::function<void()> fn) REQUIRES(!mu_);
  // True when the timer was pending (it will not fire).
  bool cancel(TimerId id) REQUIRES(!mu_);
  std::size_t pending() const REQUIRES(!mu_);
  // Callbacks that threw.
  std::uint64_t callback_errors() const noexcept { return callback_errors_.load(); }

 private:
  void run() REQUIRES(!mu_);

  const std::shared_ptr<const Clock> clock_;
  mutable Mutex mu_;
  std::condition_variable cv_;  // waits on mu_
  std::set<std::pair<SteadyTime, TimerId>> order_ GUARDED_BY(mu_);
  std::unordered_map<TimerId, std::pair<SteadyTime, std::function<void()>>> timers_ GUARDED_BY(mu_);
  TimerId next_id_ GUARDED_BY(mu_) = 1;
  bool stop_ GUARDED_BY(mu_) = false;
  std::atomic<std::uint64_t> callback_errors_{0};
  std::thread thread_;
};

}  // namespace taskmgr::detail
