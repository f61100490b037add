#include "manager/recovery.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "taskmgr/error.hpp"

namespace taskmgr::detail {

Recovery::Recovery(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
                   Dispatcher& dispatcher, Journal& journal, Placement& placement,
                   ServiceRegistry& registry, DeviceRegistry& devices, const Logger& log)
    : config_(config),
      clock_(std::move(clock)),
      scheduler_(scheduler),
      dispatcher_(dispatcher),
      journal_(journal),
      placement_(placement),
      registry_(registry),
      devices_(devices),
      log_(log) {}

void Recovery::recover() {
  std::vector<Task> tasks = journal_.load_unfinished();
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    return a.queued_at.value_or(a.created_at) < b.queued_at.value_or(b.created_at);
  });
  struct Found {
    RecordPtr rec;
    std::string device;
    std::string why;  // when no device can take it
  };
  std::vector<Found> found;
  found.reserve(tasks.size());
  // Outside the lock: features (may read image headers) and placement (host code).
  for (Task& t : tasks) {
    // A status word taskmgr does not know is left as it is (docs/STORAGE.md,
    // "Status words"): never queued again, never failed.
    if (t.status == TaskStatus::kUnrecognized) continue;
    Found f;
    f.rec = std::make_shared<Record>();
    // load_unfinished leaves out input bytes: a task without an input path
    // has its own read here, one at a time, for its features (the model may
    // read the bytes), and dropped again (its attempt reads them).
    bool in_store = false;
    RequestFeatures features;
    if (t.input.path.empty()) {
      std::optional<Task> whole = journal_.load_task(t.id);
      in_store = whole && !whole->input.data.empty();
      features = placement_.features(in_store ? *whole : t);
    } else {
      features = placement_.features(t);
    }
    const bool waits = t.status == TaskStatus::kQueued || t.status == TaskStatus::kRunning;
    bool estimated = true;
    if (waits && !t.estimated_memory_mb) {
      // A row taskmgr never placed (an adopted table's): estimated now, as
      // create_task would have. A model that fails fails the task, saying so.
      try {
        t.estimated_memory_mb = placement_.estimate(t.service, features, "");
      } catch (const Error& e) {
        f.why = std::string("estimating its memory failed: ") + e.what();
        estimated = false;
      }
    }
    if (waits && estimated) {
      f.device = t.assigned_device.value_or("");
      if (!devices_.free_memory(f.device)) {  // gone or unavailable: placed again
        f.device.clear();
        try {
          const std::int64_t est = t.estimated_memory_mb.value_or(0);
          const ServiceEntry* entry = registry_.find(t.service);
          // A service not registered yet: any device that holds it, where
          // the task waits for its service.
          f.device =
              entry ? placement_.select_device(*entry, est, "") : devices_.select_device(est, "");
        } catch (const Error& e) {
          f.why = e.what();
        }
      }
    }
    f.rec->init_unshared(std::move(t), features);
    if (in_store) f.rec->set_input_in_store_unshared();
    found.push_back(std::move(f));
  }
  {
    SchedulerLock g(scheduler_.mutex());
    for (auto& f : found) scheduler_.recover(f.rec, f.device, f.why);
    dispatcher_.dispatch();
  }
  if (!found.empty()) {
    log_.write(LogLevel::kInfo, fmt::format("recovered {} unfinished task(s) from {}", found.size(),
                                            journal_.describe()));
  }
  scheduler_.outbox().drain();
}

void Recovery::prune_if_due(SteadyTime now) {
  const double days = config_.storage.retention_days;
  if (days <= 0) return;
  const auto last = SteadyTime(SteadyTime::duration(last_prune_ns_.load()));
  // Hourly, or four times per retention period when that is shorter.
  if (now - last >= from_seconds(std::min(3600.0, days * 86400 / 4))) prune_retention();
}

void Recovery::prune_retention() {
  const double days = config_.storage.retention_days;
  if (days <= 0) return;
  last_prune_ns_.store(clock_->steady_now().time_since_epoch().count());
  // At most 100 years back: larger values would overflow the clock's range.
  const Timestamp cutoff =
      clock_->now() - std::chrono::duration_cast<Timestamp::duration>(std::chrono::duration<double>(
                          std::min(days * 86400.0, 100 * 365.25 * 86400.0)));
  try {
    const std::size_t n = journal_.prune_finished(cutoff);
    if (n > 0) {
      log_.write(LogLevel::kInfo, fmt::format("retention: deleted {} task(s) finished before {} "
                                              "(storage.retention_days = {})",
                                              n, format_timestamp(cutoff), days));
    }
  } catch (const std::exception& e) {
    log_.write(LogLevel::kWarn, std::string("retention: pruning the store failed: ") + e.what());
  }
  // The recent finished tasks kept in memory follow the store.
  SchedulerLock g(scheduler_.mutex());
  scheduler_.records().prune_finished(cutoff);
}

void Recovery::watch_store_writes() {
  const StoreStats s = journal_.stats();
  if (s.dropped_writes > dropped_reported_) {
    log_.write(LogLevel::kWarn,
               fmt::format("store: {} write(s) refused by the database for their data were given "
                           "up: never stored (close() reports them): {}",
                           s.dropped_writes - dropped_reported_, s.last_error));
    dropped_reported_ = s.dropped_writes;
  }
  if (!writes_failing_ && s.backlog > 0) {
    writes_failing_ = true;
    failed_at_episode_start_ = s.failed_writes;
    log_.write(LogLevel::kWarn,
               fmt::format("store: writes fail; {} wait to be stored and are retried (new tasks "
                           "are refused once the backlog is full, storage.max_backlog; close() "
                           "reports what still waits): {}",
                           s.backlog, s.last_error));
  } else if (writes_failing_ && s.backlog == 0) {
    writes_failing_ = false;
    log_.write(LogLevel::kInfo, fmt::format("store: caught up: every failed write is stored "
                                            "now ({} write failure(s) in this episode)",
                                            s.failed_writes - failed_at_episode_start_));
  }
}

}  // namespace taskmgr::detail
