// The PostgreSQL store's schema: its tables and forward-only migrations, the
// store lock, how a task maps onto a row of `tasks`, and the queries (reads
// and the prune) (postgres_internal.hpp).
#include <algorithm>
#include <cstdlib>

#include "postgres_internal.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr {
namespace detail::postgres {
namespace {

// Version 1: taskmgr's `tasks` table as it was before the spec's delta (the
// "existing" table the spec's ALTER TABLEs extend), and the table that
// records the migrations.
constexpr const char* kSchemaV1 = R"sql(
CREATE TABLE taskmgr_schema (
  version INTEGER PRIMARY KEY,
  applied_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);
CREATE TABLE tasks (
  id VARCHAR(36) PRIMARY KEY,
  service VARCHAR(50) NOT NULL,
  input_path TEXT,
  input_data BYTEA,
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
);
CREATE INDEX idx_tasks_status ON tasks (status, created_at, id);
CREATE INDEX idx_tasks_created ON tasks (created_at, id);
)sql";

// Version 2: the spec's "Database schema changes", exactly as the spec
// writes them, and the indexes the queries need.
constexpr const char* kMigrationV2 = R"sql(
ALTER TABLE tasks ADD COLUMN estimated_memory_mb INTEGER;
ALTER TABLE tasks ADD COLUMN actual_memory_mb INTEGER;
ALTER TABLE tasks ADD COLUMN assigned_device VARCHAR(50);
ALTER TABLE tasks ADD COLUMN service_instance_id VARCHAR(100);
ALTER TABLE tasks ADD COLUMN resource_cleanup_completed BOOLEAN DEFAULT FALSE;

CREATE TABLE task_metrics (
    id SERIAL PRIMARY KEY,
    task_id VARCHAR(36) REFERENCES tasks(id),
    timestamp TIMESTAMP,
    memory_usage_mb INTEGER,
    device VARCHAR(50),
    processing_stage VARCHAR(100)
);

CREATE TABLE task_events (
    id SERIAL PRIMARY KEY,
    task_id VARCHAR(36) REFERENCES tasks(id),
    event_type VARCHAR(50),
    timestamp TIMESTAMP,
    details JSONB
);

CREATE INDEX idx_task_metrics_task ON task_metrics (task_id, id);
CREATE INDEX idx_task_events_task ON task_events (task_id, id);
CREATE INDEX idx_tasks_unfinished ON tasks (created_at, id)
  WHERE status IN ('pending', 'queued', 'running')
     OR (resource_cleanup_completed = FALSE AND assigned_device IS NOT NULL);
CREATE INDEX idx_tasks_finished ON tasks (finished_at)
  WHERE status IN ('completed', 'failed', 'cancelled');
)sql";

struct Step {
  int version;
  const char* sql;
};
constexpr Step kSteps[] = {{1, kSchemaV1}, {2, kMigrationV2}};

// The columns every state change rewrites, in the order of mutable_params().
constexpr const char* kMutableColumns[] = {"options",
                                           "priority",
                                           "status",
                                           "attempt",
                                           "batch_size",
                                           "failure_reason",
                                           "failure_message",
                                           "result",
                                           "queued_at",
                                           "started_at",
                                           "finished_at",
                                           "estimated_memory_mb",
                                           "actual_memory_mb",
                                           "assigned_device",
                                           "service_instance_id",
                                           "resource_cleanup_completed"};
constexpr int kMutableCount = 16;

// Every column of `tasks`, in the order read_task() reads them.
constexpr const char* kTaskColumns =
    "id, service, input_path, input_data, input_media_type, options, priority, status, attempt, "
    "batch_size, failure_reason, failure_message, result, created_at, queued_at, started_at, "
    "finished_at, estimated_memory_mb, actual_memory_mb, assigned_device, service_instance_id, "
    "resource_cleanup_completed";

// load_unfinished's rows (idx_tasks_unfinished has the same predicate). Rows
// from before the upgrade (no assigned_device) never ran under this schema:
// their cleanup is not ours to redo.
constexpr const char* kUnfinished =
    "status IN ('pending', 'queued', 'running') "
    "OR (resource_cleanup_completed = FALSE AND assigned_device IS NOT NULL)";

// prune_finished's rows, finished before $1.
constexpr const char* kEnded =
    "SELECT id FROM tasks WHERE status IN ('completed', 'failed', 'cancelled') "
    "AND resource_cleanup_completed AND finished_at IS NOT NULL AND finished_at < $1";

void add_mutable(pg::Params& p, const Task& t) {
  p.text_or_null(t.options_json);
  p.integer(t.priority);
  p.text(std::string(to_string(t.status)));
  p.integer(t.attempt);
  p.integer(t.batch_size);
  if (t.failure_reason == TaskFailureReason::kNone) {
    p.null();
  } else {
    p.text(std::string(to_string(t.failure_reason)));
  }
  p.text_or_null(t.failure_message);
  p.text_or_null(t.result);
  p.opt_timestamp(t.queued_at);
  p.opt_timestamp(t.started_at);
  p.opt_timestamp(t.finished_at);
  p.opt_integer(t.estimated_memory_mb);
  p.opt_integer(t.actual_memory_mb);
  p.opt_text(t.assigned_device);
  p.opt_text(t.service_instance_id);
  p.boolean(t.resource_cleanup_completed);
}

std::string placeholders(int from, int count) {
  std::string out;
  for (int i = 0; i < count; ++i) out += (i == 0 ? "$" : ", $") + std::to_string(from + i);
  return out;
}

bool is_null(const PGresult* r, int row, int col) { return PQgetisnull(r, row, col) != 0; }
std::string text(const PGresult* r, int row, int col) {
  return std::string(PQgetvalue(r, row, col), static_cast<std::size_t>(PQgetlength(r, row, col)));
}
std::int64_t integer(const PGresult* r, int row, int col) {
  return std::strtoll(PQgetvalue(r, row, col), nullptr, 10);
}
std::optional<Timestamp> timestamp(const PGresult* r, int row, int col) {
  if (is_null(r, row, col)) return std::nullopt;
  auto t = pg::parse_timestamp(text(r, row, col));
  if (!t) {
    throw pg::PgError(
        ErrorCode::kIoError, "", false,
        "cannot read timestamp '" + text(r, row, col) + "' (out of the range taskmgr keeps)");
  }
  return t;
}

Task read_task(const PGresult* r, int row) {
  Task t;
  t.id = text(r, row, 0);
  t.service = text(r, row, 1);
  if (!is_null(r, row, 2)) t.input.path = text(r, row, 2);
  if (!is_null(r, row, 3)) {
    auto bytes = pg::parse_bytea(text(r, row, 3));
    if (!bytes) throw pg::PgError(ErrorCode::kIoError, "", false, "cannot read input_data");
    t.input.data = std::move(*bytes);
  }
  if (!is_null(r, row, 4)) t.input.media_type = text(r, row, 4);
  if (!is_null(r, row, 5)) t.options_json = text(r, row, 5);
  t.priority = static_cast<int>(integer(r, row, 6));
  t.status = parse_task_status(text(r, row, 7)).value_or(TaskStatus::kFailed);
  t.attempt = static_cast<int>(integer(r, row, 8));
  t.batch_size = static_cast<int>(integer(r, row, 9));
  if (!is_null(r, row, 10)) {
    t.failure_reason =
        parse_failure_reason(text(r, row, 10)).value_or(TaskFailureReason::kProcessingError);
  }
  if (!is_null(r, row, 11)) t.failure_message = text(r, row, 11);
  if (!is_null(r, row, 12)) t.result = text(r, row, 12);
  t.created_at = timestamp(r, row, 13).value_or(Timestamp{});
  t.queued_at = timestamp(r, row, 14);
  t.started_at = timestamp(r, row, 15);
  t.finished_at = timestamp(r, row, 16);
  if (!is_null(r, row, 17)) t.estimated_memory_mb = integer(r, row, 17);
  if (!is_null(r, row, 18)) t.actual_memory_mb = integer(r, row, 18);
  if (!is_null(r, row, 19)) t.assigned_device = text(r, row, 19);
  if (!is_null(r, row, 20)) t.service_instance_id = text(r, row, 20);
  t.resource_cleanup_completed = !is_null(r, row, 21) && text(r, row, 21) == "t";
  return t;
}

std::vector<Task> read_tasks(const PGresult* r) {
  std::vector<Task> out;
  const int n = PQntuples(r);
  out.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(read_task(r, i));
  return out;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Runs `body` in a transaction of its own on `c`: rolled back when it throws.
template <typename F>
auto in_transaction(pg::Conn& c, F&& body) {
  c.exec_script("BEGIN ISOLATION LEVEL READ COMMITTED");
  try {
    auto out = body();
    c.exec_script("COMMIT");
    return out;
  } catch (...) {
    if (!c.broken()) {
      try {
        c.exec_script("ROLLBACK");
      } catch (...) {
        // the connection's owner drops it when it is broken
      }
    }
    throw;
  }
}

}  // namespace

std::string session_setup(const PostgresStoreOptions& o) {
  std::string sql;
  if (!o.schema.empty()) sql += "SET search_path TO " + pg::quote_ident(o.schema) + ";\n";
  const auto ms = static_cast<long long>(o.statement_timeout_seconds * 1000);
  sql += "SET statement_timeout = " + std::to_string(ms) + ";\n";
  // What the contract needs, whatever the server's defaults: a commit is
  // durable when it returns; READ COMMITTED; timestamps and bytes in the
  // text forms pg.cpp reads.
  sql +=
      "SET synchronous_commit = on;\n"
      "SET default_transaction_isolation = 'read committed';\n"
      "SET DateStyle = 'ISO, YMD';\n"
      "SET TimeZone = 'UTC';\n"
      "SET bytea_output = 'hex';\n"
      "SET client_min_messages = warning;\n";
  return sql;
}

std::string target_schema(pg::Conn& conn, const PostgresStoreOptions& o) {
  if (!o.schema.empty()) return o.schema;
  pg::Result r = conn.exec("SELECT current_schema()");
  if (PQntuples(r.get()) != 1 || is_null(r.get(), 0, 0)) {
    throw Error(ErrorCode::kInvalidArgument,
                "the connection's search_path names no schema that exists: set "
                "storage.postgres.schema (PostgresStoreOptions::schema) to the schema for "
                "taskmgr's tables");
  }
  return text(r.get(), 0, 0);
}

void migrate(pg::Conn& conn, const PostgresStoreOptions& o, const std::string& where) {
  const std::string schema = target_schema(conn, o);
  const std::string named = where + " (schema " + schema + ")";
  in_transaction(conn, [&] {
    pg::Params lock;
    lock.text(schema);
    conn.exec("SELECT pg_advisory_xact_lock(hashtext('taskmgr.migrate'), hashtext($1))", lock);
    pg::Params s;
    s.text(schema);
    if (!o.schema.empty() &&
        PQntuples(conn.exec("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1", s).get()) ==
            0) {
      conn.exec_script("CREATE SCHEMA " + pg::quote_ident(schema));
    }
    pg::Result found = conn.exec(
        "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = $1 ORDER BY tablename", s);
    std::vector<std::string> tables;
    for (int i = 0; i < PQntuples(found.get()); ++i) tables.push_back(text(found.get(), i, 0));
    const auto has = [&](const char* t) {
      return std::find(tables.begin(), tables.end(), t) != tables.end();
    };
    int version = 0;
    if (has("taskmgr_schema")) {
      pg::Result v = conn.exec("SELECT coalesce(max(version), 0) FROM " + pg::quote_ident(schema) +
                               ".taskmgr_schema");
      version = static_cast<int>(integer(v.get(), 0, 0));
    }
    if (version > kSchemaVersion) {
      throw Error(ErrorCode::kIncompatible,
                  "database " + named + " has taskmgr schema version " + std::to_string(version) +
                      ", newer than this taskmgr knows (" + std::to_string(kSchemaVersion) +
                      "); it was not modified");
    }
    if (version == 0 && has("tasks")) {
      throw Error(ErrorCode::kIncompatible,
                  "database " + named +
                      " has a tasks table that taskmgr did not create (no taskmgr_schema table; "
                      "tables found: " +
                      join(tables) +
                      "); adopting an existing tasks table is not supported yet; it was not "
                      "modified");
    }
    if (version == 0 && !tables.empty() && !o.allow_other_tables) {
      throw Error(ErrorCode::kIncompatible,
                  "database " + named + " holds " + std::to_string(tables.size()) +
                      " table(s) that are not taskmgr's (" + join(tables) +
                      "); taskmgr does not create its tables among data it does not know: use "
                      "an empty schema (storage.postgres.schema) or set "
                      "storage.postgres.allow_other_tables; it was not modified");
    }
    for (const Step& step : kSteps) {
      if (version >= step.version) continue;
      conn.exec_script(step.sql);
      pg::Params v;
      v.integer(step.version);
      conn.exec("INSERT INTO " + pg::quote_ident(schema) + ".taskmgr_schema (version) VALUES ($1)",
                v);
      version = step.version;
    }
    return 0;
  });
}

bool lock_store(pg::Conn& conn, const std::string& schema, double wait_seconds) {
  const auto ms = std::max<long long>(1, static_cast<long long>(wait_seconds * 1000));
  conn.exec_script("SET lock_timeout = " + std::to_string(ms));
  pg::Params p;
  p.text(schema);
  try {
    conn.exec("SELECT pg_advisory_lock(hashtext('taskmgr.store'), hashtext($1))", p);
  } catch (const pg::PgError& e) {
    if (e.sqlstate() != "55P03" && e.sqlstate() != "57014") throw;
    conn.exec_script("SET lock_timeout = 0");
    return false;
  }
  conn.exec_script("SET lock_timeout = 0");
  return true;
}

std::string holder_of_store_lock(pg::Conn& conn, const std::string& schema) {
  pg::Params p;
  p.text(schema);
  pg::Result r = conn.exec(
      "SELECT a.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local') "
      "FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
      "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
      "AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = "
      "current_database()) "
      "AND l.classid = hashtext('taskmgr.store')::oid AND l.objid = hashtext($1)::oid",
      p);
  if (PQntuples(r.get()) == 0) return "";
  return "server pid " + text(r.get(), 0, 0) + ", application '" + text(r.get(), 0, 1) +
         "', client " + text(r.get(), 0, 2);
}

const Statement& insert_task_statement() {
  static const Statement s{"taskmgr_insert_task", [] {
                             std::string cols;
                             for (const char* c : kMutableColumns) cols += std::string(", ") + c;
                             return "INSERT INTO tasks (id, service, input_path, input_data, "
                                    "input_media_type, created_at" +
                                    cols + ") VALUES (" + placeholders(1, 6 + kMutableCount) + ")";
                           }()};
  return s;
}

const Statement& update_task_statement() {
  static const Statement s{
      "taskmgr_update_task", [] {
        std::string sets;
        int i = 1;
        for (const char* c : kMutableColumns) {
          sets += (i == 1 ? "" : ", ") + std::string(c) + " = $" + std::to_string(i);
          ++i;
        }
        return "UPDATE tasks SET " + sets + " WHERE id = $" + std::to_string(i);
      }()};
  return s;
}

const Statement& insert_event_statement() {
  static const Statement s{
      "taskmgr_insert_event",
      "INSERT INTO task_events (task_id, event_type, timestamp, details) VALUES ($1, $2, $3, $4)"};
  return s;
}

const Statement& insert_metric_statement() {
  static const Statement s{
      "taskmgr_insert_metric",
      "INSERT INTO task_metrics (task_id, timestamp, memory_usage_mb, device, processing_stage) "
      "VALUES ($1, $2, $3, $4, $5)"};
  return s;
}

pg::Params insert_task_params(const Task& t) {
  pg::Params p;
  p.text(t.id).text(t.service).text_or_null(t.input.path).bytes(t.input.data);
  p.text_or_null(t.input.media_type).timestamp(t.created_at);
  add_mutable(p, t);
  return p;
}

pg::Params update_task_params(const Task& t) {
  pg::Params p;
  add_mutable(p, t);
  p.text(t.id);
  return p;
}

pg::Params insert_event_params(const EventRecord& e) {
  pg::Params p;
  p.text(e.task_id).text(std::string(to_string(e.event))).timestamp(e.timestamp);
  p.jsonb(e.details_json);
  return p;
}

pg::Params insert_metric_params(const MetricSample& s) {
  pg::Params p;
  p.text(s.task_id).timestamp(s.timestamp).integer(s.memory_usage_mb);
  p.text(s.device).text(s.processing_stage);
  return p;
}

std::optional<Task> select_task(pg::Conn& c, const std::string& id) {
  pg::Params p;
  p.text(id);
  pg::Result r =
      c.exec_prepared("taskmgr_select_task",
                      std::string("SELECT ") + kTaskColumns + " FROM tasks WHERE id = $1", p);
  if (PQntuples(r.get()) == 0) return std::nullopt;
  return read_task(r.get(), 0);
}

std::vector<Task> select_tasks(pg::Conn& c, const TaskFilter& f) {
  std::string columns = kTaskColumns;
  if (!f.with_payloads) {
    // Same positions for read_task, NULL instead of the bulky columns.
    columns.replace(columns.find("input_data"), 10, "NULL");
    columns.replace(columns.find("result"), 6, "NULL");
  }
  // One prepared statement per shape of filter.
  std::string name = "taskmgr_list";
  std::string sql = "SELECT " + columns + " FROM tasks WHERE TRUE";
  pg::Params p;
  int n = 0;
  if (f.status) {
    sql += " AND status = $" + std::to_string(++n);
    p.text(std::string(to_string(*f.status)));
    name += "_status";
  }
  if (!f.service.empty()) {
    sql += " AND service = $" + std::to_string(++n);
    p.text(f.service);
    name += "_service";
  }
  sql += " ORDER BY created_at DESC, id DESC";
  if (f.limit != 0) {
    sql += " LIMIT $" + std::to_string(++n);
    p.integer(static_cast<std::int64_t>(std::min<std::size_t>(f.limit, INT64_MAX)));
    name += "_limit";
  }
  if (!f.with_payloads) name += "_brief";
  pg::Result r = c.exec_prepared(name, sql, p);
  std::vector<Task> out = read_tasks(r.get());
  std::reverse(out.begin(), out.end());
  return out;
}

std::vector<EventRecord> select_events(pg::Conn& c, const std::string& task_id) {
  pg::Params p;
  p.text(task_id);
  pg::Result r = c.exec_prepared(
      "taskmgr_select_events",
      "SELECT id, event_type, timestamp, details FROM task_events WHERE task_id = $1 ORDER BY id",
      p);
  std::vector<EventRecord> out;
  const int n = PQntuples(r.get());
  out.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    EventRecord e;
    e.sequence = static_cast<std::uint64_t>(integer(r.get(), i, 0));
    e.task_id = task_id;
    e.event = parse_task_event(text(r.get(), i, 1)).value_or(TaskEvent::kCreated);
    e.timestamp = timestamp(r.get(), i, 2).value_or(Timestamp{});
    e.details_json = is_null(r.get(), i, 3) ? "{}" : pg::compact_jsonb(text(r.get(), i, 3));
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<MetricSample> select_metrics(pg::Conn& c, const std::string& task_id) {
  pg::Params p;
  p.text(task_id);
  pg::Result r = c.exec_prepared("taskmgr_select_metrics",
                                 "SELECT timestamp, memory_usage_mb, device, processing_stage "
                                 "FROM task_metrics WHERE task_id = $1 ORDER BY id",
                                 p);
  std::vector<MetricSample> out;
  const int n = PQntuples(r.get());
  out.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    MetricSample s;
    s.task_id = task_id;
    s.timestamp = timestamp(r.get(), i, 0).value_or(Timestamp{});
    s.memory_usage_mb = is_null(r.get(), i, 1) ? 0 : integer(r.get(), i, 1);
    if (!is_null(r.get(), i, 2)) s.device = text(r.get(), i, 2);
    if (!is_null(r.get(), i, 3)) s.processing_stage = text(r.get(), i, 3);
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<Task> select_unfinished(pg::Conn& c) {
  pg::Params none;
  pg::Result r = c.exec_prepared("taskmgr_select_unfinished",
                                 std::string("SELECT ") + kTaskColumns + " FROM tasks WHERE " +
                                     kUnfinished + " ORDER BY created_at, id",
                                 none);
  return read_tasks(r.get());
}

std::size_t delete_finished(pg::Conn& c, Timestamp finished_before) {
  return in_transaction(c, [&] {
    for (const char* table : {"task_metrics", "task_events"}) {
      pg::Params p;
      p.timestamp(finished_before);
      c.exec(std::string("DELETE FROM ") + table + " WHERE task_id IN (" + kEnded + ")", p);
    }
    pg::Params p;
    p.timestamp(finished_before);
    pg::Result r = c.exec(std::string("DELETE FROM tasks WHERE id IN (") + kEnded + ")", p);
    return static_cast<std::size_t>(std::strtoull(PQcmdTuples(r.get()), nullptr, 10));
  });
}

}  // namespace detail::postgres

int postgres_schema_version() noexcept { return detail::postgres::kSchemaVersion; }

}  // namespace taskmgr
