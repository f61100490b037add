// The SQLite store: one writer thread with group commit, and a read
// connection. The schema, its migrations, the queries and the lock file are
// in sqlite_schema.cpp (sqlite_internal.hpp).
#include <SQLiteCpp/SQLiteCpp.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <future>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>

#include "../sync.hpp"
#include "forced_unwind.hpp"
#include "sqlite_internal.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr {
namespace detail::sqlite {
namespace {

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
using Op = std::variant<InsertOp, UpdateOp, MetricsOp>;

class SqliteStore final : public TaskStore {
 public:
  SqliteStore(const std::string& path, SqliteStoreOptions options)
      : path_(path), options_(options), lock_(path) {
    try {
      writer_db_ = std::make_unique<SQLite::Database>(
          path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE | SQLite::OPEN_FULLMUTEX);
      writer_db_->setBusyTimeout(busy_ms());
      migrate(*writer_db_, path);
      writer_db_->exec("PRAGMA journal_mode=WAL");
      writer_db_->exec(options.synchronous_full ? "PRAGMA synchronous=FULL"
                                                : "PRAGMA synchronous=NORMAL");
      writer_db_->exec("PRAGMA foreign_keys=ON");
      // Checkpoint every ~40 MB of WAL instead of 4 MB: commits rewrite the same
      // few hot pages, and a checkpoint copies each distinct page once.
      writer_db_->exec("PRAGMA wal_autocheckpoint=10000");
      if (options_.max_size_mb > 0 && !options_.page_limit) {
        // Through the page limit the commits already apply (SQLite keeps
        // max_page_count per connection, so it is set again on each).
        const std::int64_t page = writer_db_->execAndGet("PRAGMA page_size").getInt64();
        options_.page_limit = std::make_shared<std::atomic<std::int64_t>>(std::max<std::int64_t>(
            1, options_.max_size_mb * 1024 * 1024 / std::max<std::int64_t>(page, 512)));
      }
      reader_db_ =
          std::make_unique<SQLite::Database>(path, SQLite::OPEN_READONLY | SQLite::OPEN_FULLMUTEX);
      reader_db_->setBusyTimeout(busy_ms());
      insert_task_ = std::make_unique<SQLite::Statement>(
          *writer_db_, std::string("INSERT INTO tasks (id, service, input_path, input_data, "
                                   "input_media_type, created_at, ") +
                           kMutableColumns + ") VALUES (?,?,?,?,?,?" +
                           [] {
                             std::string q;
                             for (int i = 0; i < kMutableCount; ++i) q += ",?";
                             return q;
                           }() +
                           ")");
      update_task_ = std::make_unique<SQLite::Statement>(
          *writer_db_, "UPDATE tasks SET " + mutable_assignments() + " WHERE id=?");
      insert_event_ = std::make_unique<SQLite::Statement>(
          *writer_db_,
          "INSERT INTO task_events (task_id, event_type, timestamp, details) VALUES (?,?,?,?)");
      insert_metric_ = std::make_unique<SQLite::Statement>(
          *writer_db_,
          "INSERT INTO task_metrics (task_id, timestamp, memory_usage_mb, device, "
          "processing_stage) VALUES (?,?,?,?,?)");
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), "cannot open database " + path + ": " + e.what());
    }
    writer_ = std::thread([this] { run_writer(); });
  }

  ~SqliteStore() override {
    {
      MutexLock g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (writer_.joinable()) writer_.join();
  }

  void insert_tasks(const std::vector<NewTask>& tasks) override REQUIRES(!mu_, !commit_mu_) {
    if (tasks.empty()) return;
    std::future<void> done;
    std::uint64_t seq = 0;
    {
      InsertOp op{&tasks, {}};
      done = op.done.get_future();
      seq = enqueue(Op(std::move(op)), /*wake_writer=*/false);
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

  void update_task(const Task& task, const std::vector<EventRecord>& events) override
      REQUIRES(!mu_) {
    Task t = task;
    t.input = TaskInput{};  // never rewritten
    enqueue(Op(UpdateOp{std::move(t), events}));
  }

  void append_metrics(const std::vector<MetricSample>& samples) override REQUIRES(!mu_) {
    if (!samples.empty()) enqueue(Op(MetricsOp{samples}));
  }

  std::optional<Task> load_task(const std::string& id) override REQUIRES(!mu_, !read_mu_) {
    return read([&](SQLite::Database& db) { return select_task(db, id); });
  }

  std::vector<Task> list_tasks(const TaskFilter& f) override REQUIRES(!mu_, !read_mu_) {
    return read([&](SQLite::Database& db) { return select_tasks(db, f); });
  }

  std::vector<EventRecord> load_events(const std::string& task_id) override
      REQUIRES(!mu_, !read_mu_) {
    return read([&](SQLite::Database& db) { return select_events(db, task_id); });
  }

  std::vector<MetricSample> load_metrics(const std::string& task_id) override
      REQUIRES(!mu_, !read_mu_) {
    return read([&](SQLite::Database& db) { return select_metrics(db, task_id); });
  }

  std::vector<Task> load_unfinished() override REQUIRES(!mu_, !read_mu_) {
    return read([&](SQLite::Database& db) { return select_unfinished(db); });
  }

  std::size_t prune_finished(Timestamp finished_before) override REQUIRES(!mu_, !commit_mu_) {
    flush();  // every write queued before is in, so a task's last update is not lost
    MutexLock c(commit_mu_);
    try {
      return delete_finished(*writer_db_, finished_before);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), "pruning finished tasks in " + path_ + " failed: " + e.what());
    }
  }

  void flush() override REQUIRES(!mu_) {
    MutexLock l(mu_);
    const std::uint64_t target = enqueued_;
    if (committed_ < target) {
      flush_requested_ = true;
      cv_.notify_all();
    }
    done_cv_.wait(l.native(), [&]() REQUIRES(mu_) { return committed_ >= target || stop_; });
  }

  std::string describe() const override { return "sqlite:" + path_; }

  StoreStats stats() const override REQUIRES(!mu_) {
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

 private:
  int busy_ms() const { return static_cast<int>(options_.busy_timeout_seconds * 1000); }

  template <typename F, typename R = std::invoke_result_t<F, SQLite::Database&>>
  R read(F&& f) REQUIRES(!mu_, !read_mu_) {
    flush();  // readers see every write queued before the read
    MutexLock g(read_mu_);
    try {
      return f(*reader_db_);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), std::string("reading ") + path_ + " failed: " + e.what());
    }
  }

  // Returns the op's sequence number: it is committed once committed_ >= it.
  std::uint64_t enqueue(Op op, bool wake_writer = true) REQUIRES(!mu_) {
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
  void commit_queued(std::uint64_t until = UINT64_MAX) REQUIRES(!mu_, !commit_mu_) {
    MutexLock l(mu_);
    if (until == UINT64_MAX) until = enqueued_;
    while (committed_ < until) {
      if (committing_) {
        done_cv_.wait(l.native());
        continue;
      }
      std::vector<Op> batch;
      while (!ops_.empty() && batch.size() < options_.max_batch) {
        batch.push_back(std::move(ops_.front()));
        ops_.pop_front();
      }
      if (batch.empty()) return;
      committing_ = true;
      l.unlock();
      const std::size_t n = batch.size();  // commit() may prepend the backlog
      try {
        MutexLock c(commit_mu_);  // prune and backlog retries
        commit(batch);
      } catch (...) {
        // Whatever it is (a cancelled thread's forced unwind too): nobody is
        // left waiting for this commit.
        // commit() answers each failure of the database or the test hook
        // per op; this is one of its own (no memory). The batch's inserts
        // see a broken promise; nobody waits for its ops forever.
        l.lock();
        end_commit_locked(n);
        throw;
      }
      l.lock();
      end_commit_locked(n);
    }
  }

  // A commit of n ops ended, whatever became of them.
  void end_commit_locked(std::size_t n) REQUIRES(mu_) {
    committed_ += n;
    committing_ = false;
    done_cv_.notify_all();
  }

  void apply(Op& op, bool events_only = false) REQUIRES(commit_mu_) {
    if (auto* ins = std::get_if<InsertOp>(&op)) {
      for (const NewTask& n : *ins->tasks) {
        const Task& t = n.task;
        SQLite::Statement& st = *insert_task_;
        st.reset();
        st.clearBindings();
        st.bind(1, t.id);
        st.bind(2, t.service);
        bind_opt_text(st, 3, t.input.path);
        if (t.input.data.empty()) {
          st.bind(4);
        } else {
          st.bindNoCopy(4, t.input.data.data(), static_cast<int>(t.input.data.size()));
        }
        bind_opt_text(st, 5, t.input.media_type);
        st.bind(6, format_timestamp(t.created_at));
        bind_mutable(st, 7, t);
        st.exec();
        for (const auto& e : n.events) insert_event(e);
      }
    } else if (auto* up = std::get_if<UpdateOp>(&op)) {
      if (events_only) {
        for (const auto& e : up->events) insert_event(e);
        return;
      }
      const Task& t = up->task;
      SQLite::Statement& st = *update_task_;
      st.reset();
      st.clearBindings();
      bind_mutable(st, 1, t);
      st.bind(kMutableCount + 1, t.id);
      st.exec();
      for (const auto& e : up->events) insert_event(e);
    } else if (auto* m = std::get_if<MetricsOp>(&op)) {
      for (const auto& s : m->samples) {
        SQLite::Statement& st = *insert_metric_;
        st.reset();
        st.bind(1, s.task_id);
        st.bind(2, format_timestamp(s.timestamp));
        st.bind(3, static_cast<std::int64_t>(s.memory_usage_mb));
        st.bind(4, s.device);
        st.bind(5, s.processing_stage);
        st.exec();
      }
    }
  }

  // The code and message of the failure being handled (inside a catch).
  void note_failure(std::string why) REQUIRES(!mu_) {
    MutexLock g(mu_);
    last_error_ = "cannot write to " + path_ + ": " + std::move(why);
  }

  static std::pair<ErrorCode, std::string> current_failure() {
    try {
      throw;
    } catch (const SQLite::Exception& e) {
      return {code_of(e), e.what()};
    } catch (const std::exception& e) {
      return {ErrorCode::kIoError, e.what()};
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      return {ErrorCode::kIoError, "unknown exception"};
    }
  }

  // The test hook (SqliteStoreOptions::before_commit), with the transaction
  // open. Host code: commit_mu_ is held, no lock a reader or a caller queueing
  // a write needs.
  void before_commit() REQUIRES(commit_mu_) {
    if (!options_.before_commit) return;
    detail::assert_scheduler_not_held("sqlite store: before_commit");
    options_.before_commit();
  }

  void insert_event(const EventRecord& e) REQUIRES(commit_mu_) {
    SQLite::Statement& st = *insert_event_;
    st.reset();
    st.bind(1, e.task_id);
    st.bind(2, std::string(to_string(e.event)));
    st.bind(3, format_timestamp(e.timestamp));
    st.bind(4, e.details_json);
    st.exec();
  }

  // Commits `batch` in one transaction. On failure, rolls back and commits
  // each op alone, so one bad insert (disk full) fails only its caller.
  // Marks, for each task updated more than once in `batch`, all but its last
  // row update as superseded: an update writes the task's whole mutable
  // state, so only the last one matters (every event is still inserted).
  static std::vector<bool> superseded(const std::vector<Op>& batch) {
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

  void commit(std::vector<Op>& batch) REQUIRES(commit_mu_, !mu_) {
    if (options_.page_limit) {
      const std::int64_t limit = options_.page_limit->load();
      if (limit != applied_page_limit_) {
        // 0 restores SQLite's own maximum.
        writer_db_->exec("PRAGMA max_page_count = " +
                         std::to_string(limit > 0 ? limit : 1073741823));
        applied_page_limit_ = limit;
      }
    }
    // Writes that failed before (disk full, I/O error) go first, in order:
    // a task's later update must not land before its earlier one.
    if (!backlog_.empty()) {
      std::vector<Op> all;
      all.reserve(backlog_.size() + batch.size());
      for (auto& op : backlog_) all.push_back(std::move(op));
      for (auto& op : batch) all.push_back(std::move(op));
      backlog_.clear();
      batch.swap(all);
    }
    if (batch.empty()) return;  // a backlog retry after a commit that wrote the backlog
    try {
      const std::vector<bool> skip = superseded(batch);
      SQLite::Transaction tx(*writer_db_, SQLite::TransactionBehavior::IMMEDIATE);
      for (std::size_t i = 0; i < batch.size(); ++i) apply(batch[i], skip[i]);
      before_commit();
      tx.commit();
      commits_.fetch_add(1, std::memory_order_relaxed);
      writes_.fetch_add(batch.size(), std::memory_order_relaxed);
      for (auto& op : batch) {
        if (auto* ins = std::get_if<InsertOp>(&op)) ins->done.set_value();
      }
      backlog_size_.store(0);
      return;
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      // fall through: one by one (whatever failed: SQLite, or the test hook)
    }
    // One by one: an insert that fails is refused to its caller (nothing of
    // the task is kept); the first asynchronous write that fails goes to the
    // backlog with every asynchronous write after it, to be retried in order
    // (by the next commit, and by the writer thread every kBacklogRetry).
    bool backlogged = false;
    for (auto& op : batch) {
      auto* ins = std::get_if<InsertOp>(&op);
      if (ins == nullptr && backlogged) {
        backlog_.push_back(std::move(op));
        continue;
      }
      try {
        SQLite::Transaction tx(*writer_db_, SQLite::TransactionBehavior::IMMEDIATE);
        apply(op);
        before_commit();
        tx.commit();
        commits_.fetch_add(1, std::memory_order_relaxed);
        writes_.fetch_add(1, std::memory_order_relaxed);
        if (ins != nullptr) ins->done.set_value();
      } catch (...) {
        ::taskmgr::detail::rethrow_if_forced_unwind();
        if (ins != nullptr) {
          const auto [code, why] = current_failure();
          const auto& ts = *ins->tasks;
          ins->done.set_exception(std::make_exception_ptr(Error(
              code,
              (ts.size() == 1 ? "cannot store task " + ts.front().task.id
                              : "cannot store " + std::to_string(ts.size()) + " tasks (" +
                                    ts.front().task.id + " ...)") +
                  " in " + path_ + ": " + why +
                  (ts.size() == 1 ? "; the task was not created" : "; none of them was created"))));
        } else {
          note_failure(current_failure().second);
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
  // they need not be durable at once (their contract), and a create_task in
  // the meantime commits them anyway as the leader. flush() cuts the wait.
  void run_writer() REQUIRES(!mu_, !commit_mu_) {
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
      // database or the test hook per op; what still comes out (no memory
      // to keep account with) counts as a failed write, and the thread goes
      // on. There is no logger here to report it to.
      try {
        if (retry_backlog) {
          MutexLock c(commit_mu_);
          std::vector<Op> none;
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

  std::string path_;
  SqliteStoreOptions options_;
  LockFile lock_;

  // Whoever commits holds commit_mu_: a leader, the writer thread, a backlog
  // retry, a prune.
  Mutex commit_mu_;
  std::unique_ptr<SQLite::Database> writer_db_ GUARDED_BY(commit_mu_);
  std::unique_ptr<SQLite::Statement> insert_task_ GUARDED_BY(commit_mu_);
  std::unique_ptr<SQLite::Statement> update_task_ GUARDED_BY(commit_mu_);
  std::unique_ptr<SQLite::Statement> insert_event_ GUARDED_BY(commit_mu_);
  std::unique_ptr<SQLite::Statement> insert_metric_ GUARDED_BY(commit_mu_);
  std::deque<Op> backlog_ GUARDED_BY(commit_mu_);  // failed writes, retried in order
  std::int64_t applied_page_limit_ GUARDED_BY(commit_mu_) = 0;

  Mutex read_mu_;  // one reader at a time on the read connection
  std::unique_ptr<SQLite::Database> reader_db_ GUARDED_BY(read_mu_);

  // The queue of writes and the state of the group commit.
  mutable Mutex mu_;
  std::condition_variable cv_;       // wakes the writer thread
  std::condition_variable done_cv_;  // a commit ended
  std::deque<Op> ops_ GUARDED_BY(mu_);
  std::uint64_t enqueued_ GUARDED_BY(mu_) = 0;
  std::uint64_t committed_ GUARDED_BY(mu_) = 0;
  bool stop_ GUARDED_BY(mu_) = false;
  bool flush_requested_ GUARDED_BY(mu_) = false;
  std::string last_error_ GUARDED_BY(mu_);   // StoreStats::last_error
  bool committing_ GUARDED_BY(mu_) = false;  // a leader is committing a batch
  bool writer_idle_ GUARDED_BY(mu_) = false;
  static constexpr std::chrono::milliseconds kWriterDelay{2};

  std::atomic<std::uint64_t> commits_{0};         // transactions committed
  std::atomic<std::uint64_t> writes_{0};          // ops committed
  std::atomic<std::uint64_t> failed_writes_{0};   // asynchronous writes that failed once
  std::atomic<std::uint64_t> dropped_writes_{0};  // given up: the backlog overflowed
  std::atomic<std::size_t> backlog_size_{0};
  static constexpr std::size_t kMaxBacklog = 1'000'000;
  static constexpr std::chrono::milliseconds kBacklogRetry{250};
  std::thread writer_;
};

}  // namespace
}  // namespace detail::sqlite

std::shared_ptr<TaskStore> open_sqlite_store(const std::string& path, SqliteStoreOptions options) {
  if (path.empty() || path == ":memory:") {
    throw Error(ErrorCode::kInvalidArgument,
                "open_sqlite_store needs a file path (use make_memory_store for ':memory:')");
  }
  return std::make_shared<detail::sqlite::SqliteStore>(path, options);
}

}  // namespace taskmgr
