#include "manager/scheduler.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <utility>

#include "forced_unwind.hpp"
#include "manager/admission.hpp"
#include "manager/dispatcher.hpp"
#include "manager/lifecycle.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr::detail {

double seconds(Duration d) { return std::chrono::duration<double>(d).count(); }

Duration from_seconds(double s) {
  constexpr double kMax = 100 * 365.25 * 86400;
  if (!(s > 0)) return Duration::zero();
  return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(std::min(s, kMax)));
}

namespace {

TaskQueue::Options queue_options(const TasksConfig& c) {
  TaskQueue::Options qo;
  qo.enable_priority_queue = c.enable_priority_queue;
  qo.ordering = c.queue_ordering;
  qo.max_queue_size = static_cast<std::size_t>(c.max_queue_size);
  qo.starvation_after = from_seconds(c.starvation_seconds);
  qo.check_memory = c.enable_resource_tracking;
  qo.priority_aging = from_seconds(c.priority_aging_seconds);
  return qo;
}

constexpr std::size_t kWarningsKept = 32;

}  // namespace

Scheduler::Scheduler(const Config& config, std::shared_ptr<const Clock> clock,
                     DeviceRegistry& devices, Outbox& outbox, Stats& stats, TimerQueue& timers,
                     TaskErrorHandler& handler)
    : config_(config),
      clock_(std::move(clock)),
      devices_(devices),
      outbox_(outbox),
      stats_(stats),
      timers_(timers),
      handler_(handler),
      queue_(std::make_unique<TaskQueue>(queue_options(config.tasks), devices, clock_)),
      admission_(*queue_, static_cast<std::size_t>(config.tasks.max_queue_size)) {}

void Scheduler::check_open() const {
  if (closing()) throw Error(ErrorCode::kInvalidState, "the task manager is closed");
}

bool Scheduler::idle() const {
  return dispatcher_->running() == 0 && backoff_ == 0 && queue_->size() == 0;
}

int Scheduler::backoff_on(const std::string& device) const {
  auto it = backoff_by_device_.find(device);
  return it == backoff_by_device_.end() ? 0 : it->second;
}

void Scheduler::warn(Record& r, std::string text) {
  if (r.warnings.size() < kWarningsKept) r.warnings.push_back(std::move(text));
}

// ---- creation and start ----------------------------------------------------------------
void Scheduler::add_created(const RecordPtr* recs, const bool* start, std::size_t n,
                            std::vector<NewTask>& rows, std::size_t starting) {
  // Queued and unreserved in one admission section: a check in between
  // would count these tasks twice (or not at all).
  MutexLock admit(admission_.mutex(), starting > 0);
  for (std::size_t i = 0; i < n; ++i) {
    records_.put(recs[i]);
    Stats::add(stats_.created);
    if (start[i]) push_queued(recs[i], false, /*enforce_limit=*/false);
  }
  admission_.queued_reserved(starting);
  admit.unlock();
  outbox_.publish_stored(rows);  // insert_tasks stored these events
  if (starting > 0) dispatcher_->dispatch();
}

Task Scheduler::start(const RecordPtr& rec, const StartPlan& plan) {
  Task& t = rec->task;
  if (rec->phase() != Phase::kPending) {
    throw Error(ErrorCode::kInvalidState,
                fmt::format("task {} is {}: only a pending task can be started", t.id,
                            to_string(t.status)));
  }
  // Checked and queued under the admission lock: creates that start their
  // tasks reserve room under it without the scheduler lock.
  MutexLock admit(admission_.mutex());
  admission_.check_one(t.id);
  t.priority = plan.priority;
  t.batch_size = plan.batch_size;
  rec->features = plan.features;
  t.estimated_memory_mb = plan.estimate;
  t.assigned_device = plan.device;
  if (!plan.options_json.empty()) t.options_json = plan.options_json;
  EventBatch b(*clock_);
  (void)Lifecycle::apply(*rec, Step::kStart);
  enqueue(rec, b, false, false, /*enforce_limit=*/true);
  admit.unlock();
  outbox_.commit(rec, b);
  dispatcher_->dispatch();
  return t;
}

void Scheduler::enqueue(const RecordPtr& rec, EventBatch& b, bool retry, bool recovered,
                        bool enforce_limit) {
  Task& t = rec->task;
  // The spec's requeue_task: one priority lower (saturating at the lowest),
  // unless the host set the priority while it waited.
  const bool host_set = std::exchange(rec->priority_pinned, false);
  if (retry && !host_set && t.priority > INT_MIN) t.priority -= 1;
  t.queued_at = stored_time(*clock_);
  events::queued(b, t, retry, recovered);
  push_queued(rec, retry, enforce_limit);
}

// Puts a task marked queued into the queue of its device.
void Scheduler::push_queued(const RecordPtr& rec, bool retry, bool enforce_limit) {
  const Task& t = rec->task;
  QueuedTask q;
  q.task_id = t.id;
  q.device = *t.assigned_device;
  q.service = t.service;
  q.estimated_memory_mb = t.estimated_memory_mb.value_or(0);
  if (retry && t.priority < INT_MAX) {
    q.priority = t.priority + 1;
    queue_->requeue_task(std::move(q));  // one priority lower than q.priority: t.priority
  } else {
    queue_->add_task(std::move(q), t.priority, enforce_limit);
  }
  dispatcher_->note_enqueued();
  rec->queued_steady = clock_->steady_now();
}

Task Scheduler::retry(const RecordPtr& rec, const StartPlan& plan) {
  Task& t = rec->task;
  if (std::string why = not_retryable(t, rec->phase() == Phase::kDone); !why.empty()) {
    throw Error(ErrorCode::kInvalidState, why);
  }
  MutexLock admit(admission_.mutex());
  admission_.check_one(t.id, fmt::format("stays {} and can be retried later",
                                         to_string(t.status)));  // kQueueFull: nothing changed
  records_.revive(rec);
  const int last = t.attempt;
  t.priority = plan.priority;
  t.batch_size = plan.batch_size;
  rec->features = plan.features;
  t.estimated_memory_mb = plan.estimate;
  t.assigned_device = plan.device;
  if (!plan.options_json.empty()) t.options_json = plan.options_json;
  t.failure_reason = TaskFailureReason::kNone;
  t.failure_message.clear();
  t.result.clear();
  t.finished_at.reset();
  rec->cancel.store(false);
  rec->timed_out.store(false);
  rec->close_interrupt.store(false);
  rec->memory_warned.store(false);
  rec->device_warned = false;
  rec->last_mb.store(-1);
  rec->peak_mb.store(-1);
  rec->pending = Outcome{};
  EventBatch b(*clock_);
  events::retried(b, "host", "retried by the host", last, plan.device, plan.batch_size, 0.0);
  (void)Lifecycle::apply(*rec, Step::kHostRetry);
  enqueue(rec, b, /*retry=*/false, /*recovered=*/false, /*enforce_limit=*/true);
  admit.unlock();
  outbox_.commit(rec, b);
  dispatcher_->dispatch();
  return t;
}

std::string not_retryable(const Task& t, bool cleanup_over) {
  const std::string status =
      t.status == TaskStatus::kUnrecognized ? t.stored_status : std::string(to_string(t.status));
  if (t.status != TaskStatus::kFailed && t.status != TaskStatus::kCancelled) {
    return fmt::format(
        "task {} is {}: only a failed or cancelled task can be retried{}", t.id, status,
        t.status == TaskStatus::kCompleted ? " (create a new task to run it again)" : "");
  }
  if (!cleanup_over || !t.resource_cleanup_completed) {
    return fmt::format("task {} ended {}, but its cleanup is not done: retry it once it is", t.id,
                       status);
  }
  return {};
}

Task Scheduler::set_priority(const RecordPtr& rec, int priority) {
  Task& t = rec->task;
  switch (rec->phase()) {
    case Phase::kPending: break;
    case Phase::kQueued: (void)queue_->set_priority(rec->id(), priority); break;
    case Phase::kBackoff: rec->priority_pinned = true; break;
    default: {
      const std::string status = t.status == TaskStatus::kUnrecognized
                                     ? t.stored_status
                                     : std::string(to_string(t.status));
      throw Error(
          ErrorCode::kInvalidState,
          fmt::format("task {} is {}: only a waiting task's priority can change (pending "
                      "or queued)",
                      t.id, rec->phase() == Phase::kCleanup ? "finishing an attempt" : status));
    }
  }
  const int from = t.priority;
  if (from != priority) {
    t.priority = priority;
    EventBatch b(*clock_);
    events::priority_changed(b, from, priority, t.status);
    outbox_.commit(rec, b);
    if (rec->phase() == Phase::kQueued) dispatcher_->dispatch();
  }
  return t;
}

bool Scheduler::cancel(const RecordPtr& rec) {
  switch (rec->phase()) {
    case Phase::kNew:
    case Phase::kDone: return false;
    case Phase::kCleanup:
      // The attempt has ended; only a retry still to come can be cancelled
      // (finish_cleanup sees the flag).
      if (rec->pending.kind != Outcome::Kind::kRetry) return false;
      rec->cancel.store(true);
      return true;
    case Phase::kRunning: rec->cancel.store(true); return true;
    case Phase::kQueued: queue_->remove(rec->id()); break;
    case Phase::kBackoff:
      timers_.cancel(rec->retry_timer);
      --backoff_;
      --backoff_by_device_[*rec->task.assigned_device];
      break;
    case Phase::kPending: break;
  }
  rec->cancel.store(true);
  EventBatch b(*clock_);
  end_waiting(rec, TaskStatus::kCancelled, TaskFailureReason::kCancelled, "cancelled by the host",
              b);
  outbox_.commit(rec, b);
  dispatcher_->dispatch();
  return true;
}

void Scheduler::end_waiting(const RecordPtr& rec, TaskStatus status, TaskFailureReason reason,
                            const std::string& message) {
  EventBatch b(*clock_);
  end_waiting(rec, status, reason, message, b);
  outbox_.commit(rec, b);
}

// A task that ends without running (this attempt): its outcome event, then a
// cleanup with nothing to release.
void Scheduler::end_waiting(const RecordPtr& rec, TaskStatus status, TaskFailureReason reason,
                            const std::string& message, EventBatch& b) {
  Task& t = rec->task;
  const TaskStatus was = t.status;
  if (!Lifecycle::apply(*rec, Step::kEndWaiting, status)) return;
  t.failure_reason = reason;
  t.failure_message = message;
  t.finished_at = stored_time(*clock_);
  if (status == TaskStatus::kCancelled) {
    Stats::add(stats_.cancelled);
    events::cancelled(b, was, t.attempt, message);
  } else {
    stats_.failed(reason);
    events::failed(b, reason, message, t.attempt);
  }
  // Every outcome event is followed by its cleanup's (here with nothing to
  // release), whatever path ended the task.
  events::cleanup_started(b, t.attempt, false);
  t.resource_cleanup_completed = true;
  events::cleanup_completed(b, t.attempt, 0.0, {}, false);
  finished(rec);
}

void Scheduler::move_queued(const RecordPtr& rec, const std::string& from, const std::string& to,
                            const std::string& why) {
  if (rec->phase() != Phase::kQueued || rec->task.assigned_device != from) return;
  queue_->remove(rec->id());
  EventBatch b(*clock_);
  if (to.empty()) {
    end_waiting(
        rec, TaskStatus::kFailed, TaskFailureReason::kDeviceUnavailable,
        fmt::format("{} became unavailable and no other device can hold the task: {}", from, why),
        b);
  } else {
    Task& t = rec->task;
    events::device_fallback(b, from, to, "device_unavailable");
    t.assigned_device = to;
    (void)Lifecycle::apply(*rec, Step::kRequeue);
    events::queued(b, t, false, false, from);
    push_queued(rec, false, /*enforce_limit=*/false);  // one out, one in: never full
  }
  outbox_.commit(rec, b);
}

// ---- an attempt ----------------------------------------------------------------------------
AttemptStart Scheduler::begin_attempt(const RecordPtr& rec, const ServicePool::Lease& lease) {
  Task& t = rec->task;
  AttemptStart a;
  a.started = clock_->steady_now();
  (void)Lifecycle::apply(*rec, Step::kDispatch);
  t.started_at = stored_time(*clock_);
  t.service_instance_id = lease.instance_id();
  rec->instance_id = lease.instance_id();
  rec->started_steady = a.started;
  rec->last_mb.store(-1);
  rec->peak_mb.store(-1);
  rec->memory_warned.store(false);
  rec->device_warned = false;
  rec->timeout_s =
      timeout_from_options(t.options_json).value_or(config_.tasks.task_timeout_seconds);
  rec->deadline = rec->timeout_s > 0 ? a.started + from_seconds(rec->timeout_s) : SteadyTime{};
  rec->timed_out.store(false);
  rec->temp_dir.clear();
  a.device = lease.device();
  a.options = t.options_json;
  a.attempt = t.attempt;
  a.batch_size = t.batch_size;
  a.estimate_mb = t.estimated_memory_mb.value_or(0);
  a.deadline = rec->deadline;
  a.timeout_s = rec->timeout_s;
  const double wait = seconds(a.started - rec->queued_steady);
  stats_.wait.record(wait);
  if (wait > 0.5 * config_.tasks.queue_timeout_seconds)
    warn(*rec, events::waited_warning_text(wait));
  // The spec's on_task_resource_acquired: log and track the acquisition.
  if (outbox_.logs(LogLevel::kDebug)) {
    outbox_.commit_log(LogLevel::kDebug,
                       fmt::format("task {} acquired {} and {} MB on {}", t.id, lease.instance_id(),
                                   rec->reserved_mb, lease.device()));
  }
  Stats::add(stats_.started);
  EventBatch b(*clock_);
  events::resource_acquired(b, a.device, lease.instance_id(), rec->reserved_mb, a.estimate_mb);
  events::started(b, a.attempt, a.batch_size, wait);
  outbox_.commit(rec, b);
  return a;
}

void Scheduler::end_attempt(const RecordPtr& rec, Outcome o, const std::string& temp_dir) {
  Task& t = rec->task;
  rec->temp_dir = temp_dir;
  // A cancel that came after the attempt's outcome was decided (outside the
  // lock) but while the task was still running: cancel_task has returned 1,
  // so the task ends cancelled, whatever its service did (a retry is
  // cancelled in finish_cleanup). cancel() sets the flag under this lock.
  if (rec->cancel.load() &&
      (o.kind == Outcome::Kind::kCompleted || o.kind == Outcome::Kind::kFailed)) {
    o.kind = Outcome::Kind::kCancelled;
    o.result.clear();
    o.decision.alert = false;  // no out-of-memory report for a cancelled task
  }
  const std::string device = t.assigned_device.value_or("");
  if (o.peak_mb) {
    t.actual_memory_mb = *o.peak_mb;
    stats_.peak(device, *o.peak_mb);
  }
  const double proc = seconds(clock_->steady_now() - rec->started_steady);
  EventBatch b(*clock_);
  if ((o.kind == Outcome::Kind::kRetry || o.kind == Outcome::Kind::kFailed) && o.decision.alert) {
    // handle_oom_error steps 1 and 4: the memory state in the log, an alert.
    Stats::add(stats_.ooms);
    Stats::add(stats_.warnings);
    outbox_.commit_log(LogLevel::kWarn,
                       fmt::format("task {} ran out of memory on {} (attempt {}, batch_size {}): "
                                   "{}; memory state: {}",
                                   t.id, device, t.attempt, t.batch_size, o.failure.message,
                                   o.decision.memory_state_json));
    events::memory_out_of_memory(b, device, o.failure.message, o.decision.memory_state_json);
    warn(*rec, events::memory_warning_text("out_of_memory", o.failure.message));
  }
  switch (o.kind) {
    case Outcome::Kind::kCompleted:
      (void)Lifecycle::apply(*rec, Step::kEndAttempt, TaskStatus::kCompleted);
      t.result = std::move(o.result);
      t.finished_at = stored_time(*clock_);
      Stats::add(stats_.completed);
      events::completed(b, t.attempt, proc, o.peak_mb);
      break;
    case Outcome::Kind::kCancelled:
      (void)Lifecycle::apply(*rec, Step::kEndAttempt, TaskStatus::kCancelled);
      t.failure_reason = TaskFailureReason::kCancelled;
      // The host's cancel, or the service's own (TASKMGR_E_CANCELLED).
      // A host's cancel says what became of the service's work when the
      // service said more than throw_if_cancelled does (a worker killed).
      if (o.lost_claim) {
        t.failure_message = o.failure.message;
      } else if (rec->cancel.load()) {
        const bool plain =
            o.failure.message.empty() || o.failure.message == "task " + t.id + " was cancelled";
        t.failure_message = std::string("cancelled by the host while running") +
                            (plain ? "" : ": " + o.failure.message);
      } else {
        t.failure_message = "cancelled by its service: " + o.failure.message;
      }
      t.finished_at = stored_time(*clock_);
      Stats::add(stats_.cancelled);
      // A claim lost before the service ran: the task was waiting, as far
      // as the shared table tells.
      events::cancelled(b, o.before_run ? TaskStatus::kQueued : TaskStatus::kRunning, t.attempt,
                        t.failure_message);
      break;
    case Outcome::Kind::kFailed:
      (void)Lifecycle::apply(*rec, Step::kEndAttempt, TaskStatus::kFailed);
      t.failure_reason = o.decision.final_reason;
      t.failure_message = o.decision.final_message;
      t.finished_at = stored_time(*clock_);
      stats_.failed(t.failure_reason);
      events::failed(b, t.failure_reason, t.failure_message, t.attempt);
      break;
    case Outcome::Kind::kRetry: {
      (void)Lifecycle::apply(*rec, Step::kEndAttempt, TaskStatus::kQueued);
      Stats::add(stats_.retries);
      if (o.decision.cpu_fallback) {
        Stats::add(stats_.fallbacks);
        events::device_fallback(b, device, o.decision.device, to_string(o.failure.reason));
      }
      const std::string_view reason = to_string(o.failure.reason);
      events::retried(b, reason, o.failure.message, t.attempt, o.decision.device,
                      o.decision.batch_size, seconds(o.decision.delay),
                      /*counted=*/!rec->close_interrupt.load());
      warn(*rec, events::retried_warning_text(reason, t.attempt, o.failure.message));
      break;
    }
  }
  events::cleanup_started(b, t.attempt, false);
  rec->pending = std::move(o);
  rec->cleanup_started = clock_->steady_now();
  rec->cleanup_deadline =
      rec->cleanup_started + from_seconds(config_.tasks.cleanup_timeout_seconds);
  rec->cleanup_claim.store(static_cast<std::uint64_t>(t.attempt) * 4 + Record::kHookRunning);
  cleanups_.push_back(rec);
  outbox_.commit(rec, b);
}

void Scheduler::finish_cleanup(const RecordPtr& rec, const CleanupReport& report) {
  Task& t = rec->task;
  cleanups_.erase(std::remove(cleanups_.begin(), cleanups_.end(), rec), cleanups_.end());
  std::vector<std::string> problems = report.problems;
  const std::int64_t released = rec->reserved_mb;
  if (!rec->reserved_device.empty()) {
    // on_task_cleanup_completed verifies the release: the device must hold
    // at least this task's reservation (else it was released twice, or the
    // registry was changed behind the manager's back).
    const auto d = devices_.get(rec->reserved_device);
    if (d && d->reserved_mb < released) {
      problems.push_back(fmt::format(
          "memory reservation not released: {} held {} MB of reservations, less than this "
          "task's {} MB",
          rec->reserved_device, d->reserved_mb, released));
    }
    devices_.release(rec->reserved_device, released);
  }
  EventBatch b(*clock_);
  events::resource_released(b, t.assigned_device.value_or(""), rec->instance_id, released, false);
  rec->reserved_mb = 0;
  rec->reserved_device.clear();
  const bool ok = problems.empty();
  t.resource_cleanup_completed = ok;
  if (!ok) {
    Stats::add(stats_.cleanup_failures);
    warn(*rec, events::cleanup_warning_text(problems.front()));
    outbox_.commit_log(LogLevel::kWarn,
                       fmt::format("cleanup of task {} incomplete: {}", t.id, problems.front()));
  }
  events::cleanup_completed(b, t.attempt, seconds(clock_->steady_now() - rec->cleanup_started),
                            problems, false);
  rec->temp_dir.clear();
  Outcome& o = rec->pending;
  if (o.kind == Outcome::Kind::kRetry && rec->cancel.load()) {
    end_waiting(rec, TaskStatus::kCancelled, TaskFailureReason::kCancelled,
                "cancelled by the host before its retry", b);
  } else if (o.kind == Outcome::Kind::kRetry && rec->close_interrupt.load()) {
    // Interrupted by close(): queued again as it was (its priority kept, the
    // attempt not charged: the next run has the same number), and left
    // queued in the store for the next open.
    (void)Lifecycle::apply(*rec, Step::kRequeueUncounted);
    enqueue(rec, b, /*retry=*/false, /*recovered=*/false, /*enforce_limit=*/false);
  } else if (o.kind == Outcome::Kind::kRetry) {
    apply_retry(rec, o.decision, o.next_estimate_mb, b);
  } else {
    (void)Lifecycle::apply(*rec, Step::kFinish);
    finished(rec);
  }
  rec->pending = Outcome();
  outbox_.commit(rec, b);
}

void Scheduler::memory_above_estimate(const RecordPtr& rec, const std::string& device,
                                      std::int64_t mb, std::int64_t estimate_mb) {
  EventBatch b(*clock_);
  events::memory_above_estimate(b, device, mb, estimate_mb);
  warn(*rec, events::memory_warning_text(
                 "above_estimate",
                 fmt::format("uses {} MB, above its estimate of {} MB", mb, estimate_mb)));
  Stats::add(stats_.warnings);
  outbox_.commit(rec, b);
}

void Scheduler::device_nearly_full(const RecordPtr& rec, const std::string& device,
                                   std::int64_t used_mb, std::int64_t total_mb) {
  if (rec->phase() != Phase::kRunning || rec->device_warned) return;
  rec->device_warned = true;
  Stats::add(stats_.warnings);
  EventBatch b(*clock_);
  events::memory_device_nearly_full(b, device, used_mb, total_mb);
  warn(*rec,
       events::memory_warning_text(
           "device_nearly_full", fmt::format("{} is {} of {} MB full", device, used_mb, total_mb)));
  outbox_.commit(rec, b);
}

FailureSnapshot Scheduler::failure_snapshot(const Record& r) const {
  FailureSnapshot s;
  const Task& t = r.task;
  s.task.id = t.id;
  s.task.assigned_device = t.assigned_device;
  s.task.attempt = t.attempt;
  s.task.batch_size = t.batch_size;
  s.task.estimated_memory_mb = t.estimated_memory_mb;
  s.state = memory_state(r);
  s.features = r.features;
  return s;
}

void Scheduler::pool_exhausted(const RecordPtr& rec, const FailureInfo& f) {
  Task& t = rec->task;
  (void)Lifecycle::apply(*rec, Step::kCountAttempt);
  const FailureSnapshot snap = failure_snapshot(*rec);
  // The manager's handler has no log sink: deciding runs no host code.
  const RetryDecision d = handler_.handle_failure(snap.task, f, snap.state, true);
  EventBatch b(*clock_);
  if (!d.retry) {
    end_waiting(rec, TaskStatus::kFailed, d.final_reason, d.final_message, b);
  } else {
    Stats::add(stats_.retries);
    const std::string_view reason = to_string(f.reason);
    events::retried(b, reason, f.message, t.attempt, d.device, d.batch_size, seconds(d.delay));
    warn(*rec, events::retried_warning_text(reason, t.attempt, f.message));
    apply_retry(rec, d, std::nullopt, b);
  }
  outbox_.commit(rec, b);
}

void Scheduler::apply_retry(const RecordPtr& rec, const RetryDecision& d,
                            std::optional<std::int64_t> next_estimate, EventBatch& b) {
  Task& t = rec->task;
  t.assigned_device = d.device;
  t.batch_size = d.batch_size;
  rec->features.batch_size = d.batch_size;
  if (next_estimate) t.estimated_memory_mb = next_estimate;
  if (d.delay <= Duration::zero()) {
    (void)Lifecycle::apply(*rec, Step::kRequeue);
    enqueue(rec, b, true, false, /*enforce_limit=*/false);
    return;
  }
  (void)Lifecycle::apply(*rec, Step::kBackoff);
  ++backoff_;
  ++backoff_by_device_[d.device];
  // Captures `this`, as every timer and worker job does: the manager joins
  // the timer thread and the workers before any room goes. (A weak_ptr here
  // could make the timer thread the last owner and have it join itself.)
  rec->retry_timer = timers_.schedule_after(
      d.delay, [this, rec]() REQUIRES(!scheduler_lock) { on_backoff_elapsed(rec); });
}

void Scheduler::on_backoff_elapsed(const RecordPtr& rec) {
  try {
    {
      SchedulerLock g(mu_);
      if (rec->phase() != Phase::kBackoff || closing()) return;
      --backoff_;
      --backoff_by_device_[*rec->task.assigned_device];
      EventBatch b(*clock_);
      (void)Lifecycle::apply(*rec, Step::kBackoffElapsed);
      const bool again = std::exchange(rec->backoff_after_recovery, false);
      enqueue(rec, b, /*retry=*/!again, /*recovered=*/again, /*enforce_limit=*/false);
      outbox_.commit(rec, b);
      dispatcher_->dispatch();
    }
    outbox_.drain();
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    Stats::add(stats_.internal_errors);
  }
}

// ---- recovery --------------------------------------------------------------------------------
void Scheduler::recover(const RecordPtr& rec, const std::string& device,
                        const std::string& no_device_why) {
  Task& t = rec->task;
  records_.put(rec);
  rec->recovered.store(true);
  EventBatch b(*clock_);
  if (t.status == TaskStatus::kPending) {
    (void)Lifecycle::apply(*rec, Step::kRecoverPending);
    return;
  }
  if (is_terminal(t.status)) {
    // Ended, but the process died during its cleanup: finish it. The dead
    // run's temp dirs are gone (Recovery removes them), its reservations and
    // pool leases died with it.
    events::resource_released(b, t.assigned_device.value_or(""), "", 0, true);
    events::cleanup_completed(b, t.attempt, 0.0, {}, true);
    t.resource_cleanup_completed = true;
    (void)Lifecycle::apply(*rec, Step::kRecoverEnded);
    finished(rec);
    outbox_.commit(rec, b);
    return;
  }
  const bool was_running = t.status == TaskStatus::kRunning;
  Duration interrupted_delay{};
  if (was_running) {
    events::cleanup_started(b, t.attempt, true);
    events::cleanup_completed(b, t.attempt, 0.0, {}, true);
    t.resource_cleanup_completed = true;
    const int max =
        std::max(config_.tasks.retry.max_attempts, config_.tasks.retry.max_interrupted_attempts);
    if (t.attempt >= max) {
      end_waiting(rec, TaskStatus::kFailed, TaskFailureReason::kInterrupted,
                  fmt::format("the process stopped while the task ran (attempt {} of {}); no "
                              "attempts left",
                              t.attempt, max),
                  b);
      outbox_.commit(rec, b);
      return;
    }
    Stats::add(stats_.retries);
    // After the retry backoff, as any retried attempt: a task the process
    // died under does not run again the moment the process restarts (a page
    // that crashes it would crash it again at once; a host killed again and
    // again soon after each start would keep interrupting the same tasks).
    interrupted_delay = handler_.backoff_delay(t.attempt);
    const std::string message = "the process stopped while the task ran";
    events::retried(b, "interrupted", message, t.attempt, t.assigned_device.value_or(""),
                    t.batch_size, seconds(interrupted_delay));
    warn(*rec, events::retried_warning_text("interrupted", t.attempt, message));
  }
  if (device.empty()) {
    end_waiting(rec, TaskStatus::kFailed, TaskFailureReason::kDeviceUnavailable,
                "recovered task has no device: " + no_device_why, b);
    outbox_.commit(rec, b);
    return;
  }
  t.assigned_device = device;
  (void)Lifecycle::apply(*rec, Step::kRecoverQueued);
  // A queued task that ran before was waiting for a retry (its backoff, or
  // its turn after it) when the process stopped: the time it waited is not
  // known, so it waits its backoff again, in full. Else a host killed
  // during backoffs would run it at once at each start.
  const bool waiting_retry = !was_running && t.attempt > 0;
  if (waiting_retry) rec->backoff_after_recovery = true;
  const Duration delay = waiting_retry ? handler_.backoff_delay(t.attempt) : interrupted_delay;
  if (delay > Duration::zero()) {
    RetryDecision d;
    d.retry = true;
    d.device = device;
    d.batch_size = t.batch_size;
    d.delay = delay;
    apply_retry(rec, d, std::nullopt, b);  // backoff; then queued like any retry
  } else {
    enqueue(rec, b, was_running, /*recovered=*/true, /*enforce_limit=*/false);
  }
  outbox_.commit(rec, b);
}

bool Scheduler::adopt_claimed(const RecordPtr& rec, const std::string& device, RecordPtr& dropped) {
  Task& t = rec->task;
  if (RecordPtr old = records_.find(t.id)) {
    if (old->phase() != Phase::kDone) return false;
    dropped = records_.erase_finished(t.id);
  }
  records_.put(rec);
  t.assigned_device = device;
  (void)Lifecycle::apply(*rec, Step::kRecoverQueued);
  push_queued(rec, /*retry=*/false, /*enforce_limit=*/false);
  return true;
}

void Scheduler::finished(const RecordPtr& rec) {
  std::vector<RecordPtr> evicted;
  records_.finished(rec, evicted);
  outbox_.retire(evicted);
  done_cv_.notify_all();
}

MemoryState Scheduler::memory_state(const Record& r) const {
  MemoryState s;
  s.devices = devices_.list();
  s.device = r.task.assigned_device.value_or("");
  s.task_estimate_mb = r.task.estimated_memory_mb.value_or(0);
  if (r.peak_mb.load() >= 0) s.task_peak_mb = r.peak_mb.load();
  return s;
}

}  // namespace taskmgr::detail

namespace taskmgr::detail {

void Scheduler::pause(const PauseState& p) {
  pauses_.add(Pauses::Entry{p, clock_->steady_now()});
  EventBatch b(*clock_);
  events::paused(b, to_string(p.scope), p.name, p.since);
  outbox_.publish_unstored(b.take_records(""));
}

void Scheduler::resume(PauseScope scope, const std::string& name) {
  std::optional<Pauses::Entry> ended = pauses_.remove(scope, name);
  if (!ended) return;
  const SteadyTime now = clock_->steady_now();
  for (const auto& [device, n] : queue_->sizes()) {
    if (scope == PauseScope::kDevice && device != name) continue;
    for (const QueuedTask& q : queue_->snapshot(device)) {
      if (scope == PauseScope::kService && q.service != name) continue;
      const Duration credit = pauses_.credit(*ended, q.enqueued_at, q.device, q.service, now);
      if (credit <= Duration::zero()) continue;
      queue_->delay(q.task_id, credit);
      // Its wait (started's wait_s, health, the timeout's message) leaves
      // the pause out as well.
      if (RecordPtr rec = records_.find(q.task_id)) rec->queued_steady += credit;
    }
  }
  EventBatch b(*clock_);
  events::resumed(b, to_string(scope), name, ended->state.since,
                  seconds(now - ended->since_steady));
  outbox_.publish_unstored(b.take_records(""));
}

void Scheduler::restore_pauses(const std::vector<PauseState>& stored) {
  const SteadyTime now = clock_->steady_now();
  const Timestamp wall = clock_->now();
  for (const PauseState& p : stored) {
    // Its start on this process's steady clock: as long ago as its since.
    const Duration ago =
        wall > p.since ? std::chrono::duration_cast<Duration>(wall - p.since) : Duration::zero();
    pauses_.add(Pauses::Entry{p, now - std::min(ago, now.time_since_epoch())});
  }
}

}  // namespace taskmgr::detail
