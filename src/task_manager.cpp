// TaskManager: the facade, wired from the rooms of src/manager/
// (docs/ARCHITECTURE.md has the picture, the data flow and the lock order).
#include "taskmgr/task_manager.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

#include "host_call.hpp"
#include "log_internal.hpp"
#include "manager/admission.hpp"
#include "manager/attempt.hpp"
#include "manager/cluster.hpp"
#include "manager/dispatcher.hpp"
#include "manager/intake.hpp"
#include "manager/journal.hpp"
#include "manager/monitor.hpp"
#include "manager/outbox.hpp"
#include "manager/placement.hpp"
#include "manager/recovery.hpp"
#include "manager/scheduler.hpp"
#include "manager/service_registry.hpp"
#include "manager/stats.hpp"
#include "manager/sweeper.hpp"
#include "manager/temp_dirs.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/ocr.hpp"
#include "taskmgr/postgres_store.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/worker.hpp"
#include "timer_queue.hpp"
#include "utf8.hpp"

namespace taskmgr {

using namespace detail;

namespace {

AdoptOptions adopt_options(const StorageConfig& c) {
  AdoptOptions o;
  // Config::validate() checked every word.
  for (const auto& [word, to] : c.adopt.status_map) {
    o.status_map[word] = parse_task_status(to).value_or(TaskStatus::kPending);
  }
  o.default_service = c.adopt.default_service;
  return o;
}

SqliteStoreOptions sqlite_options(const StorageConfig& c) {
  SqliteStoreOptions o;
  o.allow_other_tables = c.allow_other_tables;
  o.adopt = adopt_options(c);
  o.synchronous_full = c.synchronous == SyncMode::kFull;
  o.busy_timeout_seconds = c.busy_timeout_seconds;
  o.max_size_mb = c.max_size_mb;
  o.wal_max_mb = c.wal_max_mb;
  o.vacuum = c.vacuum;
  o.max_backlog = static_cast<std::size_t>(c.max_backlog);
  return o;
}

PostgresStoreOptions postgres_options(const StorageConfig& c) {
  PostgresStoreOptions o;
  o.schema = c.postgres.schema;
  o.read_connections = static_cast<std::size_t>(c.postgres.read_connections);
  o.statement_timeout_seconds = c.postgres.statement_timeout_seconds;
  o.connect_timeout_seconds = c.postgres.connect_timeout_seconds;
  o.allow_other_tables = c.postgres.allow_other_tables;
  o.max_backlog = static_cast<std::size_t>(c.max_backlog);
  o.adopt = adopt_options(c);
  o.shared = c.shared;
  o.cluster = c.cluster;
  return o;
}

// The store the configuration names: storage.url (PostgreSQL), or
// storage.path (SQLite, or ":memory:").
std::shared_ptr<TaskStore> open_store(const StorageConfig& c) {
  if (!c.url.empty()) return open_postgres_store(c.url, postgres_options(c));
  if (c.path == ":memory:") return make_memory_store();
  return open_sqlite_store(c.path, sqlite_options(c));
}

int worker_count(const ExecutorConfig& c) {
  return c.worker_threads > 0 ? c.worker_threads
                              : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace

// The rooms, in construction order (each may use those above it); the
// destructor stops the threads first, then the members go in reverse.
class TaskManager::Impl {
 public:
  Impl(Config config, TaskManagerOptions options);
  ~Impl();

  void close() REQUIRES(!scheduler_lock);
  Task get_task(const std::string& id) REQUIRES(!scheduler_lock);
  void delete_task(const std::string& id) REQUIRES(!scheduler_lock);
  bool set_paused(PauseScope scope, const std::string& name, bool on) REQUIRES(!scheduler_lock);
  PoolSettings resize_pool(const std::string& service, const std::string& device, int min, int max)
      REQUIRES(!scheduler_lock);
  std::optional<Task> wait_task(const std::string& id, Duration timeout) REQUIRES(!scheduler_lock);
  std::optional<Task> wait_task_here(const std::string& id, Duration timeout)
      REQUIRES(!scheduler_lock);
  bool wait_idle(Duration timeout) REQUIRES(!scheduler_lock);
  void schedule_sweep();

  const Config config_;
  const Logger log_;
  const std::shared_ptr<Clock> clock_;
  Journal journal_;
  const std::shared_ptr<DeviceRegistry> devices_;
  MemoryEstimator estimator_;
  TaskErrorHandler handler_;  // no log sink: deciding runs no host code
  EventBus bus_;
  Stats stats_;
  Outbox outbox_;
  TimerQueue timers_;
  Scheduler scheduler_;
  ServiceRegistry registry_;
  Placement placement_;
  TempDirs temp_dirs_;
  Attempt attempt_;
  Dispatcher dispatcher_;
  Recovery recovery_;
  Sweeper sweeper_;
  Monitor monitor_;
  Intake intake_;
  // A shared queue (storage.shared): claims, heartbeats, rescue.
  std::unique_ptr<Cluster> cluster_;
  const Duration sweep_interval_;
  // One pause or resume at a time: the store's rows and the scheduler's
  // pauses change in the same order.
  std::mutex controls_mu_;
  // Host calls in progress that may commit a change or drain the outbox
  // (creates, starts, cancels, registrations, draining reads): close()
  // returns only after they have, so none of their host code (store, log
  // lines, event delivery) runs after it. A call counts itself before it
  // checks that the manager is open (seq_cst on both sides): close either
  // sees it, or the call sees that the manager is closing.
  std::atomic<int> in_flight_{0};
  // The count of unpersisted writes close() last logged (see close()).
  std::atomic<std::uint64_t> unpersisted_logged_{0};
  // The dropped_writes count a close() reported last (see close()).
  std::atomic<std::uint64_t> dropped_reported_{0};
  // One close() at a time: a second (another thread's) waits for the first
  // to have finished, then only flushes the store. A plain mutex, not one of
  // the library's counted locks: close() runs host code (instance
  // destructors, log lines) while holding it, and host code cannot take it
  // (close() from host code is refused before it).
  std::mutex close_mu_;
};

namespace {
struct InFlight {
  std::atomic<int>& n;
  explicit InFlight(std::atomic<int>& c) : n(c) { n.fetch_add(1, std::memory_order_seq_cst); }
  ~InFlight() { n.fetch_sub(1, std::memory_order_seq_cst); }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;
};
}  // namespace

TaskManager::Impl::Impl(Config config, TaskManagerOptions options)
    : config_((config.validate(), std::move(config))),
      log_(parse_log_level(config_.logging.level).value_or(LogLevel::kInfo),
           std::move(options.log_sink)),
      clock_(options.clock ? std::move(options.clock) : Clock::system()),
      journal_(options.store ? std::move(options.store) : open_store(config_.storage)),
      devices_(options.devices ? std::move(options.devices)
                               : std::make_shared<DeviceRegistry>(config_.devices)),
      handler_(config_.tasks.retry, nullptr, options.random_seed),
      bus_([this](LogLevel l, std::string_view m) REQUIRES(!scheduler_lock) { log_.write(l, m); }),
      stats_(devices_->ids()),
      outbox_(journal_, bus_, log_),
      timers_(clock_),
      scheduler_(config_, clock_, *devices_, outbox_, stats_, timers_, handler_),
      placement_(config_.tasks, *devices_, estimator_),
      temp_dirs_(config_.tasks.temp_dir),
      attempt_(config_, clock_, scheduler_, placement_, registry_, handler_, journal_, *devices_,
               temp_dirs_, stats_, log_),
      dispatcher_(scheduler_, attempt_, *devices_, stats_, timers_, worker_count(config_.executor),
                  std::chrono::microseconds(config_.executor.worker_linger_us)),
      recovery_(config_, clock_, scheduler_, dispatcher_, journal_, placement_, registry_,
                *devices_, log_),
      sweeper_(config_, clock_, scheduler_, dispatcher_, *devices_, recovery_, stats_, log_),
      monitor_(config_, clock_, scheduler_, dispatcher_, registry_, *devices_, stats_, bus_,
               journal_),
      intake_(config_, clock_, scheduler_, dispatcher_, registry_, placement_, journal_, *devices_,
              estimator_, worker_count(config_.executor), log_),
      sweep_interval_(options.sweep_interval) {
  scheduler_.attach(dispatcher_);
  for (auto& cb : options.subscribers) bus_.subscribe(std::move(cb));
  bool has_ocr = false;
  for (auto& f : options.services) {
    has_ocr = has_ocr || (f && f->kind() == "ocr");
    intake_.register_service(std::move(f));
  }
  if (options.builtin_ocr && !has_ocr) {
    // services.ocr.isolation: auto (the default) runs the engines in worker
    // processes when taskmgr-worker is there to run them.
    std::shared_ptr<ServiceFactory> ocr = make_ocr_service(config_.ocr);
    const auto it = config_.services.find("ocr");
    const ServiceConfig sc = it != config_.services.end() ? it->second : ServiceConfig{};
    if (sc.isolation == "auto") {
      if (find_worker_executable(sc).empty()) {
        log_.write(LogLevel::kWarn,
                   "services.ocr.isolation auto: taskmgr-worker is not beside libtaskmgr.so nor "
                   "in its libexec/taskmgr: the OCR engines run in this process (a crash in one "
                   "is this process's crash)");
      } else {
        ocr = make_process_service("ocr", config_, std::move(ocr), worker_log_sink(log_));
      }
    }
    intake_.register_service(std::move(ocr));
  }
  // Kinds whose instances a worker library makes (services.<kind>.library):
  // the host has no factory of its own for them.
  for (const auto& [kind, sc] : config_.services) {
    if (sc.isolation == "process" && !sc.library.empty() && !registry_.contains(kind)) {
      intake_.register_service(make_process_service(kind, config_, nullptr, worker_log_sink(log_)));
    }
  }
  temp_dirs_.remove_dead_runs();
  for (const std::string& n : journal_.notices()) log_.write(LogLevel::kWarn, n);
  {
    // The pauses in force when the store was last used hold from the start:
    // a recovered task they hold is queued and waits.
    std::vector<PauseState> stored = journal_.load_pauses();
    for (const PauseState& p : stored) {
      log_.write(LogLevel::kInfo,
                 fmt::format("paused since {} (store): {}{}", format_timestamp(p.since),
                             to_string(p.scope), p.name.empty() ? "" : " '" + p.name + "'"));
    }
    SchedulerLock g(scheduler_.mutex());
    scheduler_.restore_pauses(stored);
  }
  if (SharedQueue* shared = shared_queue_of(journal_.store())) {
    // Several hosts share the queue: this host runs what it claims. Nothing
    // is recovered at open (the tasks of a host that died, this one's
    // earlier run too, are rescued once their leases run out).
    cluster_ = std::make_unique<Cluster>(config_, clock_, *shared, scheduler_, dispatcher_,
                                         placement_, registry_, *devices_, temp_dirs_, log_);
    Cluster* c = cluster_.get();
    intake_.set_shared(c);
    monitor_.set_cluster(c);
    attempt_.set_claim_check([c](const std::string& id)
                                 REQUIRES(!scheduler_lock) { return c->confirm(id); },
                             [c](const std::string& id) { return c->holds(id); });
    dispatcher_.set_on_slot_free([c] { c->wake(); });
    // A task's outcome reaches this host's subscribers once the store took
    // it, or as `cancelled` (lost claim) when the fence refused it.
    scheduler_.outbox().set_refused_check(
        [shared](const std::string& id) { return shared->take_refused(id); });
    log_.write(LogLevel::kInfo, fmt::format("cluster: this host is {} in the shared queue of {}",
                                            shared->host_id(), journal_.describe()));
    cluster_->start();
  } else {
    recovery_.recover();
  }
  recovery_.prune_retention();
  schedule_sweep();
}

TaskManager::Impl::~Impl() {
  try {
    close();
  } catch (...) {
  }
  timers_.stop();  // joined first: its callbacks use the rooms
  dispatcher_.join();
  bus_.flush();
  temp_dirs_.remove_root();
}

void TaskManager::Impl::schedule_sweep() {
  // Captures `this`: the timer thread is joined first thing in ~Impl.
  timers_.schedule_after(sweep_interval_, [this]() REQUIRES(!scheduler_lock) {
    sweeper_.sweep();  // catches what it throws
    schedule_sweep();
  });
}

void TaskManager::Impl::close() {
  if (in_host_call()) {
    throw Error(ErrorCode::kInvalidState,
                "close() was called from code the library called (an event callback, a log "
                "sink, a service or its factory, supports(), a memory model); it would wait for "
                "itself: close the manager from another thread");
  }
  std::lock_guard<std::mutex> one_at_a_time(close_mu_);
  bool first = false;
  {
    SchedulerLock lock(scheduler_.mutex());
    if (!scheduler_.closed()) {
      first = true;
      scheduler_.begin_close();
    }
  }
  if (first) {
    // Running attempts finish; their cleanup completes. Queued and
    // backing-off tasks stay queued in the store. The worker loops end too
    // (their last drains write log lines: host code that must not run after
    // close() returned). Attempts still running after
    // tasks.close_grace_seconds are interrupted (the service sees
    // cancelled(); a worker process is killed kStopGraceSeconds later) and
    // go back to the queue; an in-process service that never looks at
    // cancelled() is still waited for (a thread cannot be stopped).
    const SteadyTime grace_end =
        clock_->steady_now() + from_seconds(config_.tasks.close_grace_seconds);
    bool interrupted = false;
    for (;;) {
      std::vector<std::string> ids;
      {
        SchedulerLock lock(scheduler_.mutex());
        if (dispatcher_.running() == 0 && dispatcher_.loops() == 0) {
          scheduler_.set_closed();
          break;
        }
        if (!interrupted && clock_->steady_now() >= grace_end) {
          interrupted = true;
          scheduler_.records().for_each([&ids](const RecordPtr& r) REQUIRES(scheduler_lock) {
            if (r->phase() == Phase::kRunning && !r->cancel.load()) {
              r->close_interrupt.store(true);
              ids.push_back(r->id());
            }
          });
        } else {
          lock.wait_with([this](std::unique_lock<std::mutex>& lk) {
            scheduler_.done_cv().wait_for(lk, std::chrono::milliseconds(50));
          });
        }
      }
      if (!ids.empty()) {
        // The log sink is host code: written with no lock held.
        log_.write(
            LogLevel::kWarn,
            fmt::format("close(): {} task(s) still running after "
                        "tasks.close_grace_seconds ({} s) asked to stop; one whose service "
                        "stops goes back to the queue for the next open: {}",
                        ids.size(), config_.tasks.close_grace_seconds, fmt::join(ids, ", ")));
      }
    }
  }
  if (first) {
    scheduler_.notify();  // waiters see that it is closed
    // Calls that began before close (a create that passed its open check,
    // a read that drains) finish first: their events and log lines are
    // handed on below, before close() returns. Those that begin now are
    // refused (writes) or find nothing to drain (reads).
    while (in_flight_.load(std::memory_order_seq_cst) > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    // No sweep or retry timer runs after close (a sweep in progress finishes
    // first): nothing the library does calls host code after close() returns.
    timers_.stop();
    // A shared queue: no more claims; what was claimed and did not start
    // goes back for the other hosts, once this host's writes of those
    // tasks are in (a write after the give-back would be refused by the
    // fence: a backing-off task's `retried` then stays with the claim, and
    // the task waits for its lease to run out).
    if (cluster_) {
      outbox_.drain(true);
      try {
        journal_.flush();
      } catch (const std::exception&) {
        // told by the flush below, which tries once more
      }
      cluster_->stop();
    }
    // The instances go now, while reads still work: a host's destroy_instance
    // may call the manager (instances of attempts still running were waited
    // for above; none is created after close).
    for (const ServiceEntry* e : registry_.entries()) e->pool->destroy_idle();
    outbox_.drain(true);
  }
  // Every close (a later one too) flushes the store, which tries its
  // backlog of failed writes once more.
  try {
    journal_.flush();
  } catch (const std::exception& e) {
    log_.write(LogLevel::kError, std::string("flushing the store at close failed: ") + e.what());
  }
  if (first) bus_.flush();
  // Nothing accepted is lost without a word: writes the store holds but
  // could not persist make close() fail, naming them.
  // Writes the database refused for their data were given up: no retry
  // can store them, so each is reported by one close() (the first after
  // it), and a later close() fails only for writes still waiting.
  const StoreStats st = journal_.stats();
  const std::uint64_t reported = dropped_reported_.load();
  const std::uint64_t new_drops = st.dropped_writes > reported ? st.dropped_writes - reported : 0;
  if (st.backlog > 0 || new_drops > 0) {
    dropped_reported_.store(st.dropped_writes);
    const std::string why = fmt::format(
        "{} write(s) the task manager accepted are not in the store {} ({} failed and wait for a "
        "retry, {} refused by the database for their data and given up): {}. {}",
        st.backlog + new_drops, journal_.describe(), st.backlog, new_drops,
        st.last_error.empty() ? std::string("no message") : st.last_error,
        st.backlog > 0 ? "The tasks' latest states and events are lost if the process ends "
                         "now; make room (or the database writable) and call close() again to "
                         "retry"
                       : "No retry can store writes the database refused (a later close() "
                         "does not report them again); see docs/STORAGE.md, \"What happens "
                         "on write failures\"");
    // Logged once per count (the destructor's close() says it again only
    // to its caller): a host that closes, then destroys, sees one line.
    if (unpersisted_logged_.exchange(st.unpersisted()) != st.unpersisted()) {
      log_.write(LogLevel::kError, why);
    }
    throw Error(ErrorCode::kUnpersisted, why);
  }
}

Task TaskManager::Impl::get_task(const std::string& id) {
  {
    SchedulerLock g(scheduler_.mutex());
    if (RecordPtr rec = scheduler_.records().find(id)) {
      // A shared queue's task that ended here is read from its row: any
      // host may have changed it since (a retry, a rescue, a lost claim).
      if (!cluster_ || rec->phase() != Phase::kDone) return rec->task;
    }
  }
  outbox_.drain(true);
  if (auto t = journal_.load_task(id)) {
    t->input.leave_out_data();  // as a live task's snapshot: the bytes stay in the store
    return std::move(*t);
  }
  throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
}

namespace {
// Why an ended task `t` may not be deleted ("" when it may).
std::string not_deletable(const Task& t) {
  if (!is_terminal(t.status)) {
    const std::string status =
        t.status == TaskStatus::kUnrecognized ? t.stored_status : std::string(to_string(t.status));
    return fmt::format(
        "task {} is {}: only an ended task (completed, failed or cancelled) can be "
        "deleted; cancel it and wait for it to end first",
        t.id, status);
  }
  if (!t.resource_cleanup_completed && !t.assigned_device) {
    // Never placed by taskmgr: a row of an adopted table that ended before.
    return fmt::format(
        "task {} ended {} before taskmgr ran it (a row of the adopted table): "
        "taskmgr never deletes those",
        t.id, to_string(t.status));
  }
  if (!t.resource_cleanup_completed) {
    return fmt::format(
        "task {} ended {}, but its cleanup did not complete (it is redone when the "
        "store is opened again); only a task whose cleanup is done can be deleted",
        t.id, to_string(t.status));
  }
  return {};
}
}  // namespace

bool TaskManager::Impl::set_paused(PauseScope scope, const std::string& name, bool on) {
  const char* fn = on ? "pause" : "resume";
  auto shown = [](const std::string& s) { return printable_name(s); };
  switch (scope) {
    case PauseScope::kManager:
      if (!name.empty()) {
        throw Error(ErrorCode::kInvalidArgument,
                    fmt::format("{}: a pause of the manager has no name (got a name of {} bytes)",
                                fn, name.size()));
      }
      break;
    case PauseScope::kDevice: {
      check_name(on ? "pause: device" : "resume: device", name);
      if (name.empty()) {
        throw Error(ErrorCode::kInvalidArgument,
                    fmt::format("{}: a device pause needs the device's id", fn));
      }
      bool known = false;
      for (const auto& d : devices_->list()) known = known || d.id == name;
      // A device that is gone may still be resumed (its pause was stored).
      if (!known && on) {
        throw Error(ErrorCode::kNotFound, fmt::format("{}: unknown device '{}'", fn, shown(name)));
      }
      break;
    }
    case PauseScope::kService:
      ServiceRegistry::validate_kind(name, fn);  // as register_service checks a kind
      break;
    default:
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("{}: unknown pause scope {}", fn, static_cast<int>(scope)));
  }
  scheduler_.check_open();
  {
    // Nothing to do: answered without waiting for another pause's store
    // write (as if this call came first).
    SchedulerLock g(scheduler_.mutex());
    if ((scheduler_.pauses().find(scope, name) != nullptr) == on) return false;
  }
  {
    std::lock_guard<std::mutex> one(controls_mu_);
    PauseState p;
    p.scope = scope;
    p.name = name;
    {
      SchedulerLock g(scheduler_.mutex());
      const Pauses::Entry* e = scheduler_.pauses().find(scope, name);
      if ((e != nullptr) == on) return false;  // in force already, or not at all
      p.since = on ? stored_time(*clock_) : e->state.since;
    }
    journal_.save_pause(p, on);  // throws: nothing changed
    SchedulerLock g(scheduler_.mutex());
    if (on) {
      scheduler_.pause(p);
    } else {
      scheduler_.resume(scope, name);
      dispatcher_.dispatch();
    }
  }
  outbox_.drain();
  log_.write(LogLevel::kInfo, fmt::format("{} by the host: {}{}", on ? "paused" : "resumed",
                                          to_string(scope), name.empty() ? "" : " '" + name + "'"));
  return true;
}

PoolSettings TaskManager::Impl::resize_pool(const std::string& service, const std::string& device,
                                            int min, int max) {
  auto shown = [](const std::string& s) { return printable_name(s); };
  check_name("resize_pool: service", service);
  check_name("resize_pool: device", device);
  const ServiceEntry* entry = registry_.find(service);
  if (entry == nullptr) {
    throw Error(ErrorCode::kNotFound,
                fmt::format("resize_pool: service '{}' is not registered (registered: {})",
                            shown(service), registry_.kinds()));
  }
  bool known = false;
  for (const auto& d : devices_->list()) known = known || d.id == device;
  if (!known) {
    throw Error(ErrorCode::kNotFound,
                fmt::format("resize_pool: unknown device '{}'", shown(device)));
  }
  if (std::find(entry->devices.begin(), entry->devices.end(), device) == entry->devices.end()) {
    std::string runs;
    for (const auto& d : entry->devices) runs += (runs.empty() ? "" : ", ") + d;
    throw Error(
        ErrorCode::kInvalidArgument,
        fmt::format("resize_pool: service '{}' does not run on device '{}' (it runs on: {})",
                    service, device, runs.empty() ? "none" : runs));
  }
  scheduler_.check_open();
  PoolSettings before, now;
  // Idle instances the smaller max retires: destroyed below, with no lock
  // of the manager held (destroy_instance is host code, and may call back).
  std::vector<std::unique_ptr<Service>> retired;
  {
    std::lock_guard<std::mutex> one(controls_mu_);
    before = entry->pool->resize(device, min, max, &retired);  // throws for sizes out of range
    now = entry->pool->settings(device);
    if (before.min_instances == now.min_instances && before.max_instances == now.max_instances) {
      return before;  // nothing changed: no event (a callback that resizes cannot loop)
    }
    SchedulerLock g(scheduler_.mutex());
    EventBatch b(*clock_);
    events::pool_resized(b, service, device, before, now);
    outbox_.publish_unstored(b.take_records(""));
    dispatcher_.dispatch();  // a larger max: tasks waiting for a slot may start
  }
  if (!retired.empty()) {
    TASKMGR_HOST_CALL("TaskManager::resize_pool: destroying retired instances");
    retired.clear();
  }
  if (now.min_instances > 0) {
    entry->pool->warm_in_background(
        device, [this](const std::string& message)
                    REQUIRES(!scheduler_lock) { log_.write(LogLevel::kWarn, message); });
  }
  outbox_.drain();
  log_.write(LogLevel::kInfo,
             fmt::format("pool '{}' on {} resized by the host: min {} max {} (was min {} max {})",
                         service, device, now.min_instances, now.max_instances,
                         before.min_instances, before.max_instances));
  return before;
}

void TaskManager::Impl::delete_task(const std::string& id) {
  scheduler_.check_open();
  std::optional<Task> ended;
  {
    SchedulerLock g(scheduler_.mutex());
    // Another delete of it first (then it is gone: NOT_FOUND); the same
    // thread's (a log sink that deletes the task it is told of) is refused.
    while (scheduler_.deleting(id)) {
      if (scheduler_.deleter(id) == std::this_thread::get_id()) {
        throw Error(ErrorCode::kInvalidState, "task " + id + " is being deleted already");
      }
      g.wait_with([this](std::unique_lock<std::mutex>& lk) { scheduler_.done_cv().wait(lk); });
    }
    RecordPtr rec = scheduler_.records().find(id);
    // A shared queue's task that ended here is judged by its row: another
    // host may have retried it since.
    if (rec && cluster_ && rec->phase() == Phase::kDone) rec.reset();
    if (rec) {
      // A record not done yet may still have its cleanup to come.
      Task t = rec->task;
      if (rec->phase() != Phase::kDone && is_terminal(t.status))
        t.resource_cleanup_completed = false;
      if (std::string why = not_deletable(t); !why.empty()) {
        throw Error(ErrorCode::kInvalidState, why);
      }
      t.input.data.clear();
      ended = std::move(t);
    }
    // From here to the end a retry of the task is refused (and one that
    // read it from the store before reads it again).
    scheduler_.begin_delete(id);
  }
  struct EndDelete {
    Scheduler& s;
    const std::string& id;
    ~EndDelete() {
      SchedulerLock g(s.mutex());
      s.end_delete(id);
    }
  } end_delete{scheduler_, id};
  outbox_.drain(true);  // its last changes are in the store (or in its queue)
  if (!ended) {
    ended = journal_.load_task(id);
    if (!ended) throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
    if (std::string why = not_deletable(*ended); !why.empty()) {
      throw Error(ErrorCode::kInvalidState, why);
    }
  }
  if (journal_.delete_tasks({id}) == 0) {
    std::optional<Task> now = journal_.load_task(id);
    if (!now) {
      throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "' (deleted meanwhile)");
    }
    // Changed meanwhile (a shared queue: another host retried it).
    if (std::string why = not_deletable(*now); !why.empty()) {
      throw Error(ErrorCode::kInvalidState, why);
    }
    const StoreStats st = journal_.stats();
    if (st.unpersisted() > 0) {
      throw Error(ErrorCode::kInvalidState,
                  fmt::format("task {} was not deleted: its final state is not in the store yet "
                              "({} write(s) wait or were refused: {}); try again once the store "
                              "has caught up",
                              id, st.unpersisted(), st.last_error));
    }
    throw Error(ErrorCode::kInvalidState,
                fmt::format("task {} was not deleted: it is a row of the adopted table that "
                            "taskmgr did not run, and taskmgr never deletes those",
                            id));
  }
  RecordPtr gone;
  {
    SchedulerLock g(scheduler_.mutex());
    gone = scheduler_.records().erase_finished(id);
    EventBatch b(*clock_);
    events::deleted(b, ended->status, ended->attempt);
    outbox_.publish_unstored(b.take_records(id));
  }
  outbox_.drain();
  log_.write(LogLevel::kInfo,
             fmt::format("task {} ({}) deleted by the host", id, to_string(ended->status)));
}

std::optional<Task> TaskManager::Impl::wait_task(const std::string& id, Duration timeout) {
  if (!cluster_) return wait_task_here(id, timeout);
  // A shared queue: the task may run on another host (or be claimed here
  // meanwhile): this host's record when it holds one, else the store's row,
  // read again until it has ended and its cleanup is recorded.
  const SteadyTime deadline = clock_->steady_now() + timeout;
  Duration slice = std::chrono::milliseconds(5);
  for (;;) {
    const SteadyTime now = clock_->steady_now();
    const Duration left = deadline > now ? deadline - now : Duration::zero();
    std::optional<Task> t = wait_task_here(id, std::min(left, slice));
    if (t && is_terminal(t->status) && t->resource_cleanup_completed) {
      // Ended here, or read from the row. The row has the last word: a task
      // that ended here may have been retried since (by any host), or its
      // claim lost and its result the other host's.
      outbox_.drain(true);
      std::optional<Task> row = journal_.load_task(id);
      if (!row) throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
      if (is_terminal(row->status) && row->resource_cleanup_completed) {
        row->input.leave_out_data();
        return row;
      }
    }
    if (clock_->steady_now() >= deadline) return std::nullopt;
    bool here = false;  // running here: wait_task_here waits for it
    {
      SchedulerLock g(scheduler_.mutex());
      RecordPtr rec = scheduler_.records().find(id);
      here = rec != nullptr && rec->phase() != Phase::kDone;
    }
    if (!here) std::this_thread::sleep_for(std::min(left, slice));
    slice = std::min<Duration>(slice * 2, std::chrono::milliseconds(200));
  }
}

std::optional<Task> TaskManager::Impl::wait_task_here(const std::string& id, Duration timeout) {
  const SteadyTime deadline = clock_->steady_now() + timeout;
  std::optional<Task> done;
  {
    SchedulerLock lock(scheduler_.mutex());
    RecordPtr rec = scheduler_.records().find(id);
    if (rec) {
      while (rec->phase() != Phase::kDone) {
        if (scheduler_.closed()) {
          throw Error(ErrorCode::kInvalidState,
                      fmt::format("the task manager is closed: task {} stays {} (a manager that "
                                  "opens its store again resumes it)",
                                  id, to_string(rec->task.status)));
        }
        if (clock_->steady_now() >= deadline) return std::nullopt;
        lock.wait_with([&](std::unique_lock<std::mutex>& lk) {
          clock_->wait_until(lk, scheduler_.done_cv(), deadline);
        });
      }
      done = rec->task;
    }
  }
  if (!done) {
    outbox_.drain(true);
    std::optional<Task> t = journal_.load_task(id);
    if (!t) throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
    t->input.leave_out_data();
    if (is_terminal(t->status)) return t;
    if (t->status == TaskStatus::kUnrecognized) {
      throw Error(ErrorCode::kInvalidState,
                  fmt::format("task {} has the status '{}', which taskmgr does not know "
                              "(storage.adopt.status_map does not map it): taskmgr leaves it as "
                              "it is, so it will not end here",
                              id, t->stored_status));
    }
    return std::nullopt;
  }
  outbox_.drain(true);  // its events are in the store and on the bus
  return done;
}

bool TaskManager::Impl::wait_idle(Duration timeout) {
  const SteadyTime deadline = clock_->steady_now() + timeout;
  {
    SchedulerLock lock(scheduler_.mutex());
    while (!scheduler_.idle()) {
      if (scheduler_.closed()) {
        throw Error(ErrorCode::kInvalidState,
                    "the task manager is closed: its queued tasks stay queued (a manager that "
                    "opens its store again resumes them)");
      }
      if (clock_->steady_now() >= deadline) return false;
      lock.wait_with([&](std::unique_lock<std::mutex>& lk) {
        clock_->wait_until(lk, scheduler_.done_cv(), deadline);
      });
    }
  }
  outbox_.drain(true);
  return true;
}

// ---- the facade -------------------------------------------------------------------
namespace {
// Writes what a call committed, however it returns. (A thread's forced
// unwind passes through: it is not a std::exception.)
struct DrainOnExit {
  Outbox& outbox;
  ~DrainOnExit() noexcept(false) {
    try {
      outbox.drain();
    } catch (const std::exception&) {
    }
  }
};
}  // namespace

// Every entry checks (in check builds) that the caller holds no scheduler
// lock: host code never runs under it, so no call can come back under it.
#define TASKMGR_ENTRY(name) assert_scheduler_not_held("TaskManager::" name)
// An entry that may commit a change or drain: counted for close().
#define TASKMGR_WRITER_ENTRY(name) \
  TASKMGR_ENTRY(name);             \
  InFlight taskmgr_in_flight_ { impl_->in_flight_ }

TaskManager::TaskManager(Config config, TaskManagerOptions options)
    : impl_(std::make_shared<Impl>(std::move(config), std::move(options))) {}

TaskManager::~TaskManager() {
  if (impl_ && in_host_call()) {
    // Destroying the manager from its own threads cannot be done safely.
    TASKMGR_ENTRY("~TaskManager");
    impl_->log_.write(LogLevel::kError,
                      "TaskManager destroyed from a taskmgr thread (a callback, log sink or "
                      "service): leaking it");
    new std::shared_ptr<Impl>(std::move(impl_));
    return;
  }
}

void TaskManager::register_service(std::shared_ptr<ServiceFactory> f) {
  TASKMGR_WRITER_ENTRY("register_service");
  impl_->intake_.register_service(std::move(f));
}
Task TaskManager::create_task(const TaskCreateRequest& r) {
  TASKMGR_WRITER_ENTRY("create_task");
  return std::move(impl_->intake_.create(&r, 1).front());  // no copy of the request
}
std::vector<Task> TaskManager::create_tasks(const std::vector<TaskCreateRequest>& r) {
  TASKMGR_WRITER_ENTRY("create_tasks");
  return impl_->intake_.create(r.data(), r.size());
}
Task TaskManager::start_task(const std::string& id, const TaskStartRequest& p) {
  TASKMGR_WRITER_ENTRY("start_task");
  DrainOnExit d{impl_->outbox_};
  return impl_->intake_.start(id, p);
}
ClusterStatus TaskManager::cluster() const {
  TASKMGR_ENTRY("cluster");
  impl_->scheduler_.check_open();
  if (!impl_->cluster_) {
    throw Error(ErrorCode::kUnsupported,
                "cluster(): this manager does not share its queue (storage.shared is off)");
  }
  return impl_->cluster_->status();
}

bool TaskManager::cancel_task(const std::string& id) {
  TASKMGR_WRITER_ENTRY("cancel_task");
  impl_->scheduler_.check_open();
  DrainOnExit d{impl_->outbox_};
  {
    SchedulerLock g(impl_->scheduler_.mutex());
    RecordPtr rec = impl_->scheduler_.records().find(id);
    // A shared queue's task that ended here is judged by its row: another
    // host may have retried it since.
    if (rec && impl_->cluster_ && rec->phase() == Phase::kDone) rec.reset();
    if (rec) return impl_->scheduler_.cancel(rec);
  }
  if (impl_->cluster_) return impl_->cluster_->cancel(id);  // in the shared table, or elsewhere
  if (impl_->journal_.load_task(id)) return false;          // ended long ago
  throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
}
Task TaskManager::retry_task(const std::string& id, const TaskStartRequest& p) {
  TASKMGR_WRITER_ENTRY("retry_task");
  DrainOnExit d{impl_->outbox_};
  Task t = impl_->intake_.retry(id, p);
  // Stored before it returns (a kill -9 right after keeps the retry): in
  // the store's queue (after another thread's drain), then committed.
  impl_->outbox_.drain(/*wait=*/true);
  impl_->journal_.flush();
  return t;
}
Task TaskManager::set_task_priority(const std::string& id, int priority) {
  TASKMGR_WRITER_ENTRY("set_task_priority");
  impl_->scheduler_.check_open();
  DrainOnExit d{impl_->outbox_};
  std::optional<Task> changed;
  {
    SchedulerLock g(impl_->scheduler_.mutex());
    RecordPtr rec = impl_->scheduler_.records().find(id);
    if (rec && impl_->cluster_ && rec->phase() == Phase::kDone) rec.reset();  // as cancel_task
    if (rec) {
      Task t = impl_->scheduler_.set_priority(rec, priority);
      t.input.data.clear();
      changed = std::move(t);
    }
  }
  if (changed) {
    // Stored before it returns (a kill -9 right after keeps the priority):
    // in the store's queue (after another thread's drain), then committed.
    impl_->outbox_.drain(/*wait=*/true);
    impl_->journal_.flush();
    return *changed;
  }
  if (impl_->cluster_) return impl_->cluster_->set_priority(id, priority);  // the shared table
  if (auto t = impl_->journal_.load_task(id)) {
    throw Error(
        ErrorCode::kInvalidState,
        fmt::format("task {} has ended ({}): only a waiting task's priority can change "
                    "(pending or queued)",
                    id,
                    t->status == TaskStatus::kUnrecognized ? t->stored_status
                                                           : std::string(to_string(t->status))));
  }
  throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
}
bool TaskManager::pause(PauseScope scope, const std::string& name) {
  TASKMGR_WRITER_ENTRY("pause");
  return impl_->set_paused(scope, name, true);
}
bool TaskManager::resume(PauseScope scope, const std::string& name) {
  TASKMGR_WRITER_ENTRY("resume");
  return impl_->set_paused(scope, name, false);
}
PoolSettings TaskManager::resize_pool(const std::string& service, const std::string& device,
                                      int min_instances, int max_instances) {
  TASKMGR_WRITER_ENTRY("resize_pool");
  return impl_->resize_pool(service, device, min_instances, max_instances);
}
std::vector<PauseState> TaskManager::paused() const {
  TASKMGR_ENTRY("paused");
  SchedulerLock g(impl_->scheduler_.mutex());
  return impl_->scheduler_.pauses().list();
}
void TaskManager::delete_task(const std::string& id) {
  TASKMGR_WRITER_ENTRY("delete_task");
  impl_->delete_task(id);
}
Task TaskManager::get_task(const std::string& id) const {
  TASKMGR_WRITER_ENTRY("get_task");
  return impl_->get_task(id);
}
std::vector<Task> TaskManager::list_tasks(const TaskFilter& f) const {
  TASKMGR_WRITER_ENTRY("list_tasks");
  if (auto at = invalid_utf8_at(f.service)) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("list_tasks: the service filter is not valid UTF-8 (byte {})", *at));
  }
  impl_->outbox_.drain(true);
  return impl_->journal_.list_tasks(f);
}
std::vector<EventRecord> TaskManager::get_task_events(const std::string& id) const {
  TASKMGR_WRITER_ENTRY("get_task_events");
  impl_->get_task(id);  // kNotFound for an unknown id
  impl_->outbox_.drain(true);
  return impl_->journal_.load_events(id);
}
std::vector<MetricSample> TaskManager::get_task_samples(const std::string& id) const {
  TASKMGR_WRITER_ENTRY("get_task_samples");
  impl_->get_task(id);
  impl_->outbox_.drain(true);
  return impl_->journal_.load_metrics(id);
}
std::optional<Task> TaskManager::wait_task(const std::string& id, Duration timeout) const {
  TASKMGR_ENTRY("wait_task");
  return impl_->wait_task(id, timeout);
}
bool TaskManager::wait_idle(Duration timeout) const {
  TASKMGR_ENTRY("wait_idle");
  return impl_->wait_idle(timeout);
}
TaskMetrics TaskManager::get_task_metrics() const {
  TASKMGR_ENTRY("get_task_metrics");
  return impl_->monitor_.metrics();
}
TaskHealth TaskManager::get_task_health(const std::string& id) const {
  TASKMGR_ENTRY("get_task_health");
  return impl_->monitor_.health(id);
}
SubscriptionId TaskManager::subscribe(EventCallback cb) {
  impl_->scheduler_.check_open();
  return impl_->bus_.subscribe(std::move(cb));
}
bool TaskManager::unsubscribe(SubscriptionId id) { return impl_->bus_.unsubscribe(id); }
void TaskManager::flush_events() {
  TASKMGR_WRITER_ENTRY("flush_events");
  impl_->outbox_.drain(true);
  impl_->bus_.flush();
}
void TaskManager::set_device_available(const std::string& d, bool a) {
  TASKMGR_WRITER_ENTRY("set_device_available");
  impl_->scheduler_.check_open();
  DrainOnExit drain{impl_->outbox_};
  impl_->intake_.set_device_available(d, a);
}
std::vector<DeviceInfo> TaskManager::devices() const { return impl_->devices_->list(); }
MemoryEstimate TaskManager::explain_estimate(const TaskCreateRequest& r) const {
  TASKMGR_ENTRY("explain_estimate");
  return impl_->placement_.explain(r);
}
void TaskManager::close() {
  TASKMGR_ENTRY("close");
  impl_->close();
}
const Config& TaskManager::config() const noexcept { return impl_->config_; }

}  // namespace taskmgr
