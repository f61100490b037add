// Private: the manager's counters and latency histograms.
//
// Written where a change is committed (with the scheduler lock held, or not:
// they are relaxed atomics), read by get_task_metrics without any lock. The
// per-device peaks and per-reason failure counts have fixed keys (devices
// are fixed at open, reasons are an enum), so they are atomics too.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "histogram.hpp"
#include "taskmgr/metrics.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail {

using Counter = std::atomic<std::uint64_t>;

class Stats {
 public:
  explicit Stats(const std::vector<std::string>& device_ids);

  // Counted by the host's threads (create), apart from the workers' below:
  // no cache line bounces between them on every task.
  alignas(64) Counter created{0};
  alignas(64) Counter started{0};
  Counter completed{0}, cancelled{0}, retries{0}, ooms{0}, fallbacks{0}, warnings{0},
      cleanup_failures{0}, internal_errors{0};
  Histogram wait;  // queued -> started
  Histogram proc;  // started -> finished (one attempt)

  static void add(Counter& c) noexcept { c.fetch_add(1, std::memory_order_relaxed); }
  void failed(TaskFailureReason reason) noexcept;
  void peak(const std::string& device, std::int64_t mb) noexcept;
  std::int64_t peak_of(const std::string& device) const noexcept;

  // The counters into a metrics snapshot.
  void fill(TaskMetrics& m) const;

 private:
  static constexpr std::size_t kReasons = 16;
  std::array<Counter, kReasons> failed_by_reason_{};
  Counter failed_{0};
  // Keys fixed at open: read and written without a lock.
  std::map<std::string, std::atomic<std::int64_t>> peak_by_device_;
};

}  // namespace taskmgr::detail
