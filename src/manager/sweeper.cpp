#include "manager/sweeper.hpp"

#include <fmt/format.h>

#include "forced_unwind.hpp"
#include "manager/temp_dirs.hpp"

namespace taskmgr::detail {

Sweeper::Sweeper(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
                 Dispatcher& dispatcher, DeviceRegistry& devices, Recovery& recovery, Stats& stats,
                 const Logger& log)
    : config_(config),
      clock_(std::move(clock)),
      scheduler_(scheduler),
      dispatcher_(dispatcher),
      devices_(devices),
      recovery_(recovery),
      stats_(stats),
      log_(log),
      last_refresh_(clock_->steady_now()) {}

void Sweeper::sweep() {
  try {
    sweep_once();
  } catch (const std::exception& e) {
    Stats::add(stats_.internal_errors);
    log_.write(LogLevel::kError, std::string("the periodic sweep failed: ") + e.what());
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    Stats::add(stats_.internal_errors);
    log_.write(LogLevel::kError, "the periodic sweep failed: unknown exception");
  }
}

void Sweeper::sweep_once() {
  const SteadyTime now = clock_->steady_now();
  const TasksConfig& tc = config_.tasks;
  recovery_.prune_if_due(now);
  recovery_.watch_store_writes();
  const bool refresh = now - last_refresh_ >= std::chrono::seconds(1);
  if (refresh) {
    devices_.refresh_observed();  // reads /proc, NVML: no lock held
    last_refresh_ = now;
  }
  struct Overdue {
    RecordPtr rec;
    std::string temp_dir;
  };
  std::vector<Overdue> overdue;
  {
    SchedulerLock g(scheduler_.mutex());
    if (scheduler_.closed()) return;
    // Queue timeouts.
    // A paused task's timeout does not run (resume credits its paused time).
    const Pauses& pauses = scheduler_.pauses();
    TaskQueue::Eligible paused;
    if (!pauses.empty()) {
      paused = [&pauses](const QueuedTask& q) { return pauses.holds(q.device, q.service); };
    }
    for (const auto& q :
         scheduler_.queue().take_expired(now - from_seconds(tc.queue_timeout_seconds), paused)) {
      RecordPtr rec = scheduler_.records().find(q.task_id);
      if (!rec) continue;
      scheduler_.end_waiting(
          rec, TaskStatus::kFailed, TaskFailureReason::kQueueTimeout,
          fmt::format("waited {:.6f} s in the queue of {} "
                      "(tasks.queue_timeout_seconds = {:.6f})",
                      seconds(now - rec->queued_steady), q.device, tc.queue_timeout_seconds));
    }
    // Pools stuck past their acquire timeout: POOL_EXHAUSTED for their head.
    for (auto& [rec, failure] : dispatcher_.take_exhausted(now)) {
      scheduler_.pool_exhausted(rec, failure);
    }
    // Attempts running past their deadline: they end TIMEOUT when process()
    // returns (a cooperative service sees deadline_exceeded() and stops), and
    // an instance that had to be waited for is replaced.
    for (const auto& h : dispatcher_.holders()) {
      Record& r = *h.rec;
      if (r.task.attempt != h.attempt || r.phase() != Phase::kRunning) continue;
      if (r.timeout_s > 0 && now >= r.deadline && !r.timed_out.exchange(true)) {
        scheduler_.outbox().commit_log(
            LogLevel::kWarn,
            fmt::format("task {} is running past its deadline of {} s on {}: it will end "
                        "TIMEOUT and the instance will be replaced",
                        r.id(), r.timeout_s, r.instance_id));
      }
    }
    // Cleanup hooks past cleanup_timeout_seconds: the watchdog claims the
    // cleanup and finishes it without them (below, after the file work).
    for (const auto& rec : scheduler_.cleanups()) {
      if (now < rec->cleanup_deadline) continue;
      const auto attempt = static_cast<std::uint64_t>(rec->task.attempt);
      std::uint64_t expected = attempt * 4 + Record::kHookRunning;
      if (rec->cleanup_claim.compare_exchange_strong(expected, attempt * 4 + Record::kByWatchdog)) {
        overdue.push_back({rec, rec->temp_dir});
      }
    }
    // Devices nearly full: warn the tasks running there, once per attempt.
    if (refresh && tc.enable_resource_tracking) {
      for (const auto& d : devices_.list()) {
        const std::int64_t used = std::max(d.observed_mb, d.reserved_mb);
        if (static_cast<double>(used) <
            tc.device_warning_fraction * static_cast<double>(d.total_mb)) {
          continue;
        }
        for (const auto& h : dispatcher_.holders()) {
          if (h.device != d.id) continue;
          scheduler_.device_nearly_full(h.rec, d.id, used, d.total_mb);
        }
      }
    }
    dispatcher_.dispatch();
  }
  if (!overdue.empty()) {
    std::vector<CleanupReport> reports(overdue.size());
    for (std::size_t i = 0; i < overdue.size(); ++i) {
      reports[i].hook_ok = false;
      reports[i].problems.push_back(
          fmt::format("the service's cleanup hook ran past tasks.cleanup_timeout_seconds = {} s; "
                      "its instance will be replaced",
                      tc.cleanup_timeout_seconds));
      TempDirs::remove(overdue[i].temp_dir, reports[i].problems);
    }
    SchedulerLock g(scheduler_.mutex());
    for (std::size_t i = 0; i < overdue.size(); ++i) {
      scheduler_.finish_cleanup(overdue[i].rec, reports[i]);
    }
    dispatcher_.dispatch();
  }
  scheduler_.outbox().drain();
}

}  // namespace taskmgr::detail
