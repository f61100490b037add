#include "manager/monitor.hpp"

#include <fmt/format.h>

#include "manager/lifecycle.hpp"
#include "manager/task_events.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr::detail {

TaskMetrics Monitor::metrics() {
  TaskMetrics m;
  const std::vector<DeviceInfo> devices = devices_.list();
  struct Gauge {
    std::int64_t active = 0, waiting = 0;
  };
  std::vector<Gauge> gauges(devices.size());
  {
    SchedulerLock g(scheduler_.mutex());
    const auto queued = scheduler_.queue().sizes();
    m.paused = scheduler_.pauses().list();
    for (std::size_t i = 0; i < devices.size(); ++i) {
      const std::string& id = devices[i].id;
      const auto q = queued.find(id);
      gauges[i].active = dispatcher_.running_on(id);
      gauges[i].waiting = (q == queued.end() ? 0 : static_cast<std::int64_t>(q->second)) +
                          scheduler_.backoff_on(id);
    }
  }
  std::int64_t active_total = 0, queued_total = 0;
  for (std::size_t i = 0; i < devices.size(); ++i) {
    const DeviceInfo& d = devices[i];
    m.active_tasks[d.id] = gauges[i].active;
    m.queued_tasks[d.id] = gauges[i].waiting;
    active_total += gauges[i].active;
    queued_total += gauges[i].waiting;
    DeviceMemoryMetrics dm;
    dm.total_mb = d.total_mb;
    dm.reserved_mb = d.reserved_mb;
    dm.observed_mb = d.observed_mb;
    dm.available = d.available;
    dm.peak_task_mb = stats_.peak_of(d.id);
    m.memory_by_device[d.id] = dm;
  }
  m.active_tasks["total"] = active_total;
  m.queued_tasks["total"] = queued_total;
  for (const ServiceEntry* e : registry_.entries()) {
    for (const auto& id : e->devices) {
      const auto s = e->pool->stats(id);
      PoolMetrics p;
      p.service = e->kind;
      p.device = id;
      p.in_use = s.in_use;
      p.size = s.in_use + s.idle;
      p.max = s.max;
      p.min = s.min;
      p.utilization = s.max > 0 ? static_cast<double>(s.in_use) / s.max : 0;
      p.created = s.created;
      p.destroyed = s.destroyed;
      m.pool_utilization[e->kind + "@" + id] = p;
    }
  }
  stats_.fill(m);
  m.queue_full_rejections = scheduler_.admission().rejected();
  m.events_published = bus_.published();
  m.events_dropped = bus_.dropped();
  m.callback_errors = bus_.callback_errors();
  m.internal_errors = stats_.internal_errors.load() + Lifecycle::refused();
  m.store = journal_.stats();
  if (cluster_ != nullptr) {
    m.lost_claims = cluster_->lost_claims();
    m.tasks_rescued = cluster_->rescued();
  }
  return m;
}

TaskHealth Monitor::health(const std::string& id) {
  TaskHealth h;
  h.task_id = id;
  const double long_wait = 0.5 * config_.tasks.queue_timeout_seconds;
  Task t;
  std::vector<std::string> noted;  // the record's own warnings
  bool live = false, running = false;
  std::int64_t live_mb = -1;
  double live_s = 0, queued_for = -1, past_deadline = -1, deadline_s = 0;
  std::optional<Dispatcher::RateState> rate;  // a queued task's kind's rate limit
  std::optional<PauseState> held;             // the pause that holds a queued task
  {
    SchedulerLock g(scheduler_.mutex());
    RecordPtr rec = scheduler_.records().find(id);
    // A shared queue: a task that ended here may have been retried, or
    // taken over, since; its row has the last word (as get_task).
    if (rec && cluster_ != nullptr && rec->phase() == Phase::kDone) rec.reset();
    if (rec) {
      live = true;
      t = rec->task;
      noted = rec->warnings;
      const SteadyTime now = clock_->steady_now();
      running = rec->phase() == Phase::kRunning;
      if (running) {
        live_mb = rec->last_mb.load();
        live_s = seconds(now - rec->started_steady);
        if (rec->timeout_s > 0 && now >= rec->deadline) {
          past_deadline = seconds(now - rec->deadline);
          deadline_s = rec->timeout_s;
        }
      }
      if (rec->phase() == Phase::kQueued) {
        queued_for = seconds(now - rec->queued_steady);
        rate = dispatcher_.rate_state(t.service);
        if (const Pauses::Entry* e =
                scheduler_.pauses().holding(t.assigned_device.value_or(""), t.service)) {
          held = e->state;
        }
      }
    }
  }
  std::vector<EventRecord> stored;
  if (!live) {
    // Only in the store now: read it without the lock (it may wait for the
    // writer), after writing what is committed (read-your-writes).
    scheduler_.outbox().drain(true);
    auto st = journal_.load_task(id);
    if (!st) throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
    t = std::move(*st);
    stored = journal_.load_events(id);
  }
  h.status = t.status;
  h.device = t.assigned_device;
  if (running) {
    if (live_mb >= 0) h.memory_usage_mb = live_mb;
    h.processing_time_s = live_s;
  } else {
    h.memory_usage_mb = t.actual_memory_mb;
    if (t.started_at && t.finished_at) {
      h.processing_time_s = std::chrono::duration<double>(*t.finished_at - *t.started_at).count();
    }
  }
  // What the task looks like now, then what it went through.
  if (h.memory_usage_mb && t.estimated_memory_mb && *h.memory_usage_mb > *t.estimated_memory_mb) {
    h.warnings.push_back(fmt::format("memory {} MB is above the estimate of {} MB",
                                     *h.memory_usage_mb, *t.estimated_memory_mb));
  }
  if (past_deadline >= 0) {
    h.warnings.push_back(
        fmt::format("running past its deadline of {} s (by {:.3g} s): it will "
                    "end TIMEOUT",
                    deadline_s, past_deadline));
  }
  if (t.status == TaskStatus::kUnrecognized) {
    h.warnings.push_back(
        t.stored_status.empty()
            ? std::string("the task has no status in the database; taskmgr leaves it as it is")
            : fmt::format("status '{}' is not a taskmgr status and storage.adopt.status_map does "
                          "not map it; taskmgr leaves the task as it is (map the word to start "
                          "or recover such tasks)",
                          t.stored_status));
  }
  if (t.status == TaskStatus::kQueued && !registry_.contains(t.service)) {
    h.warnings.push_back(fmt::format(
        "waiting for service '{}', which is not registered: it runs once a host registers it",
        t.service));
  }
  if (held) {
    h.warnings.push_back(fmt::format(
        "paused: {} since {}; it starts when resumed (its queue timeout does not run meanwhile)",
        held->scope == PauseScope::kManager
            ? std::string("the manager")
            : fmt::format("{} '{}'", to_string(held->scope), held->name),
        format_timestamp(held->since)));
  }
  if (rate && rate->tokens < 1) {
    h.warnings.push_back(fmt::format(
        "service '{}' is at its rate limit ({:g} tasks per second, burst {}): the next start "
        "waits for a token",
        t.service, rate->per_second, rate->burst));
  }
  if (queued_for > long_wait) {
    h.warnings.push_back(fmt::format("queued for {:.1f} s (timeout {} s)", queued_for,
                                     config_.tasks.queue_timeout_seconds));
  }
  if (live) {
    for (auto& w : noted) h.warnings.push_back(std::move(w));
  } else {
    for (const auto& e : stored) {
      if (auto w = events::warning_of(e, long_wait)) h.warnings.push_back(std::move(*w));
    }
  }
  return h;
}

}  // namespace taskmgr::detail
