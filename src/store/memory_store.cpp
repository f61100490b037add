#include <algorithm>
#include <deque>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "../sync.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr {

TaskStore::~TaskStore() = default;
namespace {
constexpr std::int64_t kMaxCursorMicros = 9'000'000'000'000'000;
}  // namespace

std::string to_string(const TaskCursor& c) {
  const auto us =
      std::chrono::duration_cast<std::chrono::microseconds>(c.created_at.time_since_epoch());
  return std::to_string(us.count()) + "_" + c.id;
}

std::optional<TaskCursor> parse_task_cursor(std::string_view s) {
  const auto sep = s.find('_');
  // The id may be empty: an adopted table's row may have one.
  if (sep == std::string_view::npos) return std::nullopt;
  const std::string_view us = s.substr(0, sep);
  const bool negative = !us.empty() && us[0] == '-';
  const std::string_view digits = us.substr(negative ? 1 : 0);
  if (digits.empty() || digits.size() > 16 ||
      digits.find_first_not_of("0123456789") != std::string_view::npos) {
    return std::nullopt;
  }
  std::int64_t n = 0;
  for (char ch : digits) n = n * 10 + (ch - '0');  // 16 digits fit
  // In nanoseconds (the clock's unit) it must fit 64 bits: ±285 years.
  if (n > kMaxCursorMicros) return std::nullopt;
  TaskCursor c;
  c.created_at = Timestamp(std::chrono::duration_cast<Timestamp::duration>(
      std::chrono::microseconds(negative ? -n : n)));
  c.id = std::string(s.substr(sep + 1));
  return c;
}

std::size_t TaskStore::prune_finished(Timestamp) { return 0; }
std::size_t TaskStore::delete_tasks(const std::vector<std::string>&) {
  throw Error(ErrorCode::kUnsupported, "the store " + describe() +
                                           " cannot delete tasks (it does not implement "
                                           "TaskStore::delete_tasks)");
}
std::vector<PauseState> TaskStore::load_pauses() { return {}; }
void TaskStore::save_pause(const PauseState&, bool) {
  throw Error(ErrorCode::kUnsupported, "the store " + describe() +
                                           " cannot keep pauses (it does not implement "
                                           "TaskStore::save_pause)");
}
StoreStats TaskStore::stats() const { return {}; }
std::vector<std::string> TaskStore::notices() const { return {}; }
void TaskStore::insert_task(const Task& task, const EventRecord& created) {
  insert_tasks({NewTask{task, {created}}});
}

namespace {

// Rows live in a node-based hash map (stable addresses); order_ keeps them in
// creation order. Events are kept without their task id (the row has it),
// and their details one after the other in one string per row: a task's ~8
// events cost two growing buffers, not eight strings.
class MemoryStore final : public TaskStore {
 public:
  // Copies are made before the lock is taken: the host thread inserting and
  // a worker updating then hold it only for the hash-map work.
  void insert_tasks(const std::vector<NewTask>& tasks) override REQUIRES(!mu_) {
    std::vector<Row> rows(tasks.size());
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      rows[i].task = tasks[i].task;
      rows[i].events.reserve(8);     // a task's usual count in all
      rows[i].details.reserve(768);  // and their usual size
      rows[i].append(tasks[i].events);
    }
    detail::MutexLock g(mu_, detail::MutexLock::Spin{});
    ++commits_;
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      auto [it, fresh] = tasks_.try_emplace(tasks[i].task.id, std::move(rows[i]));
      if (!fresh) {  // all or none: undo this call's inserts
        const std::string id = tasks[i].task.id;
        for (std::size_t j = 0; j < i; ++j) {
          order_.pop_back();
          tasks_.erase(tasks[j].task.id);
        }
        throw Error(ErrorCode::kInvalidState, "task " + id + " exists already");
      }
      ++writes_;
      for (auto& e : it->second.events) e.sequence = ++last_event_;  // as SQLite's row ids
      order_.push_back(&it->second);
    }
  }

  void update_task(const Task& task, const std::vector<EventRecord>& events) override
      REQUIRES(!mu_) {
    detail::MutexLock g(mu_, detail::MutexLock::Spin{});
    auto it = tasks_.find(task.id);
    if (it == tasks_.end()) return;  // pruned or never inserted: nothing to update
    ++commits_;
    ++writes_;
    Task& t = it->second.task;
    t.options_json = task.options_json;
    t.priority = task.priority;
    t.status = task.status;
    t.attempt = task.attempt;
    t.batch_size = task.batch_size;
    t.failure_reason = task.failure_reason;
    t.failure_message = task.failure_message;
    t.queued_at = task.queued_at;
    t.started_at = task.started_at;
    t.finished_at = task.finished_at;
    t.result = task.result;
    t.estimated_memory_mb = task.estimated_memory_mb;
    t.actual_memory_mb = task.actual_memory_mb;
    t.assigned_device = task.assigned_device;
    t.service_instance_id = task.service_instance_id;
    t.resource_cleanup_completed = task.resource_cleanup_completed;
    const std::size_t first = it->second.events.size();
    it->second.append(events);
    for (std::size_t i = first; i < it->second.events.size(); ++i) {
      it->second.events[i].sequence = ++last_event_;
    }
  }

  void append_metrics(const std::vector<MetricSample>& samples) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    for (const auto& s : samples) {
      auto it = tasks_.find(s.task_id);
      if (it != tasks_.end()) it->second.metrics.push_back(s);
    }
  }

  std::optional<Task> load_task(const std::string& id) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    auto it = tasks_.find(id);
    if (it == tasks_.end()) return std::nullopt;
    return it->second.task;
  }

  std::vector<Task> list_tasks(const TaskFilter& f) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    std::vector<Task> out;
    for (auto it = order_.rbegin(); it != order_.rend(); ++it) {
      const Task& t = (*it)->task;
      if (f.status && t.status != *f.status) continue;
      if (!f.service.empty() && t.service != f.service) continue;
      if (f.before && !before_cursor(t, *f.before)) continue;
      if (f.with_payloads) {
        out.push_back(t);
        if (!f.with_input_bytes) out.back().input.leave_out_data();
      } else {
        Task brief = t;  // (copies the payloads once; they are dropped here)
        brief.result.clear();
        brief.result.shrink_to_fit();
        brief.input.leave_out_data();
        out.push_back(std::move(brief));
      }
      if (f.limit != 0 && out.size() >= f.limit) break;
    }
    std::reverse(out.begin(), out.end());
    return out;
  }

  std::vector<EventRecord> load_events(const std::string& task_id) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    auto it = tasks_.find(task_id);
    if (it == tasks_.end()) return {};
    const Row& row = it->second;
    std::vector<EventRecord> out;
    out.reserve(row.events.size());
    for (const auto& e : row.events) {
      EventRecord r;
      r.sequence = e.sequence;
      r.task_id = task_id;
      r.event = e.event;
      r.timestamp = e.timestamp;
      r.details_json.assign(row.details, e.offset, e.length);
      out.push_back(std::move(r));
    }
    return out;
  }

  std::vector<MetricSample> load_metrics(const std::string& task_id) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    auto it = tasks_.find(task_id);
    if (it == tasks_.end()) return {};
    return it->second.metrics;
  }

  std::vector<Task> load_unfinished() override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    std::vector<Task> out;
    for (const Row* row : order_) {
      const Task& t = row->task;
      if (!is_terminal(t.status) || !t.resource_cleanup_completed) {
        out.push_back(t);  // (copies the input bytes once; they are dropped here)
        out.back().input.leave_out_data();
      }
    }
    return out;
  }

  std::size_t prune_finished(Timestamp finished_before) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    std::deque<Row*> kept;
    std::vector<std::string> gone;
    for (Row* row : order_) {
      const Task& t = row->task;
      if (is_terminal(t.status) && t.resource_cleanup_completed && t.finished_at &&
          *t.finished_at < finished_before) {
        gone.push_back(t.id);
      } else {
        kept.push_back(row);
      }
    }
    order_.swap(kept);
    for (const auto& id : gone) tasks_.erase(id);
    return gone.size();
  }

  std::size_t delete_tasks(const std::vector<std::string>& ids) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    std::unordered_set<const Row*> doomed;
    for (const auto& id : ids) {
      auto it = tasks_.find(id);
      if (it == tasks_.end()) continue;
      const Task& t = it->second.task;
      if (is_terminal(t.status) && t.resource_cleanup_completed) doomed.insert(&it->second);
    }
    if (doomed.empty()) return 0;
    std::deque<Row*> kept;
    for (Row* row : order_) {
      if (doomed.count(row) == 0) kept.push_back(row);
    }
    order_.swap(kept);
    std::vector<std::string> gone;
    for (const Row* row : doomed) gone.push_back(row->task.id);
    for (const auto& id : gone) tasks_.erase(id);
    return gone.size();
  }

  std::vector<PauseState> load_pauses() override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    std::vector<PauseState> out;
    for (const auto& [key, p] : pauses_) out.push_back(p);
    return out;
  }
  void save_pause(const PauseState& p, bool paused) override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    ++commits_;
    ++writes_;
    const auto key = std::make_pair(static_cast<int>(p.scope), p.name);
    if (paused) {
      pauses_[key] = p;
    } else {
      pauses_.erase(key);
    }
  }

  void flush() override {}
  std::string describe() const override { return "memory"; }
  StoreStats stats() const override REQUIRES(!mu_) {
    detail::MutexLock g(mu_);
    StoreStats s;
    s.commits = commits_;
    s.writes = writes_;
    return s;
  }

 private:
  struct StoredEvent {
    std::uint64_t sequence = 0;
    TaskEvent event = TaskEvent::kCreated;
    Timestamp timestamp{};
    std::size_t offset = 0, length = 0;  // its details in Row::details
  };
  struct Row {
    Task task;
    std::vector<StoredEvent> events;
    std::string details;  // every event's details_json, one after the other
    std::vector<MetricSample> metrics;

    void append(const std::vector<EventRecord>& evs) {
      for (const auto& e : evs) {
        events.push_back(
            StoredEvent{e.sequence, e.event, e.timestamp, details.size(), e.details_json.size()});
        details += e.details_json;
      }
    }
  };

  mutable detail::Mutex mu_;
  // Each insert_tasks / update_task call is one commit.
  std::uint64_t commits_ GUARDED_BY(mu_) = 0;
  std::uint64_t writes_ GUARDED_BY(mu_) = 0;
  std::uint64_t last_event_ GUARDED_BY(mu_) = 0;  // events are numbered in the order stored, from 1
  std::unordered_map<std::string, Row> tasks_ GUARDED_BY(mu_);
  std::deque<Row*> order_ GUARDED_BY(mu_);  // creation order
  std::map<std::pair<int, std::string>, PauseState> pauses_ GUARDED_BY(mu_);
};

}  // namespace

std::shared_ptr<TaskStore> make_memory_store() { return std::make_shared<MemoryStore>(); }

}  // namespace taskmgr
