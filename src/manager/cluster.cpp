#include "manager/cluster.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>

#include <boost/json.hpp>

#include "manager/lifecycle.hpp"
#include "manager/task_events.hpp"
#include "taskmgr/error.hpp"
#include "utf8.hpp"

namespace taskmgr::detail {

namespace {

// "name/pid/random" (PostgresShared's host id) -> "name".
std::string host_name_of(const std::string& host_id) {
  const auto last = host_id.rfind('/');
  if (last == std::string::npos || last == 0) return host_id;
  const auto pid = host_id.rfind('/', last - 1);
  return pid == std::string::npos ? host_id : host_id.substr(0, pid);
}

}  // namespace

Cluster::Cluster(const Config& config, std::shared_ptr<const Clock> clock, SharedQueue& queue,
                 Scheduler& scheduler, Dispatcher& dispatcher, Placement& placement,
                 ServiceRegistry& registry, DeviceRegistry& devices, TempDirs& temp_dirs,
                 const Logger& log)
    : config_(config),
      clock_(std::move(clock)),
      queue_(queue),
      scheduler_(scheduler),
      dispatcher_(dispatcher),
      placement_(placement),
      registry_(registry),
      devices_(devices),
      temp_dirs_(temp_dirs),
      log_(log) {}

Cluster::~Cluster() { stop(); }

void Cluster::start() {
  thread_ = std::thread([this]() REQUIRES(!scheduler_lock) { run(); });
}

void Cluster::stop() {
  if (stopping_.exchange(true)) {
    if (thread_.joinable()) thread_.join();
    return;
  }
  queue_.wake();
  if (thread_.joinable()) thread_.join();
  // The tasks claimed here and waiting (queued, or backing off before a
  // retry: close stopped its timer) go back to the queue, for any host now
  // rather than after their leases run out.
  std::vector<std::string> waiting;
  {
    SchedulerLock g(scheduler_.mutex());
    for (const std::string& d : devices_.ids()) {
      for (const QueuedTask& q : scheduler_.queue().snapshot(d)) waiting.push_back(q.task_id);
    }
    scheduler_.records().for_each([&waiting](const RecordPtr& r) REQUIRES(scheduler_lock) {
      if (r->phase() == Phase::kBackoff) waiting.push_back(r->id());
    });
  }
  try {
    queue_.release(waiting);
  } catch (const std::exception& e) {
    log_.write(LogLevel::kWarn,
               fmt::format("cluster: giving {} claim(s) back failed (their leases run out and "
                           "another host rescues them): {}",
                           waiting.size(), e.what()));
  }
  queue_.close_host();  // the cluster view shows it closed, not lost
}

bool Cluster::confirm(const std::string& id) {
  try {
    return queue_.confirm(id);
  } catch (const std::exception& e) {
    // The database cannot be reached: the result is written (fenced) when
    // it can be, or refused if the claim is gone by then.
    log_.write(LogLevel::kWarn,
               fmt::format("cluster: renewing the lease of task {} failed: {}", id, e.what()));
    return true;
  }
}

void Cluster::run() {
  const auto& o = queue_.cluster_options();
  auto next_beat = std::chrono::steady_clock::now();
  while (!stopping_.load()) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= next_beat) {
      heartbeat();
      next_beat = now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(o.heartbeat_seconds));
    }
    claim_round();
    const double until_beat =
        std::chrono::duration<double>(next_beat - std::chrono::steady_clock::now()).count();
    (void)queue_.wait_for_work(std::max(0.0, std::min(o.poll_seconds, until_beat)));
  }
}

void Cluster::claim_round() {
  for (int round = 0; round < 100 && !stopping_.load(); ++round) {
    ClaimRequest r;
    {
      SchedulerLock g(scheduler_.mutex());
      if (scheduler_.closing() || scheduler_.pauses().manager()) return;
      const long room = static_cast<long>(dispatcher_.workers()) - dispatcher_.running() -
                        static_cast<long>(scheduler_.queue().size());
      if (room <= 0) return;
      r.max_tasks = static_cast<std::size_t>(room);
      for (const DeviceInfo& d : devices_.list()) {
        if (!d.available || scheduler_.pauses().device(d.id)) continue;
        r.devices.push_back(d.id);
        r.max_memory_mb = std::max(r.max_memory_mb, d.free_mb());
      }
      for (const ServiceEntry* e : registry_.entries()) {
        if (!scheduler_.pauses().service(e->kind)) r.services.push_back(e->kind);
      }
      // Held here still (a lost claim's attempt): not claimed until it is gone.
      for (auto it = held_.begin(); it != held_.end();) {
        it = scheduler_.records().find(*it) ? std::next(it) : held_.erase(it);
      }
      r.exclude.assign(held_.begin(), held_.end());
    }
    if (!config_.tasks.enable_resource_tracking) r.max_memory_mb = INT64_MAX / 2;
    std::vector<ClaimedTask> claimed;
    try {
      claimed = queue_.claim(r);
    } catch (const std::exception& e) {
      log_.write(LogLevel::kWarn, fmt::format("cluster: claiming tasks failed: {}", e.what()));
      return;
    }
    if (claimed.empty()) return;
    struct Found {
      RecordPtr rec;
      std::string device;
    };
    std::vector<Found> found;
    std::vector<std::string> give_back;
    // Outside the lock: features and placement (host code).
    for (ClaimedTask& c : claimed) {
      Task& t = c.task;
      const ServiceEntry* entry = registry_.find(t.service);
      std::string device;
      try {
        if (entry == nullptr) throw Error(ErrorCode::kNotFound, "service not registered here");
        device = placement_.select_device(*entry, t.estimated_memory_mb.value_or(0),
                                          t.requested_device.value_or(""));
      } catch (const std::exception&) {
        give_back.push_back(t.id);  // another host may hold it
        continue;
      }
      auto rec = std::make_shared<Record>();
      const RequestFeatures features = placement_.features(t);
      const bool in_store = t.input.path.empty() && t.input.left_out_bytes > 0;
      rec->device_pinned.store(t.requested_device.has_value());
      rec->init_unshared(std::move(t), features);
      if (in_store) rec->set_input_in_store_unshared();
      found.push_back({std::move(rec), std::move(device)});
    }
    std::vector<RecordPtr> dropped(found.size());  // released after the lock
    {
      SchedulerLock g(scheduler_.mutex());
      for (std::size_t i = 0; i < found.size(); ++i) {
        Found& f = found[i];
        if (!scheduler_.adopt_claimed(f.rec, f.device, dropped[i])) {
          held_.insert(f.rec->id());
          give_back.push_back(f.rec->id());
        }
      }
      dispatcher_.dispatch();
    }
    if (!give_back.empty()) {
      try {
        queue_.release(give_back);
      } catch (const std::exception&) {
        // their leases run out; another host rescues them
      }
    }
    if (claimed.size() < r.max_tasks) return;  // the queue has no more for this host now
  }
}

std::string Cluster::report() {
  boost::json::object o;
  o["host_name"] = to_valid_utf8(queue_.cluster_options().host_name);
  boost::json::array devices;
  for (const DeviceInfo& d : devices_.list()) {
    devices.push_back(boost::json::object{{"id", to_valid_utf8(d.id)},
                                          {"total_mb", d.total_mb},
                                          {"free_mb", d.free_mb()},
                                          {"available", d.available}});
  }
  o["devices"] = std::move(devices);
  {
    SchedulerLock g(scheduler_.mutex());
    o["running"] = dispatcher_.running();
    o["queued"] = static_cast<std::int64_t>(scheduler_.queue().size());
    o["workers"] = dispatcher_.workers();
  }
  o["lost_claims"] = queue_.lost_claims();
  o["rescued"] = rescued_.load();
  return boost::json::serialize(o);
}

void Cluster::heartbeat() {
  const std::string me = host_id_name(queue_.cluster_options().host_name);
  bool same_machine = false;
  std::size_t expired = 0;  // queue timeouts in the shared table
  HeartbeatAnswer a;
  try {
    const Timestamp queued_before =
        stored_time(*clock_) - std::chrono::duration_cast<Duration>(std::chrono::duration<double>(
                                   config_.tasks.queue_timeout_seconds));
    a = queue_.heartbeat(
        report(),
        [&](Task& t, const std::string& lost_host) {
          if (lost_host.empty()) {
            ++expired;
          } else if (host_name_of(lost_host) == me) {
            same_machine = true;
          }
          return rescue(config_, *clock_, t, lost_host, me);
        },
        queued_before);
  } catch (const std::exception& e) {
    log_.write(LogLevel::kWarn,
               fmt::format("cluster: the heartbeat failed (this host's leases run out if it "
                           "keeps failing): {}",
                           e.what()));
    return;
  }
  if (expired > 0) {
    log_.write(LogLevel::kWarn,
               fmt::format("cluster: {} task(s) failed QUEUE_TIMEOUT: no host claimed them within "
                           "tasks.queue_timeout_seconds",
                           expired));
  }
  if (a.rescued > expired) {
    a.rescued -= expired;
    rescued_.fetch_add(a.rescued);
    log_.write(
        LogLevel::kWarn,
        fmt::format("cluster: rescued {} task(s) of host(s) whose leases ran out", a.rescued));
    // A dead run of this machine: its temp dirs are reachable here.
    if (same_machine) temp_dirs_.remove_dead_runs();
  }
  std::vector<std::string> lost = queue_.take_lost();
  lost.insert(lost.end(), a.lost.begin(), a.lost.end());
  drop_lost(lost);
  if (!a.cancel_requested.empty()) {
    SchedulerLock g(scheduler_.mutex());
    for (const auto& id : a.cancel_requested) {
      if (RecordPtr rec = scheduler_.records().find(id)) (void)scheduler_.cancel(rec);
    }
  }
}

void Cluster::drop_lost(const std::vector<std::string>& ids) {
  for (const auto& id : ids) {
    if (lost_waiting_.insert(id).second) {
      log_.write(LogLevel::kWarn,
                 fmt::format("cluster: lost the claim on task {} (its lease ran out and another "
                             "host took it over); what this host does with it is not stored",
                             id));
    }
  }
  SchedulerLock g(scheduler_.mutex());
  for (auto it = lost_waiting_.begin(); it != lost_waiting_.end();) {
    RecordPtr rec = scheduler_.records().find(*it);
    if (!rec) {
      it = lost_waiting_.erase(it);
      continue;
    }
    rec->cancel.store(true);  // a running attempt stops cooperatively
    if (rec->phase() == Phase::kDone) {
      (void)scheduler_.records().erase_finished(*it);
      it = lost_waiting_.erase(it);
    } else {
      ++it;
    }
  }
}

bool Cluster::cancel(const std::string& id) {
  SharedChange r =
      queue_.change_unclaimed(id, [this](Task& t) -> std::optional<std::vector<EventRecord>> {
        if (t.status != TaskStatus::kPending && t.status != TaskStatus::kQueued)
          return std::nullopt;
        EventBatch b(*clock_);
        const TaskStatus was = t.status;
        t.status = TaskStatus::kCancelled;
        t.failure_reason = TaskFailureReason::kCancelled;
        t.failure_message = "cancelled by the host";
        t.finished_at = stored_time(*clock_);
        t.resource_cleanup_completed = true;
        events::cancelled(b, was, t.attempt, t.failure_message);
        events::cleanup_started(b, t.attempt, false);
        events::cleanup_completed(b, t.attempt, 0.0, {}, false);
        return b.take_records(t.id);
      });
  if (!r.task) throw Error(ErrorCode::kNotFound, "unknown task id '" + printable_name(id) + "'");
  if (r.applied) return true;
  if (is_terminal(r.task->status)) return false;
  return queue_.request_cancel(id);
}

namespace {

std::string status_name(const Task& t) {
  return t.status == TaskStatus::kUnrecognized ? t.stored_status : std::string(to_string(t.status));
}

// The row after a control: applied, or why not.
Task changed_or_throw(SharedChange r, const std::string& id, std::string_view what,
                      std::string_view wanted) {
  if (!r.task) throw Error(ErrorCode::kNotFound, "unknown task id '" + printable_name(id) + "'");
  if (!r.applied) {
    throw Error(
        ErrorCode::kInvalidState,
        fmt::format("task {} is {}{}: {}", id, status_name(*r.task),
                    r.task->status == TaskStatus::kQueued || r.task->status == TaskStatus::kRunning
                        ? " on " + r.task->host.value_or("a host")
                        : "",
                    what.empty() ? std::string(wanted) : std::string(what)));
  }
  r.task->input.leave_out_data();
  return std::move(*r.task);
}

}  // namespace

Task Cluster::start(const std::string& id, const TaskStartRequest& p) {
  SharedChange r =
      queue_.change_unclaimed(id, [&](Task& t) -> std::optional<std::vector<EventRecord>> {
        if (t.status != TaskStatus::kPending) return std::nullopt;
        if (p.priority) t.priority = *p.priority;
        if (p.batch_size) t.batch_size = *p.batch_size;
        if (!p.options_json.empty()) t.options_json = p.options_json;
        if (!p.device.empty()) {
          t.requested_device = p.device;
          t.assigned_device = p.device;
        }
        t.status = TaskStatus::kQueued;
        t.queued_at = stored_time(*clock_);
        EventBatch b(*clock_);
        events::queued(b, t, false, false);
        return b.take_records(t.id);
      });
  return changed_or_throw(std::move(r), id, "", "only a pending task can be started");
}

Task Cluster::retry(const std::string& id, const TaskStartRequest& p) {
  std::string why;
  SharedChange r =
      queue_.change_unclaimed(id, [&](Task& t) -> std::optional<std::vector<EventRecord>> {
        // Never placed (a row of an adopted table that ended before
        // taskmgr): nothing of taskmgr's to clean up.
        if (!t.assigned_device && is_terminal(t.status)) t.resource_cleanup_completed = true;
        why = not_retryable(t, true);
        if (!why.empty()) return std::nullopt;
        const int last = t.attempt;
        if (p.priority) t.priority = *p.priority;
        if (p.batch_size) t.batch_size = *p.batch_size;
        if (!p.options_json.empty()) t.options_json = p.options_json;
        t.requested_device = p.device.empty() ? t.requested_device : p.device;
        t.assigned_device = t.requested_device;
        t.failure_reason = TaskFailureReason::kNone;
        t.failure_message.clear();
        t.result.clear();
        t.finished_at.reset();
        t.status = TaskStatus::kQueued;
        t.queued_at = stored_time(*clock_);
        EventBatch b(*clock_);
        events::retried(b, "host", "retried by the host", last, t.assigned_device.value_or(""),
                        t.batch_size, 0.0);
        events::queued(b, t, false, false);
        return b.take_records(t.id);
      });
  if (!why.empty()) throw Error(ErrorCode::kInvalidState, why);
  return changed_or_throw(std::move(r), id, "",
                          "only a failed or cancelled task can be retried (a host holds it)");
}

Task Cluster::set_priority(const std::string& id, int priority) {
  SharedChange r =
      queue_.change_unclaimed(id, [&](Task& t) -> std::optional<std::vector<EventRecord>> {
        if (t.status != TaskStatus::kPending && t.status != TaskStatus::kQueued) {
          return std::nullopt;
        }
        EventBatch b(*clock_);
        events::priority_changed(b, t.priority, priority, t.status);
        t.priority = priority;
        return b.take_records(t.id);
      });
  return changed_or_throw(std::move(r), id, "",
                          "only a waiting task's priority can change (pending or queued, not "
                          "claimed by a host)");
}

std::vector<EventRecord> Cluster::rescue(const Config& config, const Clock& clock, Task& t,
                                         const std::string& lost_host,
                                         const std::string& this_host_name) {
  EventBatch b(clock);
  if (lost_host.empty()) {
    // No host claimed it within the queue timeout: failed, as a task that
    // waits too long in a single host's queue.
    const double waited =
        t.queued_at ? std::chrono::duration<double>(stored_time(clock) - *t.queued_at).count() : 0;
    t.status = TaskStatus::kFailed;
    t.failure_reason = TaskFailureReason::kQueueTimeout;
    t.failure_message = fmt::format(
        "waited {:.6f} s in the shared queue and no host claimed it (tasks.queue_timeout_seconds "
        "= {:.6f})",
        waited, config.tasks.queue_timeout_seconds);
    t.finished_at = stored_time(clock);
    t.resource_cleanup_completed = true;
    events::failed(b, t.failure_reason, t.failure_message, t.attempt);
    events::cleanup_started(b, t.attempt, false);
    events::cleanup_completed(b, t.attempt, 0.0, {}, false);
    return b.take_records(t.id);
  }
  const std::string lost_name = host_name_of(lost_host);
  std::vector<std::string> problems;
  if (lost_name != this_host_name) {
    problems.push_back(fmt::format(
        "any files it left are on host {} (not reachable from {}): removed when taskmgr opens "
        "there again",
        lost_name, this_host_name));
  }
  const Timestamp now = stored_time(clock);
  const std::string why = fmt::format("host {} stopped renewing its lease", lost_host);
  if (is_terminal(t.status)) {
    // Ended there, its cleanup not recorded: recorded here.
    events::resource_released(b, t.assigned_device.value_or(""), "", 0, true);
    events::cleanup_completed(b, t.attempt, 0.0, problems, true);
    t.resource_cleanup_completed = true;
    return b.take_records(t.id);
  }
  const bool was_running = t.status == TaskStatus::kRunning;
  const int max =
      std::max(config.tasks.retry.max_attempts, config.tasks.retry.max_interrupted_attempts);
  if (was_running) {
    events::cleanup_started(b, t.attempt, true);
    events::cleanup_completed(b, t.attempt, 0.0, problems, true);
    if (t.attempt >= max) {
      t.status = TaskStatus::kFailed;
      t.failure_reason = TaskFailureReason::kHostLost;
      t.failure_message = fmt::format("{} while the task ran (attempt {} of {}); no attempts left",
                                      why, t.attempt, max);
      t.finished_at = now;
      t.resource_cleanup_completed = true;
      events::failed(b, t.failure_reason, t.failure_message, t.attempt);
      return b.take_records(t.id);
    }
    events::retried(b, "host_lost", why, t.attempt, t.requested_device.value_or(""), t.batch_size,
                    0.0);
  }
  // Queued again for any host: its device is chosen by the one that claims it.
  t.status = TaskStatus::kQueued;
  t.queued_at = now;
  t.assigned_device = t.requested_device;
  t.service_instance_id.reset();
  t.host.reset();
  t.resource_cleanup_completed = false;
  events::queued(b, t, /*retry=*/false, /*recovered=*/true);
  return b.take_records(t.id);
}

}  // namespace taskmgr::detail
