// The task state machine against a model: random sequences of create,
// start, cancel, complete, fail, out-of-memory (retry: CPU fallback or
// backoff), priority changes, the host's retries of ended tasks, deletes of
// ended tasks (and of live ones, refused), pauses and resumes of the manager,
// a device or the service, clock advances and close + reopen, through the
// public API with a real SQLite file, checked after every step:
//
//  * every task's status is the one the model allows (queued or running
//    while it waits; exact once it ended, with its cleanup completed);
//  * status "running" if and only if its service is running it now;
//  * no worker idles while a task that could run waits (work conservation),
//    and nothing starts that a pause holds (a paused manager, device or
//    service), also after a reopen;
//  * the pauses in force are the ones the model says;
//  * the events delivered for each task follow the documented grammar
//    (docs/ARCHITECTURE.md), with exactly one terminal event;
//  * the metrics' running count matches.
//
// TASKMGR_MODEL_STEPS (default 10,000) and TASKMGR_MODEL_SEED (default:
// random) drive it; the seed is printed, and a failure names the step.
#include <doctest/doctest.h>

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include "event_keys.hpp"
#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// The service: each attempt waits until the test tells it how to end, or
// until the task is cancelled.
class Script {
 public:
  enum class End { kNone, kComplete, kFail, kOom };

  void process(TaskContext& ctx) {
    std::unique_lock<std::mutex> l(mu_);
    running_[ctx.task_id()] = ctx.device();
    cv_.notify_all();
    for (;;) {
      if (auto_complete_) break;
      auto it = orders_.find(ctx.task_id());
      if (it != orders_.end()) {
        const End e = it->second;
        orders_.erase(it);
        running_.erase(ctx.task_id());
        cv_.notify_all();
        l.unlock();
        if (e == End::kFail) throw InvalidInputError("scripted failure");
        if (e == End::kOom) throw OutOfMemoryError("scripted out of memory");
        return;
      }
      if (ctx.cancelled()) break;
      cv_.wait_for(l, 1ms);
    }
    running_.erase(ctx.task_id());
    cv_.notify_all();
    l.unlock();
    ctx.throw_if_cancelled();
  }

  void order(const std::string& id, End e) {
    std::lock_guard<std::mutex> g(mu_);
    orders_[id] = e;
    cv_.notify_all();
  }
  // Orders given and not yet acted on by their attempt.
  std::size_t pending_orders() {
    std::lock_guard<std::mutex> g(mu_);
    return orders_.size();
  }
  std::map<std::string, std::string> running() {
    std::lock_guard<std::mutex> g(mu_);
    return running_;
  }
  void set_auto_complete(bool on) {
    std::lock_guard<std::mutex> g(mu_);
    auto_complete_ = on;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, End> orders_;
  std::map<std::string, std::string> running_;  // task id -> device
  bool auto_complete_ = false;
};

// What the model knows of a task.
struct Expect {
  enum class State { kPending, kWaiting, kBackoff, kDone } state = State::kPending;
  SteadyTime backoff_until{};
  TaskStatus final_status = TaskStatus::kPending;
  TaskFailureReason final_reason = TaskFailureReason::kNone;
  int attempts = 0;  // attempts that ended in this model
};

// The event grammar, per task (docs/ARCHITECTURE.md "Event sequences").
class Grammar {
 public:
  // Feeds one event; an error message when it does not fit.
  std::string feed(const EventRecord& e) {
    const std::string ev(to_string(e.event));
    history_ += (history_.empty() ? "" : " ") + ev;
    if (e.event == TaskEvent::kRetried || e.event == TaskEvent::kFailed ||
        e.event == TaskEvent::kCancelled || e.event == TaskEvent::kQueued) {
      history_ += e.details_json;
    }
    auto bad = [&] { return "event " + ev + " in state " + state_; };
    const bool terminal = ev == "completed" || ev == "failed" || ev == "cancelled";
    if (terminal && ++terminals_ > 1) return "a second terminal event: " + ev;
    if (ev == "priority_changed") {
      // The host's change of a waiting task: its state stays.
      if (state_ != "pending" && state_ != "queued" && state_ != "between_attempts") return bad();
      return "";
    }
    if (state_ == "start") {
      if (ev != "created") return bad();
      state_ = "pending";
    } else if (state_ == "pending") {
      if (ev == "queued")
        state_ = "queued";
      else if (ev == "cancelled")
        state_ = "ended_waiting";
      else
        return bad();
    } else if (state_ == "queued") {
      if (ev == "resource_acquired")
        state_ = "acquired";
      else if (ev == "queued")
        state_ = "queued";  // recovered at reopen
      else if (ev == "cancelled" || ev == "failed")
        state_ = "ended_waiting";
      else if (ev == "device_fallback")
        state_ = "moving";
      else
        return bad();
    } else if (state_ == "moving") {
      if (ev != "queued") return bad();
      state_ = "queued";
    } else if (state_ == "acquired") {
      if (ev != "started") return bad();
      state_ = "running";
    } else if (state_ == "running") {
      if (ev == "memory_warning")
        state_ = "running";
      else if (terminal)
        state_ = "outcome";
      else if (ev == "device_fallback")
        state_ = "falling_back";
      else if (ev == "retried")
        state_ = "retry_outcome";
      else
        return bad();
    } else if (state_ == "falling_back") {
      if (ev != "retried") return bad();
      state_ = "retry_outcome";
    } else if (state_ == "outcome" || state_ == "retry_outcome") {
      if (ev != "cleanup_started") return bad();
      state_ = state_ == "outcome" ? "cleaning" : "retry_cleaning";
    } else if (state_ == "cleaning" || state_ == "retry_cleaning") {
      if (ev != "resource_released") return bad();
      state_ = state_ == "cleaning" ? "released" : "retry_released";
    } else if (state_ == "released") {
      if (ev != "cleanup_completed") return bad();
      state_ = "done";
    } else if (state_ == "retry_released") {
      if (ev != "cleanup_completed") return bad();
      state_ = "between_attempts";  // queued at once, or after a backoff
    } else if (state_ == "between_attempts") {
      if (ev == "queued")
        state_ = "queued";
      else if (ev == "cancelled")
        state_ = "ended_waiting";
      else
        return bad();
    } else if (state_ == "ended_waiting") {
      if (ev != "cleanup_started") return bad();
      state_ = "waiting_cleanup";
    } else if (state_ == "waiting_cleanup") {
      if (ev != "cleanup_completed") return bad();
      state_ = "done";
    } else if (state_ == "done" && ev == "retried") {
      // The host ran the ended task again: a new run, with a terminal
      // event of its own.
      state_ = "between_attempts";
      terminals_ = 0;
    } else {
      return bad();  // nothing else after done
    }
    return "";
  }
  bool done() const { return state_ == "done"; }
  // A task the model forgot once it ended, tracked again (the host retried it).
  void resume_ended() {
    state_ = "done";
    terminals_ = 1;
  }
  const std::string& history() const { return history_; }
  const std::string& state() const { return state_; }

 private:
  std::string state_ = "start";
  std::string history_;
  int terminals_ = 0;
};

// Collects delivered events per task, across managers.
class Events {
 public:
  void operator()(const EventRecord& e) {
    std::lock_guard<std::mutex> g(mu_);
    by_task_[e.task_id].push_back(e);
  }
  std::size_t count(const std::string& id) {
    std::lock_guard<std::mutex> g(mu_);
    return by_task_[id].size();
  }
  std::vector<EventRecord> take(const std::string& id, std::size_t from) {
    std::lock_guard<std::mutex> g(mu_);
    const auto& v = by_task_[id];
    return std::vector<EventRecord>(
        v.begin() + static_cast<std::ptrdiff_t>(std::min(from, v.size())), v.end());
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::vector<EventRecord>> by_task_;
};

struct Tracked {
  Expect expect;
  Grammar grammar;
  std::size_t events_seen = 0;
};

constexpr int kWorkers = 2;
constexpr int kGpuPool = 1;
constexpr int kMaxAttempts = 3;

class Model {
 public:
  Model(std::uint64_t seed, std::string db) : rng_(seed), db_(std::move(db)) {
    config_ = test_config();
    config_.executor.worker_threads = kWorkers;
    config_.devices.cpu_memory_mb = 100000;
    config_.devices.declared.push_back({"cuda:0", "gpu", 100000});
    config_.pools.devices["cuda:0"] = PoolSettings{0, kGpuPool, 30};
    config_.tasks.max_queue_size = 1000;
    config_.tasks.queue_timeout_seconds = 1e9;
    config_.tasks.retry.max_attempts = kMaxAttempts;
    config_.tasks.retry.backoff_base_seconds = 1;
    config_.tasks.retry.backoff_multiplier = 2;
    config_.tasks.retry.backoff_jitter = 0;
    config_.storage.path = db_;
    config_.logging.level = "debug";
    open();
  }
  ~Model() {
    script_->set_auto_complete(true);
    tm_.reset();
  }

  void open() {
    script_ = std::make_shared<Script>();
    TaskManagerOptions o;
    o.clock = clock_;
    o.random_seed = 7;
    o.builtin_ocr = false;
    o.log_sink = [this](LogLevel, std::string_view m) {
      std::lock_guard<std::mutex> g(log_mu_);
      log_.emplace_back(m);
      if (log_.size() > 40) log_.pop_front();
    };
    auto script = script_;
    o.services.push_back(
        make_function_service("m", [script](TaskContext& c) { script->process(c); }));
    o.subscribers.push_back([this](const EventRecord& e) { events_(e); });  // recovery's too
    tm_ = std::make_unique<TaskManager>(config_, o);
  }

  // One random step; what it did, for the failure message.
  std::string step() {
    const int roll = std::uniform_int_distribution<int>(0, 104)(rng_);
    if (roll < 20) return create();
    if (roll < 33) return start();
    if (roll < 43) return cancel();
    if (roll < 63) return finish(Script::End::kComplete);
    if (roll < 70) return finish(Script::End::kFail);
    if (roll < 85) return finish(Script::End::kOom);
    if (roll < 93) return advance();
    if (roll < 95) return set_priority();
    if (roll < 97) return retry();
    if (roll < 99) return remove();
    if (roll < 104) return pause_or_resume();
    return reopen();
  }

  // Waits until the manager has done all it will do, then checks it.
  void settle_and_check(const std::string& what) {
    history_.push_back(what);
    if (history_.size() > 30) history_.pop_front();
    std::string why;
    const bool ok = eventually([&] { return quiescent(why); }, std::chrono::seconds(30));
    INFO("step: " << what);
    INFO("not settled: " << why);
    const std::string state = ok ? std::string() : dump();
    INFO("state:\n" << state);
    REQUIRE(ok);
    check_events(what);
  }

  std::size_t tasks() const { return tasks_.size(); }
  std::size_t priorities_changed() const { return priorities_changed_; }
  std::size_t deleted() const { return deleted_; }
  std::size_t retried() const { return retried_; }
  std::size_t pauses() const { return pauses_; }
  std::size_t ended() const { return ended_; }

 private:
  template <typename Pred>
  std::string pick(Pred pred) {
    std::vector<std::string> ids;
    for (const auto& [id, t] : tasks_) {
      if (pred(t.expect)) ids.push_back(id);
    }
    if (ids.empty()) return "";
    return ids[std::uniform_int_distribution<std::size_t>(0, ids.size() - 1)(rng_)];
  }

  std::string create() {
    if (live() >= 30) return advance();
    TaskCreateRequest r;
    r.service = "m";
    const int d = std::uniform_int_distribution<int>(0, 2)(rng_);
    r.device = d == 0 ? "" : d == 1 ? "cpu" : "cuda:0";
    r.priority = std::uniform_int_distribution<int>(-2, 2)(rng_);
    r.start = std::uniform_int_distribution<int>(0, 1)(rng_) == 1;
    const Task t = tm_->create_task(r);
    Tracked& tr = tasks_[t.id];
    tr.expect.state = r.start ? Expect::State::kWaiting : Expect::State::kPending;
    return "create " + t.id + (r.start ? " started" : "") + " on '" + r.device + "'";
  }

  std::string start() {
    const std::string id = pick([](const Expect& e) { return e.state == Expect::State::kPending; });
    if (id.empty()) return create();
    tm_->start_task(id);
    tasks_[id].expect.state = Expect::State::kWaiting;
    return "start " + id;
  }

  std::string cancel() {
    const std::string id = pick([](const Expect&) { return true; });
    if (id.empty()) return create();
    Expect& e = tasks_[id].expect;
    const bool was_live = e.state != Expect::State::kDone;
    const bool result = tm_->cancel_task(id);
    CHECK(result == was_live);
    if (was_live) end(id, TaskStatus::kCancelled, TaskFailureReason::kCancelled);
    return "cancel " + id;
  }

  std::string finish(Script::End how) {
    const auto running = script_->running();
    if (running.empty()) return advance();
    auto it = running.begin();
    std::advance(it, std::uniform_int_distribution<std::size_t>(0, running.size() - 1)(rng_));
    const std::string id = it->first;
    const std::string device = it->second;
    ran_before_pause_.erase(id);  // its next attempt, if any, is a new start
    Expect& e = tasks_[id].expect;
    REQUIRE(e.state == Expect::State::kWaiting);
    ++e.attempts;
    // Read before the order: once it is given, the next attempt (a CPU
    // fallback at once) may have started and counted itself.
    const int attempt = tm_->get_task(id).attempt;
    script_->order(id, how);
    switch (how) {
      case Script::End::kComplete:
        end(id, TaskStatus::kCompleted, TaskFailureReason::kNone);
        return "complete " + id;
      case Script::End::kFail:
        end(id, TaskStatus::kFailed, TaskFailureReason::kInvalidInput);
        return "fail " + id;
      default: break;
    }
    // Out of memory: on the GPU, the CPU at once; on the CPU a backoff of
    // 1 s, 2 s, ...; out of attempts, failed.
    if (attempt >= kMaxAttempts) {
      end(id, TaskStatus::kFailed, TaskFailureReason::kOutOfMemory);
    } else if (device != "cpu") {
      e.state = Expect::State::kWaiting;
    } else {
      e.state = Expect::State::kBackoff;
      e.backoff_until = clock_->steady_now() + std::chrono::seconds(1 << (attempt - 1));
    }
    return "oom " + id + " on " + device + " (attempt " + std::to_string(attempt) + ")";
  }

  // A live task's new priority: pending and backing-off tasks take it; a
  // waiting one takes it, or is refused if it runs now; an ended one refuses.
  std::string set_priority() {
    const std::string id = pick([](const Expect&) { return true; });
    if (id.empty()) return create();
    const Expect& e = tasks_[id].expect;
    const int p = std::uniform_int_distribution<int>(-3, 3)(rng_);
    try {
      const Task t = tm_->set_task_priority(id, p);  // (outside CHECK: it would catch a throw)
      CHECK(t.priority == p);
      CHECK(e.state != Expect::State::kDone);
      ++priorities_changed_;
      return "priority " + std::to_string(p) + " for " + id;
    } catch (const Error& err) {
      CHECK(err.code() == ErrorCode::kInvalidState);
      CHECK(e.state != Expect::State::kPending);
      CHECK(e.state != Expect::State::kBackoff);
      return "priority refused for " + id + ": " + err.what();
    }
  }

  // Runs a recently ended task again: a failed or cancelled one is queued
  // (the model tracks it again, its grammar going on from its end); a
  // completed one is refused.
  std::string retry() {
    if (ended_ids_.empty()) return advance();
    const std::size_t at =
        std::uniform_int_distribution<std::size_t>(0, ended_ids_.size() - 1)(rng_);
    const std::string id = ended_ids_[at];
    const TaskStatus status = tm_->get_task(id).status;
    try {
      const Task t = tm_->retry_task(id);  // (outside CHECK: it would catch a throw)
      CHECK(t.status == TaskStatus::kQueued);
      CHECK((status == TaskStatus::kFailed || status == TaskStatus::kCancelled));
    } catch (const Error& err) {
      CHECK(err.code() == ErrorCode::kInvalidState);
      CHECK(status == TaskStatus::kCompleted);
      return "retry refused for " + id + " (" + std::string(to_string(status)) + ")";
    }
    ended_ids_.erase(ended_ids_.begin() + static_cast<std::ptrdiff_t>(at));
    tm_->flush_events();
    Tracked& tr = tasks_[id];
    tr.expect.state = Expect::State::kWaiting;
    tr.grammar.resume_ended();
    // Its events before were checked before it was forgotten; the retry's
    // are checked from its retried event (the host's last), whatever
    // followed it already.
    const auto all = events_.take(id, 0);
    std::size_t from = all.size();
    for (std::size_t i = all.size(); i-- > 0;) {
      if (all[i].event == TaskEvent::kRetried &&
          all[i].details_json.find("\"reason\":\"host\"") != std::string::npos) {
        from = i;
        break;
      }
    }
    REQUIRE(from < all.size());
    tr.events_seen = from;
    ++retried_;
    return "retry " + id + " (" + std::string(to_string(status)) + ")";
  }

  // Deletes an ended task (it leaves the store, subscribers hear of it), or
  // tries a live one (refused, nothing changes).
  std::string remove() {
    const bool live_one = std::uniform_int_distribution<int>(0, 3)(rng_) == 0 || ended_ids_.empty();
    if (live_one) {
      const std::string id = pick([](const Expect& x) { return x.state != Expect::State::kDone; });
      if (id.empty()) return create();
      try {
        tm_->delete_task(id);
        FAIL("a live task was deleted: " << id);
      } catch (const Error& err) {
        CHECK(err.code() == ErrorCode::kInvalidState);
      }
      return "delete refused for live " + id;
    }
    const std::size_t at =
        std::uniform_int_distribution<std::size_t>(0, ended_ids_.size() - 1)(rng_);
    const std::string id = ended_ids_[at];
    ended_ids_.erase(ended_ids_.begin() + static_cast<std::ptrdiff_t>(at));
    tm_->delete_task(id);
    try {
      tm_->get_task(id);
      FAIL("a deleted task is still there: " << id);
    } catch (const Error& err) {
      CHECK(err.code() == ErrorCode::kNotFound);
    }
    tm_->flush_events();
    const auto delivered = events_.take(id, 0);
    REQUIRE_FALSE(delivered.empty());
    CHECK(delivered.back().event == TaskEvent::kDeleted);
    ++deleted_;
    return "delete " + id;
  }

  // Pauses one of the scopes, or (more often, while any holds) resumes one:
  // pause answers whether it changed anything, and so does resume.
  std::string pause_or_resume() {
    static const std::vector<std::pair<PauseScope, std::string>> kScopes = {
        {PauseScope::kManager, ""},
        {PauseScope::kDevice, "cpu"},
        {PauseScope::kDevice, "cuda:0"},
        {PauseScope::kService, "m"}};
    const auto& [scope, name] =
        kScopes[std::uniform_int_distribution<std::size_t>(0, kScopes.size() - 1)(rng_)];
    const std::string what = std::string(to_string(scope)) + (name.empty() ? "" : " " + name);
    const bool resume = !paused_.empty() && std::uniform_int_distribution<int>(0, 9)(rng_) < 7;
    if (resume) {
      const auto it =
          std::next(paused_.begin(), static_cast<long>(std::uniform_int_distribution<std::size_t>(
                                         0, paused_.size() - 1)(rng_)));
      const auto [s, n] = *it;
      paused_.erase(it);
      const bool changed = tm_->resume(s, n);  // (outside CHECK: it would catch a throw)
      CHECK(changed);
      return "resume " + std::string(to_string(s)) + (n.empty() ? "" : " " + n);
    }
    const bool was = paused_.count({scope, name}) > 0;
    for (const auto& [id, dev] : script_->running()) ran_before_pause_.insert(id);
    const bool changed = tm_->pause(scope, name);
    CHECK(changed == !was);
    paused_.insert({scope, name});
    ++pauses_;
    return "pause " + what;
  }

  // Whether a pause holds a task of service "m" on `device`.
  bool held(const std::string& device) const {
    return paused_.count({PauseScope::kManager, ""}) ||
           paused_.count({PauseScope::kService, "m"}) ||
           paused_.count({PauseScope::kDevice, device});
  }

  std::string advance() {
    const auto d = std::chrono::milliseconds(std::uniform_int_distribution<int>(200, 2500)(rng_));
    clock_->advance(d);
    const SteadyTime now = clock_->steady_now();
    for (auto& [id, t] : tasks_) {
      if (t.expect.state == Expect::State::kBackoff && now >= t.expect.backoff_until) {
        t.expect.state = Expect::State::kWaiting;
      }
    }
    return "advance " + std::to_string(d.count()) + " ms";
  }

  std::string reopen() {
    // close() waits for running attempts: let them complete now. Which of
    // the waiting tasks still start before close() stops dispatching is up
    // to the race; the store says which did, and the model follows it.
    script_->set_auto_complete(true);
    tm_->close();
    tm_.reset();
    {
      auto store = open_sqlite_store(db_);
      for (auto& [id, t] : tasks_) {
        if (t.expect.state == Expect::State::kDone) continue;
        const auto row = store->load_task(id);
        REQUIRE(row.has_value());
        if (row->status == TaskStatus::kCompleted) {
          end(id, TaskStatus::kCompleted, TaskFailureReason::kNone);
        } else if (row->status == TaskStatus::kQueued && row->attempt > 0) {
          // Waiting for a retry when the manager closed: at open it waits
          // its backoff again, in full (1 s, 2 s, ... after attempt 1, 2, ...).
          t.expect.state = Expect::State::kBackoff;
          t.expect.backoff_until =
              clock_->steady_now() + std::chrono::seconds(1 << (row->attempt - 1));
        } else if (t.expect.state == Expect::State::kBackoff) {
          t.expect.state = Expect::State::kWaiting;  // queued again at open
        }
      }
    }
    open();
    return "close and reopen";
  }

  void end(const std::string& id, TaskStatus s, TaskFailureReason r) {
    Expect& e = tasks_[id].expect;
    e.state = Expect::State::kDone;
    e.final_status = s;
    e.final_reason = r;
  }

  int live() const {
    int n = 0;
    for (const auto& [id, t] : tasks_) n += t.expect.state != Expect::State::kDone;
    return n;
  }

  std::string dump() {
    std::ostringstream out;
    out << "  last steps:\n";
    for (const auto& h : history_) out << "    " << h << "\n";
    tm_->flush_events();
    for (const auto& [id, tr] : tasks_) {
      out << "  stored " << id << ":";
      for (const auto& e : tm_->get_task_events(id)) {
        out << " " << to_string(e.event);
        if (e.event == TaskEvent::kRetried || e.event == TaskEvent::kQueued) out << e.details_json;
      }
      out << "\n";
    }
    for (const auto& [id, dev] : script_->running())
      out << "  in service: " << id << " on " << dev << "\n";
    for (const auto& [id, tr] : tasks_) {
      const Task t = tm_->get_task(id);
      out << "  " << id << " expect " << static_cast<int>(tr.expect.state) << " status "
          << to_string(t.status) << " on " << t.assigned_device.value_or("-") << " attempt "
          << t.attempt << " priority " << t.priority << " events " << tr.grammar.state() << ": "
          << tr.grammar.history() << "\n";
    }
    const TaskMetrics m = tm_->get_task_metrics();
    out << "log:\n" << log_tail();
    out << "  metrics: active " << m.active_tasks.at("total") << " queued "
        << m.queued_tasks.at("total") << " internal_errors " << m.internal_errors << "\n";
    for (const auto& [k, p] : m.pool_utilization)
      out << "  pool " << k << " in use " << p.in_use << "/" << p.max << "\n";
    return out.str();
  }

  bool quiescent(std::string& why) {
    // An order given to a running attempt must have been acted on: until
    // then that attempt still runs, which the model's "waiting" allows.
    if (script_->pending_orders() != 0) return (why = "an order is not acted on yet"), false;
    const auto running = script_->running();
    std::map<std::string, int> on_device;
    for (const auto& [id, dev] : running) ++on_device[dev];
    const int busy = static_cast<int>(running.size());
    for (const auto& [id, dev] : running) {
      if (held(dev) && ran_before_pause_.count(id) == 0) {
        return (why = id + " started on " + dev + " while a pause holds it"), false;
      }
    }
    for (const auto& [id, tr] : tasks_) {
      const Task t = tm_->get_task(id);
      const Expect& e = tr.expect;
      const bool in_service = running.count(id) > 0;
      if ((t.status == TaskStatus::kRunning) != in_service) {
        why = id + " is " + std::string(to_string(t.status)) +
              (in_service ? " but in its service" : " but not in its service");
        return false;
      }
      switch (e.state) {
        case Expect::State::kPending:
          if (t.status != TaskStatus::kPending) return (why = id + " should be pending"), false;
          break;
        case Expect::State::kBackoff:
          // Backing off once the failed attempt's cleanup is done (its timer
          // starts then: the model's clock must not move before).
          if (t.status != TaskStatus::kQueued || !t.resource_cleanup_completed) {
            return (why = id + " should back off"), false;
          }
          break;
        case Expect::State::kWaiting: {
          if (t.status != TaskStatus::kQueued && t.status != TaskStatus::kRunning) {
            why = id + " should wait or run, is " + std::string(to_string(t.status));
            return false;
          }
          if (t.status == TaskStatus::kQueued) {
            const std::string dev = t.assigned_device.value_or("");
            const int pool_max = dev == "cpu" ? kWorkers : kGpuPool;
            if (busy < kWorkers && on_device[dev] < pool_max && !held(dev)) {
              why = id + " could run on " + dev + " but waits";
              return false;
            }
          }
          break;
        }
        case Expect::State::kDone:
          if (t.status != e.final_status || t.failure_reason != e.final_reason ||
              !t.resource_cleanup_completed) {
            why = id + " should be " + std::string(to_string(e.final_status)) + "/" +
                  std::string(to_string(e.final_reason)) + " with its cleanup done, is " +
                  std::string(to_string(t.status)) + "/" + std::string(to_string(t.failure_reason));
            return false;
          }
          break;
      }
    }
    std::set<std::pair<PauseScope, std::string>> in_force;
    for (const auto& p : tm_->paused()) in_force.insert({p.scope, p.name});
    if (in_force != paused_) return (why = "the pauses in force are not the model's"), false;
    const TaskMetrics m = tm_->get_task_metrics();
    if (m.active_tasks.at("total") != busy)
      return (why = "metrics count another number running"), false;
    if (m.internal_errors != 0) return (why = "internal errors"), false;
    return true;
  }

  void check_events(const std::string& what) {
    tm_->flush_events();
    std::vector<std::string> forget;
    for (auto& entry : tasks_) {
      const std::string& id = entry.first;
      Tracked& tr = entry.second;
      for (const auto& e : events_.take(id, tr.events_seen)) {
        ++tr.events_seen;
        const std::string keys = event_keys_problem(e.event, e.details_json);
        REQUIRE_MESSAGE(keys.empty(), keys);
        const std::string err = tr.grammar.feed(e);
        INFO("step: " << what);
        INFO("task " << id << ": " << tr.grammar.history());
        INFO("log:\n" << (err.empty() ? std::string() : log_tail()));
        REQUIRE_MESSAGE(err.empty(), err);
      }
      if (tr.expect.state == Expect::State::kDone) {
        INFO("task " << id << " ended but its events stop in state " << tr.grammar.state());
        REQUIRE(tr.grammar.done());
        forget.push_back(id);
      }
    }
    const auto running = script_->running();
    for (auto it = ran_before_pause_.begin(); it != ran_before_pause_.end();) {
      it = running.count(*it) ? std::next(it) : ran_before_pause_.erase(it);
    }
    for (const auto& id : forget) {
      tasks_.erase(id);
      ++ended_;
      ended_ids_.push_back(id);  // for a later delete
      if (ended_ids_.size() > 50) ended_ids_.erase(ended_ids_.begin());
    }
  }

  std::string log_tail() {
    std::lock_guard<std::mutex> g(log_mu_);
    std::string out;
    for (const auto& l : log_) out += "    " + l + "\n";
    return out;
  }

  std::mutex log_mu_;
  std::deque<std::string> log_;
  std::deque<std::string> history_;
  std::mt19937_64 rng_;
  std::string db_;
  Config config_;
  std::shared_ptr<ManualClock> clock_ = std::make_shared<ManualClock>();
  Events events_;  // before tm_: outlives its callbacks
  std::shared_ptr<Script> script_;
  std::unique_ptr<TaskManager> tm_;
  std::map<std::string, Tracked> tasks_;
  std::size_t ended_ = 0;
  std::vector<std::string> ended_ids_;  // recently ended (forgotten by the model), to delete
  std::size_t priorities_changed_ = 0;
  std::size_t deleted_ = 0;
  std::size_t retried_ = 0;
  std::set<std::pair<PauseScope, std::string>> paused_;  // in force, kept across a reopen
  std::size_t pauses_ = 0;
  std::set<std::string> ran_before_pause_;  // in service when a pause came: may go on running
};

std::uint64_t env_or(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

}  // namespace

TEST_CASE(
    "the task state machine follows its model over random steps (TASKMGR_MODEL_STEPS, _SEED)") {
  const std::uint64_t seed = env_or("TASKMGR_MODEL_SEED", std::random_device{}());
  const std::uint64_t steps = env_or("TASKMGR_MODEL_STEPS", 10000);
  MESSAGE("model test: seed " << seed << ", " << steps
                              << " steps (rerun with TASKMGR_MODEL_SEED=" << seed << ")");
  const fs::path dir = fs::temp_directory_path() /
                       ("taskmgr-model-" + std::to_string(seed) + "-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  {
    Model model(seed, (dir / "model.db").string());
    for (std::uint64_t i = 0; i < steps; ++i) {
      const std::string what = model.step();
      model.settle_and_check("#" + std::to_string(i) + " " + what + " (seed " +
                             std::to_string(seed) + ")");
    }
    MESSAGE("model test: " << steps << " steps, " << model.ended() << " tasks ended, "
                           << model.tasks() << " still live, " << model.priorities_changed()
                           << " priorities changed, " << model.retried() << " retried, "
                           << model.deleted() << " deleted, " << model.pauses() << " paused");
    CHECK(model.ended() > steps / 20);  // the walk did reach the ends it checks
    CHECK(model.priorities_changed() > steps / 200);
    CHECK(model.deleted() > steps / 200);
    CHECK(model.retried() > steps / 400);
    CHECK(model.pauses() > steps / 200);
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}
