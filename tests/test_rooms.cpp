// The manager's rooms on their own (src/manager/): the lifecycle table, the
// record table, the outbox, queue admission and the event vocabulary.
#include <doctest/doctest.h>

#include <atomic>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "event_keys.hpp"
#include "log_internal.hpp"
#include "manager/admission.hpp"
#include "manager/cluster.hpp"
#include "manager/lifecycle.hpp"
#include "manager/outbox.hpp"
#include "manager/record_table.hpp"
#include "manager/task_events.hpp"
#include "store/shared_queue.hpp"
#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::detail;
using namespace taskmgr::test;
using namespace std::chrono_literals;

namespace {

RecordPtr record(const std::string& id) {
  auto r = std::make_shared<Record>();
  r->unshared_task().id = id;
  r->unshared_task().service = "svc";
  return r;
}

}  // namespace

// ---- the lifecycle table ---------------------------------------------------------
TEST_CASE("lifecycle: every step is allowed from exactly the phases the table documents") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  using P = Phase;
  // The table of lifecycle.hpp, written out again: a change to one without
  // the other fails here.
  const std::map<Step, std::set<Phase>> from = {
      {Step::kCreate, {P::kNew}},
      {Step::kCreateQueued, {P::kNew}},
      {Step::kStart, {P::kPending}},
      {Step::kRecoverPending, {P::kNew}},
      {Step::kRecoverQueued, {P::kNew}},
      {Step::kRecoverEnded, {P::kNew}},
      {Step::kDispatch, {P::kQueued}},
      {Step::kEndAttempt, {P::kRunning}},
      {Step::kRequeue, {P::kCleanup, P::kQueued}},
      {Step::kBackoff, {P::kCleanup, P::kQueued}},
      {Step::kBackoffElapsed, {P::kBackoff}},
      {Step::kFinish, {P::kCleanup}},
      {Step::kEndWaiting, {P::kNew, P::kPending, P::kQueued, P::kBackoff, P::kCleanup}},
      {Step::kCountAttempt, {P::kQueued}},
      {Step::kRequeueUncounted, {P::kCleanup}},
      {Step::kHostRetry, {P::kDone}},
  };
  REQUIRE(from.size() == static_cast<std::size_t>(kStepCount));
  const Phase phases[] = {P::kNew,     P::kPending, P::kQueued, P::kBackoff,
                          P::kRunning, P::kCleanup, P::kDone};
  for (const auto& row : from) {
    const Step step = row.first;
    const std::set<Phase>& allowed = row.second;
    for (Phase p : phases) {
      CAPTURE(to_string(step));
      CAPTURE(to_string(p));
      CHECK(Lifecycle::allowed(p, step) == (allowed.count(p) > 0));
    }
  }
  // Nothing leaves Done but the host's retry of a failed or cancelled task.
  for (int s = 0; s < kStepCount; ++s) {
    CHECK(Lifecycle::allowed(P::kDone, static_cast<Step>(s)) ==
          (static_cast<Step>(s) == Step::kHostRetry));
  }
  CHECK(Lifecycle::status_allowed(Step::kHostRetry, TaskStatus::kQueued));
  CHECK(Lifecycle::status_allowed(Step::kEndAttempt, TaskStatus::kQueued));  // a retry
  CHECK_FALSE(Lifecycle::status_allowed(Step::kEndAttempt, TaskStatus::kPending));
  CHECK(Lifecycle::status_allowed(Step::kEndWaiting, TaskStatus::kCancelled));
  CHECK_FALSE(Lifecycle::status_allowed(Step::kEndWaiting, TaskStatus::kCompleted));
}

TEST_CASE("lifecycle: a dispatch counts the attempt and resets resource_cleanup_completed") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  SchedulerMutex mu;
  SchedulerLock g(mu);
  RecordPtr r = record("t");
  REQUIRE(Lifecycle::apply(*r, Step::kCreateQueued));
  CHECK(r->task.status == TaskStatus::kQueued);
  REQUIRE(Lifecycle::apply(*r, Step::kDispatch));
  CHECK(r->phase() == Phase::kRunning);
  CHECK(r->task.status == TaskStatus::kRunning);
  CHECK(r->task.attempt == 1);
  CHECK_FALSE(r->task.resource_cleanup_completed);
  REQUIRE(Lifecycle::apply(*r, Step::kEndAttempt, TaskStatus::kQueued));  // to be retried
  r->task.resource_cleanup_completed = true;                              // its cleanup ends
  REQUIRE(Lifecycle::apply(*r, Step::kRequeue));
  CHECK(r->task.resource_cleanup_completed);  // still the last attempt's
  REQUIRE(Lifecycle::apply(*r, Step::kDispatch));
  CHECK(r->task.attempt == 2);
  CHECK_FALSE(r->task.resource_cleanup_completed);  // the new attempt's cleanup is to come
  // Interrupted by close(): queued again, the attempt not charged.
  REQUIRE(Lifecycle::apply(*r, Step::kEndAttempt, TaskStatus::kQueued));
  REQUIRE(Lifecycle::apply(*r, Step::kRequeueUncounted));
  CHECK(r->phase() == Phase::kQueued);
  CHECK(r->task.status == TaskStatus::kQueued);
  CHECK(r->task.attempt == 1);
  REQUIRE(Lifecycle::apply(*r, Step::kDispatch));
  CHECK(r->task.attempt == 2);
  REQUIRE(Lifecycle::apply(*r, Step::kEndAttempt, TaskStatus::kCompleted));
  REQUIRE(Lifecycle::apply(*r, Step::kFinish));
  CHECK(r->phase() == Phase::kDone);
  CHECK(r->task.status == TaskStatus::kCompleted);
}

// ---- the record table ---------------------------------------------------------
TEST_CASE("record table: finds by id, keeps the recent finished ones, evicts the oldest") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  SchedulerMutex mu;
  SchedulerLock g(mu);
  RecordTable t;
  std::vector<RecordPtr> evicted;
  const std::size_t n = RecordTable::kFinishedKept + 10;
  for (std::size_t i = 0; i < n; ++i) {
    RecordPtr r = record("task-" + std::to_string(i));
    t.put(r);
    CHECK(t.find(r->id()) == r);
    t.finished(r, evicted);
  }
  REQUIRE(evicted.size() == 10);
  for (std::size_t i = 0; i < 10; ++i) {
    CHECK(evicted[i]->id() == "task-" + std::to_string(i));  // oldest first
    CHECK(t.find(evicted[i]->id()) == nullptr);
  }
  CHECK(t.find("task-10") != nullptr);
  CHECK(t.size() == RecordTable::kFinishedKept);
  // A record put again under the same id replaces the old one.
  RecordPtr again = record("task-20");
  t.put(again);
  CHECK(t.find("task-20") == again);
  // Retention: finished before the cutoff and cleaned up -> gone.
  const Timestamp now = std::chrono::system_clock::now();
  RecordPtr old = record("old"), fresh = record("fresh"), unclean = record("unclean");
  old->task.finished_at = now - std::chrono::hours(48);
  old->task.resource_cleanup_completed = true;
  unclean->task.finished_at = now - std::chrono::hours(48);
  fresh->task.finished_at = now;
  fresh->task.resource_cleanup_completed = true;
  for (auto& r : {old, fresh, unclean}) {
    t.put(r);
    t.finished(r, evicted);
  }
  t.prune_finished(now - std::chrono::hours(24));
  CHECK(t.find("old") == nullptr);
  CHECK(t.find("fresh") == fresh);
  CHECK(t.find("unclean") == unclean);  // its cleanup never finished: kept
}

// ---- the outbox ----------------------------------------------------------------
namespace {

// A store that counts writes and can hold the first one on a gate.
class CountingStore : public ForwardingStore {
 public:
  using ForwardingStore::ForwardingStore;
  void update_task(const Task& t, const std::vector<EventRecord>& e) override {
    if (hold_first.exchange(false)) {
      held = true;
      gate.wait();
    }
    if (fail_next.exchange(false)) throw Error(ErrorCode::kIoError, "disk on fire");
    ++updates;
    std::lock_guard<std::mutex> g(mu);
    order.push_back(t.id + ":" + std::to_string(e.size()));
    ForwardingStore::update_task(t, e);
  }
  void flush() override {
    ++flushes;
    if (fail_flush.load()) throw Error(ErrorCode::kIoError, "server gone");
    ForwardingStore::flush();
  }

  std::atomic<int> updates{0}, flushes{0};
  std::atomic<bool> hold_first{false}, held{false}, fail_next{false}, fail_flush{false};
  Gate gate;
  std::mutex mu;
  std::vector<std::string> order;
};

struct OutboxFixture {
  std::shared_ptr<CountingStore> store = std::make_shared<CountingStore>(make_memory_store());
  Journal journal{store};
  EventLog events;
  std::mutex log_mu;
  std::vector<std::string> lines;
  Logger log{LogLevel::kDebug, [this](LogLevel, std::string_view m) {
               std::lock_guard<std::mutex> g(log_mu);
               lines.emplace_back(m);
             }};
  EventBus bus;
  Outbox outbox{journal, bus, log};
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>();
  SchedulerMutex mu;

  OutboxFixture() {
    bus.subscribe([this](const EventRecord& e) { events(e); });
  }

  RecordPtr stored(const std::string& id) {
    RecordPtr r = record(id);
    NewTask row;
    row.task = r->unshared_task();
    store->insert_tasks({row});
    return r;
  }
  void commit(const RecordPtr& r, TaskEvent e) REQUIRES(!scheduler_lock) {
    SchedulerLock g(mu);
    EventBatch b(*clock);
    if (e == TaskEvent::kStarted) {
      events::started(b, 1, 1, 0.5);
    } else if (e == TaskEvent::kCompleted) {
      events::completed(b, 1, 0.5, std::nullopt);
      events::cleanup_started(b, 1, false);
    } else {
      events::cleanup_started(b, 1, false);
    }
    outbox.commit(r, b);
  }
};

}  // namespace

TEST_CASE(
    "outbox: commits are stored and published in order, and one task's consecutive changes are one "
    "write") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  OutboxFixture f;
  RecordPtr a = f.stored("a"), b = f.stored("b");
  f.commit(a, TaskEvent::kStarted);
  f.commit(a, TaskEvent::kCleanupStarted);  // merged with the one before: one write
  f.commit(b, TaskEvent::kStarted);
  {
    SchedulerLock g(f.mu);
    f.outbox.commit_log(LogLevel::kInfo, "after b");
  }
  f.commit(a, TaskEvent::kCleanupStarted);  // a again, after b: a write of its own
  f.outbox.drain(true);
  f.bus.flush();
  CHECK(f.store->updates.load() == 3);
  CHECK(f.store->order == std::vector<std::string>{"a:2", "b:1", "a:1"});
  CHECK(names(f.events.all()) ==
        std::vector<std::string>{"started", "cleanup_started", "started", "cleanup_started"});
  CHECK(f.lines == std::vector<std::string>{"after b"});
  CHECK_FALSE(f.outbox.pending());
}

TEST_CASE("outbox: a drain that finds another drainer leaves the commit to it, and it is written") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  OutboxFixture f;
  RecordPtr a = f.stored("a"), b = f.stored("b");
  f.store->hold_first = true;
  f.commit(a, TaskEvent::kStarted);
  std::thread first(
      [&]() REQUIRES(!scheduler_lock) { f.outbox.drain(); });  // holds the drain inside the store
  REQUIRE(eventually([&] { return f.store->held.load(); }));
  f.commit(b, TaskEvent::kStarted);
  f.outbox.drain();  // returns at once: another thread drains
  CHECK(f.store->updates.load() == 0);
  f.store->gate.open();
  first.join();
  // The first drainer looked at the outbox again before it returned.
  CHECK(f.store->updates.load() == 2);
  CHECK_FALSE(f.outbox.pending());
}

TEST_CASE(
    "outbox: a store write that fails is logged, its events still published, later ones written") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  OutboxFixture f;
  RecordPtr a = f.stored("a"), b = f.stored("b");
  f.store->fail_next = true;
  f.commit(a, TaskEvent::kStarted);
  f.outbox.drain(true);
  f.commit(b, TaskEvent::kStarted);
  f.outbox.drain(true);
  f.bus.flush();
  CHECK(f.store->updates.load() == 1);
  CHECK(f.events.all().size() == 2);
  REQUIRE(f.lines.size() == 1);
  CHECK(f.lines[0].find("storing task a failed: disk on fire") != std::string::npos);
}

TEST_CASE(
    "outbox: with a shared queue, a start or an outcome is published after the store's commit: a "
    "refused start left out, a refused outcome told as cancelled (lost claim)") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  OutboxFixture f;
  RecordPtr a = f.stored("a"), b = f.stored("b"), c = f.stored("c"), d = f.stored("d");
  std::vector<std::string> asked;
  int flushes_when_asked = -1;
  f.outbox.set_refused_check([&](const std::string& id) {
    asked.push_back(id);
    flushes_when_asked = f.store->flushes.load();
    return id == "a" || id == "d";
  });
  // No start or outcome in the pass: nothing waits for the store.
  f.commit(c, TaskEvent::kCleanupStarted);
  f.outbox.drain(true);
  CHECK(f.store->flushes.load() == 0);
  CHECK(asked.empty());
  f.commit(a, TaskEvent::kCompleted);
  f.commit(d, TaskEvent::kStarted);
  f.commit(b, TaskEvent::kCompleted);
  f.outbox.drain(true);
  f.bus.flush();
  CHECK(asked == std::vector<std::string>{"a", "d", "b"});
  CHECK(flushes_when_asked == 1);  // asked once the writes were committed
  std::vector<std::string> seen;
  for (const EventRecord& e : f.events.all()) {
    seen.push_back(e.task_id + ":" + std::string(to_string(e.event)));
    if (e.task_id == "a" && e.event == TaskEvent::kCancelled) {
      CHECK(e.details_json.find("\"while\":\"running\"") != std::string::npos);
      CHECK(e.details_json.find("lost claim: another host took the task over") !=
            std::string::npos);
    }
  }
  CHECK(seen == std::vector<std::string>{"c:cleanup_started", "a:cancelled", "a:cleanup_started",
                                         "b:completed", "b:cleanup_started"});
  bool warned = false;
  for (const auto& line : f.lines)
    warned = warned || line.find("task a: the store refused its completed") != std::string::npos;
  CHECK(warned);
}

TEST_CASE(
    "outbox: with a shared queue, an outcome whose commit cannot be waited for is published as "
    "applied, and the failure logged") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  OutboxFixture f;
  RecordPtr a = f.stored("a");
  bool asked = false;
  f.outbox.set_refused_check([&](const std::string&) { return asked = true; });
  f.store->fail_flush = true;
  f.commit(a, TaskEvent::kCompleted);
  f.outbox.drain(true);
  f.bus.flush();
  CHECK_FALSE(asked);
  CHECK(names(f.events.all()) == std::vector<std::string>{"completed", "cleanup_started"});
  REQUIRE(f.lines.size() == 1);
  CHECK(f.lines[0].find("waiting for the store to commit tasks' outcomes failed: server gone") !=
        std::string::npos);
}

// ---- queue admission --------------------------------------------------------------
TEST_CASE("queue admission: reservations count against max_queue_size until queued or given back") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  DeviceRegistry devices(
      std::vector<DeviceInfo>{{"cpu", DeviceKind::kCpu, 1000, 0, 0, true, "test", ""}});
  TaskQueue::Options qo;
  qo.max_queue_size = 3;
  TaskQueue queue(qo, devices, Clock::system());
  QueueAdmission admission(queue, 3);
  admission.reserve(2, true);
  try {
    admission.reserve(2, true);
    FAIL("expected QUEUE_FULL");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kQueueFull);
    CHECK(std::string(e.what()).find("2 more to start; no task was created") != std::string::npos);
  }
  admission.reserve(1, false);  // exactly full
  {
    MutexLock g(admission.mutex());
    CHECK_THROWS_AS(admission.check_one("t"), Error);
  }
  admission.unreserve(1);
  {
    MutexLock g(admission.mutex());
    admission.check_one("t");  // room for one now
    QueuedTask q;
    q.task_id = "x";
    q.device = "cpu";
    queue.add_task(q, 0);
    admission.queued_reserved(1);  // one reserved task is in the queue now
  }
  CHECK(queue.size() == 1);
  CHECK(admission.rejected() == 2);
}

// ---- the event vocabulary ------------------------------------------------------------
TEST_CASE(
    "event vocabulary: every builder writes exactly its documented keys, and EVENTS.md lists "
    "them") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  ManualClock clock;
  EventBatch b(clock);
  Task t;
  t.id = "t";
  t.service = "svc";
  t.assigned_device = "cpu";
  MemoryEstimate est;
  est.model = "linear";
  est.mb = 10;
  t.estimated_memory_mb = 10;
  events::created(b, t, &est);
  events::created(b, t, nullptr);
  events::queued(b, t, true, false);
  events::queued(b, t, false, false, "cuda:0");
  events::resource_acquired(b, "cpu", "svc@cpu#1", 10, 10);
  events::started(b, 1, 1, 0.25);
  events::completed(b, 1, 1.5, std::nullopt);
  events::completed(b, 1, 1.5, 42);
  events::failed(b, TaskFailureReason::kOutOfMemory, "out", 2);
  events::cancelled(b, TaskStatus::kQueued, 0, "by host");
  events::retried(b, "out_of_memory", "out", 1, "cpu", 1, 2.0);
  events::device_fallback(b, "cuda:0", "cpu", "out_of_memory");
  events::memory_above_estimate(b, "cpu", 20, 10);
  events::memory_out_of_memory(b, "cuda:0", "out", R"({"device":"cuda:0"})");
  events::memory_device_nearly_full(b, "cuda:0", 7500, 8000);
  events::cleanup_started(b, 1, false);
  events::resource_released(b, "cpu", "svc@cpu#1", 10, false);
  events::resource_released(b, "cpu", "", 0, true);
  events::cleanup_completed(b, 1, 0.1, {}, false);
  events::cleanup_completed(b, 1, 0.1, {std::string(300, 'x')}, false);  // too long to capture
  events::priority_changed(b, 0, 5, TaskStatus::kQueued);
  events::deleted(b, TaskStatus::kCompleted, 1);
  events::paused(b, "device", "cpu", clock.now());
  events::resumed(b, "device", "cpu", clock.now(), 2.5);
  events::pool_resized(b, "svc", "cpu", PoolSettings{0, 4, 30}, PoolSettings{1, 2, 30});
  const auto records = b.take_records("t");
  std::set<TaskEvent> seen;
  for (const auto& e : records) {
    const std::string problem = event_keys_problem(e.event, e.details_json);
    CHECK_MESSAGE(problem.empty(), problem);
    seen.insert(e.event);
  }
  CHECK(seen.size() == all_task_events().size());  // every event type has a builder here
  // The documentation has a row per event naming each of its keys.
  std::ifstream in(std::string(TASKMGR_DOCS_DIR) + "/EVENTS.md");
  REQUIRE(in);
  std::map<std::string, std::string> rows;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("| `", 0) != 0) continue;
    const auto end = line.find('`', 3);
    rows[line.substr(3, end - 3)] = line;
  }
  for (TaskEvent e : all_task_events()) {
    const std::string name(to_string(e));
    CAPTURE(name);
    REQUIRE(rows.count(name) == 1);
    for (const auto& k : events::keys_of(e)) {
      CHECK(rows[name].find("`" + std::string(k) + "`") != std::string::npos);
    }
  }
}

TEST_CASE(
    "event vocabulary: health warnings read back from stored events say what the live ones said") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  ManualClock clock;
  EventBatch b(clock);
  events::memory_above_estimate(b, "cpu", 20, 10);
  events::retried(b, "out_of_memory", "out", 1, "cpu", 1, 2.0);
  events::started(b, 2, 1, 400.0);
  events::started(b, 2, 1, 1.0);  // a short wait: no warning
  events::cleanup_completed(b, 2, 0.1, {"temp dir /x still exists"}, false);
  events::cleanup_completed(b, 2, 0.1, {}, false);  // ok: no warning
  const auto records = b.take_records("t");
  std::vector<std::string> read;
  for (const auto& e : records) {
    if (auto w = events::warning_of(e, 150.0)) read.push_back(*w);
  }
  const std::vector<std::string> live = {
      events::memory_warning_text("above_estimate", "uses 20 MB, above its estimate of 10 MB"),
      events::retried_warning_text("out_of_memory", 1, "out"),
      events::waited_warning_text(400.0),
      events::cleanup_warning_text("temp dir /x still exists"),
  };
  CHECK(read == live);
}

#if defined(TASKMGR_INTERNAL_CHECKS)
TEST_CASE("the scheduler lock's holder count follows locks, unlocks, waits and exceptions") {
  assert_scheduler_not_held("test");  // for the analysis: tests hold no lock
  SchedulerMutex mu;
  CHECK(scheduler_depth() == 0);
  try {
    SchedulerLock g(mu);
    CHECK(scheduler_depth() == 1);
    throw std::runtime_error("unwinds through the lock");
  } catch (const std::runtime_error&) {
  }
  CHECK(scheduler_depth() == 0);
  {
    SchedulerLock g(mu);
    g.unlock();
    CHECK(scheduler_depth() == 0);
    g.lock();
    std::condition_variable cv;
    g.wait_with([&](std::unique_lock<std::mutex>& lk) {
      CHECK(scheduler_depth() == 0);
      cv.wait_for(lk, 1ms);
    });
    CHECK(scheduler_depth() == 1);
  }
  CHECK(scheduler_depth() == 0);
}
#endif

// ---- the dispatcher ----------------------------------------------------------------
namespace {

// Holds the store write of one task's cleanup (the last row of its attempt,
// written by the worker loop's last drain before the loop returns).
class HoldingStore : public ForwardingStore {
 public:
  using ForwardingStore::ForwardingStore;
  void update_task(const Task& t, const std::vector<EventRecord>& e) override {
    if (t.resource_cleanup_completed && t.id == hold_id() && !held.exchange(true)) gate.wait();
    ForwardingStore::update_task(t, e);
  }

  void hold(const std::string& id) {
    std::lock_guard<std::mutex> g(mu_);
    id_ = id;
  }
  std::atomic<bool> held{false};
  Gate gate;

 private:
  std::string hold_id() {
    std::lock_guard<std::mutex> g(mu_);
    return id_;
  }
  std::mutex mu_;
  std::string id_;
};

}  // namespace

TEST_CASE("dispatcher: a task queued while the last worker loop makes its last drain is run") {
  // One worker, no linger, a clock that stands still (no timer or sweep
  // dispatches anything): only the worker loop that is about to return can
  // take a task queued during its last drain, since dispatch() counted that
  // loop as busy and posted none. It once returned and the task waited for
  // ever (found by the model test).
  Config c = test_config();
  c.executor.worker_threads = 1;
  c.executor.worker_linger_us = 0;
  auto store = std::make_shared<HoldingStore>(make_memory_store());
  TaskManagerOptions o;
  o.builtin_ocr = false;
  o.clock = std::make_shared<ManualClock>();
  o.store = store;
  TaskManager tm(c, o);
  Gate service_gate;
  std::atomic<bool> in_service{false};
  tm.register_service(make_function_service("svc", [&](TaskContext& ctx) {
    if (ctx.options_json() != "{\"hold\":true}") return;
    in_service = true;
    service_gate.wait();
  }));
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  r.options_json = "{\"hold\":true}";
  const Task a = tm.create_task(r);
  REQUIRE(eventually([&] { return in_service.load(); }));
  store->hold(a.id);  // a's last row will wait in the loop's last drain
  service_gate.open();
  REQUIRE(eventually([&] { return store->held.load(); }));
  // The loop is in its last drain now; b is queued meanwhile (its create
  // waits for the held store to write its own row, so on another thread).
  r.options_json = "{}";
  std::string b_id;
  std::thread creator([&] { b_id = tm.create_task(r).id; });
  REQUIRE(eventually([&] { return tm.get_task_metrics().queued_tasks.at("total") == 1; }));
  store->gate.open();
  creator.join();
  // Real time (the manager's clock stands still, and so would its waits).
  CHECK(eventually([&] { return tm.get_task(b_id).status == TaskStatus::kCompleted; }));
  CHECK(tm.get_task(a.id).status == TaskStatus::kCompleted);
}

TEST_CASE(
    "Cluster::rescue: a lost host's tasks are queued again, or fail host_lost out of attempts") {
  Config c = test_config();
  c.tasks.retry.max_attempts = 3;
  c.tasks.retry.max_interrupted_attempts = 4;
  ManualClock clock;
  auto names = [](const std::vector<EventRecord>& ev) {
    std::string out;
    for (const auto& e : ev) {
      out += (out.empty() ? "" : ",") + std::string(to_string(e.event));
      CHECK(test::event_keys_problem(e.event, e.details_json) == "");
    }
    return out;
  };
  Task running;
  running.id = generate_task_id();
  running.status = TaskStatus::kRunning;
  running.attempt = 2;
  running.assigned_device = "cuda:0";
  running.host = "a";
  running.service_instance_id = "svc@cuda:0#1";
  // Attempts left: cleaned up (its files on another machine: said so),
  // retried host_lost, queued for any host (its device was not named).
  Task t = running;
  auto ev = detail::Cluster::rescue(c, clock, t, "a/123/abcd1234", "b");
  CHECK(names(ev) == "cleanup_started,cleanup_completed,retried,queued");
  CHECK(ev[1].details_json.find("not reachable") != std::string::npos);
  CHECK(ev[2].details_json.find("\"reason\":\"host_lost\"") != std::string::npos);
  CHECK(t.status == TaskStatus::kQueued);
  CHECK_FALSE(t.assigned_device.has_value());
  CHECK_FALSE(t.host.has_value());
  CHECK(t.attempt == 2);  // counted: the next is 3
  // Same machine: its files are reachable (removed there), no problem named.
  t = running;
  ev = detail::Cluster::rescue(c, clock, t, "b/99/ffff0000", "b");
  CHECK(ev[1].details_json.find("not reachable") == std::string::npos);
  // A named device is kept for the next host.
  t = running;
  t.requested_device = "cuda:0";
  (void)detail::Cluster::rescue(c, clock, t, "a/1/1", "b");
  CHECK(t.assigned_device == "cuda:0");
  // Out of attempts (max of the two limits: 4): failed host_lost.
  t = running;
  t.attempt = 4;
  ev = detail::Cluster::rescue(c, clock, t, "a/1/1", "b");
  CHECK(names(ev) == "cleanup_started,cleanup_completed,failed");
  CHECK(t.status == TaskStatus::kFailed);
  CHECK(t.failure_reason == TaskFailureReason::kHostLost);
  CHECK(t.resource_cleanup_completed);
  CHECK(t.finished_at.has_value());
  // Claimed and waiting there: queued again, no attempt counted.
  t = running;
  t.status = TaskStatus::kQueued;
  ev = detail::Cluster::rescue(c, clock, t, "a/1/1", "b");
  CHECK(names(ev) == "queued");
  CHECK(t.attempt == 2);
  // Ended there, its cleanup not recorded: recorded here.
  t = running;
  t.status = TaskStatus::kCompleted;
  ev = detail::Cluster::rescue(c, clock, t, "a/1/1", "b");
  CHECK(names(ev) == "resource_released,cleanup_completed");
  CHECK(t.status == TaskStatus::kCompleted);
  CHECK(t.resource_cleanup_completed);
  // No host claimed it within the queue timeout (lost host ""): failed
  // QUEUE_TIMEOUT, nothing to clean up.
  c.tasks.queue_timeout_seconds = 2;
  t = Task{};
  t.id = generate_task_id();
  t.status = TaskStatus::kQueued;
  t.queued_at = detail::stored_time(clock) - std::chrono::seconds(3);
  ev = detail::Cluster::rescue(c, clock, t, "", "b");
  CHECK(names(ev) == "failed,cleanup_started,cleanup_completed");
  CHECK(t.status == TaskStatus::kFailed);
  CHECK(t.failure_reason == TaskFailureReason::kQueueTimeout);
  CHECK(t.failure_message.find("waited 3.000000 s in the shared queue") != std::string::npos);
  CHECK(t.resource_cleanup_completed);
}

TEST_CASE("host_id_name cuts a host name to 60 bytes at a character's boundary") {
  CHECK(detail::host_id_name("short") == "short");
  CHECK(detail::host_id_name(std::string(70, 'x')) == std::string(60, 'x'));
  // 59 ASCII bytes, then a 2-byte character that would straddle byte 60.
  const std::string name = std::string(59, 'x') + "\xc3\xa9" + "tail";
  CHECK(detail::host_id_name(name) == std::string(59, 'x'));
  // A name of 60 bytes exactly is kept whole.
  CHECK(detail::host_id_name(std::string(58, 'x') + "\xc3\xa9") ==
        std::string(58, 'x') + "\xc3\xa9");
}
