#include "timer_queue.hpp"

#include "forced_unwind.hpp"
#include "host_call.hpp"

namespace taskmgr::detail {

TimerQueue::TimerQueue(std::shared_ptr<const Clock> clock) : clock_(std::move(clock)) {
  thread_ = std::thread([this] { run(); });
}

TimerQueue::~TimerQueue() { stop(); }

void TimerQueue::stop() {
  {
    MutexLock g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

TimerQueue::TimerId TimerQueue::schedule(SteadyTime deadline, std::function<void()> fn) {
  TimerId id;
  bool first;
  {
    MutexLock g(mu_);
    id = next_id_++;
    timers_.emplace(id, std::make_pair(deadline, std::move(fn)));
    order_.emplace(deadline, id);
    first = order_.begin()->second == id;
  }
  if (first) cv_.notify_all();
  return id;
}

TimerQueue::TimerId TimerQueue::schedule_after(Duration delay, std::function<void()> fn) {
  return schedule(clock_->steady_now() + delay, std::move(fn));
}

bool TimerQueue::cancel(TimerId id) {
  std::function<void()> fn;  // declared first: destroyed after the lock is released
  MutexLock g(mu_);
  auto it = timers_.find(id);
  if (it == timers_.end()) return false;
  order_.erase({it->second.first, id});
  fn = std::move(it->second.second);
  timers_.erase(it);
  return true;
}

std::size_t TimerQueue::pending() const {
  MutexLock g(mu_);
  return timers_.size();
}

void TimerQueue::run() {
  HostCallScope host;  // timer callbacks may log to the host
  MutexLock lock(mu_);
  while (!stop_) {
    if (order_.empty()) {
      cv_.wait(lock.native());
      continue;
    }
    const auto [deadline, id] = *order_.begin();
    if (clock_->steady_now() < deadline) {
      clock_->wait_until(lock.native(), cv_, deadline);
      continue;
    }
    order_.erase(order_.begin());
    std::function<void()> fn;
    if (auto node = timers_.extract(id); !node.empty()) fn = std::move(node.mapped().second);
    lock.unlock();
    try {
      if (fn) fn();
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      // A timer's failure is its own: the thread goes on to the next one.
      callback_errors_.fetch_add(1);
    }
    fn = nullptr;  // its captures go before the lock is taken again
    lock.lock();
  }
}

}  // namespace taskmgr::detail
