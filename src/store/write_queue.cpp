// The group commit the durable stores share (write_queue.hpp).
#include "write_queue.hpp"

#include <algorithm>
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
  if (const std::size_t held = backlog_size_.load(); held >= options_.max_backlog) {
    // Bounded: the writes of tasks accepted before are kept, new work is
    // refused until the database takes them.
    std::string why;
    {
      MutexLock g(mu_);
      why = last_error_;
    }
    throw Error(
        ErrorCode::kIoError,
        (tasks.size() == 1 ? "cannot store task " + tasks.front().task.id
                           : "cannot store " + std::to_string(tasks.size()) + " tasks (" +
                                 tasks.front().task.id + " ...)") +
            " in " + options_.where + ": " + std::to_string(held) +
            " earlier writes wait to be stored (the most kept, max_backlog = " +
            std::to_string(options_.max_backlog) + "); last failure: " + why +
            (tasks.size() == 1 ? "; the task was not created" : "; none of them was created"));
  }
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

void WriteQueue::update(Task task, std::vector<EventRecord> events, std::int64_t fence) {
  task.input = TaskInput{};  // never rewritten
  enqueue(WriteOp(UpdateOp{std::move(task), std::move(events), fence}));
}

void WriteQueue::append(std::vector<MetricSample> samples, std::vector<std::int64_t> fences) {
  if (!samples.empty()) enqueue(WriteOp(MetricsOp{std::move(samples), std::move(fences)}));
}

void WriteQueue::flush(bool retry_backlog) {
  {
    MutexLock l(mu_);
    const std::uint64_t target = enqueued_;
    if (committed_ < target) {
      flush_requested_ = true;
      cv_.notify_all();
    }
    done_cv_.wait(l.native(), [&]() REQUIRES(mu_) { return committed_ >= target || stop_; });
  }
  if (retry_backlog && backlog_size_.load() > 0) {
    MutexLock c(commit_mu_);
    std::vector<WriteOp> none;
    commit(none);
  }
}

void WriteQueue::remember_unpersisted(const Task& task) {
  MutexLock g(mu_);
  unpersisted_[task.id] = task;
  unpersisted_size_.store(unpersisted_.size());
}

void WriteQueue::forget_unpersisted(const std::vector<WriteOp>& committed) {
  if (unpersisted_size_.load() == 0) return;  // the usual case: nothing to look up
  MutexLock g(mu_);
  for (const auto& op : committed) {
    if (const auto* up = std::get_if<UpdateOp>(&op)) unpersisted_.erase(up->task.id);
  }
  unpersisted_size_.store(unpersisted_.size());
}

std::unordered_map<std::string, Task> WriteQueue::unpersisted_snapshot() const {
  if (unpersisted_size_.load() == 0) return {};
  MutexLock g(mu_);
  return unpersisted_;
}

namespace {
// The row as read, with the mutable state of `latest` (an update writes
// all of it; never the input, and the row's created_at is as stored).
Task overlaid(Task row, const Task& latest) {
  Task out = latest;
  out.input = std::move(row.input);
  out.created_at = row.created_at;
  return out;
}
}  // namespace

std::optional<Task> WriteQueue::overlay_task(std::optional<Task> row) const {
  if (!row || unpersisted_size_.load() == 0) return row;
  MutexLock g(mu_);
  const auto it = unpersisted_.find(row->id);
  if (it == unpersisted_.end()) return row;
  return overlaid(std::move(*row), it->second);
}

std::vector<Task> WriteQueue::list_tasks(
    const TaskFilter& f, const std::function<std::vector<Task>(const TaskFilter&)>& query,
    const std::function<std::optional<Task>(const std::string&)>& load) const {
  // Taken before the query: an update that commits meanwhile is in both.
  const std::unordered_map<std::string, Task> latest = unpersisted_snapshot();
  if (latest.empty()) return query(f);
  // The database's answer without the overlaid tasks (at most latest.size()
  // of its rows go, so `limit` more rows still hold the newest `limit`),
  // then each overlaid task that the filter takes in its latest state.
  TaskFilter g = f;
  if (g.limit != 0) g.limit += latest.size();
  std::vector<Task> out;
  for (Task& t : query(g)) {
    if (latest.count(t.id) == 0) out.push_back(std::move(t));
  }
  for (const auto& [id, state] : latest) {
    if (f.status && state.status != *f.status) continue;
    if (!f.service.empty() && state.service != f.service) continue;
    std::optional<Task> row = load(id);
    if (!row) continue;
    if (f.before && !before_cursor(*row, *f.before)) continue;
    Task t = overlaid(std::move(*row), state);
    if (!f.with_payloads) {
      t.result.clear();
      t.input.leave_out_data();
    } else if (!f.with_input_bytes) {
      t.input.leave_out_data();
    }
    out.push_back(std::move(t));
  }
  std::sort(out.begin(), out.end(), [](const Task& a, const Task& b) {
    return a.created_at != b.created_at ? a.created_at < b.created_at : a.id < b.id;
  });
  if (f.limit != 0 && out.size() > f.limit) {
    out.erase(out.begin(), out.end() - static_cast<std::ptrdiff_t>(f.limit));
  }
  return out;
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
    forget_unpersisted(batch);
    return;
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    // fall through: one by one (whatever failed: the database, or a test hook)
  }
  // One by one: an insert that fails is refused to its caller (nothing of
  // the task is kept); the first asynchronous write that fails goes to the
  // backlog with every asynchronous write after it, to be retried in order
  // (by the next commit, and by the writer thread every kBacklogRetry). An
  // asynchronous write the database refuses for its data is given up. Reads
  // see the state of every update not in the database (the overlay).
  static const std::vector<bool> kAlone(1, false);
  bool backlogged = false;
  for (auto& op : batch) {
    auto* ins = std::get_if<InsertOp>(&op);
    const auto* up = std::get_if<UpdateOp>(&op);
    if (ins == nullptr && backlogged) {
      if (up != nullptr) remember_unpersisted(up->task);
      backlog_.push_back(std::move(op));
      continue;
    }
    try {
      backend_.write(&op, 1, kAlone);
      commits_.fetch_add(1, std::memory_order_relaxed);
      writes_.fetch_add(1, std::memory_order_relaxed);
      if (ins != nullptr) ins->done.set_value();
      if (up != nullptr && unpersisted_size_.load() > 0) {
        MutexLock g(mu_);
        unpersisted_.erase(up->task.id);
        unpersisted_size_.store(unpersisted_.size());
      }
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
        if (up != nullptr) remember_unpersisted(up->task);
        note_failure((up != nullptr ? "an update of task " + up->task.id
                                    : std::string("a batch of metric samples")) +
                     " was refused and given up: " + why);
        failed_writes_.fetch_add(1);
        dropped_writes_.fetch_add(1);
      } else {
        note_failure(why);
        failed_writes_.fetch_add(1);
        backlogged = true;
        if (up != nullptr) remember_unpersisted(up->task);
        backlog_.push_back(std::move(op));
      }
    }
  }
  // Never dropped: insert() refuses new tasks while the backlog is full.
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
