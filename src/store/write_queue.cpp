// The group commit the durable stores share (write_queue.hpp).
#include "write_queue.hpp"

#include <string_view>
#include <unordered_map>

#include "../forced_unwind.hpp"

namespace taskmgr::detail {
namespace {

// The code and message of the failure being handled (inside a catch).
std::pair<ErrorCode, std::string> current_failure() {
  try {
    throw;
  } catch (const Error& e) {
    return {e.code(), e.what()};
  } catch (const std::exception& e) {
    return {ErrorCode::kIoError, e.what()};
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    return {ErrorCode::kIoError, "unknown exception"};
  }
}

// Inside a catch: whether the database refused the write for its data.
bool rejected() {
  try {
    throw;
  } catch (const RejectedWrite&) {
    return true;
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    return false;
  }
}

// Marks, for each task updated more than once in `batch`, all but its last
// row update as superseded: an update writes the task's whole mutable state,
// so only the last one matters (every event is still inserted).
std::vector<bool> superseded(const std::vector<WriteOp>& batch) {
  std::vector<bool> skip(batch.size(), false);
  std::unordered_map<std::string_view, std::size_t> last;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    if (const auto* up = std::get_if<UpdateOp>(&batch[i])) {
      auto [it, fresh] = last.try_emplace(up->task.id, i);
      if (!fresh) {
        skip[it->second] = true;
        it->second = i;
      }
    }
  }
  return skip;
}

}  // namespace

WriteQueue::WriteQueue(WriteBackend& backend, Options options)
    : backend_(backend), options_(std::move(options)) {
  writer_ = std::thread([this] { run_writer(); });
}

WriteQueue::~WriteQueue() { stop(); }

void WriteQueue::stop() {
  {
    MutexLock g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (writer_.joinable()) writer_.join();
}

void WriteQueue::insert(const std::vector<NewTask>& tasks) {
  if (tasks.empty()) return;
  std::future<void> done;
  std::uint64_t seq = 0;
  {
    InsertOp op{&tasks, {}};
    done = op.done.get_future();
    seq = enqueue(WriteOp(std::move(op)), /*wake_writer=*/false);
  }
  // Leader-based group commit (as LevelDB's writers do): the caller commits
  // everything queued so far itself, its own insert included, unless a
  // commit already in progress took it. No hand-off to the writer thread and
  // back for a lone caller; many callers still share one commit. The leader
  // stops once its own insert is in: what was queued after it is left to
  // the next leader or the writer thread.
  commit_queued(seq);
  done.get();  // returns once committed; rethrows the commit's error
}

void WriteQueue::update(Task task, std::vector<EventRecord> events) {
  task.input = TaskInput{};  // never rewritten
  enqueue(WriteOp(UpdateOp{std::move(task), std::move(events)}));
}

void WriteQueue::append(std::vector<MetricSample> samples) {
  if (!samples.empty()) enqueue(WriteOp(MetricsOp{std::move(samples)}));
}

void WriteQueue::flush() {
  MutexLock l(mu_);
  const std::uint64_t target = enqueued_;
  if (committed_ < target) {
    flush_requested_ = true;
    cv_.notify_all();
  }
  done_cv_.wait(l.native(), [&]() REQUIRES(mu_) { return committed_ >= target || stop_; });
}

StoreStats WriteQueue::stats() const {
  StoreStats s;
  s.commits = commits_.load();
  s.writes = writes_.load();
  s.failed_writes = failed_writes_.load();
  s.dropped_writes = dropped_writes_.load();
  s.backlog = backlog_size_.load();
  {
    MutexLock g(mu_);
    s.queued = enqueued_ - committed_;
    s.last_error = last_error_;
  }
  return s;
}

// Returns the op's sequence number: it is committed once committed_ >= it.
std::uint64_t WriteQueue::enqueue(WriteOp op, bool wake_writer) {
  bool wake = false;
  std::uint64_t seq = 0;
  {
    MutexLock g(mu_);
    if (stop_) throw Error(ErrorCode::kInvalidState, "the store is closed");
    ops_.push_back(std::move(op));
    seq = ++enqueued_;
    // Wake the writer only when it sleeps for want of work (or the batch
    // is full): while it gathers a batch, more writes need no wake-up.
    wake = wake_writer && (writer_idle_ || ops_.size() >= options_.max_batch);
  }
  if (wake) cv_.notify_one();
  return seq;
}

// Group commit, leader and followers (as LevelDB's writers): the first
// caller to find no commit in progress leads: it takes everything queued
// (up to max_batch), commits it, and wakes the others. A caller whose write
// a leader took just waits on done_cv_ for committed_ to pass it: it never
// competes for a lock only to learn that it is done (a caller that just
// returned would win that race again and again, one commit per write).
// Returns when the ops up to `until` (default: all queued now) are committed.
void WriteQueue::commit_queued(std::uint64_t until) {
  MutexLock l(mu_);
  if (until == UINT64_MAX) until = enqueued_;
  while (committed_ < until) {
    if (committing_) {
      done_cv_.wait(l.native());
      continue;
    }
    std::vector<WriteOp> batch;
    while (!ops_.empty() && batch.size() < options_.max_batch) {
      batch.push_back(std::move(ops_.front()));
      ops_.pop_front();
    }
    if (batch.empty()) return;
    committing_ = true;
    l.unlock();
    const std::size_t n = batch.size();  // commit() may prepend the backlog
    try {
      MutexLock c(commit_mu_);  // backlog retries
      commit(batch);
    } catch (...) {
      // Whatever it is (a cancelled thread's forced unwind too): nobody is
      // left waiting for this commit.
      // commit() answers each failure of the database or the backend per
      // op; this is one of its own (no memory). The batch's inserts see a
      // broken promise; nobody waits for its ops forever.
      l.lock();
      end_commit_locked(n);
      throw;
    }
    l.lock();
    end_commit_locked(n);
  }
}

// A commit of n ops ended, whatever became of them.
void WriteQueue::end_commit_locked(std::size_t n) {
  committed_ += n;
  committing_ = false;
  done_cv_.notify_all();
}

void WriteQueue::note_failure(const std::string& why) {
  MutexLock g(mu_);
  last_error_ = "cannot write to " + options_.where + ": " + why;
}

// Commits `batch` in one transaction. On failure, commits each op alone, so
// one bad insert (disk full) fails only its caller.
void WriteQueue::commit(std::vector<WriteOp>& batch) {
  // Writes that failed before (disk full, I/O error) go first, in order:
  // a task's later update must not land before its earlier one.
  if (!backlog_.empty()) {
    std::vector<WriteOp> all;
    all.reserve(backlog_.size() + batch.size());
    for (auto& op : backlog_) all.push_back(std::move(op));
    for (auto& op : batch) all.push_back(std::move(op));
    backlog_.clear();
    batch.swap(all);
  }
  if (batch.empty()) return;  // a backlog retry after a commit that wrote the backlog
  try {
    backend_.write(batch.data(), batch.size(), superseded(batch));
    commits_.fetch_add(1, std::memory_order_relaxed);
    writes_.fetch_add(batch.size(), std::memory_order_relaxed);
    for (auto& op : batch) {
      if (auto* ins = std::get_if<InsertOp>(&op)) ins->done.set_value();
    }
    backlog_size_.store(0);
    return;
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    // fall through: one by one (whatever failed: the database, or a test hook)
  }
  // One by one: an insert that fails is refused to its caller (nothing of
  // the task is kept); the first asynchronous write that fails goes to the
  // backlog with every asynchronous write after it, to be retried in order
  // (by the next commit, and by the writer thread every kBacklogRetry). An
  // asynchronous write the database refuses for its data is given up.
  static const std::vector<bool> kAlone(1, false);
  bool backlogged = false;
  for (auto& op : batch) {
    auto* ins = std::get_if<InsertOp>(&op);
    if (ins == nullptr && backlogged) {
      backlog_.push_back(std::move(op));
      continue;
    }
    try {
      backend_.write(&op, 1, kAlone);
      commits_.fetch_add(1, std::memory_order_relaxed);
      writes_.fetch_add(1, std::memory_order_relaxed);
      if (ins != nullptr) ins->done.set_value();
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      const auto [code, why] = current_failure();
      if (ins != nullptr) {
        const auto& ts = *ins->tasks;
        ins->done.set_exception(std::make_exception_ptr(Error(
            code,
            (ts.size() == 1 ? "cannot store task " + ts.front().task.id
                            : "cannot store " + std::to_string(ts.size()) + " tasks (" +
                                  ts.front().task.id + " ...)") +
                " in " + options_.where + ": " + why +
                (ts.size() == 1 ? "; the task was not created" : "; none of them was created"))));
      } else if (rejected()) {
        const auto* up = std::get_if<UpdateOp>(&op);
        note_failure((up != nullptr ? "an update of task " + up->task.id
                                    : std::string("a batch of metric samples")) +
                     " was refused and given up: " + why);
        failed_writes_.fetch_add(1);
        dropped_writes_.fetch_add(1);
      } else {
        note_failure(why);
        failed_writes_.fetch_add(1);
        backlogged = true;
        backlog_.push_back(std::move(op));
      }
    }
  }
  while (backlog_.size() > kMaxBacklog) {  // bounded: the oldest are given up
    backlog_.pop_front();
    dropped_writes_.fetch_add(1);
  }
  backlog_size_.store(backlog_.size());
}

// Commits the asynchronous writes (updates, events, samples). It lets them
// gather for up to kWriterDelay first, so that one transaction carries many:
// they need not be durable at once (their contract), and an insert in the
// meantime commits them anyway as the leader. flush() cuts the wait.
void WriteQueue::run_writer() {
  for (;;) {
    bool retry_backlog = false;
    {
      MutexLock l(mu_);
      writer_idle_ = true;
      if (backlog_size_.load() > 0) {
        cv_.wait_for(l.native(), kBacklogRetry,
                     [this]() REQUIRES(mu_) { return stop_ || !ops_.empty(); });
      } else {
        cv_.wait(l.native(), [this]() REQUIRES(mu_) { return stop_ || !ops_.empty(); });
      }
      writer_idle_ = false;
      if (ops_.empty() && stop_) return;
      retry_backlog = ops_.empty();  // woken to retry the backlog of failed writes
      if (!retry_backlog) {
        cv_.wait_for(l.native(), kWriterDelay, [this]() REQUIRES(mu_) {
          return stop_ || flush_requested_ || ops_.size() >= options_.max_batch;
        });
        flush_requested_ = false;
      }
    }
    // Nothing escapes this thread: commit() answers each failure of the
    // database or the backend per op; what still comes out (no memory to
    // keep account with) counts as a failed write, and the thread goes on.
    // There is no logger here to report it to.
    try {
      if (retry_backlog) {
        MutexLock c(commit_mu_);
        std::vector<WriteOp> none;
        commit(none);
      } else {
        commit_queued();
      }
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      note_failure(current_failure().second);
      failed_writes_.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

}  // namespace taskmgr::detail
