#include "taskmgr/task_queue.hpp"

#include <algorithm>
#include <limits>

#include <set>
#include <string_view>
#include <unordered_map>

#include "sync.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr {

struct TaskQueue::Impl {
  struct Entry {
    QueuedTask task;
    // Written by choose_locked through a const set element: mu guards it.
    mutable std::optional<SteadyTime> passed_over_since;
    bool delayed = false;  // enqueued_at moved later (delay): by_seq is no longer its order
  };
  struct Order {
    const Options* options;
    bool operator()(const Entry& a, const Entry& b) const;
  };
  using DeviceQueue = std::set<Entry, Order>;
  struct Location {
    DeviceQueue* queue;
    DeviceQueue::iterator it;
  };
  using SeqMap = std::map<std::uint64_t, Location>;
  using Index = std::unordered_map<std::string_view, std::uint64_t>;

  Impl(Options o, const DeviceRegistry& d, std::shared_ptr<const Clock> c)
      : options(o), devices(d), clock(c ? std::move(c) : Clock::system()) {}

  void insert_locked(QueuedTask task) REQUIRES(mu);
  void erase_locked(std::string_view task_id) REQUIRES(mu);
  std::optional<DeviceQueue::iterator> choose_locked(const std::string& device,
                                                     const Eligible& eligible,
                                                     const Eligible& hidden) REQUIRES(mu);

  // Fixed at construction.
  const Options options;
  const DeviceRegistry& devices;  // its own lock is taken under mu (free_memory)
  const std::shared_ptr<const Clock> clock;

  detail::Mutex mu;
  // Set nodes never move: the index views each entry's own task_id, and a
  // device's queue stays in queues once created (empty or not).
  std::map<std::string, DeviceQueue> queues GUARDED_BY(mu);
  Index index GUARDED_BY(mu);  // task id -> sequence
  // Arrival order, which is also enqueued_at order (a monotonic clock): the
  // oldest is first (queue timeout).
  SeqMap by_seq GUARDED_BY(mu);
  // Nodes of removed entries, reused by the next inserts (insert_locked).
  static constexpr std::size_t kNodeCache = 1024;
  std::vector<DeviceQueue::node_type> free_entries GUARDED_BY(mu);
  std::vector<SeqMap::node_type> free_seq GUARDED_BY(mu);
  std::vector<Index::node_type> free_index GUARDED_BY(mu);
  std::uint64_t next_sequence GUARDED_BY(mu) = 1;
  std::size_t delayed GUARDED_BY(mu) = 0;  // entries with delayed set
};

namespace {
__extension__ typedef __int128 Wide;  // GCC and Clang (-Wpedantic: an extension)

// -1 when x ranks above y by priority (aged: priority + waited / interval,
// equivalently priority * interval - enqueued_at), 1 when below, 0 when equal.
int rank_order(const QueuedTask& x, const QueuedTask& y, Duration aging) {
  if (aging.count() <= 0) {
    if (x.priority == y.priority) return 0;
    return x.priority > y.priority ? -1 : 1;
  }
  // (px - py) * I against ex - ey, in 128 bits: no priority or interval
  // overflows it.
  const Wide levels = static_cast<Wide>(x.priority) - y.priority;
  const Wide lhs = levels * aging.count();
  const Wide rhs = static_cast<Wide>(x.enqueued_at.time_since_epoch().count()) -
                   y.enqueued_at.time_since_epoch().count();
  if (lhs == rhs) return 0;
  return lhs > rhs ? -1 : 1;
}
}  // namespace

bool TaskQueue::Impl::Order::operator()(const Entry& a, const Entry& b) const {
  const QueuedTask& x = a.task;
  const QueuedTask& y = b.task;
  if (options->enable_priority_queue) {
    if (const int r = rank_order(x, y, options->priority_aging); r != 0) return r < 0;
    if (options->ordering == QueueOrdering::kLargestFirst &&
        x.estimated_memory_mb != y.estimated_memory_mb) {
      return x.estimated_memory_mb > y.estimated_memory_mb;
    }
  }
  return x.sequence < y.sequence;
}

TaskQueue::TaskQueue(Options options, const DeviceRegistry& devices,
                     std::shared_ptr<const Clock> clock)
    : impl_(std::make_unique<Impl>(options, devices, std::move(clock))) {}

TaskQueue::~TaskQueue() = default;

// Nodes of removed entries are kept (up to kNodeCache of each kind) and
// filled in again by the next insert: a task queued by one thread and taken
// by another then allocates and frees nothing in the steady state (no
// allocator lock shared by the two threads), and the entry's strings keep
// their capacity.
void TaskQueue::Impl::insert_locked(QueuedTask task) {
  task.sequence = next_sequence++;
  task.enqueued_at = clock->steady_now();
  auto qit = queues.find(task.device);
  if (qit == queues.end()) qit = queues.emplace(task.device, DeviceQueue(Order{&options})).first;
  DeviceQueue& q = qit->second;
  DeviceQueue::iterator it;
  if (!free_entries.empty()) {
    DeviceQueue::node_type node = std::move(free_entries.back());
    free_entries.pop_back();
    QueuedTask& t = node.value().task;
    t.task_id.assign(task.task_id);  // into the node's capacity
    t.device.assign(task.device);
    t.service.assign(task.service);
    t.estimated_memory_mb = task.estimated_memory_mb;
    t.priority = task.priority;
    t.enqueued_at = task.enqueued_at;
    t.sequence = task.sequence;
    node.value().passed_over_since.reset();
    node.value().delayed = false;
    it = q.insert(std::move(node)).position;
  } else {
    it = q.insert(Entry{std::move(task), std::nullopt}).first;
  }
  if (!free_seq.empty()) {
    auto node = std::move(free_seq.back());
    free_seq.pop_back();
    node.key() = it->task.sequence;
    node.mapped() = Location{&q, it};
    by_seq.insert(by_seq.end(), std::move(node));
  } else {
    by_seq.emplace_hint(by_seq.end(), it->task.sequence, Location{&q, it});
  }
  if (!free_index.empty()) {
    auto node = std::move(free_index.back());
    free_index.pop_back();
    node.key() = std::string_view(it->task.task_id);
    node.mapped() = it->task.sequence;
    index.insert(std::move(node));
  } else {
    index.emplace(std::string_view(it->task.task_id), it->task.sequence);
  }
}

void TaskQueue::Impl::erase_locked(std::string_view task_id) {
  auto ix = index.find(task_id);
  if (ix == index.end()) return;
  auto bs = by_seq.find(ix->second);
  const Location loc = bs->second;
  if (loc.it->delayed) --delayed;
  auto index_node = index.extract(ix);  // its key views the entry (never read again)
  auto seq_node = by_seq.extract(bs);
  auto entry_node = loc.queue->extract(loc.it);
  if (free_entries.size() < kNodeCache) {
    free_index.push_back(std::move(index_node));
    free_seq.push_back(std::move(seq_node));
    free_entries.push_back(std::move(entry_node));
  }
}

void TaskQueue::add_task(QueuedTask task, int priority, bool enforce_limit) {
  if (task.task_id.empty() || task.device.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "add_task: a queued task needs an id and a device");
  }
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  if (im.index.count(task.task_id)) {
    throw Error(ErrorCode::kInvalidState, "task " + task.task_id + " is already queued");
  }
  if (enforce_limit && im.index.size() >= im.options.max_queue_size) {
    throw Error(ErrorCode::kQueueFull, "queue full: " + std::to_string(im.index.size()) +
                                           " tasks queued (tasks.max_queue_size = " +
                                           std::to_string(im.options.max_queue_size) + "); task " +
                                           task.task_id + " was not queued");
  }
  task.priority = priority;
  im.insert_locked(std::move(task));
}

void TaskQueue::add_task(const Task& task, int priority) {
  QueuedTask q;
  q.task_id = task.id;
  q.device = task.assigned_device.value_or("");
  q.service = task.service;
  q.estimated_memory_mb = task.estimated_memory_mb.value_or(0);
  add_task(std::move(q), priority);
}

// `eligible` is the manager's own filter (pool capacity), not host code.
std::optional<TaskQueue::Impl::DeviceQueue::iterator> TaskQueue::Impl::choose_locked(
    const std::string& device, const Eligible& eligible, const Eligible& hidden) {
  auto qit = queues.find(device);
  if (qit == queues.end()) return std::nullopt;
  std::int64_t free_mb = 0;
  if (options.check_memory) {
    const auto free = devices.free_memory(device);
    if (!free) return std::nullopt;  // unknown or unavailable
    free_mb = *free;
  }
  const SteadyTime now = clock->steady_now();
  for (auto it = qit->second.begin(); it != qit->second.end(); ++it) {
    if (hidden && hidden(it->task)) continue;
    if (options.check_memory && it->task.estimated_memory_mb > free_mb) {
      if (!it->passed_over_since) it->passed_over_since = now;
      if (now - *it->passed_over_since >= options.starvation_after) {
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
                                                   const Eligible& eligible,
                                                   const Eligible& hidden) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.choose_locked(device, eligible, hidden);
  if (!it) return std::nullopt;
  QueuedTask out = (*it)->task;
  im.erase_locked(out.task_id);
  return out;
}

std::optional<QueuedTask> TaskQueue::peek_next_task(const std::string& device,
                                                    const Eligible& eligible,
                                                    const Eligible& hidden) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.choose_locked(device, eligible, hidden);
  if (!it) return std::nullopt;
  return (*it)->task;
}

void TaskQueue::requeue_task(QueuedTask task) {
  if (task.task_id.empty() || task.device.empty()) {
    throw Error(ErrorCode::kInvalidArgument,
                "requeue_task: a queued task needs an id and a device");
  }
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  im.erase_locked(task.task_id);
  if (task.priority > std::numeric_limits<int>::min()) task.priority -= 1;  // saturates
  im.insert_locked(std::move(task));
}

bool TaskQueue::set_priority(const std::string& task_id, int priority) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto ix = im.index.find(task_id);
  if (ix == im.index.end()) return false;
  Impl::Location& loc = im.by_seq.find(ix->second)->second;
  // The node keeps its strings (the index's key views its task_id).
  auto node = loc.queue->extract(loc.it);
  node.value().task.priority = priority;
  loc.it = loc.queue->insert(std::move(node)).position;
  return true;
}

bool TaskQueue::precedes(const QueuedTask& a, const QueuedTask& b) const {
  const Options& o = impl_->options;  // fixed at construction: no lock
  if (o.enable_priority_queue) {
    if (const int r = rank_order(a, b, o.priority_aging); r != 0) return r < 0;
  }
  return a.sequence < b.sequence;
}

bool TaskQueue::remove(const std::string& task_id) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  if (!im.index.count(task_id)) return false;
  im.erase_locked(task_id);
  return true;
}

std::vector<QueuedTask> TaskQueue::take_expired(SteadyTime cutoff, const Eligible& exempt) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  std::vector<QueuedTask> out;
  // Arrival order is enqueued_at order unless a task was delayed: then
  // every entry is looked at.
  for (auto it = im.by_seq.begin(); it != im.by_seq.end();) {
    const QueuedTask& t = it->second.it->task;
    if (t.enqueued_at > cutoff) {
      if (im.delayed == 0) break;
      ++it;
      continue;
    }
    if (exempt && exempt(t)) {
      ++it;
      continue;
    }
    out.push_back(t);
    ++it;  // erase_locked invalidates only the erased entry's iterator
    im.erase_locked(out.back().task_id);
  }
  if (im.delayed > 0) {
    std::sort(out.begin(), out.end(), [](const QueuedTask& a, const QueuedTask& b) {
      return a.enqueued_at != b.enqueued_at ? a.enqueued_at < b.enqueued_at
                                            : a.sequence < b.sequence;
    });
  }
  return out;
}

bool TaskQueue::delay(const std::string& task_id, Duration by) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto ix = im.index.find(task_id);
  if (ix == im.index.end()) return false;
  if (by <= Duration::zero()) return true;
  Impl::Location& loc = im.by_seq.find(ix->second)->second;
  auto node = loc.queue->extract(loc.it);  // keeps its strings (the index views its id)
  node.value().task.enqueued_at += by;
  if (!node.value().delayed) {
    node.value().delayed = true;
    ++im.delayed;
  }
  loc.it = loc.queue->insert(std::move(node)).position;
  return true;
}

bool TaskQueue::contains(const std::string& task_id) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  return im.index.count(task_id) != 0;
}

std::size_t TaskQueue::size() const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  return im.index.size();
}

std::size_t TaskQueue::size(const std::string& device) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.queues.find(device);
  return it == im.queues.end() ? 0 : it->second.size();
}

std::map<std::string, std::size_t> TaskQueue::sizes() const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  std::map<std::string, std::size_t> out;
  for (const auto& [d, q] : im.queues) {
    if (!q.empty()) out[d] = q.size();
  }
  return out;
}

std::vector<QueuedTask> TaskQueue::snapshot(const std::string& device) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  std::vector<QueuedTask> out;
  auto it = im.queues.find(device);
  if (it == im.queues.end()) return out;
  for (const auto& e : it->second) out.push_back(e.task);
  return out;
}

}  // namespace taskmgr
