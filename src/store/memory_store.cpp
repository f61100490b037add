#include <map>
#include <mutex>
#include <unordered_map>

#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr {

TaskStore::~TaskStore() = default;
std::size_t TaskStore::prune_finished(Timestamp) { return 0; }

namespace {

class MemoryStore final : public TaskStore {
 public:
  void insert_task(const Task& task, const EventRecord& created) override {
    std::lock_guard<std::mutex> g(mu_);
    auto [it, inserted] = tasks_.try_emplace(task.id);
    if (!inserted) throw Error(ErrorCode::kInvalidState, "task " + task.id + " exists already");
    it->second.task = task;
    it->second.order = next_order_++;
    it->second.events.push_back(created);
    order_.emplace(it->second.order, task.id);
  }

  void update_task(const Task& task, const std::vector<EventRecord>& events) override {
    std::lock_guard<std::mutex> g(mu_);
    auto it = tasks_.find(task.id);
    if (it == tasks_.end()) return;  // pruned or never inserted: nothing to update
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
    auto& ev = it->second.events;
    ev.insert(ev.end(), events.begin(), events.end());
  }

  void append_metrics(const std::vector<MetricSample>& samples) override {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& s : samples) {
      auto it = tasks_.find(s.task_id);
      if (it != tasks_.end()) it->second.metrics.push_back(s);
    }
  }

  std::optional<Task> load_task(const std::string& id) override {
    std::lock_guard<std::mutex> g(mu_);
    auto it = tasks_.find(id);
    if (it == tasks_.end()) return std::nullopt;
    return it->second.task;
  }

  std::vector<Task> list_tasks(const TaskFilter& f) override {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<Task> out;
    for (auto it = order_.rbegin(); it != order_.rend(); ++it) {
      const Task& t = tasks_.at(it->second).task;
      if (f.status && t.status != *f.status) continue;
      if (!f.service.empty() && t.service != f.service) continue;
      out.push_back(t);
      if (f.limit != 0 && out.size() >= f.limit) break;
    }
    return {out.rbegin(), out.rend()};
  }

  std::vector<EventRecord> load_events(const std::string& task_id) override {
    std::lock_guard<std::mutex> g(mu_);
    auto it = tasks_.find(task_id);
    if (it == tasks_.end()) return {};
    return it->second.events;
  }

  std::vector<MetricSample> load_metrics(const std::string& task_id) override {
    std::lock_guard<std::mutex> g(mu_);
    auto it = tasks_.find(task_id);
    if (it == tasks_.end()) return {};
    return it->second.metrics;
  }

  std::vector<Task> load_unfinished() override {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<Task> out;
    for (const auto& [order, id] : order_) {
      const Task& t = tasks_.at(id).task;
      if (!is_terminal(t.status) || !t.resource_cleanup_completed) out.push_back(t);
    }
    return out;
  }

  std::size_t prune_finished(Timestamp finished_before) override {
    std::lock_guard<std::mutex> g(mu_);
    std::size_t n = 0;
    for (auto it = order_.begin(); it != order_.end();) {
      const Task& t = tasks_.at(it->second).task;
      if (is_terminal(t.status) && t.resource_cleanup_completed && t.finished_at &&
          *t.finished_at < finished_before) {
        tasks_.erase(it->second);
        it = order_.erase(it);
        ++n;
      } else {
        ++it;
      }
    }
    return n;
  }

  void flush() override {}
  std::string describe() const override { return "memory"; }

 private:
  struct Row {
    Task task;
    std::uint64_t order = 0;
    std::vector<EventRecord> events;
    std::vector<MetricSample> metrics;
  };
  std::mutex mu_;
  std::unordered_map<std::string, Row> tasks_;
  std::map<std::uint64_t, std::string> order_;
  std::uint64_t next_order_ = 1;
};

}  // namespace

std::shared_ptr<TaskStore> make_memory_store() { return std::make_shared<MemoryStore>(); }

}  // namespace taskmgr
