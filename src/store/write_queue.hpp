// Private to the durable stores: the queue of writes and its group commit,
// which the SQLite and the PostgreSQL store share. A store is the queue's
// WriteBackend: it writes a group of queued writes in one transaction; the
// queue decides what goes into which transaction, who commits it (a caller
// of insert_tasks as the leader, or the writer thread), and what becomes of
// writes that fail (an insert is refused to its caller; an update or a
// metrics batch is kept and retried in order).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <future>
#include <string>
#include <thread>
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
};
struct MetricsOp {
  std::vector<MetricSample> samples;
};
using WriteOp = std::variant<InsertOp, UpdateOp, MetricsOp>;

// A write the database refuses for its data (a value it cannot hold, a
// constraint it breaks): trying it again cannot succeed. An asynchronous
// write that fails so on its own is given up (StoreStats::dropped_writes)
// instead of blocking every write queued after it.
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
    std::size_t max_batch = 1000;  // most writes committed in one transaction
    std::string where;             // names the database in messages ("/path/to.db")
  };

  // Starts the writer thread. `backend` must outlive stop().
  WriteQueue(WriteBackend& backend, Options options);
  // stop()s.
  ~WriteQueue();
  WriteQueue(const WriteQueue&) = delete;
  WriteQueue& operator=(const WriteQueue&) = delete;

  // TaskStore::insert_tasks: returns once the tasks are committed; throws
  // Error when they cannot be (nothing of them kept).
  void insert(const std::vector<NewTask>& tasks) REQUIRES(!mu_, !commit_mu_);
  // TaskStore::update_task and append_metrics: queued, committed later.
  void update(Task task, std::vector<EventRecord> events) REQUIRES(!mu_);
  void append(std::vector<MetricSample> samples) REQUIRES(!mu_);
  // Returns once every write queued before it was tried (committed, or
  // failed and kept in the backlog).
  void flush() REQUIRES(!mu_);
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

  std::atomic<std::uint64_t> commits_{0};         // transactions committed
  std::atomic<std::uint64_t> writes_{0};          // ops committed
  std::atomic<std::uint64_t> failed_writes_{0};   // asynchronous writes that failed once
  std::atomic<std::uint64_t> dropped_writes_{0};  // given up: refused, or the backlog overflowed
  std::atomic<std::size_t> backlog_size_{0};
  std::thread writer_;

  static constexpr std::chrono::milliseconds kWriterDelay{2};
  static constexpr std::size_t kMaxBacklog = 1'000'000;
  static constexpr std::chrono::milliseconds kBacklogRetry{250};
};

}  // namespace taskmgr::detail
