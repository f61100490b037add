// taskmgr: the injectable clock.
//
// Every timestamp, deadline and wait inside taskmgr goes through a Clock, so
// that backoff, queue timeouts, acquire timeouts and cleanup timeouts can be
// tested without real waiting (leveldb's Env, rocksdb's MockSystemClock).
// Hosts normally use Clock::system(); tests use ManualClock.
//
// Thread-safety: all members are safe to call from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "taskmgr/export.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

using SteadyTime = std::chrono::steady_clock::time_point;
using Duration = std::chrono::steady_clock::duration;

class TASKMGR_API Clock {
 public:
  virtual ~Clock();

  // Wall-clock time, for records and events.
  virtual Timestamp now() const = 0;
  // Monotonic time, for deadlines.
  virtual SteadyTime steady_now() const = 0;

  // Blocks on `cv` (whose mutex `lock` holds) until notified or until
  // steady_now() >= deadline. Returns false when the deadline passed. May
  // wake spuriously; callers re-check their condition.
  virtual bool wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                          SteadyTime deadline) const = 0;

  // The real clocks (std::chrono::system_clock and steady_clock).
  static std::shared_ptr<Clock> system();
};

// A clock that moves only when told to. Waits through wait_until() return as
// soon as advance() moves time past their deadline (they poll the fake time
// every millisecond of real time).
class TASKMGR_API ManualClock : public Clock {
 public:
  // Starts at `start` (wall) and at an arbitrary steady epoch.
  explicit ManualClock(Timestamp start = Timestamp{} + std::chrono::hours(24 * 365 * 56));
  ~ManualClock() override;

  Timestamp now() const override;
  SteadyTime steady_now() const override;
  bool wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  SteadyTime deadline) const override;

  // Moves both clocks forward by d (>= 0).
  void advance(Duration d);

 private:
  mutable std::mutex mu_;
  Timestamp wall_;
  SteadyTime steady_;
};

}  // namespace taskmgr
