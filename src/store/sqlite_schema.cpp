// The SQLite store's schema: its tables and forward-only migrations, how a
// task maps onto a row of `tasks`, the queries (reads and the prune), and
// the lock file that keeps one store per database (sqlite_internal.hpp).
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <algorithm>

#include <sqlite3.h>

#include <cerrno>
#include <cstring>

#include "sqlite_internal.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr {
namespace detail::sqlite {
namespace {

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

template <typename T>
void bind_opt(SQLite::Statement& st, int i, const std::optional<T>& v) {
  if (v) {
    st.bind(i, *v);
  } else {
    st.bind(i);
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

// Every column of `tasks`, in the order read_task() reads them.
constexpr const char* kTaskColumns =
    "id, service, input_path, input_data, input_media_type, options, priority, status, attempt, "
    "batch_size, failure_reason, failure_message, result, created_at, queued_at, started_at, "
    "finished_at, estimated_memory_mb, actual_memory_mb, assigned_device, service_instance_id, "
    "resource_cleanup_completed";

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

}  // namespace

void bind_opt_text(SQLite::Statement& st, int i, const std::string& v) {
  if (v.empty()) {
    st.bind(i);
  } else {
    st.bind(i, v);
  }
}

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

ErrorCode code_of(const SQLite::Exception& e) {
  switch (e.getErrorCode()) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return ErrorCode::kBusy;
    case SQLITE_NOMEM: return ErrorCode::kOutOfMemory;
    default: return ErrorCode::kIoError;
  }
}

std::optional<Task> select_task(SQLite::Database& db, const std::string& id) {
  SQLite::Statement q(db, std::string("SELECT ") + kTaskColumns + " FROM tasks WHERE id=?");
  q.bind(1, id);
  if (!q.executeStep()) return std::nullopt;
  return read_task(q);
}

std::vector<Task> select_tasks(SQLite::Database& db, const TaskFilter& f) {
  std::string columns = kTaskColumns;
  if (!f.with_payloads) {
    // Same positions for read_task, NULL instead of the bulky columns.
    columns.replace(columns.find("input_data"), 10, "NULL");
    columns.replace(columns.find("result"), 6, "NULL");
  }
  std::string sql = "SELECT " + columns + " FROM tasks WHERE 1=1";
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
  std::reverse(out.begin(), out.end());
  return out;
}

std::vector<EventRecord> select_events(SQLite::Database& db, const std::string& task_id) {
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
}

std::vector<MetricSample> select_metrics(SQLite::Database& db, const std::string& task_id) {
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
}

// Rows from before the upgrade (no assigned_device) never ran under this
// schema: their cleanup is not ours to redo.
std::vector<Task> select_unfinished(SQLite::Database& db) {
  SQLite::Statement q(db, std::string("SELECT ") + kTaskColumns +
                              " FROM tasks WHERE status IN ('pending','queued','running') "
                              "OR (resource_cleanup_completed = 0 AND assigned_device IS NOT NULL) "
                              "ORDER BY created_at, id");
  std::vector<Task> out;
  while (q.executeStep()) out.push_back(read_task(q));
  return out;
}

std::size_t delete_finished(SQLite::Database& db, Timestamp finished_before) {
  static constexpr const char* kEnded =
      "SELECT id FROM tasks WHERE status IN ('completed','failed','cancelled') "
      "AND resource_cleanup_completed = 1 AND finished_at IS NOT NULL AND finished_at < ?1";
  SQLite::Transaction tx(db, SQLite::TransactionBehavior::IMMEDIATE);
  const std::string cutoff = format_timestamp(finished_before);
  for (const char* table : {"task_metrics", "task_events"}) {
    SQLite::Statement del(
        db, std::string("DELETE FROM ") + table + " WHERE task_id IN (" + kEnded + ")");
    del.bind(1, cutoff);
    del.exec();
  }
  SQLite::Statement del(db, std::string("DELETE FROM tasks WHERE id IN (") + kEnded + ")");
  del.bind(1, cutoff);
  const int n = del.exec();
  tx.commit();
  return static_cast<std::size_t>(n);
}

void migrate(SQLite::Database& db, const std::string& path) {
  int version = db.execAndGet("PRAGMA user_version").getInt();
  if (version > kSchemaVersion) {
    throw Error(ErrorCode::kIncompatible,
                "database " + path + " has schema version " + std::to_string(version) +
                    ", newer than this taskmgr knows (" + std::to_string(kSchemaVersion) +
                    "); it was not modified");
  }
  if (version == 0) {
    std::vector<std::string> tables;
    SQLite::Statement q(db,
                        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE "
                        "'sqlite\\_%' ESCAPE '\\' ORDER BY name");
    while (q.executeStep()) tables.push_back(q.getColumn(0).getString());
    if (std::find(tables.begin(), tables.end(), "tasks") != tables.end()) {
      throw Error(
          ErrorCode::kIncompatible,
          "database " + path + " has a tasks table but no schema version; it was not modified");
    }
    if (!tables.empty()) {
      std::string names;
      for (const auto& t : tables) names += (names.empty() ? "" : ", ") + t;
      throw Error(ErrorCode::kIncompatible,
                  "database " + path + " holds " + std::to_string(tables.size()) +
                      " table(s) that are not taskmgr's (" + names +
                      "); taskmgr does not create its tables among data it does not know: use "
                      "another file; it was not modified");
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

LockFile::LockFile(const std::string& db_path) : path_(db_path + ".lock") {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw Error(ErrorCode::kIoError,
                "cannot open lock file " + path_ + ": " + std::strerror(errno));
  }
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    char buf[32] = {0};
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    ::close(fd_);
    fd_ = -1;
    throw Error(ErrorCode::kBusy,
                "database " + db_path + " is in use by another task manager" +
                    (n > 0 ? " (pid " + std::string(buf, static_cast<std::size_t>(n)) + ")" : "") +
                    "; only one may open it at a time");
  }
  const std::string pid = std::to_string(::getpid());
  if (::ftruncate(fd_, 0) == 0) {
    [[maybe_unused]] const ssize_t w = ::pwrite(fd_, pid.data(), pid.size(), 0);
  }
}

LockFile::~LockFile() {
  if (fd_ >= 0) {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }
}

}  // namespace detail::sqlite

int sqlite_schema_version() noexcept { return detail::sqlite::kSchemaVersion; }

}  // namespace taskmgr
