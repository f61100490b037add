#include "manager/attempt.hpp"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "forced_unwind.hpp"
#include "host_call.hpp"
#include "json_check.hpp"
#include "manager/admission.hpp"
#include "utf8.hpp"

namespace taskmgr::detail {

// What a service sees of its task (TaskContext), for one attempt.
class Attempt::Context final : public TaskContext {
 public:
  Context(Attempt& at, RecordPtr rec, const AttemptStart& a, std::string instance)
      : at_(at), rec_(std::move(rec)), a_(a), instance_(std::move(instance)) {}

  const std::string& task_id() const override { return rec_->id(); }
  const std::string& service() const override { return rec_->service(); }
  const TaskInput& input() const override { return loaded_ ? input_ : rec_->input(); }
  const std::string& options_json() const override { return a_.options; }
  int batch_size() const override { return a_.batch_size; }
  int attempt() const override { return a_.attempt; }
  const std::string& device() const override { return a_.device; }
  const std::string& service_instance_id() const override { return instance_; }
  std::int64_t estimated_memory_mb() const override { return a_.estimate_mb; }
  bool cancelled() const override {
    return rec_->cancel.load(std::memory_order_relaxed) ||
           rec_->close_interrupt.load(std::memory_order_relaxed);
  }
  bool deadline_exceeded() const override {
    return rec_->timed_out.load(std::memory_order_relaxed) ||
           (a_.timeout_s > 0 && at_.clock_->steady_now() >= a_.deadline);
  }
  double seconds_left() const override {
    if (a_.timeout_s <= 0) return std::numeric_limits<double>::infinity();
    return std::max(0.0, seconds(a_.deadline - at_.clock_->steady_now()));
  }

  const std::string& temp_dir() override REQUIRES(!scheduler_lock) {
    if (temp_.empty()) {
      temp_ = at_.temp_dirs_.create(rec_->id(), a_.attempt);
      SchedulerLock g(at_.scheduler_.mutex());
      rec_->temp_dir = temp_;  // the watchdog's cleanup removes it too
    }
    return temp_;
  }

  void stage(std::string_view name) override REQUIRES(!scheduler_lock) {
    if (auto at = invalid_utf8_at(name)) {
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("stage: the name is not valid UTF-8 (byte {})", *at));
    }
    MetricSample s;
    s.task_id = rec_->id();
    s.timestamp = stored_time(*at_.clock_);
    s.memory_usage_mb = std::max<std::int64_t>(0, rec_->last_mb.load());
    s.device = a_.device;
    s.processing_stage = std::string(name);
    try {
      at_.journal_.append_metrics({s});
    } catch (const std::exception& e) {
      at_.log_.write(LogLevel::kWarn,
                     std::string("storing a task_metrics sample failed: ") + e.what());
    }
  }

  void report_memory(std::int64_t mb) override REQUIRES(!scheduler_lock) {
    if (mb < 0) return;
    const auto device = at_.devices_.get(a_.device);
    // A figure past the device's total is an out-of-memory failure (below),
    // not a measurement: it is not kept as the task's peak.
    if (!device || mb <= device->total_mb) {
      rec_->last_mb.store(mb);
      std::int64_t prev = rec_->peak_mb.load();
      while (mb > prev && !rec_->peak_mb.compare_exchange_weak(prev, mb)) {
      }
    }
    const auto& tc = at_.config_.tasks;
    if (tc.max_task_memory_mb > 0 && mb > tc.max_task_memory_mb) {
      throw TaskError(TaskFailureReason::kMemoryLimitExceeded,
                      fmt::format("task {} uses {} MB, over tasks.max_task_memory_mb = {}",
                                  rec_->id(), mb, tc.max_task_memory_mb));
    }
    if (device && mb > device->total_mb) {
      throw OutOfMemoryError(fmt::format("task {} uses {} MB, more than {} has ({} MB)", rec_->id(),
                                         mb, a_.device, device->total_mb));
    }
    if (tc.enable_resource_tracking && a_.estimate_mb > 0 &&
        static_cast<double>(mb) >
            tc.memory_warning_fraction * static_cast<double>(a_.estimate_mb) &&
        !rec_->memory_warned.exchange(true)) {
      {
        SchedulerLock g(at_.scheduler_.mutex());
        at_.scheduler_.memory_above_estimate(rec_, a_.device, mb, a_.estimate_mb);
      }
      at_.scheduler_.outbox().drain();
    }
  }

  void set_result(std::string result_json) override {
    if (!result_json.empty()) {
      if (auto problem = json_document_problem(result_json)) {
        throw Error(ErrorCode::kInvalidArgument, "set_result: " + *problem);
      }
    }
    result_ = std::move(result_json);
  }

  // The input's bytes, read from the store for this attempt when the record
  // holds none (a waiting task keeps them there, not in memory); released
  // with the attempt.
  void load_input() REQUIRES(!scheduler_lock) {
    if (!rec_->input_in_store()) return;
    std::optional<Task> row;
    try {
      row = at_.journal_.load_task(rec_->id());
    } catch (const Error& e) {
      throw Error(e.code(),
                  std::string("reading the task's input from the store failed: ") + e.what());
    }
    if (!row || row->input.data.empty()) {
      throw TaskError(TaskFailureReason::kInvalidInput,
                      "the task's input bytes are no longer in the store");
    }
    input_ = std::move(row->input);
    loaded_ = true;
  }

  std::string take_result() { return std::move(result_); }
  const std::string& created_temp() const { return temp_; }

 private:
  Attempt& at_;
  RecordPtr rec_;
  const AttemptStart& a_;
  std::string instance_;
  std::string temp_;
  std::string result_;
  TaskInput input_;
  bool loaded_ = false;
};

Attempt::Attempt(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
                 Placement& placement, ServiceRegistry& registry, TaskErrorHandler& handler,
                 Journal& journal, DeviceRegistry& devices, TempDirs& temp_dirs, Stats& stats,
                 const Logger& log)
    : config_(config),
      clock_(std::move(clock)),
      scheduler_(scheduler),
      placement_(placement),
      registry_(registry),
      handler_(handler),
      journal_(journal),
      devices_(devices),
      temp_dirs_(temp_dirs),
      stats_(stats),
      log_(log) {}

std::optional<CleanupReport> Attempt::run(const RecordPtr& rec, ServicePool::Lease lease,
                                          const AttemptStart& a) {
  Context ctx(*this, rec, a, lease.instance_id());
  // A task found unfinished at open may be one that takes the process down
  // with it (a crash, the kernel's OOM killer, an abort) as soon as it
  // runs: its attempt's `started` is in the store before host code runs,
  // so that the next open counts the attempt and stops after
  // max_interrupted_attempts. (Without this the write could still wait in
  // the group commit when the process died, and the task ran again at
  // every start, forever.) Other tasks do not wait for that commit: one
  // that kills the process in its first run is found unfinished at the
  // next open and counted from then on, so a task runs at most
  // max_interrupted_attempts + 1 times however it dies. The wait costs a
  // commit per attempt, which only recovered tasks pay.
  //
  // A shared queue's task (claim_check_) waits for that commit always: an
  // attempt that ran is counted in the row (a host that rescues the task
  // after this host died runs the next attempt, never this one again); and
  // one whose claim was lost while it waited here (the started write
  // refused by the fence: no round trip to ask) does not run at all.
  bool lost_before = false;
  if (rec->recovered.load() || claim_check_) {
    scheduler_.outbox().drain(/*wait=*/true);
    journal_.flush();
  }
  if (claim_held_ && !claim_held_(rec->id())) lost_before = true;
  std::exception_ptr err;
  if (!lost_before) {
    try {
      ctx.throw_if_cancelled();
      ctx.load_input();
      TASKMGR_HOST_CALL("Service::process");
      lease.service().process(ctx);  // creates the instance on first use (the factory)
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      err = std::current_exception();
    }
  }
  stats_.proc.record(seconds(clock_->steady_now() - a.started));

  Outcome o = decide(rec, err, ctx, a);
  if (claim_check_ && (lost_before || !claim_check_(rec->id()))) {
    // The claim is lost: another host took the task over (its lease ran
    // out). This attempt's outcome is discarded; the store keeps the other
    // host's.
    Outcome lost;
    lost.kind = Outcome::Kind::kCancelled;
    lost.lost_claim = true;
    lost.failure.reason = TaskFailureReason::kCancelled;
    lost.before_run = lost_before;
    lost.failure.message = lost_before ? kLostClaimBeforeRunMessage : kLostClaimMessage;
    lost.peak_mb = o.peak_mb;
    lost.failure.instance_broken = o.failure.instance_broken;
    o = std::move(lost);
  }
  if (o.failure.instance_broken) lease.discard();
  Service* svc = lease.has_instance() ? &lease.service() : nullptr;
  const std::optional<std::int64_t> peak = o.peak_mb;
  RequestFeatures features;
  std::string device;
  {
    SchedulerLock g(scheduler_.mutex());
    features = rec->features;
    device = rec->task.assigned_device.value_or("");
    scheduler_.end_attempt(rec, std::move(o), ctx.created_temp());
  }
  // Not drained here: the outcome and cleanup_started go out with the end of
  // the cleanup (one store write, one publication), a hook's time later. A
  // hook that hangs does not hold them: any other drain (other tasks, the
  // sweep, a reader) writes the outbox.
  // The service's cache hook, watched by the sweep (cleanup_timeout_seconds).
  if (svc != nullptr) {
    TASKMGR_HOST_CALL("Service::cleanup_task");
    svc->cleanup_task(rec->id());
  }
  std::uint64_t expected = static_cast<std::uint64_t>(a.attempt) * 4 + Record::kHookRunning;
  const bool mine = rec->cleanup_claim.compare_exchange_strong(
      expected, static_cast<std::uint64_t>(a.attempt) * 4 + Record::kByWorker);
  if (!mine) lease.discard();  // the watchdog gave up on this instance
  lease.release();             // may destroy the instance: host code, no lock held
  if (!mine) return std::nullopt;
  CleanupReport report;
  TempDirs::remove(ctx.created_temp(), report.problems);
  if (peak) {
    try {
      placement_.learn(rec->service(), device, features, *peak);
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      host_failed(rec, "the memory model", "nothing learned from this attempt");
    }
  }
  return report;
}

void Attempt::host_failed(const RecordPtr& rec, const char* what, const char* consequence) {
  std::string why = "unknown exception";
  try {
    throw;
  } catch (const std::exception& e) {
    why = to_valid_utf8(e.what());  // host text, for a log line
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
  }
  log_.write(LogLevel::kWarn, fmt::format("task {}: {} of service '{}' threw ({}); {}", rec->id(),
                                          what, rec->service(), why, consequence));
}

Outcome Attempt::decide(const RecordPtr& rec, std::exception_ptr err, Context& ctx,
                        const AttemptStart& a) {
  Outcome o;
  if (rec->peak_mb.load() >= 0) o.peak_mb = rec->peak_mb.load();
  if (rec->cancel.load()) {
    // Cancel has priority over everything else: cancel_task said the task
    // was cancelled, so it ends cancelled, even when its service finished
    // the work (the result is dropped) or ran past its deadline.
    if (err) o.failure = TaskErrorHandler::classify(err);
    o.kind = Outcome::Kind::kCancelled;
    o.failure.reason = TaskFailureReason::kCancelled;
    o.failure.retryable = false;
    return o;
  }
  if (rec->timed_out.load() || (err && ctx.deadline_exceeded())) {
    // Past its deadline: TIMEOUT, not retried. An instance that had to be
    // waited for past the deadline (the sweep saw it) is replaced.
    o.kind = Outcome::Kind::kFailed;
    if (err) o.failure = TaskErrorHandler::classify(err);
    // TIMEOUT from the service is a stop it made itself (throw_if_cancelled,
    // or a worker process that was killed and replaced already): its
    // instance is kept. Its own words follow the deadline, unless they are
    // throw_if_cancelled's.
    const bool cooperated = err && o.failure.reason == TaskFailureReason::kTimeout;
    const bool plain = o.failure.message == "task " + rec->id() + " ran past its deadline";
    o.failure.reason = TaskFailureReason::kTimeout;
    o.failure.retryable = false;
    o.failure.out_of_memory = false;
    o.failure.instance_broken = o.failure.instance_broken || (rec->timed_out.load() && !cooperated);
    o.failure.message = fmt::format(
        "task {} ran past its deadline of {} s ({}){}", rec->id(), a.timeout_s,
        timeout_from_options(a.options) ? "options.timeout_seconds" : "tasks.task_timeout_seconds",
        o.failure.message.empty() || plain ? "" : ": " + o.failure.message);
    o.decision.retry = false;
    o.decision.final_reason = TaskFailureReason::kTimeout;
    o.decision.final_message = o.failure.message;
    return o;
  }
  if (err && rec->close_interrupt.load()) {
    // close() interrupted it after tasks.close_grace_seconds and the service
    // stopped (or its worker was killed): back to the queue, as it was, for
    // the next open. Not a failure: its priority stays.
    o.failure = TaskErrorHandler::classify(err);
    const bool plain = o.failure.message == "task " + rec->id() + " was cancelled";
    o.kind = Outcome::Kind::kRetry;
    o.failure.reason = TaskFailureReason::kInterrupted;
    o.failure.retryable = true;
    o.failure.out_of_memory = false;
    o.failure.message = fmt::format(
        "interrupted by close() after tasks.close_grace_seconds ({} s); queued for the next open{}",
        config_.tasks.close_grace_seconds,
        plain || o.failure.message.empty() ? "" : ": " + o.failure.message);
    o.decision.retry = true;
    o.decision.device = a.device;
    o.decision.batch_size = a.batch_size;
    o.decision.delay = Duration::zero();
    return o;
  }
  if (!err) {
    o.kind = Outcome::Kind::kCompleted;
    o.result = ctx.take_result();
    return o;
  }
  o.failure = TaskErrorHandler::classify(err);
  if (o.failure.reason == TaskFailureReason::kCancelled) {
    // The service stopped the task as cancelled (TASKMGR_E_CANCELLED, a
    // TaskError(kCancelled)): it ends cancelled, as a host's cancel does.
    o.kind = Outcome::Kind::kCancelled;
    o.failure.retryable = false;
    return o;
  }
  FailureSnapshot snap;
  {
    SchedulerLock g(scheduler_.mutex());
    snap = scheduler_.failure_snapshot(*rec);
  }
  // Host code (supports(), a memory model) runs here, without the lock.
  // What they throw is the host's failure, not the library's: logged, and
  // the decision goes on without it (no CPU fallback, the estimate kept).
  bool cpu_ok = false;
  try {
    const ServiceEntry* entry = registry_.find(rec->service());
    if (entry != nullptr) cpu_ok = placement_.cpu_supported(*entry);
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    host_failed(rec, "supports()", "no CPU fallback for this retry");
  }
  o.decision = handler_.handle_failure(snap.task, o.failure, snap.state, cpu_ok);
  o.kind = o.decision.retry ? Outcome::Kind::kRetry : Outcome::Kind::kFailed;
  if (o.decision.retry) {
    RequestFeatures f = snap.features;
    f.batch_size = o.decision.batch_size;
    try {
      o.next_estimate_mb = placement_.estimate(rec->service(), f, o.decision.device);
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      host_failed(rec, "the memory model", "the retry keeps the last estimate");
    }
    // An out-of-memory retry with a smaller batch is placed again for its
    // smaller estimate, as create_task placed the task: one that did not
    // fit a GPU at full batch may fit one at half. Not when the host chose
    // the device, nor for a CPU fallback (the handler chose the CPU).
    if (o.failure.out_of_memory && !o.decision.cpu_fallback && o.next_estimate_mb &&
        !rec->device_pinned.load()) {
      try {
        const ServiceEntry* entry = registry_.find(rec->service());
        const auto any = placement_.estimate(rec->service(), f, "");
        if (entry != nullptr && any) {
          const std::string to = placement_.select_device(*entry, *any, "");
          if (to != o.decision.device) {
            o.decision.device = to;
            o.next_estimate_mb = placement_.estimate(rec->service(), f, to);
          }
        }
      } catch (...) {
        ::taskmgr::detail::rethrow_if_forced_unwind();
        host_failed(rec, "placement (a memory model or supports())",
                    "the retry stays on its device");
      }
    }
  }
  return o;
}

}  // namespace taskmgr::detail
