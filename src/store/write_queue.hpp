// Private to the durable stores: the queue of writes and its group commit,
// which the SQLite and the PostgreSQL store share. A store is the queue's
// WriteBackend: it writes a group of queued writes in one transaction; the
// queue decides what goes into which transaction, who commits it (a caller
// of insert_tasks as the leader, or the writer thread), and what becomes of
// writes that fail (an insert is refused to its caller; an update or a
// metrics batch is kept and retried in order; while the backlog of failed
// writes is full, new inserts are refused), and what reads see of writes
// that are not in the database (the latest state of each task whose update
// waits in the backlog or was given up: overlay_task, list_tasks).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "../sync.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr::detail {

// New tasks, inserted together (one transaction: all or none).
struct InsertOp {
  const std::vector<NewTask>* tasks;  // the caller's, alive until `done`
  std::promise<void> done;
};
struct UpdateOp {
  Task task;
  std::vector<EventRecord> events;
  // A shared queue's fence (the claim the host holds the task by; 0 = none):
  // the backend writes the update only while the row still carries it.
  std::int64_t fence = 0;
};
struct MetricsOp {
  std::vector<MetricSample> samples;
  std::vector<std::int64_t> fences;  // one per sample, or empty: as UpdateOp::fence
};
using WriteOp = std::variant<InsertOp, UpdateOp, MetricsOp>;

// A write the database refuses for its data (a value it cannot hold, a
// constraint it breaks): trying it again cannot succeed. An asynchronous
// write that fails so on its own is given up (StoreStats::dropped_writes,
// named in last_error; a manager logs it and close() reports it) instead of
// blocking every write queued after it.
class RejectedWrite : public Error {
 public:
  RejectedWrite(ErrorCode code, const std::string& message) : Error(code, message) {}
};

// The database side of a store.
class WriteBackend {
 public:
  virtual ~WriteBackend() = default;
  // Writes ops[0..n) in one transaction, all of them or none. An update
  // whose superseded[i] is set stores its events only: a later update among
  // the n rewrites the same row (an update writes the whole mutable state).
  // Throws on failure (any exception; the transaction rolled back): an
  // Error's code and message are kept, any other exception counts as
  // kIoError.
  virtual void write(WriteOp* ops, std::size_t n, const std::vector<bool>& superseded) = 0;
};

class WriteQueue {
 public:
  struct Options {
    std::size_t max_batch = 1000;      // most writes committed in one transaction
    std::string where;                 // names the database in messages ("/path/to.db")
    std::size_t max_backlog = 100000;  // failed writes kept; when full, inserts are refused
  };

  // Starts the writer thread. `backend` must outlive stop().
  WriteQueue(WriteBackend& backend, Options options);
  // stop()s.
  ~WriteQueue();
  WriteQueue(const WriteQueue&) = delete;
  WriteQueue& operator=(const WriteQueue&) = delete;

  // TaskStore::insert_tasks: returns once the tasks are committed; throws
  // Error when they cannot be (nothing of them kept), kIoError at once while
  // the backlog holds max_backlog failed writes.
  void insert(const std::vector<NewTask>& tasks) REQUIRES(!mu_, !commit_mu_);
  // TaskStore::update_task and append_metrics: queued, committed later.
  // `fence`, `fences`: UpdateOp's and MetricsOp's.
  void update(Task task, std::vector<EventRecord> events, std::int64_t fence = 0) REQUIRES(!mu_);
  void append(std::vector<MetricSample> samples, std::vector<std::int64_t> fences = {})
      REQUIRES(!mu_);
  // Returns once every write queued before it was tried (committed, or
  // failed and kept in the backlog). retry_backlog: then the backlog is
  // tried once more (TaskStore::flush; reads do not, they only wait).
  void flush(bool retry_backlog = false) REQUIRES(!mu_, !commit_mu_);
  // What reads see of writes that are not in the database: `row` as read
  // from it, with the latest state an unpersisted update gave the task
  // (its mutable fields; the row keeps its input and created_at).
  std::optional<Task> overlay_task(std::optional<Task> row) const REQUIRES(!mu_);
  // TaskStore::list_tasks through the same overlay: `query` runs the
  // filter on the database, `load` reads one task from it. Filters and the
  // limit apply to the state a task has with its unpersisted updates.
  std::vector<Task> list_tasks(
      const TaskFilter& filter, const std::function<std::vector<Task>(const TaskFilter&)>& query,
      const std::function<std::optional<Task>(const std::string&)>& load) const REQUIRES(!mu_);
  // The counters of StoreStats.
  StoreStats stats() const REQUIRES(!mu_);
  // Writes queued later are refused (kInvalidState); the writer thread
  // commits what is queued and ends. Idempotent.
  void stop() REQUIRES(!mu_);

 private:
  std::uint64_t enqueue(WriteOp op, bool wake_writer = true) REQUIRES(!mu_);
  void commit_queued(std::uint64_t until = UINT64_MAX) REQUIRES(!mu_, !commit_mu_);
  void end_commit_locked(std::size_t n) REQUIRES(mu_);
  void commit(std::vector<WriteOp>& batch) REQUIRES(commit_mu_, !mu_);
  void note_failure(const std::string& why) REQUIRES(!mu_);
  // The overlay: `task` is the latest state of its task, not in the
  // database (an update kept in the backlog or given up); forget: an
  // update of the task committed.
  void remember_unpersisted(const Task& task) REQUIRES(!mu_);
  void forget_unpersisted(const std::vector<WriteOp>& committed) REQUIRES(!mu_);
  std::unordered_map<std::string, Task> unpersisted_snapshot() const REQUIRES(!mu_);
  void run_writer() REQUIRES(!mu_, !commit_mu_);

  WriteBackend& backend_;
  const Options options_;

  // Whoever commits holds commit_mu_: a leader, the writer thread, a backlog
  // retry.
  Mutex commit_mu_;
  std::deque<WriteOp> backlog_ GUARDED_BY(commit_mu_);  // failed writes, retried in order

  // The queue of writes and the state of the group commit.
  mutable Mutex mu_;
  std::condition_variable cv_;       // wakes the writer thread
  std::condition_variable done_cv_;  // a commit ended
  std::deque<WriteOp> ops_ GUARDED_BY(mu_);
  std::uint64_t enqueued_ GUARDED_BY(mu_) = 0;
  std::uint64_t committed_ GUARDED_BY(mu_) = 0;
  bool stop_ GUARDED_BY(mu_) = false;
  bool flush_requested_ GUARDED_BY(mu_) = false;
  std::string last_error_ GUARDED_BY(mu_);   // StoreStats::last_error
  bool committing_ GUARDED_BY(mu_) = false;  // a leader is committing a batch
  bool writer_idle_ GUARDED_BY(mu_) = false;
  // Per task id, the latest state of a task whose update is not in the
  // database (in the backlog, or given up).
  std::unordered_map<std::string, Task> unpersisted_ GUARDED_BY(mu_);
  std::atomic<std::size_t> unpersisted_size_{0};  // unpersisted_.size(), read without mu_

  std::atomic<std::uint64_t> commits_{0};        // transactions committed
  std::atomic<std::uint64_t> writes_{0};         // ops committed
  std::atomic<std::uint64_t> failed_writes_{0};  // asynchronous writes that failed once
  std::atomic<std::uint64_t> dropped_writes_{
      0};  // given up: refused by the database for their data
  std::atomic<std::size_t> backlog_size_{0};
  std::thread writer_;

  static constexpr std::chrono::milliseconds kWriterDelay{2};
  static constexpr std::chrono::milliseconds kBacklogRetry{250};
};

}  // namespace taskmgr::detail
