// The SQLite store's schema: its tables and forward-only migrations, how a
// task maps onto a row of `tasks`, the queries (reads and the prune), and
// the lock file that keeps one store per database (sqlite_internal.hpp).
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <algorithm>

#include <sqlite3.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "../utf8.hpp"
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
// (SERIAL becomes SQLite's INTEGER PRIMARY KEY, JSONB is JSON text): its
// ALTER TABLEs, each run when the column is not there yet (an adopted table
// may have some), then its new tables.
constexpr std::pair<const char*, const char*> kSpecColumns[] = {
    {"estimated_memory_mb", "ALTER TABLE tasks ADD COLUMN estimated_memory_mb INTEGER"},
    {"actual_memory_mb", "ALTER TABLE tasks ADD COLUMN actual_memory_mb INTEGER"},
    {"assigned_device", "ALTER TABLE tasks ADD COLUMN assigned_device VARCHAR(50)"},
    {"service_instance_id", "ALTER TABLE tasks ADD COLUMN service_instance_id VARCHAR(100)"},
    {"resource_cleanup_completed",
     "ALTER TABLE tasks ADD COLUMN resource_cleanup_completed BOOLEAN DEFAULT FALSE"},
};
constexpr const char* kSpecTables = R"sql(
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

// Version 3: input bytes in a table of their own, so that a task's row
// stays small. SQLite reads a column stored after a large value by walking
// the value's overflow pages (listing 10,000 tasks of 1 MiB read all 10 GB
// of their inputs), and rewrites a whole row on every update (each state
// change of a task rewrote its input). For taskmgr's own table only (an
// adopted table keeps its input column: its application reads it).
constexpr const char* kInputsApart = R"sql(
CREATE TABLE task_inputs (
  task_id VARCHAR(36) PRIMARY KEY NOT NULL REFERENCES tasks(id),
  data BLOB NOT NULL
);
INSERT INTO task_inputs (task_id, data)
  SELECT id, input_data FROM tasks WHERE input_data IS NOT NULL;
UPDATE tasks SET input_data = NULL WHERE input_data IS NOT NULL;
)sql";

// Version 4: the pauses in force (TaskManager::pause), so that they hold
// across a restart. One row per paused scope; resume deletes it.
constexpr const char* kPausesTable = R"sql(
CREATE TABLE IF NOT EXISTS task_pauses (
  scope VARCHAR(20) NOT NULL,
  name TEXT NOT NULL,
  since TIMESTAMP NOT NULL,
  PRIMARY KEY (scope, name)
) WITHOUT ROWID;
)sql";

using store::Field;
using store::Kind;
using store::TaskLayout;

std::optional<Timestamp> col_ts(const SQLite::Column& c) {
  if (c.isNull()) return std::nullopt;
  const std::string s = c.getString();
  if (auto t = parse_timestamp(s)) return t;  // taskmgr's own form
  return store::parse_stored_time(s);
}

std::string quote(const std::string& name) {
  std::string out = "\"";
  for (char c : name) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

// "?, ?, ..." for n parameters.
std::string params(std::size_t n) {
  std::string out;
  for (std::size_t i = 0; i < n; ++i) out += i == 0 ? "?" : ", ?";
  return out;
}

// A time as its column keeps it: RFC 3339 text, or seconds since 1970.
void bind_time(SQLite::Statement& st, int i, Kind k, const std::optional<Timestamp>& t) {
  if (!t) {
    st.bind(i);
  } else if (k == Kind::kEpoch) {
    st.bind(i, static_cast<std::int64_t>(
                   std::chrono::floor<std::chrono::seconds>(t->time_since_epoch()).count()));
  } else if (k == Kind::kEpochReal) {
    const auto us =
        std::chrono::duration_cast<std::chrono::microseconds>(t->time_since_epoch()).count();
    st.bind(i, static_cast<double>(us) / 1e6);
  } else {
    st.bind(i, format_timestamp(*t));
  }
}

void bind_text_or_null(SQLite::Statement& st, int i, const std::string& v) {
  if (v.empty()) {
    st.bind(i);
  } else {
    st.bind(i, v);
  }
}

template <typename T>
void bind_opt(SQLite::Statement& st, int i, const std::optional<T>& v) {
  if (v) {
    st.bind(i, *v);
  } else {
    st.bind(i);
  }
}

void bind_field(SQLite::Statement& st, int i, const TaskLayout& l, Field f, const Task& t) {
  switch (f) {
    case store::kId: st.bind(i, t.id); break;
    case store::kService: st.bind(i, t.service); break;
    case store::kInputPath: bind_text_or_null(st, i, t.input.path); break;
    case store::kInputData:
      if (t.input.data.empty()) {
        st.bind(i);
      } else {
        st.bindNoCopy(i, t.input.data.data(), static_cast<int>(t.input.data.size()));
      }
      break;
    case store::kMediaType: bind_text_or_null(st, i, t.input.media_type); break;
    case store::kOptions: bind_text_or_null(st, i, t.options_json); break;
    case store::kPriority: st.bind(i, t.priority); break;
    case store::kStatus:
      st.bind(i, t.status == TaskStatus::kUnrecognized ? t.stored_status
                                                       : std::string(to_string(t.status)));
      break;
    case store::kAttempt: st.bind(i, t.attempt); break;
    case store::kBatchSize: st.bind(i, t.batch_size); break;
    case store::kFailureReason:
      if (t.failure_reason == TaskFailureReason::kNone) {
        st.bind(i);
      } else {
        st.bind(i, std::string(to_string(t.failure_reason)));
      }
      break;
    case store::kFailureMessage: bind_text_or_null(st, i, t.failure_message); break;
    case store::kResult: bind_text_or_null(st, i, t.result); break;
    case store::kCreatedAt: bind_time(st, i, l.kind(f), t.created_at); break;
    case store::kQueuedAt: bind_time(st, i, l.kind(f), t.queued_at); break;
    case store::kStartedAt: bind_time(st, i, l.kind(f), t.started_at); break;
    case store::kFinishedAt: bind_time(st, i, l.kind(f), t.finished_at); break;
    case store::kEstimatedMemory: bind_opt(st, i, t.estimated_memory_mb); break;
    case store::kActualMemory: bind_opt(st, i, t.actual_memory_mb); break;
    case store::kAssignedDevice: bind_opt(st, i, t.assigned_device); break;
    case store::kServiceInstance: bind_opt(st, i, t.service_instance_id); break;
    case store::kCleanupCompleted: st.bind(i, t.resource_cleanup_completed ? 1 : 0); break;
    case store::kRequestedDevice: bind_opt(st, i, t.requested_device); break;
    case store::kHost: bind_opt(st, i, t.host); break;
    case store::kFieldCount: break;
  }
}

Task read_task(SQLite::Statement& q, const TaskLayout& l) {
  Task t;
  bool service_seen = false;
  for (int f = 0; f < store::kFieldCount; ++f) {
    const SQLite::Column c = q.getColumn(f);
    if (c.isNull()) continue;
    if (f == store::kService) service_seen = true;
    if (f == store::kInputData) {
      if (c.isInteger()) {  // left out: its length (TaskLayout::select_list)
        t.input.left_out_bytes =
            static_cast<std::uint64_t>(std::max<std::int64_t>(0, c.getInt64()));
        continue;
      }
      const auto* p = static_cast<const std::uint8_t*>(c.getBlob());
      t.input.data.assign(p, p + c.getBytes());
      continue;
    }
    const std::string v = c.getString();
    if (f >= store::kCreatedAt && f <= store::kFinishedAt && !l.adopted()) {
      // taskmgr's own form first (it is nearly always that).
      if (const auto when = col_ts(c)) {
        if (f == store::kCreatedAt) t.created_at = *when;
        if (f == store::kQueuedAt) t.queued_at = *when;
        if (f == store::kStartedAt) t.started_at = *when;
        if (f == store::kFinishedAt) t.finished_at = *when;
        continue;
      }
    }
    l.set_field(t, Field(f), v);
  }
  if (!l.has(store::kStatus) || q.getColumn(store::kStatus).isNull()) {
    t.status = TaskStatus::kUnrecognized;  // no status word at all: stored_status ""
  }
  const auto& extra = l.extra();
  for (std::size_t i = 0; i < extra.size(); ++i) {
    const SQLite::Column c = q.getColumn(static_cast<int>(store::kFieldCount + i));
    if (!c.isNull()) t.extra[extra[i]] = c.getString();
  }
  l.finish(t, service_seen);
  return t;
}

// "status IN (?, ...)" for the words of `statuses`, appended to `binds`.
std::string status_in(const TaskLayout& l, std::initializer_list<TaskStatus> statuses,
                      std::vector<std::string>& binds) {
  if (!l.has(store::kStatus)) return "0";  // no status column: every row is unrecognized
  std::size_t n = 0;
  for (TaskStatus s : statuses) {
    for (auto& w : l.words_for(s)) {
      binds.push_back(std::move(w));
      ++n;
    }
  }
  return quote(l.column(store::kStatus)) + " IN (" + params(n) + ")";
}

std::string order_by(const TaskLayout& l, const char* dir) {
  std::string out = " ORDER BY ";
  if (l.has(store::kCreatedAt)) out += quote(l.column(store::kCreatedAt)) + dir + ", ";
  return out + quote(l.column(store::kId)) + dir;
}

std::vector<std::string> tables_of(SQLite::Database& db) {
  std::vector<std::string> tables;
  SQLite::Statement q(db,
                      "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE "
                      "'sqlite\\_%' ESCAPE '\\' ORDER BY name");
  while (q.executeStep()) tables.push_back(q.getColumn(0).getString());
  return tables;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

bool has(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// Why the unversioned `tasks` table cannot be adopted, or "".
std::string adoption_problem(SQLite::Database& db) {
  const std::vector<std::string> tables = tables_of(db);
  for (const char* t : {"task_events", "task_metrics"}) {
    if (has(tables, t)) {
      return std::string("it has a ") + t +
             " table already, which taskmgr would create: it does not know that table's "
             "columns";
    }
  }
  const auto cols = task_columns(db);
  const auto id = std::find_if(cols.begin(), cols.end(), [](const store::Column& c) {
    std::string n = c.name;
    std::transform(n.begin(), n.end(), n.begin(),
                   [](unsigned char ch) { return std::tolower(ch); });
    return n == "id";
  });
  if (id == cols.end()) return "its tasks table has no id column";
  std::string type = id->type;
  std::transform(type.begin(), type.end(), type.begin(),
                 [](unsigned char ch) { return std::toupper(ch); });
  if (type.find("INT") != std::string::npos || type.find("BLOB") != std::string::npos ||
      type.find("REAL") != std::string::npos) {
    return "its tasks.id column is " + id->type +
           ", not text: taskmgr's ids are 36-character UUIDs (task_events.task_id is "
           "VARCHAR(36))";
  }
  // The new tables' REFERENCES tasks(id) need id to be unique on its own.
  bool unique = false;
  {
    SQLite::Statement pk(
        db,
        "SELECT count(*), sum(pk = 1 AND name = ?) FROM pragma_table_info('tasks') "
        "WHERE pk > 0");
    pk.bind(1, id->name);
    if (pk.executeStep()) unique = pk.getColumn(0).getInt() == 1 && pk.getColumn(1).getInt() == 1;
  }
  if (!unique) {
    // A UNIQUE index SQLite accepts as a foreign key's parent: on id alone,
    // not partial, in the column's own collation (else every write of an
    // event fails "foreign key mismatch").
    const char* coll = nullptr;
    if (sqlite3_table_column_metadata(db.getHandle(), "main", "tasks", id->name.c_str(), nullptr,
                                      &coll, nullptr, nullptr, nullptr) != SQLITE_OK ||
        coll == nullptr) {
      coll = "BINARY";
    }
    SQLite::Statement ix(
        db,
        "SELECT count(*) FROM pragma_index_list('tasks') l WHERE l.\"unique\" = 1 AND "
        "l.partial = 0 AND (SELECT count(*) FROM pragma_index_info(l.name)) = 1 AND "
        "(SELECT name FROM pragma_index_info(l.name)) = ? AND (SELECT upper(coll) FROM "
        "pragma_index_xinfo(l.name) WHERE key = 1) = upper(?)");
    ix.bind(1, id->name);
    ix.bind(2, std::string(coll));
    unique = ix.executeStep() && ix.getColumn(0).getInt() > 0;
  }
  if (!unique) {
    return "its tasks.id column is neither the primary key nor unique (a UNIQUE index on id "
           "alone, not partial, in the column's collation): the spec's task_events and "
           "task_metrics reference tasks(id)";
  }
  SQLite::Statement len(db, "SELECT count(*), coalesce(max(length(" + quote(id->name) +
                                ")), 0), sum(" + quote(id->name) + " IS NULL) FROM tasks");
  len.executeStep();
  if (len.getColumn(1).getInt() > 36) {
    return "its tasks.id values are up to " + std::to_string(len.getColumn(1).getInt()) +
           " characters long; the spec's task_id columns are VARCHAR(36)";
  }
  if (len.getColumn(2).getInt() > 0) {
    return std::to_string(len.getColumn(2).getInt()) + " of its tasks have no id (NULL)";
  }
  // A status column taskmgr can write (generated columns are not listed by
  // table_info: they are read-only, and stay out of its fields).
  if (!store::TaskLayout::of(task_columns(db), {}, "").has(store::kStatus)) {
    return "its tasks table has no status column taskmgr can write (a column named status or "
           "state, not generated): every task would read back with no status";
  }
  // Every id comes back to hosts as UTF-8 text and is looked up by what
  // they send back: an id that is not UTF-8 (or is a BLOB) could be listed
  // but never found.
  SQLite::Statement ids(
      db, "SELECT " + quote(id->name) + ", typeof(" + quote(id->name) + ") FROM tasks");
  std::int64_t bad = 0;
  std::string first;
  while (ids.executeStep()) {
    const SQLite::Column c = ids.getColumn(0);
    const std::string v(static_cast<const char*>(c.getBlob()),
                        static_cast<std::size_t>(c.getBytes()));
    if (ids.getColumn(1).getString() != "text" || invalid_utf8_at(v)) {
      if (bad++ == 0) first = to_valid_utf8(v);
    }
  }
  if (bad > 0) {
    return std::to_string(bad) + " of its tasks.id values are not UTF-8 text (the first reads '" +
           first + "'): taskmgr returns ids as UTF-8 and finds tasks by them";
  }
  return "";
}

}  // namespace

std::vector<store::Column> task_columns(SQLite::Database& db) {
  std::vector<store::Column> out;
  SQLite::Statement q(
      db,
      "SELECT name, type, \"notnull\", coalesce(dflt_value, '') FROM pragma_table_info('tasks') "
      "ORDER BY cid");
  while (q.executeStep()) {
    out.push_back({q.getColumn(0).getString(), q.getColumn(1).getString(), 0,
                   q.getColumn(2).getInt() != 0, q.getColumn(3).getString()});
  }
  return out;
}

store::TaskLayout task_layout(SQLite::Database& db, const AdoptOptions& adopt) {
  store::TaskLayout l =
      store::TaskLayout::of(task_columns(db), adopt.status_map, adopt.default_service);
  if (has(tables_of(db), "task_inputs")) {
    l.keep_inputs_apart("SELECT i.data FROM task_inputs i WHERE i.task_id = tasks.id",
                        "SELECT length(i.data) FROM task_inputs i WHERE i.task_id = tasks.id");
  }
  if (!l.has(store::kAttempt)) {
    // An adopted table with no attempt column: a task's attempt is the one
    // its last `started` event names (task_events is ours), so that
    // attempts are counted across restarts (a task the process dies under
    // again and again runs out of them).
    l.derive(store::kAttempt,
             "SELECT MAX(CAST(json_extract(e.details, '$.attempt') AS INTEGER)) FROM task_events "
             "e WHERE e.task_id = tasks." +
                 quote(l.column(store::kId)) + " AND e.event_type = 'started'");
  }
  return l;
}

std::string insert_task_sql(const TaskLayout& l) {
  std::string cols, values;
  std::size_t n = 0;
  auto add = [&](Field f) {
    if (!l.has(f)) return;
    cols += (n == 0 ? "" : ", ") + quote(l.column(f));
    values += (n++ == 0 ? "" : ", ") + l.written(f, "?");
  };
  for (Field f : store::kInsertOnlyFields) add(f);
  for (Field f : store::kMutableFields) add(f);
  return "INSERT INTO tasks (" + cols + ") VALUES (" + values + ")";
}

std::string update_task_sql(const TaskLayout& l) {
  std::string sets;
  for (Field f : store::kMutableFields) {
    if (l.has(f))
      sets += (sets.empty() ? "" : ", ") + quote(l.column(f)) + " = " + l.written(f, "?");
  }
  return "UPDATE tasks SET " + sets + " WHERE " + quote(l.column(store::kId)) + " = ?";
}

void bind_insert(SQLite::Statement& st, const TaskLayout& l, const Task& t) {
  int i = 1;
  for (Field f : store::kInsertOnlyFields) {
    if (l.has(f)) bind_field(st, i++, l, f, t);
  }
  for (Field f : store::kMutableFields) {
    if (l.has(f)) bind_field(st, i++, l, f, t);
  }
}

void bind_update(SQLite::Statement& st, const TaskLayout& l, const Task& t) {
  int i = 1;
  for (Field f : store::kMutableFields) {
    if (l.has(f)) bind_field(st, i++, l, f, t);
  }
  st.bind(i, t.id);
}

ErrorCode code_of(const SQLite::Exception& e) {
  switch (e.getErrorCode()) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return ErrorCode::kBusy;
    case SQLITE_NOMEM: return ErrorCode::kOutOfMemory;
    default: return ErrorCode::kIoError;
  }
}

std::optional<Task> select_task(SQLite::Database& db, const TaskLayout& l, const std::string& id) {
  SQLite::Statement q(db, "SELECT " + l.select_list(quote, "length", true) + " FROM tasks WHERE " +
                              quote(l.column(store::kId)) + " = ?");
  q.bind(1, id);
  if (!q.executeStep()) return std::nullopt;
  return read_task(q, l);
}

std::vector<Task> select_tasks(SQLite::Database& db, const TaskLayout& l, const TaskFilter& f) {
  std::string sql = "SELECT " +
                    l.select_list(quote, "length", f.with_payloads, f.with_input_bytes) +
                    " FROM tasks WHERE 1=1";
  std::vector<std::string> binds;
  if (f.status) {
    if (*f.status == TaskStatus::kUnrecognized) {
      if (l.has(store::kStatus)) {
        binds = l.known_words();
        const std::string c = quote(l.column(store::kStatus));
        sql += " AND (" + c + " IS NULL OR " + c + " NOT IN (" + params(binds.size()) + "))";
      }
    } else {
      sql += " AND " + status_in(l, {*f.status}, binds);
    }
  }
  if (!f.service.empty()) {
    if (l.has(store::kService)) {
      const std::string c = quote(l.column(store::kService));
      sql += " AND (" + c + " = ?";
      // Rows that name no service are the default service's.
      if (f.service == l.default_service()) sql += " OR " + c + " IS NULL";
      sql += ")";
      binds.push_back(f.service);
    } else if (f.service != l.default_service()) {
      sql += " AND 0";
    }
  }
  // Paging: before the cursor in the order below (created_at, then id).
  const std::string id_col = quote(l.column(store::kId));
  const bool by_time = f.before && l.has(store::kCreatedAt);
  if (by_time) {
    const std::string c = quote(l.column(store::kCreatedAt));
    sql += " AND (" + c + " < ? OR (" + c + " = ? AND " + id_col + " < ?))";
  } else if (f.before) {
    sql += " AND " + id_col + " < ?";
  }
  sql += order_by(l, " DESC");
  if (f.limit != 0) sql += " LIMIT " + std::to_string(f.limit);
  SQLite::Statement q(db, sql);
  int n = 0;
  for (const auto& b : binds) q.bind(++n, b);
  if (by_time) {
    bind_time(q, ++n, l.kind(store::kCreatedAt), f.before->created_at);
    bind_time(q, ++n, l.kind(store::kCreatedAt), f.before->created_at);
  }
  if (f.before) q.bind(++n, f.before->id);
  std::vector<Task> out;
  while (q.executeStep()) out.push_back(read_task(q, l));
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
std::vector<Task> select_unfinished(SQLite::Database& db, const TaskLayout& l) {
  std::vector<std::string> binds;
  const std::string waiting =
      status_in(l, {TaskStatus::kPending, TaskStatus::kQueued, TaskStatus::kRunning}, binds);
  // Ended with its cleanup due: a task taskmgr ran (in an adopted table,
  // one with events: the earlier application's ended rows are not taskmgr's
  // to clean up, whatever their assigned_device).
  const std::string ran =
      l.adopted() ? " AND EXISTS (SELECT 1 FROM task_events e WHERE e.task_id = tasks." +
                        quote(l.column(store::kId)) + ")"
                  : std::string();
  SQLite::Statement q(db, "SELECT " + l.select_list(quote, "length", true, /*with_input=*/false) +
                              " FROM tasks WHERE " + waiting +
                              " OR (resource_cleanup_completed = 0 AND assigned_device IS NOT "
                              "NULL" +
                              ran + ")" + order_by(l, ""));
  for (std::size_t i = 0; i < binds.size(); ++i) q.bind(static_cast<int>(i + 1), binds[i]);
  std::vector<Task> out;
  while (q.executeStep()) out.push_back(read_task(q, l));
  return out;
}

namespace {
// The ended tasks (completed, failed or cancelled, cleanup done) that
// `extra` (an SQL condition on `tasks`, its ? bound by `bind_extra` after the
// status words) selects, deleted with their samples, events and input bytes
// in one transaction. In an adopted table: only the rows taskmgr ran (it
// wrote their events); the earlier application's own rows are never
// deleted, also when its table had an assigned_device column of its own.
std::size_t delete_ended(SQLite::Database& db, const TaskLayout& l, const std::string& extra,
                         const std::function<void(SQLite::Statement&, int)>& bind_extra,
                         const std::function<void()>& before = {}) {
  std::vector<std::string> binds;
  std::string ended =
      "SELECT " + quote(l.column(store::kId)) + " FROM tasks WHERE " +
      status_in(l, {TaskStatus::kCompleted, TaskStatus::kFailed, TaskStatus::kCancelled}, binds) +
      " AND resource_cleanup_completed = 1 AND " + extra;
  if (l.adopted()) {
    ended += " AND EXISTS (SELECT 1 FROM task_events e WHERE e.task_id = tasks." +
             quote(l.column(store::kId)) + ")";
  }
  SQLite::Transaction tx(db, SQLite::TransactionBehavior::IMMEDIATE);
  if (before) before();
  // The ids first: deleting a task's events changes which tasks `ended`
  // selects in an adopted table (those with events).
  db.exec("CREATE TEMP TABLE IF NOT EXISTS taskmgr_prune (id TEXT PRIMARY KEY)");
  db.exec("DELETE FROM temp.taskmgr_prune");
  SQLite::Statement pick(db, "INSERT INTO temp.taskmgr_prune " + ended);
  int i = 1;
  for (const auto& w : binds) pick.bind(i++, w);
  bind_extra(pick, i);
  pick.exec();
  const std::string gone = " IN (SELECT id FROM temp.taskmgr_prune)";
  db.exec("DELETE FROM task_metrics WHERE task_id" + gone);
  db.exec("DELETE FROM task_events WHERE task_id" + gone);
  if (l.inputs_apart()) db.exec("DELETE FROM task_inputs WHERE task_id" + gone);
  const int n = db.exec("DELETE FROM tasks WHERE " + quote(l.column(store::kId)) + gone);
  db.exec("DELETE FROM temp.taskmgr_prune");
  tx.commit();
  return static_cast<std::size_t>(n);
}
}  // namespace

std::size_t delete_finished(SQLite::Database& db, const TaskLayout& l, Timestamp finished_before) {
  if (!l.has(store::kFinishedAt)) return 0;  // an adopted table with no end times: nothing known
  const std::string at = quote(l.column(store::kFinishedAt));
  return delete_ended(db, l, at + " IS NOT NULL AND " + at + " < ?",
                      [&](SQLite::Statement& st, int i) {
                        bind_time(st, i, l.kind(store::kFinishedAt), finished_before);
                      });
}

std::size_t delete_tasks(SQLite::Database& db, const TaskLayout& l,
                         const std::vector<std::string>& ids) {
  if (ids.empty()) return 0;
  return delete_ended(
      db, l, quote(l.column(store::kId)) + " IN (SELECT id FROM temp.taskmgr_wanted)",
      [](SQLite::Statement&, int) {},
      [&] {
        db.exec("CREATE TEMP TABLE IF NOT EXISTS taskmgr_wanted (id TEXT PRIMARY KEY)");
        db.exec("DELETE FROM temp.taskmgr_wanted");
        SQLite::Statement add(db, "INSERT OR IGNORE INTO temp.taskmgr_wanted VALUES (?)");
        for (const auto& id : ids) {
          add.bind(1, id);
          add.exec();
          add.reset();
        }
      });
}

std::vector<PauseState> load_pauses(SQLite::Database& db) {
  std::vector<PauseState> out;
  SQLite::Statement q(db, "SELECT scope, name, since FROM task_pauses ORDER BY scope, name");
  while (q.executeStep()) {
    auto scope = parse_pause_scope(q.getColumn(0).getString());
    auto since = col_ts(q.getColumn(2));
    if (!scope || !since) continue;  // not a row taskmgr wrote: left as it is
    out.push_back(PauseState{*scope, q.getColumn(1).getString(), *since});
  }
  return out;
}

void save_pause(SQLite::Database& db, const PauseState& p, bool paused) {
  if (paused) {
    SQLite::Statement st(
        db, "INSERT OR REPLACE INTO task_pauses (scope, name, since) VALUES (?, ?, ?)");
    st.bind(1, std::string(to_string(p.scope)));
    st.bind(2, p.name);
    st.bind(3, format_timestamp(p.since));
    st.exec();
  } else {
    SQLite::Statement st(db, "DELETE FROM task_pauses WHERE scope = ? AND name = ?");
    st.bind(1, std::string(to_string(p.scope)));
    st.bind(2, p.name);
    st.exec();
  }
}

void check_migratable(SQLite::Database& db, const std::string& path, bool allow_other_tables) {
  const int version = db.execAndGet("PRAGMA user_version").getInt();
  if (version > kSchemaVersion) {
    throw Error(ErrorCode::kIncompatible,
                "database " + path + " has schema version " + std::to_string(version) +
                    ", newer than this taskmgr knows (" + std::to_string(kSchemaVersion) +
                    "); it was not modified");
  }
  if (version != 0) return;
  const std::vector<std::string> tables = tables_of(db);
  if (has(tables, "tasks")) {
    const std::string why = adoption_problem(db);
    if (!why.empty()) {
      throw Error(ErrorCode::kIncompatible,
                  "database " + path +
                      " has a tasks table taskmgr did not create, and cannot adopt it: " + why +
                      " (tables: " + join(tables) + "); it was not modified");
    }
    return;
  }
  if (!tables.empty() && !allow_other_tables) {
    throw Error(ErrorCode::kIncompatible,
                "database " + path + " holds " + std::to_string(tables.size()) +
                    " table(s) that are not taskmgr's (" + join(tables) +
                    ") and no tasks table; taskmgr does not create its tables among data it does "
                    "not know: use another file, or set storage.allow_other_tables to create "
                    "them beside; it was not modified");
  }
}

void migrate(SQLite::Database& db, const std::string& path, bool allow_other_tables) {
  check_migratable(db, path, allow_other_tables);
  int version = db.execAndGet("PRAGMA user_version").getInt();
  auto spec_changes = [&] {
    std::vector<std::string> have;
    for (const auto& c : task_columns(db)) have.push_back(c.name);
    for (const auto& [column, sql] : kSpecColumns) {
      if (!has(have, column)) db.exec(sql);
    }
    db.exec(kSpecTables);
  };
  // Version 3 (kInputsApart), where the table is taskmgr's own in its
  // columns. (Adoption, below, records the current version without it: an
  // adopted table keeps its input column, which its application reads.)
  auto inputs_apart = [&] {
    if (!store::TaskLayout::of(task_columns(db), {}, "").adopted()) db.exec(kInputsApart);
  };
  if (version == 0 && has(tables_of(db), "tasks")) {
    // Adopting an earlier application's table: the spec's changes, in one
    // transaction; its own columns and rows are not touched.
    SQLite::Transaction tx(db, SQLite::TransactionBehavior::IMMEDIATE);
    try {
      spec_changes();
      db.exec(kPausesTable);
    } catch (const SQLite::Exception& e) {
      // A table SQLite will not change so (a STRICT table refuses the
      // spec's VARCHAR(50), say): rolled back, nothing changed.
      throw Error(ErrorCode::kIncompatible,
                  "database " + path +
                      " has a tasks table taskmgr did not create, and cannot adopt it: the "
                      "spec's changes failed: " +
                      e.what() + "; it was not modified");
    }
    db.exec("PRAGMA user_version = " + std::to_string(kSchemaVersion));
    tx.commit();
    return;
  }
  // Each step in its own transaction; forward only.
  for (int to = version + 1; to <= kSchemaVersion; ++to) {
    SQLite::Transaction tx(db, SQLite::TransactionBehavior::IMMEDIATE);
    if (to == 1) db.exec(kSchemaV1);
    if (to == 2) spec_changes();
    if (to == 3) inputs_apart();
    if (to == 4) db.exec(kPausesTable);
    db.exec("PRAGMA user_version = " + std::to_string(to));
    tx.commit();
    version = to;
  }
}

void check_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) return;  // not there yet: created empty
  const std::string wal = path + "-wal";
  const auto wal_size = fs::file_size(wal, ec);
  const bool has_wal = !ec && wal_size > 0;
  if (size == 0) {
    if (has_wal) {
      throw Error(ErrorCode::kIncompatible,
                  "database " + path + " is empty, but a -wal file of " + std::to_string(wal_size) +
                      " bytes is beside it: it belongs to no database here (SQLite would delete "
                      "it); move it away, or back beside the database it came from; nothing was "
                      "modified");
    }
    return;
  }
  {
    std::ifstream in(path, std::ios::binary);
    char head[16] = {};
    in.read(head, sizeof head);
    const auto n = static_cast<std::size_t>(in.gcount());
    if (n < sizeof head || std::memcmp(head, "SQLite format 3", 16) != 0) {
      std::string shown;
      for (std::size_t i = 0; i < n; ++i) {
        const auto c = static_cast<unsigned char>(head[i]);
        shown += c >= 0x20 && c < 0x7f ? std::string(1, head[i]) : std::string(".");
      }
      throw Error(ErrorCode::kIncompatible,
                  "database " + path + " is not a SQLite database (" + std::to_string(size) +
                      " bytes, beginning \"" + shown +
                      "\"): taskmgr does not write over a file it does not know; it was not "
                      "modified");
    }
  }
  if (!has_wal) return;
  // What the file holds with its -wal, and without it (read through a
  // second name of the same file, where no -wal is beside it).
  std::vector<std::string> with_wal, alone;
  {
    SQLite::Database db(path, SQLite::OPEN_READONLY);
    with_wal = tables_of(db);
  }
  const fs::path probe = path + ".taskmgr-probe-" + std::to_string(::getpid());
  fs::remove_all(probe, ec);
  fs::create_directories(probe, ec);
  const fs::path copy = probe / "db";
  fs::create_hard_link(path, copy, ec);
  if (ec) fs::copy_file(path, copy, ec);
  bool alone_read = false;
  if (!ec) {
    try {
      SQLite::Database db(copy.string(), SQLite::OPEN_READONLY);
      alone = tables_of(db);
      alone_read = true;
    } catch (const SQLite::Exception&) {
      // cannot tell: judged below by what reads through the -wal
    }
  }
  fs::remove_all(probe, ec);
  std::vector<std::string> lost;
  for (const auto& t : alone) {
    if (!has(with_wal, t)) lost.push_back(t);
  }
  // A -wal of this database adds to what the file holds (a crash leaves one
  // behind); it never hides a table the file alone has.
  if (!lost.empty() || (!alone_read && with_wal.empty())) {
    throw Error(
        ErrorCode::kIncompatible,
        "database " + path + " (" + std::to_string(size) + " bytes) " +
            (with_wal.empty() ? std::string("reads as empty") : "loses table(s) " + join(lost)) +
            " through the -wal file beside it (" + std::to_string(wal_size) +
            " bytes), which looks like another database's; " +
            (alone_read ? "the file alone holds " +
                              (alone.empty() ? std::string("no tables") : "tables " + join(alone))
                        : std::string("the file alone could not be read to compare")) +
            ". Move the -wal file away (or back beside its own database) and open again; "
            "nothing was modified");
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
