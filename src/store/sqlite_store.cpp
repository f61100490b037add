// The SQLite store: schema and migrations, one writer thread with group
// commit, a read connection, an exclusive lock file. SQL lives here only.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <SQLiteCpp/SQLiteCpp.h>
#include <sqlite3.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <variant>

#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr {
namespace {

constexpr int kSchemaVersion = 2;

// Version 1: the "existing" tasks table, before the spec's delta.
constexpr const char* kSchemaV1 = R"sql(
CREATE TABLE tasks (
  id VARCHAR(36) PRIMARY KEY NOT NULL,
  service VARCHAR(50) NOT NULL,
  input_path TEXT,
  input_data BLOB,
  input_media_type TEXT,
  options TEXT,
  priority INTEGER NOT NULL DEFAULT 0,
  status VARCHAR(20) NOT NULL,
  attempt INTEGER NOT NULL DEFAULT 0,
  batch_size INTEGER NOT NULL DEFAULT 1,
  failure_reason VARCHAR(50),
  failure_message TEXT,
  result TEXT,
  created_at TIMESTAMP NOT NULL,
  queued_at TIMESTAMP,
  started_at TIMESTAMP,
  finished_at TIMESTAMP
) WITHOUT ROWID;
CREATE INDEX idx_tasks_status ON tasks(status);
)sql";

// Version 2: the spec's "Database schema changes", as the spec writes them
// (SERIAL becomes SQLite's INTEGER PRIMARY KEY, JSONB is JSON text).
constexpr const char* kMigrationV2 = R"sql(
ALTER TABLE tasks ADD COLUMN estimated_memory_mb INTEGER;
ALTER TABLE tasks ADD COLUMN actual_memory_mb INTEGER;
ALTER TABLE tasks ADD COLUMN assigned_device VARCHAR(50);
ALTER TABLE tasks ADD COLUMN service_instance_id VARCHAR(100);
ALTER TABLE tasks ADD COLUMN resource_cleanup_completed BOOLEAN DEFAULT FALSE;
CREATE TABLE task_metrics (
  id INTEGER PRIMARY KEY,
  task_id VARCHAR(36) REFERENCES tasks(id),
  timestamp TIMESTAMP,
  memory_usage_mb INTEGER,
  device VARCHAR(50),
  processing_stage VARCHAR(100)
);
CREATE TABLE task_events (
  id INTEGER PRIMARY KEY,
  task_id VARCHAR(36) REFERENCES tasks(id),
  event_type VARCHAR(50),
  timestamp TIMESTAMP,
  details TEXT
);
CREATE INDEX idx_task_metrics_task ON task_metrics(task_id);
CREATE INDEX idx_task_events_task ON task_events(task_id, id);
)sql";

constexpr const char* kTaskColumns =
    "id, service, input_path, input_data, input_media_type, options, priority, status, attempt, "
    "batch_size, failure_reason, failure_message, result, created_at, queued_at, started_at, "
    "finished_at, estimated_memory_mb, actual_memory_mb, assigned_device, service_instance_id, "
    "resource_cleanup_completed";


template <typename T>
void bind_opt(SQLite::Statement& st, int i, const std::optional<T>& v) {
  if (v) {
    st.bind(i, *v);
  } else {
    st.bind(i);
  }
}

void bind_opt_text(SQLite::Statement& st, int i, const std::string& v) {
  if (v.empty()) {
    st.bind(i);
  } else {
    st.bind(i, v);
  }
}

void bind_opt_ts(SQLite::Statement& st, int i, const std::optional<Timestamp>& t) {
  if (t) {
    st.bind(i, format_timestamp(*t));
  } else {
    st.bind(i);
  }
}

std::optional<Timestamp> col_ts(const SQLite::Column& c) {
  if (c.isNull()) return std::nullopt;
  return parse_timestamp(c.getString());
}

// The columns every state change rewrites, bound from `first` on, in the
// order of kMutableColumns.
constexpr const char* kMutableColumns =
    "options, priority, status, attempt, batch_size, failure_reason, failure_message, result, "
    "queued_at, started_at, finished_at, estimated_memory_mb, actual_memory_mb, "
    "assigned_device, service_instance_id, resource_cleanup_completed";
constexpr int kMutableCount = 16;

void bind_mutable(SQLite::Statement& st, int first, const Task& t) {
  int i = first;
  bind_opt_text(st, i++, t.options_json);
  st.bind(i++, t.priority);
  st.bind(i++, std::string(to_string(t.status)));
  st.bind(i++, t.attempt);
  st.bind(i++, t.batch_size);
  if (t.failure_reason == TaskFailureReason::kNone) {
    st.bind(i++);
  } else {
    st.bind(i++, std::string(to_string(t.failure_reason)));
  }
  bind_opt_text(st, i++, t.failure_message);
  bind_opt_text(st, i++, t.result);
  bind_opt_ts(st, i++, t.queued_at);
  bind_opt_ts(st, i++, t.started_at);
  bind_opt_ts(st, i++, t.finished_at);
  bind_opt(st, i++, t.estimated_memory_mb);
  bind_opt(st, i++, t.actual_memory_mb);
  bind_opt(st, i++, t.assigned_device);
  bind_opt(st, i++, t.service_instance_id);
  st.bind(i++, t.resource_cleanup_completed ? 1 : 0);
}

std::string mutable_assignments() {
  std::string out, cols = kMutableColumns;
  std::size_t pos = 0;
  while (pos < cols.size()) {
    std::size_t comma = cols.find(',', pos);
    if (comma == std::string::npos) comma = cols.size();
    std::string name = cols.substr(pos, comma - pos);
    name.erase(0, name.find_first_not_of(' '));
    out += (out.empty() ? "" : ", ") + name + "=?";
    pos = comma + 1;
  }
  return out;
}

Task read_task(SQLite::Statement& q) {
  Task t;
  t.id = q.getColumn(0).getString();
  t.service = q.getColumn(1).getString();
  if (!q.getColumn(2).isNull()) t.input.path = q.getColumn(2).getString();
  if (!q.getColumn(3).isNull()) {
    const auto* p = static_cast<const std::uint8_t*>(q.getColumn(3).getBlob());
    t.input.data.assign(p, p + q.getColumn(3).getBytes());
  }
  if (!q.getColumn(4).isNull()) t.input.media_type = q.getColumn(4).getString();
  if (!q.getColumn(5).isNull()) t.options_json = q.getColumn(5).getString();
  t.priority = q.getColumn(6).getInt();
  t.status = parse_task_status(q.getColumn(7).getString()).value_or(TaskStatus::kFailed);
  t.attempt = q.getColumn(8).getInt();
  t.batch_size = q.getColumn(9).getInt();
  if (!q.getColumn(10).isNull()) {
    t.failure_reason = parse_failure_reason(q.getColumn(10).getString())
                           .value_or(TaskFailureReason::kProcessingError);
  }
  if (!q.getColumn(11).isNull()) t.failure_message = q.getColumn(11).getString();
  if (!q.getColumn(12).isNull()) t.result = q.getColumn(12).getString();
  t.created_at = col_ts(q.getColumn(13)).value_or(Timestamp{});
  t.queued_at = col_ts(q.getColumn(14));
  t.started_at = col_ts(q.getColumn(15));
  t.finished_at = col_ts(q.getColumn(16));
  if (!q.getColumn(17).isNull()) t.estimated_memory_mb = q.getColumn(17).getInt64();
  if (!q.getColumn(18).isNull()) t.actual_memory_mb = q.getColumn(18).getInt64();
  if (!q.getColumn(19).isNull()) t.assigned_device = q.getColumn(19).getString();
  if (!q.getColumn(20).isNull()) t.service_instance_id = q.getColumn(20).getString();
  t.resource_cleanup_completed = !q.getColumn(21).isNull() && q.getColumn(21).getInt() != 0;
  return t;
}

ErrorCode code_of(const SQLite::Exception& e) {
  switch (e.getErrorCode()) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return ErrorCode::kBusy;
    case SQLITE_NOMEM:
      return ErrorCode::kOutOfMemory;
    default:
      return ErrorCode::kIoError;
  }
}

// An exclusive lock on "<db>.lock": one store per database at a time, in this
// process or any other. flock locks belong to the open file, so a second open
// in the same process conflicts too.
class LockFile {
 public:
  explicit LockFile(const std::string& db_path) : path_(db_path + ".lock") {
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      throw Error(ErrorCode::kIoError, "cannot open lock file " + path_ + ": " + std::strerror(errno));
    }
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      char buf[32] = {0};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      ::close(fd_);
      fd_ = -1;
      throw Error(ErrorCode::kBusy, "database " + db_path +
                                        " is in use by another task manager" +
                                        (n > 0 ? " (pid " + std::string(buf, static_cast<std::size_t>(n)) + ")" : "") +
                                        "; only one may open it at a time");
    }
    const std::string pid = std::to_string(::getpid());
    if (::ftruncate(fd_, 0) == 0) {
      [[maybe_unused]] const ssize_t w = ::pwrite(fd_, pid.data(), pid.size(), 0);
    }
  }
  ~LockFile() {
    if (fd_ >= 0) {
      ::flock(fd_, LOCK_UN);
      ::close(fd_);
    }
  }
  LockFile(const LockFile&) = delete;
  LockFile& operator=(const LockFile&) = delete;

 private:
  std::string path_;
  int fd_ = -1;
};

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
      reader_db_ = std::make_unique<SQLite::Database>(path, SQLite::OPEN_READONLY |
                                                                SQLite::OPEN_FULLMUTEX);
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
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (writer_.joinable()) writer_.join();
  }

  void insert_tasks(const std::vector<NewTask>& tasks) override {
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

  void update_task(const Task& task, const std::vector<EventRecord>& events) override {
    Task t = task;
    t.input = TaskInput{};  // never rewritten
    enqueue(Op(UpdateOp{std::move(t), events}));
  }

  void append_metrics(const std::vector<MetricSample>& samples) override {
    if (!samples.empty()) enqueue(Op(MetricsOp{samples}));
  }

  std::optional<Task> load_task(const std::string& id) override {
    return read([&](SQLite::Database& db) -> std::optional<Task> {
      SQLite::Statement q(db, std::string("SELECT ") + kTaskColumns + " FROM tasks WHERE id=?");
      q.bind(1, id);
      if (!q.executeStep()) return std::nullopt;
      return read_task(q);
    });
  }

  std::vector<Task> list_tasks(const TaskFilter& f) override {
    return read([&](SQLite::Database& db) {
      std::string sql = std::string("SELECT ") + kTaskColumns + " FROM tasks WHERE 1=1";
      if (f.status) sql += " AND status=?";
      if (!f.service.empty()) sql += " AND service=?";
      sql += " ORDER BY created_at DESC, id DESC";
      if (f.limit != 0) sql += " LIMIT " + std::to_string(f.limit);
      SQLite::Statement q(db, sql);
      int i = 1;
      if (f.status) q.bind(i++, std::string(to_string(*f.status)));
      if (!f.service.empty()) q.bind(i++, f.service);
      std::vector<Task> out;
      while (q.executeStep()) out.push_back(read_task(q));
      return std::vector<Task>(out.rbegin(), out.rend());
    });
  }

  std::vector<EventRecord> load_events(const std::string& task_id) override {
    return read([&](SQLite::Database& db) {
      SQLite::Statement q(db,
                          "SELECT id, event_type, timestamp, details FROM task_events "
                          "WHERE task_id=? ORDER BY id");
      q.bind(1, task_id);
      std::vector<EventRecord> out;
      while (q.executeStep()) {
        EventRecord e;
        e.sequence = static_cast<std::uint64_t>(q.getColumn(0).getInt64());
        e.task_id = task_id;
        e.event = parse_task_event(q.getColumn(1).getString()).value_or(TaskEvent::kCreated);
        e.timestamp = col_ts(q.getColumn(2)).value_or(Timestamp{});
        e.details_json = q.getColumn(3).isNull() ? "{}" : q.getColumn(3).getString();
        out.push_back(std::move(e));
      }
      return out;
    });
  }

  std::vector<MetricSample> load_metrics(const std::string& task_id) override {
    return read([&](SQLite::Database& db) {
      SQLite::Statement q(db,
                          "SELECT timestamp, memory_usage_mb, device, processing_stage "
                          "FROM task_metrics WHERE task_id=? ORDER BY id");
      q.bind(1, task_id);
      std::vector<MetricSample> out;
      while (q.executeStep()) {
        MetricSample s;
        s.task_id = task_id;
        s.timestamp = col_ts(q.getColumn(0)).value_or(Timestamp{});
        s.memory_usage_mb = q.getColumn(1).getInt64();
        s.device = q.getColumn(2).getString();
        s.processing_stage = q.getColumn(3).getString();
        out.push_back(std::move(s));
      }
      return out;
    });
  }

  // Rows from before the upgrade (no assigned_device) never ran under this
  // schema: their cleanup is not ours to redo.
  std::vector<Task> load_unfinished() override {
    return read([&](SQLite::Database& db) {
      SQLite::Statement q(db, std::string("SELECT ") + kTaskColumns +
                                  " FROM tasks WHERE status IN ('pending','queued','running') "
                                  "OR (resource_cleanup_completed = 0 AND assigned_device IS NOT NULL) "
                                  "ORDER BY created_at, id");
      std::vector<Task> out;
      while (q.executeStep()) out.push_back(read_task(q));
      return out;
    });
  }

  std::size_t prune_finished(Timestamp finished_before) override {
    flush();  // every write queued before is in, so a task's last update is not lost
    std::lock_guard<std::mutex> c(commit_mu_);
    try {
      static constexpr const char* kEnded =
          "SELECT id FROM tasks WHERE status IN ('completed','failed','cancelled') "
          "AND resource_cleanup_completed = 1 AND finished_at IS NOT NULL AND finished_at < ?1";
      SQLite::Transaction tx(*writer_db_, SQLite::TransactionBehavior::IMMEDIATE);
      const std::string cutoff = format_timestamp(finished_before);
      for (const char* table : {"task_metrics", "task_events"}) {
        SQLite::Statement del(*writer_db_, std::string("DELETE FROM ") + table +
                                               " WHERE task_id IN (" + kEnded + ")");
        del.bind(1, cutoff);
        del.exec();
      }
      SQLite::Statement del(*writer_db_,
                            std::string("DELETE FROM tasks WHERE id IN (") + kEnded + ")");
      del.bind(1, cutoff);
      const int n = del.exec();
      tx.commit();
      return static_cast<std::size_t>(n);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), "pruning finished tasks in " + path_ + " failed: " + e.what());
    }
  }

  void flush() override {
    std::unique_lock<std::mutex> l(mu_);
    const std::uint64_t target = enqueued_;
    if (committed_ < target) {
      flush_requested_ = true;
      cv_.notify_all();
    }
    done_cv_.wait(l, [&] { return committed_ >= target || stop_; });
  }

  std::string describe() const override { return "sqlite:" + path_; }

  StoreStats stats() const override {
    StoreStats s;
    s.commits = commits_.load();
    s.writes = writes_.load();
    s.failed_writes = failed_writes_.load();
    s.dropped_writes = dropped_writes_.load();
    s.backlog = backlog_size_.load();
    {
      std::lock_guard<std::mutex> g(mu_);
      s.queued = enqueued_ - committed_;
    }
    return s;
  }

 private:
  int busy_ms() const { return static_cast<int>(options_.busy_timeout_seconds * 1000); }

  static void migrate(SQLite::Database& db, const std::string& path) {
    int version = db.execAndGet("PRAGMA user_version").getInt();
    if (version > kSchemaVersion) {
      throw Error(ErrorCode::kIncompatible,
                  "database " + path + " has schema version " + std::to_string(version) +
                      ", newer than this taskmgr knows (" + std::to_string(kSchemaVersion) +
                      "); it was not modified");
    }
    if (version == 0) {
      const bool has_tasks =
          db.execAndGet("SELECT count(*) FROM sqlite_master WHERE type='table' AND name='tasks'")
              .getInt() != 0;
      if (has_tasks) {
        throw Error(ErrorCode::kIncompatible,
                    "database " + path +
                        " has a tasks table but no schema version; it was not modified");
      }
    }
    // Each step in its own transaction; forward only.
    const std::pair<int, const char*> steps[] = {{1, kSchemaV1}, {2, kMigrationV2}};
    for (const auto& [to, sql] : steps) {
      if (version >= to) continue;
      SQLite::Transaction tx(db, SQLite::TransactionBehavior::IMMEDIATE);
      db.exec(sql);
      db.exec("PRAGMA user_version = " + std::to_string(to));
      tx.commit();
      version = to;
    }
  }

  template <typename F>
  auto read(F&& f) -> decltype(f(std::declval<SQLite::Database&>())) {
    flush();  // readers see every write queued before the read
    std::lock_guard<std::mutex> g(read_mu_);
    try {
      return f(*reader_db_);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), std::string("reading ") + path_ + " failed: " + e.what());
    }
  }

  // Returns the op's sequence number: it is committed once committed_ >= it.
  std::uint64_t enqueue(Op op, bool wake_writer = true) {
    bool wake = false;
    std::uint64_t seq = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
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
  void commit_queued(std::uint64_t until = UINT64_MAX) {
    std::unique_lock<std::mutex> l(mu_);
    if (until == UINT64_MAX) until = enqueued_;
    while (committed_ < until) {
      if (committing_) {
        done_cv_.wait(l);
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
        std::lock_guard<std::mutex> c(commit_mu_);  // prune and backlog retries
        commit(batch);
      } catch (...) {
        // commit() reports failures per op; this is one of its own (no
        // memory). The batch's inserts see a broken promise; nobody waits
        // for its ops forever.
        l.lock();
        committed_ += n;
        committing_ = false;
        done_cv_.notify_all();
        throw;
      }
      l.lock();
      committed_ += n;
      committing_ = false;
      done_cv_.notify_all();
    }
  }

  void apply(Op& op, bool events_only = false) {
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

  void insert_event(const EventRecord& e) {
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

  void commit(std::vector<Op>& batch) {
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
    try {
      const std::vector<bool> skip = superseded(batch);
      SQLite::Transaction tx(*writer_db_, SQLite::TransactionBehavior::IMMEDIATE);
      for (std::size_t i = 0; i < batch.size(); ++i) apply(batch[i], skip[i]);
      tx.commit();
      commits_.fetch_add(1, std::memory_order_relaxed);
      writes_.fetch_add(batch.size(), std::memory_order_relaxed);
      for (auto& op : batch) {
        if (auto* ins = std::get_if<InsertOp>(&op)) ins->done.set_value();
      }
      backlog_size_.store(0);
      return;
    } catch (const std::exception&) {
      // fall through: one by one
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
        tx.commit();
        commits_.fetch_add(1, std::memory_order_relaxed);
        writes_.fetch_add(1, std::memory_order_relaxed);
        if (ins != nullptr) ins->done.set_value();
      } catch (const std::exception& e) {
        if (ins != nullptr) {
          const auto* se = dynamic_cast<const SQLite::Exception*>(&e);
          const auto& ts = *ins->tasks;
          ins->done.set_exception(std::make_exception_ptr(
              Error(se ? code_of(*se) : ErrorCode::kIoError,
                    (ts.size() == 1 ? "cannot store task " + ts.front().task.id
                                    : "cannot store " + std::to_string(ts.size()) +
                                          " tasks (" + ts.front().task.id + " ...)") +
                        " in " + path_ + ": " + e.what() +
                        (ts.size() == 1 ? "; the task was not created"
                                        : "; none of them was created"))));
        } else {
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
  void run_writer() {
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu_);
        writer_idle_ = true;
        if (backlog_size_.load() > 0) {
          cv_.wait_for(l, kBacklogRetry, [this] { return stop_ || !ops_.empty(); });
        } else {
          cv_.wait(l, [this] { return stop_ || !ops_.empty(); });
        }
        writer_idle_ = false;
        if (ops_.empty() && stop_) return;
        if (ops_.empty()) {  // woken to retry the backlog of failed writes
          l.unlock();
          std::lock_guard<std::mutex> c(commit_mu_);
          std::vector<Op> none;
          commit(none);
          continue;
        }
        cv_.wait_for(l, kWriterDelay, [this] {
          return stop_ || flush_requested_ || ops_.size() >= options_.max_batch;
        });
        flush_requested_ = false;
      }
      commit_queued();
    }
  }

  std::string path_;
  SqliteStoreOptions options_;
  LockFile lock_;
  std::unique_ptr<SQLite::Database> writer_db_;
  std::unique_ptr<SQLite::Database> reader_db_;
  std::unique_ptr<SQLite::Statement> insert_task_, update_task_, insert_event_, insert_metric_;
  std::mutex read_mu_;

  std::mutex commit_mu_;  // held while committing (a leader, a backlog retry, a prune)
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::deque<Op> ops_;
  std::uint64_t enqueued_ = 0;
  std::uint64_t committed_ = 0;
  bool stop_ = false;
  bool flush_requested_ = false;
  bool committing_ = false;  // a leader is committing a batch (mu_)
  bool writer_idle_ = false;
  static constexpr std::chrono::milliseconds kWriterDelay{2};
  std::atomic<std::uint64_t> commits_{0};         // transactions committed
  std::atomic<std::uint64_t> writes_{0};          // ops committed
  std::atomic<std::uint64_t> failed_writes_{0};   // asynchronous writes that failed once
  std::atomic<std::uint64_t> dropped_writes_{0};  // given up: the backlog overflowed
  std::deque<Op> backlog_;                        // failed writes, retried in order (commit_mu_)
  std::atomic<std::size_t> backlog_size_{0};
  static constexpr std::size_t kMaxBacklog = 1'000'000;
  static constexpr std::chrono::milliseconds kBacklogRetry{250};
  std::int64_t applied_page_limit_ = 0;
  std::thread writer_;
};

}  // namespace

int sqlite_schema_version() noexcept { return kSchemaVersion; }

std::shared_ptr<TaskStore> open_sqlite_store(const std::string& path, SqliteStoreOptions options) {
  if (path.empty() || path == ":memory:") {
    throw Error(ErrorCode::kInvalidArgument,
                "open_sqlite_store needs a file path (use make_memory_store for ':memory:')");
  }
  return std::make_shared<SqliteStore>(path, options);
}

}  // namespace taskmgr
