#include "taskmgr/clock.hpp"

namespace taskmgr {
namespace {

class SystemClock final : public Clock {
 public:
  Timestamp now() const override { return std::chrono::system_clock::now(); }
  SteadyTime steady_now() const override { return std::chrono::steady_clock::now(); }
  bool wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  SteadyTime deadline) const override {
    return cv.wait_until(lock, deadline) == std::cv_status::no_timeout;
  }
};

}  // namespace

Clock::~Clock() = default;

std::shared_ptr<Clock> Clock::system() {
  static const std::shared_ptr<Clock> clock = std::make_shared<SystemClock>();
  return clock;
}

ManualClock::ManualClock(Timestamp start) : wall_(start), steady_(SteadyTime{}) {}
ManualClock::~ManualClock() = default;

Timestamp ManualClock::now() const {
  std::lock_guard<std::mutex> g(mu_);
  return wall_;
}

SteadyTime ManualClock::steady_now() const {
  std::lock_guard<std::mutex> g(mu_);
  return steady_;
}

bool ManualClock::wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                             SteadyTime deadline) const {
  if (steady_now() >= deadline) return false;
  cv.wait_for(lock, std::chrono::milliseconds(1));
  return steady_now() < deadline;
}

void ManualClock::advance(Duration d) {
  std::lock_guard<std::mutex> g(mu_);
  if (d.count() < 0) return;
  wall_ += std::chrono::duration_cast<std::chrono::system_clock::duration>(d);
  steady_ += d;
}

}  // namespace taskmgr
