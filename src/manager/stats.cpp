#include "manager/stats.hpp"

#include "manager/lifecycle.hpp"

namespace taskmgr::detail {

Stats::Stats(const std::vector<std::string>& device_ids) {
  for (const auto& id : device_ids) peak_by_device_[id].store(0);
  static_assert(kReasons > static_cast<std::size_t>(TaskFailureReason::kHostLost));
}

void Stats::failed(TaskFailureReason reason) noexcept {
  failed_.fetch_add(1, std::memory_order_relaxed);
  const auto i = static_cast<std::size_t>(reason);
  if (i < kReasons) failed_by_reason_[i].fetch_add(1, std::memory_order_relaxed);
}

void Stats::peak(const std::string& device, std::int64_t mb) noexcept {
  auto it = peak_by_device_.find(device);
  if (it == peak_by_device_.end()) return;
  std::int64_t prev = it->second.load(std::memory_order_relaxed);
  while (mb > prev && !it->second.compare_exchange_weak(prev, mb, std::memory_order_relaxed)) {
  }
}

std::int64_t Stats::peak_of(const std::string& device) const noexcept {
  auto it = peak_by_device_.find(device);
  return it == peak_by_device_.end() ? 0 : it->second.load(std::memory_order_relaxed);
}

void Stats::fill(TaskMetrics& m) const {
  auto get = [](const Counter& c) { return c.load(std::memory_order_relaxed); };
  m.tasks_created = get(created);
  m.tasks_started = get(started);
  m.tasks_completed = get(completed);
  m.tasks_failed = get(failed_);
  m.tasks_cancelled = get(cancelled);
  for (TaskFailureReason r : all_failure_reasons()) {
    const auto i = static_cast<std::size_t>(r);
    if (i < kReasons && get(failed_by_reason_[i]) > 0) {
      m.failed_by_reason[std::string(to_string(r))] = get(failed_by_reason_[i]);
    }
  }
  m.retries = get(retries);
  m.oom_errors = get(ooms);
  m.cpu_fallbacks = get(fallbacks);
  m.memory_warnings = get(warnings);
  m.cleanup_failures = get(cleanup_failures);
  m.wait_time = wait.summary();
  m.processing_time = proc.summary();
  m.average_wait_time = m.wait_time.mean_s;
}

}  // namespace taskmgr::detail
