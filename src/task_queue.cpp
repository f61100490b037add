#include "taskmgr/task_queue.hpp"

#include "taskmgr/error.hpp"

namespace taskmgr {

bool TaskQueue::Order::operator()(const Entry& a, const Entry& b) const {
  const QueuedTask& x = a.task;
  const QueuedTask& y = b.task;
  if (options->enable_priority_queue) {
    if (x.priority != y.priority) return x.priority > y.priority;
    if (options->ordering == QueueOrdering::kLargestFirst &&
        x.estimated_memory_mb != y.estimated_memory_mb) {
      return x.estimated_memory_mb > y.estimated_memory_mb;
    }
  }
  return x.sequence < y.sequence;
}

TaskQueue::TaskQueue(Options options, const DeviceRegistry& devices,
                     std::shared_ptr<const Clock> clock)
    : options_(options), devices_(devices), clock_(std::move(clock)) {
  if (!clock_) clock_ = Clock::system();
}

TaskQueue::~TaskQueue() = default;

// Nodes of removed entries are kept (up to kNodeCache of each kind) and
// filled in again by the next insert: a task queued by one thread and taken
// by another then allocates and frees nothing in the steady state (no
// allocator lock shared by the two threads), and the entry's strings keep
// their capacity.
void TaskQueue::insert_locked(QueuedTask task) {
  task.sequence = next_sequence_++;
  task.enqueued_at = clock_->steady_now();
  auto qit = queues_.find(task.device);
  if (qit == queues_.end()) qit = queues_.emplace(task.device, DeviceQueue(Order{&options_})).first;
  DeviceQueue& q = qit->second;
  DeviceQueue::iterator it;
  if (!free_entries_.empty()) {
    DeviceQueue::node_type node = std::move(free_entries_.back());
    free_entries_.pop_back();
    QueuedTask& t = node.value().task;
    t.task_id.assign(task.task_id);  // into the node's capacity
    t.device.assign(task.device);
    t.service.assign(task.service);
    t.estimated_memory_mb = task.estimated_memory_mb;
    t.priority = task.priority;
    t.enqueued_at = task.enqueued_at;
    t.sequence = task.sequence;
    node.value().passed_over_since.reset();
    it = q.insert(std::move(node)).position;
  } else {
    it = q.insert(Entry{std::move(task), std::nullopt}).first;
  }
  if (!free_seq_.empty()) {
    auto node = std::move(free_seq_.back());
    free_seq_.pop_back();
    node.key() = it->task.sequence;
    node.mapped() = Location{&q, it};
    by_seq_.insert(by_seq_.end(), std::move(node));
  } else {
    by_seq_.emplace_hint(by_seq_.end(), it->task.sequence, Location{&q, it});
  }
  if (!free_index_.empty()) {
    auto node = std::move(free_index_.back());
    free_index_.pop_back();
    node.key() = std::string_view(it->task.task_id);
    node.mapped() = it->task.sequence;
    index_.insert(std::move(node));
  } else {
    index_.emplace(std::string_view(it->task.task_id), it->task.sequence);
  }
}

void TaskQueue::erase_locked(std::string_view task_id) {
  auto ix = index_.find(task_id);
  if (ix == index_.end()) return;
  auto bs = by_seq_.find(ix->second);
  const Location loc = bs->second;
  auto index_node = index_.extract(ix);  // its key views the entry (never read again)
  auto seq_node = by_seq_.extract(bs);
  auto entry_node = loc.queue->extract(loc.it);
  if (free_entries_.size() < kNodeCache) {
    free_index_.push_back(std::move(index_node));
    free_seq_.push_back(std::move(seq_node));
    free_entries_.push_back(std::move(entry_node));
  }
}

void TaskQueue::add_task(QueuedTask task, int priority, bool enforce_limit) {
  if (task.task_id.empty() || task.device.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "add_task: a queued task needs an id and a device");
  }
  std::lock_guard<std::mutex> g(mu_);
  if (index_.count(task.task_id)) {
    throw Error(ErrorCode::kInvalidState, "task " + task.task_id + " is already queued");
  }
  if (enforce_limit && index_.size() >= options_.max_queue_size) {
    throw Error(ErrorCode::kQueueFull,
                "queue full: " + std::to_string(index_.size()) +
                    " tasks queued (tasks.max_queue_size = " +
                    std::to_string(options_.max_queue_size) + "); task " + task.task_id +
                    " was not queued");
  }
  task.priority = priority;
  insert_locked(std::move(task));
}

void TaskQueue::add_task(const Task& task, int priority) {
  QueuedTask q;
  q.task_id = task.id;
  q.device = task.assigned_device.value_or("");
  q.service = task.service;
  q.estimated_memory_mb = task.estimated_memory_mb.value_or(0);
  add_task(std::move(q), priority);
}

std::optional<TaskQueue::DeviceQueue::iterator> TaskQueue::choose_locked(
    const std::string& device, const Eligible& eligible) {
  auto qit = queues_.find(device);
  if (qit == queues_.end()) return std::nullopt;
  std::int64_t free_mb = 0;
  if (options_.check_memory) {
    const auto free = devices_.free_memory(device);
    if (!free) return std::nullopt;  // unknown or unavailable
    free_mb = *free;
  }
  const SteadyTime now = clock_->steady_now();
  for (auto it = qit->second.begin(); it != qit->second.end(); ++it) {
    if (options_.check_memory && it->task.estimated_memory_mb > free_mb) {
      if (!it->passed_over_since) it->passed_over_since = now;
      if (now - *it->passed_over_since >= options_.starvation_after) {
        return std::nullopt;  // starved: it goes next, nothing passes it any more
      }
      continue;
    }
    if (eligible && !eligible(it->task)) continue;
    return it;
  }
  return std::nullopt;
}

std::optional<QueuedTask> TaskQueue::get_next_task(const std::string& device,
                                                   const Eligible& eligible) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = choose_locked(device, eligible);
  if (!it) return std::nullopt;
  QueuedTask out = (*it)->task;
  erase_locked(out.task_id);
  return out;
}

std::optional<QueuedTask> TaskQueue::peek_next_task(const std::string& device,
                                                    const Eligible& eligible) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = choose_locked(device, eligible);
  if (!it) return std::nullopt;
  return (*it)->task;
}

void TaskQueue::requeue_task(QueuedTask task) {
  if (task.task_id.empty() || task.device.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "requeue_task: a queued task needs an id and a device");
  }
  std::lock_guard<std::mutex> g(mu_);
  erase_locked(task.task_id);
  task.priority -= 1;
  insert_locked(std::move(task));
}

bool TaskQueue::remove(const std::string& task_id) {
  std::lock_guard<std::mutex> g(mu_);
  if (!index_.count(task_id)) return false;
  erase_locked(task_id);
  return true;
}

std::vector<QueuedTask> TaskQueue::take_expired(SteadyTime cutoff) {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<QueuedTask> out;
  while (!by_seq_.empty() && by_seq_.begin()->second.it->task.enqueued_at <= cutoff) {
    out.push_back(by_seq_.begin()->second.it->task);
    erase_locked(out.back().task_id);
  }
  return out;
}

bool TaskQueue::contains(const std::string& task_id) const {
  std::lock_guard<std::mutex> g(mu_);
  return index_.count(task_id) != 0;
}

std::size_t TaskQueue::size() const {
  std::lock_guard<std::mutex> g(mu_);
  return index_.size();
}

std::size_t TaskQueue::size(const std::string& device) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = queues_.find(device);
  return it == queues_.end() ? 0 : it->second.size();
}

std::map<std::string, std::size_t> TaskQueue::sizes() const {
  std::lock_guard<std::mutex> g(mu_);
  std::map<std::string, std::size_t> out;
  for (const auto& [d, q] : queues_) {
    if (!q.empty()) out[d] = q.size();
  }
  return out;
}

std::vector<QueuedTask> TaskQueue::snapshot(const std::string& device) const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<QueuedTask> out;
  auto it = queues_.find(device);
  if (it == queues_.end()) return out;
  for (const auto& e : it->second) out.push_back(e.task);
  return out;
}

}  // namespace taskmgr
