#include "taskmgr/task_manager.hpp"

#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/container/small_vector.hpp>
#include <boost/json.hpp>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <deque>
#include <filesystem>
#include <random>
#include <shared_mutex>
#include <thread>
#include <unordered_map>

#include "histogram.hpp"
#include "host_call.hpp"
#include "json_writer.hpp"
#include "spin_lock.hpp"

#ifndef TASKMGR_LINGER_US
#define TASKMGR_LINGER_US 50
#endif
#include "log_internal.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/ocr.hpp"
#include "taskmgr/service_pool.hpp"
#include "taskmgr/task_queue.hpp"
#include "timer_queue.hpp"
#include "utf8.hpp"

namespace taskmgr {

namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

double seconds(Duration d) { return std::chrono::duration<double>(d).count(); }

// Seconds from configuration or task options as a steady duration, clamped
// to [0, 100 years]: a larger value (e.g. "timeout_seconds": 1e300) would
// overflow the clock's 64-bit nanoseconds.
Duration from_seconds(double s) {
  constexpr double kMax = 100 * 365.25 * 86400;
  if (!(s > 0)) return Duration::zero();
  return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(std::min(s, kMax)));
}

SqliteStoreOptions sqlite_options(const StorageConfig& c) {
  SqliteStoreOptions o;
  o.synchronous_full = c.synchronous == SyncMode::kFull;
  o.busy_timeout_seconds = c.busy_timeout_seconds;
  return o;
}

std::string pool_key(const std::string& service, const std::string& device) {
  return service + "@" + device;
}

void check_options_json(const std::string& options) {
  if (options.empty()) return;
  boost::system::error_code ec;
  auto v = json::parse(options, ec);
  if (ec) {
    throw Error(ErrorCode::kInvalidArgument, "options are not valid JSON: " + ec.message());
  }
  if (!v.is_object()) throw Error(ErrorCode::kInvalidArgument, "options must be a JSON object");
  // "timeout_seconds" is the library's own option (the attempt's deadline).
  if (const json::value* t = v.as_object().if_contains("timeout_seconds")) {
    if (!t->is_number() || !(t->to_number<double>() > 0) || !std::isfinite(t->to_number<double>())) {
      throw Error(ErrorCode::kInvalidArgument,
                  "options.timeout_seconds must be a number > 0, got " + json::serialize(*t));
    }
  }
}

// The task's own deadline, from its options ("timeout_seconds").
std::optional<double> timeout_from_options(const std::string& options) {
  if (options.empty() || options.find("timeout_seconds") == std::string::npos) return std::nullopt;
  boost::system::error_code ec;
  auto v = json::parse(options, ec);
  if (ec || !v.is_object()) return std::nullopt;
  const json::value* t = v.as_object().if_contains("timeout_seconds");
  if (t == nullptr || !t->is_number()) return std::nullopt;
  return t->to_number<double>();
}

std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

// What an attempt came to, decided before its cleanup.
struct Outcome {
  enum class Kind { kCompleted, kFailed, kCancelled, kRetry } kind = Kind::kCompleted;
  FailureInfo failure;
  RetryDecision decision;
  std::string result;
  std::optional<std::int64_t> peak_mb;
};

enum class Phase { kPending, kQueued, kBackoff, kRunning, kDone };

struct Record {
  Task task;
  RequestFeatures features;
  Phase phase = Phase::kPending;
  std::atomic<bool> cancel{false};
  detail::TimerQueue::TimerId retry_timer = 0;
  SteadyTime queued_steady{};
  SteadyTime started_steady{};
  std::int64_t reserved_mb = 0;
  std::string reserved_device;
  std::atomic<std::int64_t> last_mb{-1};
  std::atomic<std::int64_t> peak_mb{-1};
  std::atomic<bool> memory_warned{false};
  bool device_warned = false;
  // The running attempt's deadline (0 = none) and whether the sweep found it
  // still running past it (the attempt then ends TIMEOUT).
  SteadyTime deadline{};
  double timeout_s = 0;
  std::atomic<bool> timed_out{false};
  // Cleanup of the current attempt: 0 idle, 1 hook running, 2 finished by the watchdog.
  std::atomic<int> cleanup_phase{0};
  SteadyTime cleanup_deadline{};
  SteadyTime cleanup_started{};
  std::string temp_dir;
  std::string instance_id;
  Outcome pending;
};

using RecordPtr = std::shared_ptr<Record>;

// An event as committed under the manager's lock: its details captured by
// value and written as JSON when drained, after the lock is released (or
// written at once when they do not fit the capture).
struct PendingEvent {
  TaskEvent event = TaskEvent::kCreated;
  Timestamp timestamp{};
  bool captured = false;
  detail::CapturedObject fields;  // when captured
  std::string details;            // otherwise

  void write_details(std::string& out) const {
    if (captured) {
      fields.assign_to(out);
    } else {
      out.assign(details);
    }
  }
};
// commit_locked relies on it: events move into reserved room without throwing.
static_assert(std::is_nothrow_move_constructible_v<PendingEvent>);

}  // namespace

// ---------------------------------------------------------------------------
class TaskManager::Impl {
 public:
  Impl(Config config, TaskManagerOptions options);
  ~Impl();

  void register_service(std::shared_ptr<ServiceFactory> factory);
  Task create_task(const TaskCreateRequest& request);
  std::vector<Task> create_tasks(const std::vector<TaskCreateRequest>& requests);
  // The requests of create_task (one) or create_tasks (many), uncopied.
  struct Requests {
    const TaskCreateRequest* p;
    std::size_t n;
    std::size_t size() const { return n; }
    bool empty() const { return n == 0; }
    const TaskCreateRequest& operator[](std::size_t i) const { return p[i]; }
    const TaskCreateRequest* begin() const { return p; }
    const TaskCreateRequest* end() const { return p + n; }
  };
  std::vector<Task> create_many(Requests requests);
  Task start_task(const std::string& id, const TaskStartRequest& params);
  bool cancel_task(const std::string& id);
  Task get_task(const std::string& id) const;
  std::vector<Task> list_tasks(const TaskFilter& filter) const;
  std::optional<Task> wait_task(const std::string& id, Duration timeout) const;
  bool wait_idle(Duration timeout) const;
  TaskMetrics metrics() const;
  TaskHealth health(const std::string& id) const;
  void set_device_available(const std::string& device, bool available);
  MemoryEstimate explain(const TaskCreateRequest& request) const;
  void close();

  Config config_;
  detail::Logger log_;
  std::shared_ptr<Clock> clock_;
  std::shared_ptr<TaskStore> store_;
  std::shared_ptr<DeviceRegistry> devices_;
  MemoryEstimator estimator_;
  std::unique_ptr<TaskQueue> queue_;
  std::unique_ptr<TaskErrorHandler> handler_;
  EventBus bus_;

  // The context a service sees; defined below.
  class Context;

 private:
  // The events of one state change (one critical section). They share one
  // timestamp, read once. Held inline: a batch allocates nothing.
  struct Batch {
    boost::container::small_vector<PendingEvent, 4> events;
    std::optional<Timestamp> now;
  };
  // The batch's events as records of task `id` (details written now).
  static std::vector<EventRecord> records_of(Batch& b, const std::string& id);

  void check_open_locked() const;
  void add_event(Batch& b, const Record& r, TaskEvent e,
                 std::initializer_list<detail::JsonField> details) const;
  void commit_locked(const RecordPtr& rec, Batch& b);
  struct OutboxItem;
  OutboxItem& next_outbox_item_locked();  // under outbox_mu_

 public:
  // Writes what commit_locked queued to the store and the bus, in commit
  // order, outside mu_. `wait`: also when another thread is draining.
  void drain(bool wait = false);

 private:
  RecordPtr find_locked(const std::string& id) const;
  void put_locked(const RecordPtr& rec);
  bool supports(const std::string& service, const DeviceInfo& d) const;
  std::function<bool(const DeviceInfo&)> support_filter(const std::string& service) const;

  // retry: a further attempt (requeue_task: one priority lower). recovered:
  // found queued at open (never refused, same priority).
  void enqueue_locked(const RecordPtr& rec, Batch& b, bool retry, bool recovered = false);
  void mark_queued(Record& r, Batch& b, bool retry, bool recovered) const;
  void push_queued_locked(const RecordPtr& rec, bool retry, bool recovered, bool enforce_limit);
  struct Launch {
    RecordPtr rec;
    ServicePool::Lease lease;
  };
  void dispatch_locked();
  std::optional<Launch> next_locked();
  void worker_loop();
  void run_attempt(const RecordPtr& rec, ServicePool::Lease lease,
                   std::unique_lock<std::mutex>& lock);
  Outcome decide(const RecordPtr& rec, std::exception_ptr err, Context& ctx);
  void begin_cleanup_locked(const RecordPtr& rec, Outcome o, Batch& b);
  void finish_cleanup_locked(const RecordPtr& rec, bool hook_ok, const std::string& problem,
                             Batch& b);
  void end_unstarted_locked(const RecordPtr& rec, TaskStatus status, TaskFailureReason reason,
                            const std::string& message, Batch& b);
  void retry_unstarted_locked(const RecordPtr& rec, const FailureInfo& f, Batch& b);
  void apply_retry_locked(const RecordPtr& rec, const RetryDecision& d, Batch& b);
  void finished_locked(const RecordPtr& rec);
  void sweep();
  void schedule_sweep();
  // The deadline of an attempt, in seconds (0 = none): the task's
  // "timeout_seconds" option, else tasks.task_timeout_seconds.
  double timeout_for(const std::string& options) const {
    return timeout_from_options(options).value_or(config_.tasks.task_timeout_seconds);
  }
  // storage.retention_days: deletes finished tasks older than that from the
  // store (and from memory). At open, then hourly from the sweep.
  void prune_retention();
  void recover();
  void remove_dead_temp_dirs();
  MemoryState memory_state_locked(const Record& r) const;
  std::string temp_dir_for(const Record& r, int attempt);

  mutable std::mutex mu_;
  mutable std::condition_variable done_cv_;
  // Written under mu_ and registry_mu_ (register_service), so either lock
  // reads them: create_task takes only registry_mu_ (shared).
  mutable std::shared_mutex registry_mu_;
  std::map<std::string, std::shared_ptr<ServiceFactory>> factories_;
  std::map<std::string, std::function<bool(const DeviceInfo&)>> filters_;  // per service: supports()
  std::map<std::string, std::unique_ptr<ServicePool>> pools_;
  // Keyed by a view of the record's own task.id (never changes; the value
  // keeps it alive): no copy of the id per task. Insert with put_locked.
  std::unordered_map<std::string_view, RecordPtr> records_;
  // Nodes of records_ erased, reused by put_locked (at most kFinishedKept):
  // a record put by the host and erased by a worker allocates nothing.
  std::vector<std::unordered_map<std::string_view, RecordPtr>::node_type> free_record_nodes_;
  std::deque<RecordPtr> finished_fifo_;  // the recent finished tasks kept in records_
  std::vector<RecordPtr> running_recs_;  // attempts running now (at most one per worker)
  std::map<std::string, SteadyTime> pool_blocked_;
  std::map<std::string, int> running_by_device_;
  std::map<std::string, int> backoff_by_device_;
  std::map<std::string, std::int64_t> peak_by_device_;
  std::vector<RecordPtr> cleanups_;  // attempts whose cleanup hook is running
  // Committed state changes not yet written to the store and the bus (mu_).
  // What is copied here under the lock is kept small: the row without its
  // id (taken from `rec` when drained) and the events as captured; the
  // drain writes ids and JSON details outside the lock.
  struct OutboxItem {
    RecordPtr rec;  // the task (its id); null for `ready` items
    Task task;      // the row to store, without its id and input
    std::size_t first = 0, count = 0;  // its events in outbox_events_
    std::vector<EventRecord> ready;    // store == false: events stored already, to publish
    bool store = true;  // false: only publish (the store has it already)
  };
  std::mutex outbox_mu_;  // taken inside mu_ to append, alone to swap out
  // Items are reused: the first outbox_used_ are pending, the rest keep
  // their strings' capacity for the next commits.
  std::vector<OutboxItem> outbox_;
  std::size_t outbox_used_ = 0;
  std::vector<PendingEvent> outbox_events_;
  std::atomic<bool> outbox_pending_{false};  // outbox_ not empty (set and cleared under outbox_mu_)
  std::mutex drain_mu_;  // one drainer at a time keeps commit order
  std::vector<OutboxItem> spare_outbox_;          // drain_mu_: swapped with outbox_
  std::vector<PendingEvent> spare_outbox_events_;  // drain_mu_: swapped with outbox_events_
  std::vector<EventRecord> spare_events_;          // drain_mu_
  std::vector<EventRecord> item_events_;           // drain_mu_: one item's events, for the store
  // Finished records evicted from records_ (outbox_mu_): the drainer drops
  // them, outside mu_, so that freeing them (memory another thread may
  // have allocated, behind the allocator's lock) never holds up the manager.
  std::vector<RecordPtr> retired_;
  std::vector<RecordPtr> spare_retired_;           // drain_mu_
  std::vector<std::string> device_ids_;  // fixed at open
  int workers_ = 1;
  int running_ = 0;   // attempts holding a worker thread
  int loops_ = 0;     // worker_loop jobs posted and not yet returned
  int lingering_ = 0; // loops waiting a moment for new work
  std::atomic<std::uint64_t> enqueued_{0};  // tasks ever put in the queue
  std::int64_t last_enqueue_ns_ = 0;                  // under mu_
  std::atomic<std::int64_t> arrival_gap_ns_{1'000'000'000};  // mean gap between enqueues
  static constexpr std::chrono::microseconds kWorkerLinger{TASKMGR_LINGER_US};
  int backoff_ = 0;   // tasks waiting for a retry timer
  // Admission to the queue (tasks.max_queue_size): a create with start
  // reserves room under admit_mu_ alone (it does not take mu_), start_task
  // checks and queues under mu_ then admit_mu_; the reservation is given
  // back once the tasks are queued (or their creation failed).
  std::mutex admit_mu_;
  std::atomic<std::size_t> queue_reserved_{0};
  std::atomic<bool> closing_{false};
  bool closed_ = false;
  SteadyTime last_prune_{};
  SteadyTime last_refresh_{};

  // Counters (under mu_ or atomics).
  std::uint64_t created_ = 0, started_ = 0, completed_ = 0, failed_ = 0, cancelled_ = 0;
  std::map<std::string, std::uint64_t> failed_by_reason_;
  std::atomic<std::uint64_t> queue_full_{0};
  std::uint64_t retries_ = 0, ooms_ = 0, fallbacks_ = 0, warnings_ = 0,
                cleanup_failures_ = 0;
  detail::Histogram wait_hist_;
  detail::Histogram proc_hist_;

  std::string temp_root_;
  std::once_flag temp_once_;

  // Last: stopped first.
  std::unique_ptr<boost::asio::thread_pool> threads_;
  std::unique_ptr<detail::TimerQueue> timers_;
  Duration sweep_interval_;

  static constexpr std::size_t kFinishedKept = 256;  // recent finished tasks kept in memory; the rest live in the store
  // Finished records evicted from records_ that wait for a create_task to
  // drop them; past this many a drain drops them (they may hold input bytes).
  static constexpr std::size_t kRetiredMax = 256;
  // Outbox items kept for reuse after a drain (a burst may have made more),
  // and the string capacity an item keeps for a task's result.
  static constexpr std::size_t kOutboxKept = 1024;
  static constexpr std::size_t kResultKept = 4096;
};

// ---------------------------------------------------------------------------
class TaskManager::Impl::Context final : public TaskContext {
 public:
  Context(Impl& m, RecordPtr rec, std::string device, std::string instance, int attempt,
          int batch, std::int64_t estimate, std::string options)
      : m_(m),
        rec_(std::move(rec)),
        device_(std::move(device)),
        instance_(std::move(instance)),
        options_(std::move(options)),
        attempt_(attempt),
        batch_(batch),
        estimate_(estimate) {}

  const std::string& task_id() const override { return rec_->task.id; }
  const std::string& service() const override { return rec_->task.service; }
  const TaskInput& input() const override { return rec_->task.input; }
  const std::string& options_json() const override { return options_; }
  int batch_size() const override { return batch_; }
  int attempt() const override { return attempt_; }
  const std::string& device() const override { return device_; }
  const std::string& service_instance_id() const override { return instance_; }
  std::int64_t estimated_memory_mb() const override { return estimate_; }
  bool cancelled() const override { return rec_->cancel.load(std::memory_order_relaxed); }
  bool deadline_exceeded() const override {
    return rec_->timed_out.load(std::memory_order_relaxed) ||
           (rec_->timeout_s > 0 && m_.clock_->steady_now() >= rec_->deadline);
  }
  double seconds_left() const override {
    if (rec_->timeout_s <= 0) return std::numeric_limits<double>::infinity();
    return std::max(0.0, seconds(rec_->deadline - m_.clock_->steady_now()));
  }

  const std::string& temp_dir() override {
    if (temp_.empty()) {
      std::string dir = m_.temp_dir_for(*rec_, attempt_);
      std::error_code ec;
      fs::create_directories(dir, ec);
      if (ec) {
        throw TaskError(TaskFailureReason::kProcessingError,
                        "cannot create temp dir " + dir + ": " + ec.message());
      }
      temp_ = std::move(dir);
      auto g = detail::spin_lock(m_.mu_);
      rec_->temp_dir = temp_;
    }
    return temp_;
  }

  void stage(std::string_view name) override {
    MetricSample s;
    s.task_id = rec_->task.id;
    s.timestamp = m_.clock_->now();
    s.memory_usage_mb = std::max<std::int64_t>(0, rec_->last_mb.load());
    s.device = device_;
    s.processing_stage = std::string(name);
    try {
      m_.store_->append_metrics({s});
    } catch (const std::exception& e) {
      m_.log_.write(LogLevel::kWarn, std::string("storing a task_metrics sample failed: ") + e.what());
    }
  }

  void report_memory(std::int64_t mb) override {
    if (mb < 0) return;
    rec_->last_mb.store(mb);
    std::int64_t prev = rec_->peak_mb.load();
    while (mb > prev && !rec_->peak_mb.compare_exchange_weak(prev, mb)) {
    }
    const auto& tc = m_.config_.tasks;
    if (tc.max_task_memory_mb > 0 && mb > tc.max_task_memory_mb) {
      throw TaskError(TaskFailureReason::kMemoryLimitExceeded,
                      "task " + rec_->task.id + " uses " + std::to_string(mb) +
                          " MB, over tasks.max_task_memory_mb = " +
                          std::to_string(tc.max_task_memory_mb),
                      true);
    }
    if (auto d = m_.devices_->get(device_); d && mb > d->total_mb) {
      throw OutOfMemoryError("task " + rec_->task.id + " uses " + std::to_string(mb) +
                             " MB, more than " + device_ + " has (" +
                             std::to_string(d->total_mb) + " MB)");
    }
    if (tc.enable_resource_tracking && estimate_ > 0 &&
        static_cast<double>(mb) > tc.memory_warning_fraction * static_cast<double>(estimate_) &&
        !rec_->memory_warned.exchange(true)) {
      auto g = detail::spin_lock(m_.mu_);
      Batch b;
      m_.add_event(b, *rec_, TaskEvent::kMemoryWarning,
                   {{"kind", "above_estimate"},
                    {"device", device_},
                    {"memory_usage_mb", mb},
                    {"estimated_memory_mb", estimate_},
                    {"message", "uses " + std::to_string(mb) + " MB, above its estimate of " +
                                    std::to_string(estimate_) + " MB"}});
      ++m_.warnings_;
      m_.commit_locked(rec_, b);
    }
    m_.drain();
  }

  void set_result(std::string result_json) override { result_ = std::move(result_json); }

  std::string take_result() { return std::move(result_); }
  const std::string& created_temp() const { return temp_; }

 private:
  Impl& m_;
  RecordPtr rec_;
  std::string device_;
  std::string instance_;
  std::string options_;
  int attempt_;
  int batch_;
  std::int64_t estimate_;
  std::string temp_;
  std::string result_;
};

// ---------------------------------------------------------------------------
TaskManager::Impl::Impl(Config config, TaskManagerOptions options)
    : config_((config.validate(), std::move(config))),
      log_(parse_log_level(config_.logging.level).value_or(LogLevel::kInfo),
           std::move(options.log_sink)),
      clock_(options.clock ? std::move(options.clock) : Clock::system()),
      store_(options.store ? std::move(options.store)
             : config_.storage.path == ":memory:"
                 ? make_memory_store()
                 : open_sqlite_store(config_.storage.path, sqlite_options(config_.storage))),
      devices_(options.devices ? std::move(options.devices)
                               : std::make_shared<DeviceRegistry>(config_.devices)),
      bus_(
          [this](LogLevel l, std::string_view m) { log_.write(l, m); }),
      sweep_interval_(options.sweep_interval) {
  workers_ = config_.executor.worker_threads > 0
                 ? config_.executor.worker_threads
                 : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  TaskQueue::Options qo;
  qo.enable_priority_queue = config_.tasks.enable_priority_queue;
  qo.ordering = config_.tasks.queue_ordering;
  qo.max_queue_size = static_cast<std::size_t>(config_.tasks.max_queue_size);
  qo.starvation_after = from_seconds(config_.tasks.starvation_seconds);
  qo.check_memory = config_.tasks.enable_resource_tracking;
  queue_ = std::make_unique<TaskQueue>(qo, *devices_, clock_);
  handler_ = std::make_unique<TaskErrorHandler>(
      config_.tasks.retry, [this](LogLevel l, std::string_view m) { log_.write(l, m); },
      options.random_seed);
  threads_ = std::make_unique<boost::asio::thread_pool>(static_cast<std::size_t>(workers_));
  timers_ = std::make_unique<detail::TimerQueue>(clock_);
  last_refresh_ = clock_->steady_now();
  device_ids_ = devices_->ids();
  bool has_ocr = false;
  for (auto& f : options.services) {
    has_ocr = has_ocr || (f && f->kind() == "ocr");
    register_service(std::move(f));
  }
  if (options.builtin_ocr && !has_ocr) register_service(make_ocr_service(config_.ocr));
  remove_dead_temp_dirs();
  recover();
  prune_retention();
  schedule_sweep();
}

TaskManager::Impl::~Impl() {
  try {
    close();
  } catch (...) {
  }
  timers_->stop();  // joined before the pointer changes: sweeps read timers_
  if (threads_) threads_->join();
  threads_.reset();
  bus_.flush();
  if (!temp_root_.empty()) {
    std::error_code ec;
    fs::remove_all(temp_root_, ec);
  }
}

void TaskManager::Impl::check_open_locked() const {
  if (closing_) throw Error(ErrorCode::kInvalidState, "the task manager is closed");
}

void TaskManager::Impl::add_event(Batch& b, const Record&, TaskEvent e,
                                  std::initializer_list<detail::JsonField> details) const {
  if (!b.now) b.now = clock_->now();
  PendingEvent& ev = b.events.emplace_back();
  ev.event = e;
  ev.timestamp = *b.now;
  ev.captured = ev.fields.capture(details);
  if (!ev.captured) ev.details = detail::json_object(details);  // long text (messages): rare
}

std::vector<EventRecord> TaskManager::Impl::records_of(Batch& b, const std::string& id) {
  std::vector<EventRecord> out(b.events.size());
  for (std::size_t i = 0; i < b.events.size(); ++i) {
    out[i].task_id = id;
    out[i].event = b.events[i].event;
    out[i].timestamp = b.events[i].timestamp;
    b.events[i].write_details(out[i].details_json);
  }
  b.events.clear();
  b.now.reset();
  return out;
}

// Every state change and its events are committed here, under mu_, in the
// order they happen; drain() writes them to the store (task row + events
// together) and publishes the events, in that same order, without holding
// mu_. Readers call drain(true) first, so they see every committed change.
void TaskManager::Impl::commit_locked(const RecordPtr& rec, Batch& b) {
  if (b.events.empty()) return;
  const Task& t = rec->task;
  const std::size_t n = b.events.size();
  std::lock_guard<std::mutex> g(outbox_mu_);
  // What can run out of memory comes first, before anything is claimed:
  // room for the events, a free item, the row's strings.
  if (outbox_events_.capacity() - outbox_events_.size() < n) {
    outbox_events_.reserve(std::max(2 * outbox_events_.capacity(), outbox_events_.size() + n));
  }
  // The task's previous change still waits: one item (the later row
  // supersedes the earlier one; the events, contiguous at the end of
  // outbox_events_, stay in order).
  const bool same = outbox_used_ > 0 && outbox_[outbox_used_ - 1].store &&
                    outbox_[outbox_used_ - 1].rec == rec;
  if (!same && outbox_used_ == outbox_.size()) outbox_.emplace_back();
  OutboxItem& item = same ? outbox_[outbox_used_ - 1] : outbox_[outbox_used_];
  // The row, into the item's strings (a reused item's capacity: no
  // allocation in the steady state).
  Task& row = item.task;
  row.service = t.service;
  row.options_json = t.options_json;
  row.priority = t.priority;
  row.status = t.status;
  row.attempt = t.attempt;
  row.batch_size = t.batch_size;
  row.failure_reason = t.failure_reason;
  row.failure_message = t.failure_message;
  row.created_at = t.created_at;
  row.queued_at = t.queued_at;
  row.started_at = t.started_at;
  row.finished_at = t.finished_at;
  row.result = t.result;
  row.estimated_memory_mb = t.estimated_memory_mb;
  row.actual_memory_mb = t.actual_memory_mb;
  row.assigned_device = t.assigned_device;
  row.service_instance_id = t.service_instance_id;
  row.resource_cleanup_completed = t.resource_cleanup_completed;
  // Nothing below throws (room reserved; events move without allocating).
  for (auto& e : b.events) outbox_events_.push_back(std::move(e));
  b.events.clear();
  b.now.reset();
  if (same) {
    item.count += n;
  } else {
    ++outbox_used_;
    item.rec = rec;
    item.store = true;
    item.first = outbox_events_.size() - n;
    item.count = n;
  }
  outbox_pending_.store(true, std::memory_order_release);
}

TaskManager::Impl::OutboxItem& TaskManager::Impl::next_outbox_item_locked() {
  if (outbox_used_ == outbox_.size()) outbox_.emplace_back();
  return outbox_[outbox_used_++];
}

void TaskManager::Impl::drain(bool wait) {
  // Nothing committed since the last drain took the outbox: nothing to do
  // (a drain in progress re-checks the outbox when it ends).
  if (!wait && !outbox_pending_.load(std::memory_order_acquire)) return;
  for (;;) {
    std::unique_lock<std::mutex> d(drain_mu_, std::defer_lock);
    if (wait) {
      d.lock();
    } else if (!d.try_lock()) {
      return;  // the drainer re-checks the outbox after it finishes
    }
    // The outbox and the spare swap buffers: neither is reallocated in the
    // steady state.
    std::vector<OutboxItem> items = std::move(spare_outbox_);
    std::vector<PendingEvent> pending = std::move(spare_outbox_events_);
    std::vector<RecordPtr> retired = std::move(spare_retired_);
    std::size_t n_items = 0;
    {
      auto g = detail::spin_lock(outbox_mu_);
      items.swap(outbox_);
      n_items = outbox_used_;
      outbox_used_ = 0;  // the spare's items are all processed: reusable
      pending.swap(outbox_events_);
      if (retired_.size() > kRetiredMax) retired.swap(retired_);  // no create_task took them
      outbox_pending_.store(false, std::memory_order_relaxed);
    }
    retired.clear();  // the last references, mostly
    spare_retired_ = std::move(retired);
    // Records the dispatcher has delivered are filled in again: their
    // strings keep their capacity, so writing ids and details here
    // allocates nothing in the steady state.
    std::vector<EventRecord> events = bus_.take_recycled();
    if (events.empty()) events = std::move(spare_events_);
    std::size_t used = 0;
    auto next_record = [&]() -> EventRecord& {
      return used < events.size() ? events[used++] : (++used, events.emplace_back());
    };
    for (std::size_t k = 0; k < n_items; ++k) {
      OutboxItem& it = items[k];
      if (!it.store) {
        for (auto& e : it.ready) next_record() = std::move(e);
        it.ready.clear();
        continue;
      }
      // The ids and the JSON details, written here, outside mu_.
      it.task.id = it.rec->task.id;
      item_events_.resize(it.count);
      for (std::size_t i = 0; i < it.count; ++i) {
        const PendingEvent& p = pending[it.first + i];
        EventRecord& e = item_events_[i];
        e.sequence = 0;
        e.task_id.assign(it.task.id);
        e.event = p.event;
        e.timestamp = p.timestamp;
        p.write_details(e.details_json);
      }
      try {
        store_->update_task(it.task, item_events_);
      } catch (const std::exception& e) {
        log_.write(LogLevel::kError, "storing task " + it.task.id + " failed: " + e.what());
      }
      // Published as they are: swapped with recycled records, whose
      // strings then serve the next item (no copy, no allocation).
      for (auto& e : item_events_) std::swap(next_record(), e);
      it.rec.reset();
      if (it.task.result.capacity() > kResultKept) std::string().swap(it.task.result);
    }
    if (items.size() > kOutboxKept) items.resize(kOutboxKept);  // after a burst
    events.resize(used);
    bus_.publish(std::move(events));  // leaves `events` empty, capacity kept
    const bool none = n_items == 0;
    pending.clear();
    spare_outbox_ = std::move(items);
    spare_outbox_events_ = std::move(pending);
    spare_events_ = std::move(events);
    d.unlock();
    if (none) {
      auto g = detail::spin_lock(outbox_mu_);
      if (outbox_used_ == 0) return;
    }
  }
}

void TaskManager::Impl::put_locked(const RecordPtr& rec) {
  records_.erase(rec->task.id);  // a key must view the id of the record it maps to
  if (free_record_nodes_.empty()) {
    records_.emplace(std::string_view(rec->task.id), rec);
    return;
  }
  auto node = std::move(free_record_nodes_.back());
  free_record_nodes_.pop_back();
  node.key() = std::string_view(rec->task.id);
  node.mapped() = rec;
  records_.insert(std::move(node));
}

RecordPtr TaskManager::Impl::find_locked(const std::string& id) const {
  auto it = records_.find(id);
  return it == records_.end() ? nullptr : it->second;
}

bool TaskManager::Impl::supports(const std::string& service, const DeviceInfo& d) const {
  auto it = factories_.find(service);
  return it != factories_.end() && it->second->supports(d);
}

std::function<bool(const DeviceInfo&)> TaskManager::Impl::support_filter(
    const std::string& service) const {
  auto it = filters_.find(service);  // made once, at registration
  if (it != filters_.end()) return it->second;
  return [](const DeviceInfo&) { return false; };  // no such service: no device
}

std::string TaskManager::Impl::temp_dir_for(const Record& r, int attempt) {
  std::call_once(temp_once_, [this] {
    fs::path root = config_.tasks.temp_dir.empty() ? fs::temp_directory_path()
                                                   : fs::path(config_.tasks.temp_dir);
    std::random_device rd;
    char suffix[16];
    std::snprintf(suffix, sizeof suffix, "%08x", rd());
    temp_root_ = (root / ("taskmgr-" + std::to_string(::getpid()) + "-" + suffix)).string();
  });
  return temp_root_ + "/" + r.task.id + "-a" + std::to_string(attempt);
}

// ---- services -------------------------------------------------------------
void TaskManager::Impl::register_service(std::shared_ptr<ServiceFactory> factory) {
  if (!factory) throw Error(ErrorCode::kInvalidArgument, "register_service: factory is null");
  const std::string kind = factory->kind();
  if (kind.empty()) throw Error(ErrorCode::kInvalidArgument, "register_service: empty service kind");
  ServicePool* pool = nullptr;
  {
    auto g = detail::spin_lock(mu_);
    check_open_locked();
    if (factories_.count(kind)) {
      throw Error(ErrorCode::kInvalidState, "service '" + kind + "' is registered already");
    }
    auto p = std::make_unique<ServicePool>(factory, config_.pools, workers_, clock_);
    pool = p.get();
    pools_[kind] = std::move(p);
    estimator_.register_model(kind, factory->memory_model());
    // Visible to create_task (which reads these under registry_mu_ alone)
    // only now that its pool and memory model are in place.
    std::unique_lock<std::shared_mutex> r(registry_mu_);
    factories_[kind] = factory;
    filters_[kind] = [factory](const DeviceInfo& d) { return factory->supports(d); };
  }
  for (const auto& d : devices_->list()) {
    if (factory->supports(d) && pool->settings(d.id).min_instances > 0) pool->warm(d.id);
  }
  auto g = detail::spin_lock(mu_);
  dispatch_locked();  // recovered tasks of this service may be waiting
}

// ---- create / start / cancel ------------------------------------------------
namespace {

// The checks create_task makes before it takes any lock.
void validate_request(const TaskCreateRequest& req) {
  for (const auto& [what, value] :
       {std::pair<const char*, const std::string*>{"input path", &req.input.path},
        {"service", &req.service},
        {"device", &req.device},
        {"media type", &req.input.media_type}}) {
    if (auto at = detail::invalid_utf8_at(*value)) {
      throw Error(ErrorCode::kInvalidArgument, std::string(what) + " is not valid UTF-8 (byte " +
                                                   std::to_string(*at) + ")");
    }
  }
  if (req.batch_size < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "batch_size must be >= 1, got " + std::to_string(req.batch_size));
  }
  if (!req.input.path.empty() && !req.input.data.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "input: give a path or bytes, not both");
  }
  check_options_json(req.options_json);
}

}  // namespace

// One request or many: validate all, reserve queue room for those that
// start, estimate and place each, store them all in one commit, then put
// the started ones in the queue.
std::vector<Task> TaskManager::Impl::create_tasks(const std::vector<TaskCreateRequest>& reqs) {
  return create_many({reqs.data(), reqs.size()});
}

Task TaskManager::Impl::create_task(const TaskCreateRequest& req) {
  return std::move(create_many({&req, 1}).front());  // no copy of the request
}

std::vector<Task> TaskManager::Impl::create_many(Requests reqs) {
  const bool many = reqs.size() != 1;
  // Runs `f` for request i; a failure of one of many names it.
  auto for_request = [many](std::size_t i, auto&& f) {
    if (!many) return f();
    try {
      return f();
    } catch (const Error& e) {
      throw Error(e.code(), "request " + std::to_string(i) + ": " + e.what() +
                                "; no task was created");
    }
  };
  if (reqs.empty()) return {};
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    for_request(i, [&] { validate_request(reqs[i]); });
  }
  std::size_t starting = 0;
  for (const auto& r : reqs) starting += r.start ? 1 : 0;
  // Each request's device filter: its service's, made at registration
  // (services are never removed, so the pointers stay valid).
  // Neither takes mu_: the workers hold it often, and a host thread that
  // waits for it is the bottleneck of a stream of short tasks.
  boost::container::small_vector<const std::function<bool(const DeviceInfo&)>*, 1> allowed(reqs.size());
  {
    std::shared_lock<std::shared_mutex> r(registry_mu_);
    check_open_locked();
    for (std::size_t i = 0; i < reqs.size(); ++i) {
      const std::string& service = reqs[i].service;
      if (i > 0 && service == reqs[i - 1].service) {
        allowed[i] = allowed[i - 1];
        continue;
      }
      auto f = filters_.find(service);
      for_request(i, [&] {
        if (f == filters_.end()) {
          std::string known;
          for (const auto& [k, fac] : factories_) known += (known.empty() ? "" : ", ") + k;
          throw Error(ErrorCode::kNotFound,
                      "no service '" + service + "' is registered" +
                          (known.empty() ? "" : " (registered: " + known + ")"));
        }
      });
      allowed[i] = &f->second;
    }
  }
  if (starting > 0) {
    std::lock_guard<std::mutex> a(admit_mu_);
    {
      const std::size_t max = static_cast<std::size_t>(config_.tasks.max_queue_size);
      const std::size_t queued = queue_->size() + queue_reserved_.load();
      if (queued + starting > max) {
        ++queue_full_;
        throw Error(ErrorCode::kQueueFull,
                    "queue full: " + std::to_string(queued) + " tasks queued (tasks.max_queue_size = " +
                        std::to_string(max) + ")" +
                        (many ? ", " + std::to_string(starting) + " more to start"
                              : std::string()) +
                        "; " + (many ? "no task was" : "the task was not") + " created");
      }
      queue_reserved_ += starting;  // room kept until the tasks are queued
    }
  }
  // Gives back the reserved queue room if anything below fails.
  struct Reservation {
    Impl& m;
    std::size_t n;
    ~Reservation() {
      if (n != 0) m.queue_reserved_ -= n;
    }
  } reservation{*this, starting};

  boost::container::small_vector<RecordPtr, 1> recs;  // one create: no allocation
  std::vector<NewTask> rows;
  recs.reserve(reqs.size());
  rows.reserve(reqs.size());
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    const TaskCreateRequest& req = reqs[i];
    auto rec = std::make_shared<Record>();
    Task& t = rec->task;
    t.id = generate_task_id();
    t.service = req.service;
    t.input = req.input;
    t.options_json = req.options_json;
    t.priority = req.priority;
    t.batch_size = req.batch_size;
    t.status = TaskStatus::kPending;
    t.created_at = clock_->now();
    Batch b;
    for_request(i, [&] {
      const auto& filter = *allowed[i];
      if (config_.tasks.enable_resource_tracking) {
        rec->features = estimator_.features(req);
        const MemoryEstimate est = estimator_.estimate(req.service, rec->features, req.device);
        if (config_.tasks.max_task_memory_mb > 0 && est.mb > config_.tasks.max_task_memory_mb) {
          throw Error(ErrorCode::kMemoryLimitExceeded,
                      "task estimated at " + std::to_string(est.mb) +
                          " MB exceeds tasks.max_task_memory_mb = " +
                          std::to_string(config_.tasks.max_task_memory_mb) + " (" +
                          est.explanation() + ")");
        }
        t.estimated_memory_mb = est.mb;
        t.assigned_device = devices_->select_device(est.mb, req.device, filter);
        add_event(b, *rec, TaskEvent::kCreated,
                  {{"service", t.service},
                   {"priority", t.priority},
                   {"batch_size", t.batch_size},
                   {"device", *t.assigned_device},
                   {"estimated_memory_mb", est.mb},
                   {"estimate_model", est.model},
                   {"estimate_correction", est.correction}});
      } else {
        rec->features.batch_size = req.batch_size;
        t.assigned_device = devices_->select_device(0, req.device, filter);
        add_event(b, *rec, TaskEvent::kCreated,
                  {{"service", t.service},
                   {"priority", t.priority},
                   {"batch_size", t.batch_size},
                   {"device", *t.assigned_device}});
      }
    });
    if (req.start) mark_queued(*rec, b, false, false);
    NewTask& row = rows.emplace_back();  // built in place: a Task is large to move
    row.task = t;
    row.events = records_of(b, t.id);
    recs.push_back(std::move(rec));
  }
  store_->insert_tasks(rows);  // durable before we return; throws on failure: nothing kept
  std::vector<RecordPtr> retired;  // finished records to drop, after the locks
  bool worker_drains = false;
  std::vector<Task> out;
  out.reserve(rows.size());
  {
    auto g = detail::spin_lock(mu_);
    // Queued and unreserved in one step, under admit_mu_: an admission check
    // in between would count these tasks twice (or not at all).
    std::unique_lock<std::mutex> admit(admit_mu_, std::defer_lock);
    if (starting > 0) admit.lock();
    for (std::size_t i = 0; i < recs.size(); ++i) {
      const RecordPtr& rec = recs[i];
      put_locked(rec);
      ++created_;
      if (reqs[i].start) push_queued_locked(rec, false, false, /*enforce_limit=*/false);
      out.push_back(std::move(rows[i].task));
    }
    queue_reserved_ -= starting;  // now in the queue
    reservation.n = 0;
    if (admit.owns_lock()) admit.unlock();
    {
      std::lock_guard<std::mutex> o(outbox_mu_);
      retired.swap(retired_);  // dropped below, outside both locks
      for (auto& row : rows) {
        OutboxItem& item = next_outbox_item_locked();
        item.rec.reset();
        item.store = false;  // insert_tasks stored these events
        item.count = 0;
        item.ready = std::move(row.events);
      }
      outbox_pending_.store(true, std::memory_order_release);
    }
    if (starting > 0) dispatch_locked();
    // A lingering worker drains when it takes the task or when its linger
    // ends (~50 us): the host thread, often the bottleneck of a stream of
    // creates, leaves the events to it.
    worker_drains = lingering_ > 0;
  }
  if (!worker_drains) drain();
  return out;
}

Task TaskManager::Impl::start_task(const std::string& id, const TaskStartRequest& p) {
  auto lock = detail::spin_lock(mu_);
  check_open_locked();
  RecordPtr rec = find_locked(id);
  if (!rec) {
    lock.unlock();
    if (auto t = store_->load_task(id)) {
      throw Error(ErrorCode::kInvalidState, "task " + id + " is " +
                                                std::string(to_string(t->status)) +
                                                ": only a pending task can be started");
    }
    throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
  }
  if (rec->phase != Phase::kPending) {
    throw Error(ErrorCode::kInvalidState, "task " + id + " is " +
                                              std::string(to_string(rec->task.status)) +
                                              ": only a pending task can be started");
  }
  Task& t = rec->task;
  if (p.batch_size && *p.batch_size < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "batch_size must be >= 1, got " + std::to_string(*p.batch_size));
  }
  check_options_json(p.options_json);
  // Work out the changes first; apply them only when the task is queued.
  const int priority = p.priority.value_or(t.priority);
  const int batch = p.batch_size.value_or(t.batch_size);
  RequestFeatures features = rec->features;
  features.batch_size = batch;
  std::optional<std::int64_t> estimate = t.estimated_memory_mb;
  std::string device = *t.assigned_device;
  if (!p.device.empty() || batch != t.batch_size) {
    if (config_.tasks.enable_resource_tracking) {
      estimate = estimator_.estimate(t.service, features, p.device).mb;
    }
    device = devices_->select_device(estimate.value_or(0), p.device.empty() ? device : p.device,
                                     support_filter(t.service));
  }
  // Checked and queued under admit_mu_: creates that start their tasks
  // reserve room under it without mu_.
  std::unique_lock<std::mutex> admit(admit_mu_);
  if (queue_->size() + queue_reserved_ >= static_cast<std::size_t>(config_.tasks.max_queue_size)) {
    ++queue_full_;
    throw Error(ErrorCode::kQueueFull,
                "queue full: " + std::to_string(queue_->size() + queue_reserved_) +
                    " tasks queued (tasks.max_queue_size = " +
                    std::to_string(config_.tasks.max_queue_size) + "); task " + id +
                    " stays pending and can be started later");
  }
  t.priority = priority;
  t.batch_size = batch;
  rec->features = features;
  t.estimated_memory_mb = estimate;
  t.assigned_device = device;
  if (!p.options_json.empty()) t.options_json = p.options_json;
  Batch b;
  enqueue_locked(rec, b, false);
  admit.unlock();
  commit_locked(rec, b);
  Task out = t;
  dispatch_locked();
  return out;
}

void TaskManager::Impl::enqueue_locked(const RecordPtr& rec, Batch& b, bool retry,
                                       bool recovered) {
  Task& t = rec->task;
  if (retry) t.priority -= 1;  // the spec's requeue_task: one priority lower
  mark_queued(*rec, b, retry, recovered);
  // A retry or a recovered task was accepted before: never refused.
  push_queued_locked(rec, retry, recovered, /*enforce_limit=*/!retry && !recovered);
}

// The task's queued state and event (status, queued_at), without the queue.
void TaskManager::Impl::mark_queued(Record& r, Batch& b, bool retry, bool recovered) const {
  Task& t = r.task;
  t.status = TaskStatus::kQueued;
  t.queued_at = clock_->now();
  add_event(b, r, TaskEvent::kQueued,
            {{"device", *t.assigned_device},
             {"priority", t.priority},
             {"batch_size", t.batch_size},
             {"estimated_memory_mb", t.estimated_memory_mb.value_or(0)},
             {"retry", retry},
             {"recovered", recovered}});
}

// Puts a task marked queued into the queue of its device.
void TaskManager::Impl::push_queued_locked(const RecordPtr& rec, bool retry, bool recovered,
                                           bool enforce_limit) {
  Task& t = rec->task;
  QueuedTask q;
  q.task_id = t.id;
  q.device = *t.assigned_device;
  q.service = t.service;
  q.estimated_memory_mb = t.estimated_memory_mb.value_or(0);
  if (retry) {
    q.priority = t.priority + 1;
    queue_->requeue_task(std::move(q));  // one priority lower than q.priority
  } else {
    (void)recovered;
    queue_->add_task(std::move(q), t.priority, enforce_limit);
  }
  enqueued_.fetch_add(1, std::memory_order_release);
  {
    // Running mean of the real time between enqueues (worker linger heuristic).
    const std::int64_t now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                    std::chrono::steady_clock::now().time_since_epoch())
                                    .count();
    const std::int64_t gap = now_ns - last_enqueue_ns_;
    last_enqueue_ns_ = now_ns;
    const std::int64_t avg = arrival_gap_ns_.load(std::memory_order_relaxed);
    arrival_gap_ns_.store(avg + (std::min<std::int64_t>(gap, 1'000'000'000) - avg) / 8,
                          std::memory_order_relaxed);
  }
  rec->phase = Phase::kQueued;
  rec->queued_steady = clock_->steady_now();
}

bool TaskManager::Impl::cancel_task(const std::string& id) {
  auto lock = detail::spin_lock(mu_);
  RecordPtr rec = find_locked(id);
  if (!rec) {
    lock.unlock();
    if (store_->load_task(id)) return false;  // ended long ago
    throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
  }
  Batch b;
  switch (rec->phase) {
    case Phase::kDone:
      return false;
    case Phase::kRunning:
      rec->cancel.store(true);
      return true;
    case Phase::kQueued:
      queue_->remove(id);
      break;
    case Phase::kBackoff:
      timers_->cancel(rec->retry_timer);
      --backoff_;
      --backoff_by_device_[*rec->task.assigned_device];
      break;
    case Phase::kPending:
      break;
  }
  rec->cancel.store(true);
  end_unstarted_locked(rec, TaskStatus::kCancelled, TaskFailureReason::kCancelled,
                       "cancelled by the host", b);
  commit_locked(rec, b);
  dispatch_locked();
  return true;
}

// A task that ends without running (cancelled while waiting, queue timeout,
// no device): its outcome event, then a cleanup with nothing to release.
void TaskManager::Impl::end_unstarted_locked(const RecordPtr& rec, TaskStatus status,
                                             TaskFailureReason reason,
                                             const std::string& message, Batch& b) {
  Task& t = rec->task;
  const std::string was(to_string(t.status));
  t.status = status;
  t.failure_reason = reason;
  t.failure_message = message;
  t.finished_at = clock_->now();
  if (status == TaskStatus::kCancelled) {
    ++cancelled_;
    add_event(b, *rec, TaskEvent::kCancelled, {{"while", was}, {"message", message}});
  } else {
    ++failed_;
    ++failed_by_reason_[std::string(to_string(reason))];
    add_event(b, *rec, TaskEvent::kFailed,
              {{"reason", to_string(reason)}, {"message", message}, {"attempt", t.attempt}});
  }
  add_event(b, *rec, TaskEvent::kCleanupStarted, {{"attempt", t.attempt}});
  t.resource_cleanup_completed = true;
  add_event(b, *rec, TaskEvent::kCleanupCompleted,
            {{"ok", true}, {"attempt", t.attempt}, {"duration_s", detail::JsonValue::seconds(0.0)}});
  finished_locked(rec);
}

void TaskManager::Impl::finished_locked(const RecordPtr& rec) {
  rec->phase = Phase::kDone;
  finished_fifo_.push_back(rec);
  while (finished_fifo_.size() > kFinishedKept) {
    RecordPtr old = std::move(finished_fifo_.front());
    finished_fifo_.pop_front();
    if (auto node = records_.extract(old->task.id)) {
      node.mapped().reset();  // not the last reference: `old` holds one
      if (free_record_nodes_.size() < kFinishedKept) free_record_nodes_.push_back(std::move(node));
    }
    std::lock_guard<std::mutex> o(outbox_mu_);
    retired_.push_back(std::move(old));
    // The next create_task drops them (the thread that allocated them,
    // usually: its allocator's fast path); a drain does when they pile up.
    if (retired_.size() > kRetiredMax) outbox_pending_.store(true, std::memory_order_release);
  }
  done_cv_.notify_all();
}

// ---- dispatch -----------------------------------------------------------------
// Worker threads run worker_loop(): take the next runnable task, run it,
// finish it and take the next one in the same critical section. A loop is
// posted to the Boost.Asio pool only for an idle worker, so a busy pool
// needs no post and no wake-up per task.
void TaskManager::Impl::dispatch_locked() {
  if (closing_) return;
  const int idle = workers_ - loops_;
  // A lingering loop takes the next task itself (it watches enqueued_):
  // posting another loop for that task would only wake a thread for nothing.
  const std::size_t waiting = queue_->size();
  const std::size_t catching = static_cast<std::size_t>(lingering_);
  const std::size_t uncaught = waiting > catching ? waiting - catching : 0;
  const int want = static_cast<int>(
      std::min<std::size_t>(static_cast<std::size_t>(std::max(idle, 0)), uncaught));
  for (int i = 0; i < want; ++i) {
    ++loops_;
    boost::asio::post(*threads_, [this] { worker_loop(); });
  }
}

void TaskManager::Impl::worker_loop() {
  detail::HostCallScope host;  // services and log sinks run here
  auto lock = detail::spin_lock(mu_);
  while (!closing_) {
    std::optional<Launch> launch = next_locked();
    // Linger only when tasks arrive faster than the linger lasts: spinning
    // while the host is slow to submit would only take CPU from it.
    if (!launch && lingering_ == 0 &&
        arrival_gap_ns_.load(std::memory_order_relaxed) <
            std::chrono::duration_cast<std::chrono::nanoseconds>(kWorkerLinger).count()) {
      // Linger a moment for the next task before giving the thread back: a
      // host that submits a stream of short tasks then needs no post and no
      // thread wake-up per task. Only new work (enqueues) ends the linger
      // early; real time, as this is CPU scheduling, not a task timeout.
      const std::uint64_t seen = enqueued_.load(std::memory_order_acquire);
      ++lingering_;  // one lingering worker is enough to catch the next task
      lock.unlock();
      drain();
      const auto until = std::chrono::steady_clock::now() + kWorkerLinger;
      bool more = false;
      for (unsigned spin = 1;; ++spin) {
        if (enqueued_.load(std::memory_order_acquire) != seen) {
          more = true;
          break;
        }
        if (spin % 64 == 0 && std::chrono::steady_clock::now() >= until) break;
        detail::cpu_relax();
      }
      detail::spin_relock(lock);
      --lingering_;
      if (more) continue;
      if (closing_) break;  // close() leaves queued tasks queued
      // A task queued after the linger timed out but before this loop took
      // the lock again counted on it (dispatch_locked posts no loop for a
      // task a lingering one will catch): look once more.
      launch = next_locked();
      if (!launch) break;
    }
    if (!launch) break;
    run_attempt(launch->rec, std::move(launch->lease), lock);  // returns locked
  }
  --loops_;
  done_cv_.notify_all();
  lock.unlock();
  drain();
}

// The best runnable task over all devices: fits its device's free memory now
// (TaskQueue::get_next_task), has a pool slot, highest priority then oldest.
// Reserves its memory and leases its instance slot.
std::optional<TaskManager::Impl::Launch> TaskManager::Impl::next_locked() {
  if (queue_->size() == 0) return std::nullopt;
  std::optional<QueuedTask> best;
  for (const auto& id : device_ids_) {
    if (queue_->size(id) == 0) continue;
    auto head = queue_->peek_next_task(id);  // none when unavailable or nothing fits
    if (!head) continue;
    std::optional<QueuedTask> cand = head;
    auto pool = pools_.find(head->service);
    if (pool == pools_.end() || !pool->second->has_capacity(id)) {
      if (pool != pools_.end()) {
        pool_blocked_.try_emplace(pool_key(head->service, id), clock_->steady_now());
      }
      cand = queue_->peek_next_task(id, [this, &id](const QueuedTask& q) {
        auto p = pools_.find(q.service);  // a recovered task may wait for its service
        return p != pools_.end() && p->second->has_capacity(id);
      });
    }
    if (!cand) continue;
    const bool better =
        !best || (config_.tasks.enable_priority_queue && cand->priority != best->priority
                      ? cand->priority > best->priority
                      : cand->sequence < best->sequence);
    if (better) best = std::move(cand);
  }
  if (!best) return std::nullopt;
  const QueuedTask& qt = *best;
  auto lease = pools_.at(qt.service)->try_acquire(qt.device);
  if (!lease) return std::nullopt;  // cannot happen: capacity was checked under mu_
  queue_->remove(qt.task_id);
  RecordPtr rec = find_locked(qt.task_id);
  if (!pool_blocked_.empty()) pool_blocked_.erase(pool_key(qt.service, qt.device));
  if (config_.tasks.enable_resource_tracking) {
    devices_->reserve(qt.device, qt.estimated_memory_mb, /*force=*/true);
    rec->reserved_mb = qt.estimated_memory_mb;
    rec->reserved_device = qt.device;
  }
  rec->phase = Phase::kRunning;
  ++running_;
  ++running_by_device_[qt.device];
  return Launch{std::move(rec), std::move(*lease)};
}

// ---- one attempt, on a worker thread ------------------------------------------
// Called with `lock` held; returns with it held again, after the attempt's
// cleanup, so that the worker loop can take the next task at once.
void TaskManager::Impl::run_attempt(const RecordPtr& rec, ServicePool::Lease lease,
                                    std::unique_lock<std::mutex>& lock) {
  const SteadyTime start = clock_->steady_now();
  std::string device, options;
  int attempt, batch;
  std::int64_t estimate;
  {
    Task& t = rec->task;
    t.status = TaskStatus::kRunning;
    t.attempt += 1;
    t.started_at = clock_->now();
    t.service_instance_id = lease.instance_id();
    rec->instance_id = lease.instance_id();
    rec->started_steady = start;
    rec->last_mb.store(-1);
    rec->peak_mb.store(-1);
    rec->memory_warned.store(false);
    rec->device_warned = false;
    rec->timeout_s = timeout_for(t.options_json);
    rec->deadline = rec->timeout_s > 0 ? start + from_seconds(rec->timeout_s) : SteadyTime{};
    rec->timed_out.store(false);
    running_recs_.push_back(rec);
    rec->temp_dir.clear();
    device = lease.device();
    options = t.options_json;
    attempt = t.attempt;
    batch = t.batch_size;
    estimate = t.estimated_memory_mb.value_or(0);
    const double wait = seconds(start - rec->queued_steady);
    wait_hist_.record(wait);
    // The spec's on_task_resource_acquired: log and track the acquisition.
    if (log_.enabled(LogLevel::kDebug)) {
      log_.write(LogLevel::kDebug, "task " + t.id + " acquired " + lease.instance_id() + " and " +
                                       std::to_string(rec->reserved_mb) + " MB on " + lease.device());
    }
    ++started_;
    Batch b;
    add_event(b, *rec, TaskEvent::kResourceAcquired,
              {{"device", device},
               {"service_instance_id", lease.instance_id()},
               {"reserved_mb", rec->reserved_mb},
               {"estimated_memory_mb", estimate}});
    add_event(b, *rec, TaskEvent::kStarted,
              {{"attempt", attempt}, {"batch_size", batch}, {"wait_s", detail::JsonValue::seconds(wait)}});
    commit_locked(rec, b);
  }
  lock.unlock();
  drain();

  Context ctx(*this, rec, device, lease.instance_id(), attempt, batch, estimate, options);
  std::exception_ptr err;
  try {
    ctx.throw_if_cancelled();
    lease.service().process(ctx);
  } catch (...) {
    err = std::current_exception();
  }
  proc_hist_.record(seconds(clock_->steady_now() - start));

  Outcome o = decide(rec, err, ctx);
  if (o.failure.instance_broken) lease.discard();
  Service* svc = lease.has_instance() ? &lease.service() : nullptr;
  {
    auto g = detail::spin_lock(mu_);
    Batch b;
    rec->temp_dir = ctx.created_temp();
    begin_cleanup_locked(rec, std::move(o), b);
    commit_locked(rec, b);
  }
  // Not drained here: the outcome and cleanup_started go out with the end of
  // the cleanup (one store write, one publication), a hook's time later. A
  // hook that hangs does not hold them: any other drain (other tasks, the
  // sweep, a reader) writes the outbox.
  // The service's cache hook, watched by the sweep (cleanup_timeout_seconds).
  if (svc != nullptr) svc->cleanup_task(rec->task.id);
  int expected = 1;
  const bool mine = rec->cleanup_phase.compare_exchange_strong(expected, 0);
  if (!mine) lease.discard();  // the watchdog gave up on this instance
  lease.release();
  detail::spin_relock(lock);
  cleanups_.erase(std::remove(cleanups_.begin(), cleanups_.end(), rec), cleanups_.end());
  running_recs_.erase(std::remove(running_recs_.begin(), running_recs_.end(), rec),
                      running_recs_.end());
  Batch b;
  if (mine) {
    finish_cleanup_locked(rec, true, "", b);
    commit_locked(rec, b);
  }
  --running_;
  --running_by_device_[device];
  done_cv_.notify_all();
}

Outcome TaskManager::Impl::decide(const RecordPtr& rec, std::exception_ptr err, Context& ctx) {
  Outcome o;
  if (rec->peak_mb.load() >= 0) o.peak_mb = rec->peak_mb.load();
  if (!rec->cancel.load() && (rec->timed_out.load() || (err && ctx.deadline_exceeded()))) {
    // Past its deadline: TIMEOUT, not retried. An instance that had to be
    // waited for past the deadline (the sweep saw it) is replaced.
    o.kind = Outcome::Kind::kFailed;
    if (err) o.failure = TaskErrorHandler::classify(err);
    const bool cooperated = err && o.failure.reason == TaskFailureReason::kTimeout;
    o.failure.reason = TaskFailureReason::kTimeout;
    o.failure.retryable = false;
    o.failure.out_of_memory = false;
    o.failure.instance_broken = o.failure.instance_broken || (rec->timed_out.load() && !cooperated);
    o.failure.message = "task " + rec->task.id + " ran past its deadline of " +
                        format_seconds(rec->timeout_s) + " s (" +
                        (timeout_from_options(rec->task.options_json) ? "options.timeout_seconds"
                                                                       : "tasks.task_timeout_seconds") +
                        ")" + (o.failure.message.empty() || cooperated ? "" : ": " + o.failure.message);
    o.decision.retry = false;
    o.decision.final_reason = TaskFailureReason::kTimeout;
    o.decision.final_message = o.failure.message;
    return o;
  }
  if (!err) {
    o.kind = Outcome::Kind::kCompleted;
    o.result = ctx.take_result();
    return o;
  }
  o.failure = TaskErrorHandler::classify(err);
  if (rec->cancel.load()) {
    o.kind = Outcome::Kind::kCancelled;
    o.failure.reason = TaskFailureReason::kCancelled;
    return o;
  }
  Task snap;
  MemoryState state;
  bool cpu_ok = false;
  {
    auto g = detail::spin_lock(mu_);
    const Task& t = rec->task;
    snap.id = t.id;
    snap.assigned_device = t.assigned_device;
    snap.attempt = t.attempt;
    snap.batch_size = t.batch_size;
    snap.estimated_memory_mb = t.estimated_memory_mb;
    state = memory_state_locked(*rec);
    if (auto cpu = devices_->get("cpu")) cpu_ok = supports(t.service, *cpu);
  }
  o.decision = handler_->handle_failure(snap, o.failure, state, cpu_ok);
  o.kind = o.decision.retry ? Outcome::Kind::kRetry : Outcome::Kind::kFailed;
  return o;
}

MemoryState TaskManager::Impl::memory_state_locked(const Record& r) const {
  MemoryState s;
  s.devices = devices_->list();
  s.device = r.task.assigned_device.value_or("");
  s.task_estimate_mb = r.task.estimated_memory_mb.value_or(0);
  if (r.peak_mb.load() >= 0) s.task_peak_mb = r.peak_mb.load();
  return s;
}

void TaskManager::Impl::begin_cleanup_locked(const RecordPtr& rec, Outcome o, Batch& b) {
  Task& t = rec->task;
  const std::string device = t.assigned_device.value_or("");
  if (o.peak_mb) {
    t.actual_memory_mb = *o.peak_mb;
    auto& peak = peak_by_device_[device];
    peak = std::max(peak, *o.peak_mb);
  }
  const double proc = seconds(clock_->steady_now() - rec->started_steady);
  if ((o.kind == Outcome::Kind::kRetry || o.kind == Outcome::Kind::kFailed) &&
      o.decision.alert) {
    ++ooms_;
    ++warnings_;
    add_event(b, *rec, TaskEvent::kMemoryWarning,
              {{"kind", "out_of_memory"},
               {"alert", true},
               {"device", device},
               {"message", o.failure.message},
               {"memory_state", detail::JsonValue::raw(o.decision.memory_state_json)}});
  }
  switch (o.kind) {
    case Outcome::Kind::kCompleted:
      t.status = TaskStatus::kCompleted;
      t.result = o.result;
      t.finished_at = clock_->now();
      ++completed_;
      add_event(b, *rec, TaskEvent::kCompleted,
                {{"attempt", t.attempt},
                 {"processing_time_s", detail::JsonValue::seconds(proc)},
                 {"actual_memory_mb", o.peak_mb}});
      break;
    case Outcome::Kind::kCancelled:
      t.status = TaskStatus::kCancelled;
      t.failure_reason = TaskFailureReason::kCancelled;
      t.failure_message = "cancelled by the host while running";
      t.finished_at = clock_->now();
      ++cancelled_;
      add_event(b, *rec, TaskEvent::kCancelled, {{"while", "running"}, {"attempt", t.attempt}});
      break;
    case Outcome::Kind::kFailed:
      t.status = TaskStatus::kFailed;
      t.failure_reason = o.decision.final_reason;
      t.failure_message = o.decision.final_message;
      t.finished_at = clock_->now();
      ++failed_;
      ++failed_by_reason_[std::string(to_string(t.failure_reason))];
      add_event(b, *rec, TaskEvent::kFailed,
                {{"reason", to_string(t.failure_reason)},
                 {"message", t.failure_message},
                 {"attempt", t.attempt}});
      break;
    case Outcome::Kind::kRetry:
      ++retries_;
      t.status = TaskStatus::kQueued;  // waiting for its next attempt
      if (o.decision.cpu_fallback) {
        ++fallbacks_;
        add_event(b, *rec, TaskEvent::kDeviceFallback,
                  {{"from", device}, {"to", o.decision.device}, {"reason", to_string(o.failure.reason)}});
      }
      add_event(b, *rec, TaskEvent::kRetried,
                {{"reason", to_string(o.failure.reason)},
                 {"message", o.failure.message},
                 {"attempt", t.attempt},
                 {"next_attempt", t.attempt + 1},
                 {"device", o.decision.device},
                 {"batch_size", o.decision.batch_size},
                 {"delay_s", detail::JsonValue::seconds(seconds(o.decision.delay))}});
      break;
  }
  add_event(b, *rec, TaskEvent::kCleanupStarted, {{"attempt", t.attempt}});
  rec->pending = std::move(o);
  rec->cleanup_started = clock_->steady_now();
  rec->cleanup_deadline = rec->cleanup_started + from_seconds(config_.tasks.cleanup_timeout_seconds);
  rec->cleanup_phase.store(1);
  cleanups_.push_back(rec);
}

// The second half of a cleanup: reservation, temp dir, verification
// (the spec's on_task_cleanup_completed), then retry or finish.
void TaskManager::Impl::finish_cleanup_locked(const RecordPtr& rec, bool hook_ok,
                                              const std::string& problem, Batch& b) {
  Task& t = rec->task;
  std::vector<std::string> problems;
  if (!hook_ok) problems.push_back(problem);
  if (!rec->temp_dir.empty()) {
    std::error_code ec;
    fs::remove_all(rec->temp_dir, ec);
  }
  const std::int64_t released = rec->reserved_mb;
  if (!rec->reserved_device.empty()) devices_->release(rec->reserved_device, rec->reserved_mb);
  rec->reserved_mb = 0;
  add_event(b, *rec, TaskEvent::kResourceReleased,
            {{"device", t.assigned_device.value_or("")},
             {"service_instance_id", rec->instance_id},
             {"reserved_mb", released}});
  rec->reserved_device.clear();
  // on_task_cleanup_completed: verify, and update the task's resource tracking.
  if (!rec->temp_dir.empty() && fs::exists(rec->temp_dir)) {
    problems.push_back("temp dir " + rec->temp_dir + " still exists");
  }
  if (rec->reserved_mb != 0) problems.push_back("memory reservation not released");
  const bool ok = problems.empty();
  t.resource_cleanup_completed = ok;
  if (!ok) ++cleanup_failures_;
  std::string pj = "[";
  for (const auto& p : problems) {
    if (pj.size() > 1) pj += ',';
    detail::JsonValue::append_string(pj, p);
  }
  pj += ']';
  add_event(b, *rec, TaskEvent::kCleanupCompleted,
            {{"ok", ok},
             {"attempt", t.attempt},
             {"duration_s", detail::JsonValue::seconds(seconds(clock_->steady_now() - rec->cleanup_started))},
             {"problems", detail::JsonValue::raw(pj)}});
  if (!ok) {
    log_.write(LogLevel::kWarn, "cleanup of task " + t.id + " incomplete: " + problems.front());
  }
  rec->temp_dir.clear();

  Outcome& o = rec->pending;
  if (o.peak_mb && config_.tasks.enable_resource_tracking) {
    estimator_.record_actual(t.service, t.assigned_device.value_or(""), rec->features, *o.peak_mb);
  }
  if (o.kind == Outcome::Kind::kRetry) {
    apply_retry_locked(rec, o.decision, b);
  } else {
    finished_locked(rec);
  }
}

void TaskManager::Impl::apply_retry_locked(const RecordPtr& rec, const RetryDecision& d,
                                           Batch& b) {
  Task& t = rec->task;
  t.assigned_device = d.device;
  t.batch_size = d.batch_size;
  rec->features.batch_size = d.batch_size;
  if (config_.tasks.enable_resource_tracking) {
    t.estimated_memory_mb = estimator_.estimate(t.service, rec->features, d.device).mb;
  }
  t.status = TaskStatus::kQueued;
  if (d.delay <= Duration::zero()) {
    enqueue_locked(rec, b, true);
    return;
  }
  rec->phase = Phase::kBackoff;
  ++backoff_;
  ++backoff_by_device_[d.device];
  // Captures `this`, as every timer and worker job does: ~Impl joins the
  // timer thread and the workers before any member goes. (A weak_ptr here
  // could make the timer thread the last owner and have it join itself.)
  Impl* self = this;
  rec->retry_timer = timers_->schedule_after(d.delay, [self, rec] {
    auto g = detail::spin_lock(self->mu_);
    if (rec->phase != Phase::kBackoff || self->closing_) return;
    --self->backoff_;
    --self->backoff_by_device_[*rec->task.assigned_device];
    Batch batch;
    self->enqueue_locked(rec, batch, true);
    self->commit_locked(rec, batch);
    self->dispatch_locked();
    g.unlock();
    self->drain();
  });
}

// A task that could not start (its pool stayed full): counts as an attempt.
void TaskManager::Impl::retry_unstarted_locked(const RecordPtr& rec, const FailureInfo& f,
                                               Batch& b) {
  Task& t = rec->task;
  t.attempt += 1;
  Task snap;
  snap.id = t.id;
  snap.assigned_device = t.assigned_device;
  snap.attempt = t.attempt;
  snap.batch_size = t.batch_size;
  snap.estimated_memory_mb = t.estimated_memory_mb;
  const RetryDecision d = handler_->handle_failure(snap, f, memory_state_locked(*rec), true);
  if (!d.retry) {
    end_unstarted_locked(rec, TaskStatus::kFailed, d.final_reason, d.final_message, b);
    return;
  }
  ++retries_;
  add_event(b, *rec, TaskEvent::kRetried,
            {{"reason", to_string(f.reason)},
             {"message", f.message},
             {"attempt", t.attempt},
             {"next_attempt", t.attempt + 1},
             {"device", d.device},
             {"batch_size", d.batch_size},
             {"delay_s", detail::JsonValue::seconds(seconds(d.delay))}});
  apply_retry_locked(rec, d, b);
}

// ---- recovery at open ---------------------------------------------------------------
// Tasks the store holds unfinished come back: pending ones stay pending,
// queued ones are queued again in their original order, and ones that were
// running when the process died get a `retried` event with reason
// "interrupted" (the attempt counts) or, out of attempts, end failed
// INTERRUPTED. Their cleanup is redone (the dead run's temp dirs are removed
// by remove_dead_temp_dirs()).
void TaskManager::Impl::recover() {
  std::vector<Task> tasks = store_->load_unfinished();
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    const Timestamp qa = a.queued_at.value_or(a.created_at);
    const Timestamp qb = b.queued_at.value_or(b.created_at);
    return qa < qb;
  });
  auto g = detail::spin_lock(mu_);
  for (Task& t : tasks) {
    auto rec = std::make_shared<Record>();
    TaskCreateRequest req;
    req.service = t.service;
    req.input = t.input;
    req.options_json = t.options_json;
    req.batch_size = std::max(1, t.batch_size);
    rec->features = estimator_.features(req);
    rec->task = std::move(t);
    Task& task = rec->task;
    put_locked(rec);
    Batch b;
    if (task.status == TaskStatus::kPending) {
      rec->phase = Phase::kPending;
      continue;
    }
    if (is_terminal(task.status)) {
      // Ended, but the process died during its cleanup: finish it. The dead
      // run's temp dirs are gone (remove_dead_temp_dirs), its reservations
      // and pool leases died with it.
      add_event(b, *rec, TaskEvent::kResourceReleased,
                {{"device", task.assigned_device.value_or("")}, {"recovered", true}});
      add_event(b, *rec, TaskEvent::kCleanupCompleted,
                {{"ok", true}, {"attempt", task.attempt}, {"recovered", true},
                 {"duration_s", detail::JsonValue::seconds(0.0)}});
      task.resource_cleanup_completed = true;
      finished_locked(rec);
      commit_locked(rec, b);
      continue;
    }
    const bool was_running = task.status == TaskStatus::kRunning;
    if (was_running) {
      add_event(b, *rec, TaskEvent::kCleanupStarted, {{"attempt", task.attempt}, {"recovered", true}});
      add_event(b, *rec, TaskEvent::kCleanupCompleted,
                {{"ok", true}, {"attempt", task.attempt}, {"recovered", true},
                 {"duration_s", detail::JsonValue::seconds(0.0)}});
      task.resource_cleanup_completed = true;
      if (task.attempt >= config_.tasks.retry.max_attempts) {
        end_unstarted_locked(rec, TaskStatus::kFailed, TaskFailureReason::kInterrupted,
                             "the process stopped while the task ran (attempt " +
                                 std::to_string(task.attempt) + " of " +
                                 std::to_string(config_.tasks.retry.max_attempts) +
                                 "); no attempts left",
                             b);
        commit_locked(rec, b);
        continue;
      }
      ++retries_;
      add_event(b, *rec, TaskEvent::kRetried,
                {{"reason", "interrupted"},
                 {"message", "the process stopped while the task ran"},
                 {"attempt", task.attempt},
                 {"next_attempt", task.attempt + 1},
                 {"device", task.assigned_device.value_or("")},
                 {"batch_size", task.batch_size},
                 {"delay_s", detail::JsonValue::seconds(0.0)}});
    }
    // Queued again on its device, or another one if that is gone.
    const std::string device = task.assigned_device.value_or("");
    if (!devices_->free_memory(device)) {
      try {
        task.assigned_device = devices_->select_device(task.estimated_memory_mb.value_or(0), "",
                                                       support_filter(task.service));
      } catch (const Error& e) {
        end_unstarted_locked(rec, TaskStatus::kFailed, TaskFailureReason::kDeviceUnavailable,
                             std::string("recovered task has no device: ") + e.what(), b);
        commit_locked(rec, b);
        continue;
      }
    }
    enqueue_locked(rec, b, was_running, /*recovered=*/true);
    commit_locked(rec, b);
  }
  if (!tasks.empty()) {
    log_.write(LogLevel::kInfo, "recovered " + std::to_string(tasks.size()) +
                                    " unfinished task(s) from " + store_->describe());
  }
  dispatch_locked();
}

void TaskManager::Impl::remove_dead_temp_dirs() {
  std::error_code ec;
  const fs::path root = config_.tasks.temp_dir.empty() ? fs::temp_directory_path(ec)
                                                       : fs::path(config_.tasks.temp_dir);
  if (ec) return;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind("taskmgr-", 0) != 0) continue;
    const std::string rest = name.substr(8);
    const auto dash = rest.find('-');
    if (dash == std::string::npos) continue;
    long pid = 0;
    try {
      pid = std::stol(rest.substr(0, dash));
    } catch (...) {
      continue;
    }
    if (pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive
    std::error_code rm;
    fs::remove_all(it->path(), rm);
  }
}

// ---- the periodic sweep ---------------------------------------------------------
void TaskManager::Impl::schedule_sweep() {
  // Captures `this`: the timer thread is joined first thing in ~Impl.
  timers_->schedule_after(sweep_interval_, [this] {
    sweep();
    drain();
    schedule_sweep();
  });
}

void TaskManager::Impl::prune_retention() {
  const double days = config_.storage.retention_days;
  if (days <= 0) return;
  last_prune_ = clock_->steady_now();
  // At most 100 years back: larger values would overflow the clock's range.
  const Timestamp cutoff =
      clock_->now() - std::chrono::duration_cast<Timestamp::duration>(
                          std::chrono::duration<double>(std::min(days * 86400.0, 100 * 365.25 * 86400.0)));
  try {
    const std::size_t n = store_->prune_finished(cutoff);
    if (n > 0) {
      log_.write(LogLevel::kInfo, "retention: deleted " + std::to_string(n) +
                                      " task(s) finished before " + format_timestamp(cutoff) +
                                      " (storage.retention_days = " + std::to_string(days) + ")");
    }
  } catch (const std::exception& e) {
    log_.write(LogLevel::kWarn, std::string("retention: pruning the store failed: ") + e.what());
  }
  // The recent finished tasks kept in memory follow the store.
  auto g = detail::spin_lock(mu_);
  std::deque<RecordPtr> kept;
  for (auto& rec : finished_fifo_) {
    if (rec->task.finished_at && *rec->task.finished_at < cutoff &&
        rec->task.resource_cleanup_completed) {
      records_.erase(rec->task.id);
    } else {
      kept.push_back(std::move(rec));
    }
  }
  finished_fifo_.swap(kept);
}

void TaskManager::Impl::sweep() {
  const SteadyTime now = clock_->steady_now();
  // Hourly, or four times per retention period when that is shorter.
  if (config_.storage.retention_days > 0 &&
      now - last_prune_ >= from_seconds(std::min(3600.0, config_.storage.retention_days * 86400 / 4))) {
    prune_retention();
  }
  const bool refresh = now - last_refresh_ >= std::chrono::seconds(1);
  if (refresh) {
    devices_->refresh_observed();
    last_refresh_ = now;
  }
  auto g = detail::spin_lock(mu_);
  if (closed_) return;
  // Queue timeouts.
  for (const auto& q : queue_->take_expired(now - from_seconds(config_.tasks.queue_timeout_seconds))) {
    RecordPtr rec = find_locked(q.task_id);
    if (!rec) continue;
    Batch b;
    end_unstarted_locked(rec, TaskStatus::kFailed, TaskFailureReason::kQueueTimeout,
                         "waited " + std::to_string(seconds(now - rec->queued_steady)) +
                             " s in the queue of " + q.device +
                             " (tasks.queue_timeout_seconds = " +
                             std::to_string(config_.tasks.queue_timeout_seconds) + ")",
                         b);
    commit_locked(rec, b);
  }
  // Pools that stayed full past their acquire timeout: POOL_EXHAUSTED.
  for (auto it = pool_blocked_.begin(); it != pool_blocked_.end();) {
    const auto at = it->first.find('@');
    const std::string service = it->first.substr(0, at);
    const std::string device = it->first.substr(at + 1);
    ServicePool& pool = *pools_.at(service);
    const Duration limit = from_seconds(pool.settings(device).acquire_timeout_seconds);
    if (pool.has_capacity(device)) {
      it = pool_blocked_.erase(it);
      continue;
    }
    if (now - it->second < limit) {
      ++it;
      continue;
    }
    auto head = queue_->peek_next_task(device);
    it = pool_blocked_.erase(it);
    if (!head || head->service != service) continue;
    queue_->remove(head->task_id);
    RecordPtr rec = find_locked(head->task_id);
    FailureInfo f;
    f.reason = TaskFailureReason::kPoolExhausted;
    f.retryable = true;
    f.message = "no '" + service + "' instance on " + device + " became free within " +
                std::to_string(seconds(limit)) + " s (pool max " +
                std::to_string(pool.settings(device).max_instances) + ")";
    Batch b;
    retry_unstarted_locked(rec, f, b);
    commit_locked(rec, b);
  }
  // Attempts running past their deadline: they end TIMEOUT when process()
  // returns (a cooperative service sees deadline_exceeded() and stops), and
  // an instance that had to be waited for is replaced.
  for (const auto& rec : running_recs_) {
    if (rec->timeout_s > 0 && now >= rec->deadline && !rec->timed_out.exchange(true)) {
      log_.write(LogLevel::kWarn, "task " + rec->task.id + " is running past its deadline of " +
                                      format_seconds(rec->timeout_s) + " s on " + rec->instance_id +
                                      ": it will end TIMEOUT and the instance will be replaced");
    }
  }
  // Cleanup hooks past cleanup_timeout_seconds: finish the cleanup without them.
  for (auto it = cleanups_.begin(); it != cleanups_.end();) {
    RecordPtr rec = *it;
    int expected = 1;
    if (now >= rec->cleanup_deadline && rec->cleanup_phase.compare_exchange_strong(expected, 2)) {
      it = cleanups_.erase(it);
      Batch b;
      finish_cleanup_locked(rec, false,
                            "the service's cleanup hook ran past tasks.cleanup_timeout_seconds = " +
                                std::to_string(config_.tasks.cleanup_timeout_seconds) +
                                " s; its instance will be replaced",
                            b);
      commit_locked(rec, b);
    } else {
      ++it;
    }
  }
  // Devices nearly full: warn the tasks running there, once per attempt.
  if (refresh && config_.tasks.enable_resource_tracking) {
    for (const auto& d : devices_->list()) {
      const std::int64_t used = std::max(d.observed_mb, d.reserved_mb);
      if (static_cast<double>(used) <
          config_.tasks.device_warning_fraction * static_cast<double>(d.total_mb)) {
        continue;
      }
      for (auto& [id, rec] : records_) {
        if (rec->phase != Phase::kRunning || rec->device_warned ||
            rec->task.assigned_device != d.id) {
          continue;
        }
        rec->device_warned = true;
        ++warnings_;
        Batch b;
        add_event(b, *rec, TaskEvent::kMemoryWarning,
                  {{"kind", "device_nearly_full"},
                   {"device", d.id},
                   {"used_mb", used},
                   {"total_mb", d.total_mb},
                   {"message", d.id + " is " + std::to_string(used) + " of " +
                                   std::to_string(d.total_mb) + " MB full"}});
        commit_locked(rec, b);
      }
    }
  }
  dispatch_locked();
}

// ---- queries ------------------------------------------------------------------------
Task TaskManager::Impl::get_task(const std::string& id) const {
  {
    auto g = detail::spin_lock(mu_);
    if (RecordPtr rec = find_locked(id)) return rec->task;
  }
  const_cast<Impl*>(this)->drain(true);
  if (auto t = store_->load_task(id)) return *t;
  throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
}

std::vector<Task> TaskManager::Impl::list_tasks(const TaskFilter& filter) const {
  const_cast<Impl*>(this)->drain(true);
  return store_->list_tasks(filter);
}

std::optional<Task> TaskManager::Impl::wait_task(const std::string& id, Duration timeout) const {
  const SteadyTime deadline = clock_->steady_now() + timeout;
  auto lock = detail::spin_lock(mu_);
  RecordPtr rec = find_locked(id);
  if (!rec) {
    lock.unlock();
    if (auto t = store_->load_task(id); t && is_terminal(t->status)) return t;
    if (store_->load_task(id)) return std::nullopt;
    throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
  }
  while (rec->phase != Phase::kDone) {
    if (clock_->steady_now() >= deadline) return std::nullopt;
    clock_->wait_until(lock, done_cv_, deadline);
  }
  Task t = rec->task;
  lock.unlock();
  const_cast<Impl*>(this)->drain(true);  // its events are in the store and on the bus
  return t;
}

bool TaskManager::Impl::wait_idle(Duration timeout) const {
  const SteadyTime deadline = clock_->steady_now() + timeout;
  auto lock = detail::spin_lock(mu_);
  while (running_ > 0 || backoff_ > 0 || queue_->size() > 0) {
    if (clock_->steady_now() >= deadline) return false;
    clock_->wait_until(lock, done_cv_, deadline);
  }
  lock.unlock();
  const_cast<Impl*>(this)->drain(true);
  return true;
}

TaskMetrics TaskManager::Impl::metrics() const {
  TaskMetrics m;
  auto g = detail::spin_lock(mu_);
  const auto queued = queue_->sizes();
  std::int64_t active_total = 0, queued_total = 0;
  for (const auto& d : devices_->list()) {
    const auto r = running_by_device_.find(d.id);
    const std::int64_t active = r == running_by_device_.end() ? 0 : r->second;
    const auto q = queued.find(d.id);
    const auto bo = backoff_by_device_.find(d.id);
    const std::int64_t waiting = (q == queued.end() ? 0 : static_cast<std::int64_t>(q->second)) +
                                 (bo == backoff_by_device_.end() ? 0 : bo->second);
    m.active_tasks[d.id] = active;
    m.queued_tasks[d.id] = waiting;
    active_total += active;
    queued_total += waiting;
    DeviceMemoryMetrics dm;
    dm.total_mb = d.total_mb;
    dm.reserved_mb = d.reserved_mb;
    dm.observed_mb = d.observed_mb;
    dm.available = d.available;
    auto pk = peak_by_device_.find(d.id);
    dm.peak_task_mb = pk == peak_by_device_.end() ? 0 : pk->second;
    m.memory_by_device[d.id] = dm;
  }
  m.active_tasks["total"] = active_total;
  m.queued_tasks["total"] = queued_total;
  for (const auto& [kind, pool] : pools_) {
    for (const auto& d : devices_->list()) {
      if (!supports(kind, d)) continue;
      const auto s = pool->stats(d.id);
      PoolMetrics p;
      p.service = kind;
      p.device = d.id;
      p.in_use = s.in_use;
      p.size = s.in_use + s.idle;
      p.max = s.max;
      p.utilization = s.max > 0 ? static_cast<double>(s.in_use) / s.max : 0;
      p.created = s.created;
      p.destroyed = s.destroyed;
      m.pool_utilization[pool_key(kind, d.id)] = p;
    }
  }
  m.wait_time = wait_hist_.summary();
  m.processing_time = proc_hist_.summary();
  m.average_wait_time = m.wait_time.mean_s;
  m.tasks_created = created_;
  m.tasks_started = started_;
  m.tasks_completed = completed_;
  m.tasks_failed = failed_;
  m.tasks_cancelled = cancelled_;
  m.failed_by_reason = failed_by_reason_;
  m.retries = retries_;
  m.oom_errors = ooms_;
  m.cpu_fallbacks = fallbacks_;
  m.memory_warnings = warnings_;
  m.queue_full_rejections = queue_full_;
  m.cleanup_failures = cleanup_failures_;
  m.events_published = bus_.published();
  m.events_dropped = bus_.dropped();
  m.callback_errors = bus_.callback_errors();
  m.store = store_->stats();
  return m;
}

TaskHealth TaskManager::Impl::health(const std::string& id) const {
  TaskHealth h;
  h.task_id = id;
  Task t;
  bool running = false;
  std::int64_t live_mb = -1;
  double live_s = 0;
  double queued_for = -1;
  double past_deadline = -1;  // seconds past its deadline, when running past it
  double deadline_s = 0;
  {
    auto g = detail::spin_lock(mu_);
    if (RecordPtr rec = find_locked(id)) {
      t = rec->task;
      running = rec->phase == Phase::kRunning;
      if (running) {
        live_mb = rec->last_mb.load();
        live_s = seconds(clock_->steady_now() - rec->started_steady);
        if (rec->timeout_s > 0 && clock_->steady_now() >= rec->deadline) {
          past_deadline = seconds(clock_->steady_now() - rec->deadline);
          deadline_s = rec->timeout_s;
        }
      }
      if (rec->phase == Phase::kQueued) queued_for = seconds(clock_->steady_now() - rec->queued_steady);
    } else if (auto st = store_->load_task(id)) {
      t = *st;
    } else {
      throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
    }
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
  // Warnings, from the task and its event history.
  if (h.memory_usage_mb && t.estimated_memory_mb && *h.memory_usage_mb > *t.estimated_memory_mb) {
    h.warnings.push_back("memory " + std::to_string(*h.memory_usage_mb) +
                         " MB is above the estimate of " + std::to_string(*t.estimated_memory_mb) +
                         " MB");
  }
  if (past_deadline >= 0) {
    h.warnings.push_back("running past its deadline of " + format_seconds(deadline_s) + " s (by " +
                         format_seconds(past_deadline) + " s): it will end TIMEOUT");
  }
  const double long_wait = 0.5 * config_.tasks.queue_timeout_seconds;
  if (queued_for > long_wait) {
    h.warnings.push_back("queued for " + std::to_string(static_cast<int>(queued_for)) +
                         " s (timeout " +
                         std::to_string(static_cast<int>(config_.tasks.queue_timeout_seconds)) +
                         " s)");
  }
  const_cast<Impl*>(this)->drain(true);
  for (const auto& e : store_->load_events(id)) {
    boost::system::error_code ec;
    auto d = json::parse(e.details_json, ec);
    if (ec || !d.is_object()) continue;
    const auto& o = d.as_object();
    auto str = [&o](const char* k) -> std::string {
      auto it = o.find(k);
      return it != o.end() && it->value().is_string() ? std::string(it->value().as_string()) : "";
    };
    if (e.event == TaskEvent::kMemoryWarning) {
      h.warnings.push_back("memory warning (" + str("kind") + "): " + str("message"));
    } else if (e.event == TaskEvent::kRetried) {
      h.warnings.push_back("retried after " + str("reason") + " on attempt " +
                           (o.contains("attempt") ? json::serialize(o.at("attempt")) : "?") + ": " +
                           str("message"));
    } else if (e.event == TaskEvent::kStarted && o.contains("wait_s") &&
               o.at("wait_s").is_double() && o.at("wait_s").as_double() > long_wait) {
      h.warnings.push_back("waited " + std::to_string(static_cast<int>(o.at("wait_s").as_double())) +
                           " s in the queue");
    } else if (e.event == TaskEvent::kCleanupCompleted && o.contains("ok") &&
               o.at("ok").is_bool() && !o.at("ok").as_bool()) {
      std::string why;
      if (o.contains("problems") && o.at("problems").is_array() &&
          !o.at("problems").as_array().empty() && o.at("problems").as_array()[0].is_string()) {
        why = std::string(o.at("problems").as_array()[0].as_string());
      }
      h.warnings.push_back("cleanup incomplete: " + why);
    }
  }
  return h;
}

void TaskManager::Impl::set_device_available(const std::string& device, bool available) {
  devices_->set_available(device, available);  // kNotFound for an unknown id
  auto g = detail::spin_lock(mu_);
  if (!available) {
    for (const auto& q : queue_->snapshot(device)) {
      RecordPtr rec = find_locked(q.task_id);
      if (!rec) continue;
      queue_->remove(q.task_id);
      Batch b;
      try {
        const std::string to = devices_->select_device(q.estimated_memory_mb, "",
                                                       support_filter(q.service));
        add_event(b, *rec, TaskEvent::kDeviceFallback,
                  {{"from", device}, {"to", to}, {"reason", "device_unavailable"}});
        rec->task.assigned_device = to;
        QueuedTask moved = q;
        moved.device = to;
        queue_->add_task(moved, q.priority);  // one out, one in: never full
        add_event(b, *rec, TaskEvent::kQueued,
                  {{"device", to}, {"priority", q.priority}, {"retry", false}});
      } catch (const Error& e) {
        end_unstarted_locked(rec, TaskStatus::kFailed, TaskFailureReason::kDeviceUnavailable,
                             device + " became unavailable and no other device can hold the task: " +
                                 e.what(),
                             b);
      }
      commit_locked(rec, b);
    }
  }
  dispatch_locked();
}

MemoryEstimate TaskManager::Impl::explain(const TaskCreateRequest& request) const {
  return estimator_.estimate(request);
}

void TaskManager::Impl::close() {
  if (detail::in_host_call()) {
    throw Error(ErrorCode::kInvalidState,
                "close() was called from a taskmgr thread (an event callback, a log sink or a "
                "service); it would wait for itself: close the manager from another thread");
  }
  auto lock = detail::spin_lock(mu_);
  if (closed_) return;
  closing_ = true;
  // Running attempts finish; their cleanup completes. Queued and backing-off
  // tasks stay queued in the store.
  while (running_ > 0) done_cv_.wait_for(lock, std::chrono::milliseconds(50));
  closed_ = true;
  lock.unlock();
  drain(true);
  try {
    store_->flush();
  } catch (const std::exception& e) {
    log_.write(LogLevel::kError, std::string("flushing the store at close failed: ") + e.what());
  }
  bus_.flush();
}

// ---------------------------------------------------------------------------
TaskManager::TaskManager(Config config, TaskManagerOptions options)
    : impl_(std::make_shared<Impl>(std::move(config), std::move(options))) {}

TaskManager::~TaskManager() {
  if (impl_ && detail::in_host_call()) {
    // Destroying the manager from its own threads cannot be done safely.
    impl_->log_.write(LogLevel::kError,
                      "TaskManager destroyed from a taskmgr thread (a callback, log sink or "
                      "service): leaking it");
    new std::shared_ptr<Impl>(std::move(impl_));
    return;
  }
}

void TaskManager::register_service(std::shared_ptr<ServiceFactory> f) {
  impl_->register_service(std::move(f));
}
Task TaskManager::create_task(const TaskCreateRequest& r) { return impl_->create_task(r); }
std::vector<Task> TaskManager::create_tasks(const std::vector<TaskCreateRequest>& r) {
  return impl_->create_tasks(r);
}
namespace {
// Writes what a call committed, however it returns.
struct DrainOnExit {
  TaskManager::Impl* impl;
  ~DrainOnExit();
};
}  // namespace

Task TaskManager::start_task(const std::string& id, const TaskStartRequest& p) {
  DrainOnExit d{impl_.get()};
  return impl_->start_task(id, p);
}
bool TaskManager::cancel_task(const std::string& id) {
  DrainOnExit d{impl_.get()};
  return impl_->cancel_task(id);
}
Task TaskManager::get_task(const std::string& id) const { return impl_->get_task(id); }
std::vector<Task> TaskManager::list_tasks(const TaskFilter& f) const { return impl_->list_tasks(f); }
std::vector<EventRecord> TaskManager::get_task_events(const std::string& id) const {
  get_task(id);  // kNotFound for an unknown id
  impl_->drain(true);
  return impl_->store_->load_events(id);
}
std::vector<MetricSample> TaskManager::get_task_samples(const std::string& id) const {
  get_task(id);
  impl_->drain(true);
  return impl_->store_->load_metrics(id);
}
std::optional<Task> TaskManager::wait_task(const std::string& id, Duration timeout) const {
  return impl_->wait_task(id, timeout);
}
bool TaskManager::wait_idle(Duration timeout) const { return impl_->wait_idle(timeout); }
TaskMetrics TaskManager::get_task_metrics() const { return impl_->metrics(); }
TaskHealth TaskManager::get_task_health(const std::string& id) const { return impl_->health(id); }
SubscriptionId TaskManager::subscribe(EventCallback cb) { return impl_->bus_.subscribe(std::move(cb)); }
bool TaskManager::unsubscribe(SubscriptionId id) { return impl_->bus_.unsubscribe(id); }
void TaskManager::flush_events() {
  impl_->drain(true);
  impl_->bus_.flush();
}
void TaskManager::set_device_available(const std::string& d, bool a) {
  DrainOnExit drain{impl_.get()};
  impl_->set_device_available(d, a);
}
std::vector<DeviceInfo> TaskManager::devices() const { return impl_->devices_->list(); }
MemoryEstimate TaskManager::explain_estimate(const TaskCreateRequest& r) const {
  return impl_->explain(r);
}
void TaskManager::close() { impl_->close(); }

DrainOnExit::~DrainOnExit() {
  try {
    impl->drain();
  } catch (...) {
  }
}
const Config& TaskManager::config() const noexcept { return impl_->config_; }

}  // namespace taskmgr
