// Private: timers on one thread, driven by the injectable Clock. Used for
// retry backoff and the manager's periodic sweep (queue timeouts, pool
// exhaustion, cleanup deadlines, device memory). Callbacks run on the timer
// thread without the timer lock held; they must be short.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

#include "taskmgr/clock.hpp"

namespace taskmgr::detail {

class TimerQueue {
 public:
  using TimerId = std::uint64_t;

  explicit TimerQueue(std::shared_ptr<const Clock> clock);
  ~TimerQueue();  // stop()
  // Joins the timer thread; pending timers never fire. Idempotent; not from a callback.
  void stop();
  TimerQueue(const TimerQueue&) = delete;
  TimerQueue& operator=(const TimerQueue&) = delete;

  TimerId schedule(SteadyTime deadline, std::function<void()> fn);
  TimerId schedule_after(Duration delay, std::function<void()> fn);
  // True when the timer was pending (it will not fire).
  bool cancel(TimerId id);
  std::size_t pending() const;

 private:
  void run();

  std::shared_ptr<const Clock> clock_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::set<std::pair<SteadyTime, TimerId>> order_;
  std::unordered_map<TimerId, std::pair<SteadyTime, std::function<void()>>> timers_;
  TimerId next_id_ = 1;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace taskmgr::detail
