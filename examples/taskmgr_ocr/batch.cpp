#include "batch.hpp"

#include <boost/json.hpp>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>

namespace ocrcli {
namespace json = boost::json;
using taskmgr::Task;
using taskmgr::TaskStatus;

std::string source_of(const Task& task) {
  if (task.options_json.find("\"source\"") == std::string::npos) return "";
  boost::system::error_code ec;
  const json::value v = json::parse(task.options_json, ec);
  if (ec || !v.is_object()) return "";
  const json::value* s = v.as_object().if_contains("source");
  return s != nullptr && s->is_string() ? std::string(s->as_string()) : "";
}

namespace {

std::string options_for(const BatchOptions& o, const std::string& key, const Document& d,
                        int number) {
  json::object obj;
  obj["source"] = key;
  if (number > 0) obj["page"] = number;
  if (d.pdf) obj["dpi"] = o.dpi;
  if (!o.output.empty()) obj["output"] = o.output;
  if (!o.words) obj["words"] = false;
  return json::serialize(obj);
}

// Task ids whose tasks may have ended, handed from the event thread to the
// batch's thread.
class Endings {
 public:
  void push(const std::string& id) {
    {
      std::lock_guard<std::mutex> g(mu_);
      ids_.push_back(id);
    }
    cv_.notify_one();
  }
  std::vector<std::string> wait(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, timeout, [this] { return !ids_.empty(); });
    return std::exchange(ids_, {});
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> ids_;
};

enum class State : std::uint8_t { kTodo, kInFlight, kBefore, kEnded, kRefused };

// Errors of create_task that concern the page, not the run: the page is
// reported failed and the others go on.
bool page_error(taskmgr::ErrorCode c) {
  return c == taskmgr::ErrorCode::kInvalidArgument || c == taskmgr::ErrorCode::kNotFound ||
         c == taskmgr::ErrorCode::kMemoryLimitExceeded ||
         c == taskmgr::ErrorCode::kDeviceUnavailable;
}

// What a page's latest task is, compactly (a run may have 100,000 pages).
struct Outcome {
  TaskStatus status = TaskStatus::kPending;
  taskmgr::TaskFailureReason reason = taskmgr::TaskFailureReason::kNone;
  bool any = false;  // a task was found
};

}  // namespace

Batch::Batch(taskmgr::TaskManager& tm, const Plan& plan, BatchOptions options)
    : tm_(tm), plan_(plan), options_(std::move(options)) {}

std::string Batch::source_for(const Document& d, const Page& p) const {
  // The page, and what was asked of it: a page read before for another
  // output (no PDF in its result) or at another dpi is read again.
  std::string s = page_key(d, p);
  if (!options_.settings.empty()) s += "|" + options_.settings;
  if (!options_.output.empty()) s += "|" + options_.output;
  if (options_.words) s += "|words";  // a page read without them is read again for them
  if (d.pdf) s += "|dpi=" + std::to_string(options_.dpi);
  return s;
}

Summary Batch::run(const std::function<void(const PageEnd&)>& on_end,
                   const std::function<void(std::size_t)>& on_wait) {
  const std::size_t n = plan_.pages.size();
  std::unordered_map<std::string, std::size_t> index;
  index.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const Page& p = plan_.pages[i];
    index.emplace(source_for(plan_.documents[p.doc], p), i);
  }
  std::vector<State> state(n, State::kTodo);
  std::vector<Outcome> run_outcome(n);
  std::unordered_map<std::string, std::size_t> flight;  // task id -> page
  Summary s;
  s.pages = n;

  // What earlier runs left, oldest first: a page's latest ended task says
  // whether it is done; an unfinished one (queued again by the manager when
  // it opened) is adopted.
  taskmgr::TaskFilter filter;
  filter.service = "ocr";
  filter.with_payloads = false;  // how they stand, not their results (a run may have 100,000)
  // Per page, its latest ended task: completed (done), or failed
  // INTERRUPTED (the process died under it every time: not tried again
  // unless redone); otherwise "" (tried again).
  std::unordered_map<std::size_t, std::string> latest_ended;
  for (const Task& t : tm_.list_tasks(filter)) {
    const auto it = index.find(source_of(t));
    if (it == index.end()) continue;
    const std::size_t i = it->second;
    if (taskmgr::is_terminal(t.status)) {
      const bool stays = t.status == TaskStatus::kCompleted ||
                         (t.status == TaskStatus::kFailed &&
                          t.failure_reason == taskmgr::TaskFailureReason::kInterrupted);
      latest_ended[i] = stays ? t.id : std::string();
      continue;
    }
    if (state[i] == State::kInFlight) {  // one unfinished task per page: the oldest
      tm_.cancel_task(t.id);
      ++s.duplicates_cancelled;
      continue;
    }
    if (t.status == TaskStatus::kPending) {
      try {
        tm_.start_task(t.id);
      } catch (const taskmgr::Error&) {
        tm_.cancel_task(t.id);  // it cannot be queued now: a new task replaces it
        ++s.duplicates_cancelled;
        continue;
      }
    }
    state[i] = State::kInFlight;
    flight.emplace(t.id, i);
    ++s.adopted;
  }
  // Pages completed before, reported first (unless redone).
  if (!options_.redo) {
    for (std::size_t i = 0; i < n; ++i) {
      const auto it = latest_ended.find(i);
      if (state[i] != State::kTodo || it == latest_ended.end() || it->second.empty()) continue;
      state[i] = State::kBefore;
      on_end(PageEnd{i, tm_.get_task(it->second), true});
    }
  }
  latest_ended.clear();

  Endings endings;
  const taskmgr::SubscriptionId sub = tm_.subscribe([&endings](const taskmgr::EventRecord& e) {
    // A task has ended when its final event is out and its cleanup is done:
    // either may come last.
    if (e.event == taskmgr::TaskEvent::kCompleted || e.event == taskmgr::TaskEvent::kFailed ||
        e.event == taskmgr::TaskEvent::kCancelled ||
        e.event == taskmgr::TaskEvent::kCleanupCompleted) {
      endings.push(e.task_id);
    }
  });
  struct Unsubscribe {
    taskmgr::TaskManager& tm;
    taskmgr::SubscriptionId id;
    ~Unsubscribe() { tm.unsubscribe(id); }
  } unsubscribe{tm_, sub};

  std::size_t next = 0, ended = 0;
  std::string fatal;
  const auto refuse = [&](std::size_t i, const std::string& why) {
    state[i] = State::kRefused;
    ++ended;
    Task t;
    t.status = TaskStatus::kFailed;
    t.failure_reason = taskmgr::TaskFailureReason::kInvalidInput;
    t.failure_message = "not accepted as a task: " + why;
    on_end(PageEnd{i, std::move(t), false});
  };
  const auto stopped = [&] { return options_.stop != nullptr && options_.stop->load() != 0; };
  const auto submit = [&] {
    while (fatal.empty() && !stopped() && flight.size() < options_.window && next < n) {
      const std::size_t i = next;
      if (state[i] != State::kTodo) {
        ++next;
        continue;
      }
      const Page& p = plan_.pages[i];
      const Document& d = plan_.documents[p.doc];
      if (d.special) {  // reading a FIFO would block a worker for good
        ++next;
        refuse(i, "not a regular file (a FIFO, socket or device): " + d.shown);
        continue;
      }
      taskmgr::TaskCreateRequest r;
      r.service = "ocr";
      r.input.path = d.path;
      r.priority = options_.priority;
      r.device = options_.device;
      r.options_json = options_for(options_, source_for(d, p), d, p.number);
      r.start = true;  // stored already queued: one commit, never left pending
      try {
        const Task t = tm_.create_task(r);
        state[i] = State::kInFlight;
        flight.emplace(t.id, i);
        ++next;
      } catch (const taskmgr::Error& e) {
        if (e.code() == taskmgr::ErrorCode::kQueueFull && !flight.empty()) return;  // later
        if (page_error(e.code())) {
          ++next;
          refuse(i, e.what());
          continue;
        }
        fatal = e.what();  // the store refused it (disk full, ...): stop submitting
      }
    }
  };
  // Pages that ended, handed to on_end only after the next pages are
  // submitted: what the caller does with a result (parse it, write an
  // output) never keeps a worker waiting for its next page.
  std::vector<PageEnd> ended_pages;
  const auto finish = [&](const std::string& id) {
    const auto it = flight.find(id);
    if (it == flight.end()) return;
    std::optional<Task> t = tm_.wait_task(id, std::chrono::milliseconds(0));
    if (!t) return;  // not ended yet, or its cleanup is still running
    const std::size_t i = it->second;
    flight.erase(it);
    state[i] = State::kEnded;
    run_outcome[i] = Outcome{t->status, t->failure_reason, true};
    ++ended;
    ended_pages.push_back(PageEnd{i, std::move(*t), false});
  };
  const auto deliver = [&] {
    for (const PageEnd& e : ended_pages) on_end(e);
    ended_pages.clear();
  };
  const auto poll = [&] {
    std::vector<std::string> ids;
    ids.reserve(flight.size());
    for (const auto& [id, i] : flight) ids.push_back(id);
    for (const auto& id : ids) finish(id);
  };
  submit();
  poll();  // adopted tasks that ended before the subscription
  auto last_poll = std::chrono::steady_clock::now();
  while (!flight.empty() || (next < n && fatal.empty() && !stopped())) {
    submit();
    deliver();
    const auto ids = endings.wait(std::chrono::milliseconds(200));
    for (const auto& id : ids) finish(id);
    const auto now = std::chrono::steady_clock::now();
    if (ids.empty() || now - last_poll > std::chrono::seconds(1)) {
      poll();  // a belt to the events' braces: they are not the only signal
      last_poll = now;
      on_wait(ended);
    }
  }
  deliver();
  if (!fatal.empty()) s.problems.push_back(fatal);

  // The summary, from the database: what it holds for each page.
  std::vector<Outcome> db(n);
  for (const Task& t : tm_.list_tasks(filter)) {
    const auto it = index.find(source_of(t));
    if (it != index.end()) db[it->second] = Outcome{t.status, t.failure_reason, true};
  }
  std::size_t disagree = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const Outcome& o = db[i];
    if (state[i] == State::kRefused) {
      ++s.refused;  // no task: nothing in the database
    } else if (state[i] == State::kBefore && o.status == TaskStatus::kCompleted) {
      ++s.before;
    } else if (o.status == TaskStatus::kCompleted) {
      ++s.completed;
    } else if (o.status == TaskStatus::kFailed) {
      ++s.failed;
      ++s.failures[std::string(taskmgr::to_string(o.reason))];
    } else if (o.status == TaskStatus::kCancelled) {
      ++s.cancelled;
    } else if (state[i] == State::kTodo) {
      ++s.not_started;
    } else {
      ++s.unfinished;
    }
    if (state[i] == State::kEnded && run_outcome[i].status != o.status) ++disagree;
  }
  const taskmgr::StoreStats st = tm_.get_task_metrics().store;
  if (st.failed_writes > 0) {
    s.problems.push_back(std::to_string(st.failed_writes) + " write(s) to the database failed (" +
                         std::to_string(st.backlog) + " still waiting, " +
                         std::to_string(st.dropped_writes) + " given up): " + st.last_error);
  }
  if (disagree > 0) {
    s.problems.push_back("the database does not hold the result of " + std::to_string(disagree) +
                         " page(s) that ended in this run");
  }
  return s;
}

}  // namespace ocrcli
