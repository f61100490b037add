// The PostgreSQL store's schema: its tables and forward-only migrations, the
// store lock, how a task maps onto a row of `tasks`, and the queries (reads
// and the prune) (postgres_internal.hpp).
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <functional>

#include "postgres_internal.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr {
namespace detail::postgres {
namespace {

// Version 1: taskmgr's `tasks` table as it was before the spec's delta (the
// "existing" table the spec's ALTER TABLEs extend), and the table that
// records the migrations.
constexpr const char* kSchemaTable = R"sql(
CREATE TABLE taskmgr_schema (
  version INTEGER PRIMARY KEY,
  applied_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);
)sql";
constexpr const char* kSchemaV1 = R"sql(
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
// writes them (with IF NOT EXISTS: an adopted table may have some of the
// columns), and the indexes the queries need.
constexpr const char* kSpecChanges = R"sql(
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS estimated_memory_mb INTEGER;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS actual_memory_mb INTEGER;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS assigned_device VARCHAR(50);
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS service_instance_id VARCHAR(100);
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS resource_cleanup_completed BOOLEAN DEFAULT FALSE;

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
)sql";
// Version 3: the pauses in force (TaskManager::pause), so that they hold
// across a restart. One row per paused scope; resume deletes it.
constexpr const char* kPausesTable = R"sql(
CREATE TABLE IF NOT EXISTS task_pauses (
  scope VARCHAR(20) NOT NULL,
  name TEXT NOT NULL,
  since TIMESTAMP NOT NULL,
  PRIMARY KEY (scope, name)
);
)sql";

// Version 4: several hosts sharing the queue (docs/SCALING.md). A task's
// claim: the host that holds it (claimed_by, a host's id: one open of a
// store), its fencing token (claim, from task_claims: every claim a new
// one, kept after the task ends; a rescue clears it), the lease's end
// (server time) and a cancel asked for by another host; the device the
// creating host named (requested_device: NULL = the claiming host chooses)
// and the host name that ran it (host). task_hosts: one row per open of a
// store in shared mode, its heartbeat and what it reported.
constexpr const char* kSharedQueue = R"sql(
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS claimed_by VARCHAR(100);
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS claim BIGINT;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMP;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS requested_device VARCHAR(50);
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS run_host VARCHAR(100);
CREATE SEQUENCE IF NOT EXISTS task_claims;
CREATE TABLE IF NOT EXISTS task_hosts (
  id VARCHAR(100) PRIMARY KEY,
  host_name VARCHAR(100) NOT NULL,
  pid INTEGER NOT NULL,
  started_at TIMESTAMP NOT NULL,
  heartbeat_at TIMESTAMP NOT NULL,
  lease_seconds DOUBLE PRECISION NOT NULL,
  closed_at TIMESTAMP,
  report JSONB NOT NULL DEFAULT '{}'
);
)sql";
// Its indexes, on taskmgr's own table only (an adopted one may lack the
// columns; a shared queue needs taskmgr's own table).
constexpr const char* kSharedQueueIndexes = R"sql(
CREATE INDEX IF NOT EXISTS idx_tasks_claimable ON tasks (priority DESC, queued_at, id)
  WHERE status = 'queued' AND claimed_by IS NULL;
CREATE INDEX IF NOT EXISTS idx_tasks_claimed ON tasks (claimed_by, lease_expires_at)
  WHERE claimed_by IS NOT NULL;
)sql";

// The indexes on taskmgr's own tasks table (an adopted one is not changed
// beyond the spec's columns).
constexpr const char* kOwnTaskIndexes = R"sql(
CREATE INDEX idx_tasks_unfinished ON tasks (created_at, id)
  WHERE status IN ('pending', 'queued', 'running')
     OR (resource_cleanup_completed = FALSE AND assigned_device IS NOT NULL);
CREATE INDEX idx_tasks_finished ON tasks (finished_at)
  WHERE status IN ('completed', 'failed', 'cancelled');
)sql";

using store::Field;
using store::Kind;
using store::TaskLayout;

std::string quote(const std::string& name) { return pg::quote_ident(name); }

void add_time(pg::Params& p, Kind k, const std::optional<Timestamp>& t) {
  if (!t) {
    p.null();
  } else if (k == Kind::kEpoch) {
    p.integer(std::chrono::floor<std::chrono::seconds>(t->time_since_epoch()).count());
  } else if (k == Kind::kEpochReal) {
    // Exact decimal text (a double would round the microseconds).
    const auto us = std::chrono::floor<std::chrono::microseconds>(t->time_since_epoch()).count();
    const auto a = us < 0 ? -us : us;
    std::string frac = std::to_string(a % 1000000);
    frac.insert(0, 6 - frac.size(), '0');
    p.text((us < 0 ? "-" : "") + std::to_string(a / 1000000) + "." + frac);
  } else {
    p.timestamp(*t);
  }
}

void add_field(pg::Params& p, const TaskLayout& l, Field f, const Task& t) {
  switch (f) {
    case store::kId: p.text(t.id); break;
    case store::kService: p.text(t.service); break;
    case store::kInputPath: p.text_or_null(t.input.path); break;
    case store::kInputData: p.bytes(t.input.data); break;
    case store::kMediaType: p.text_or_null(t.input.media_type); break;
    case store::kOptions: p.text_or_null(t.options_json); break;
    case store::kPriority: p.integer(t.priority); break;
    case store::kStatus:
      p.text(t.status == TaskStatus::kUnrecognized ? t.stored_status : l.word_to_write(t.status));
      break;
    case store::kAttempt: p.integer(t.attempt); break;
    case store::kBatchSize: p.integer(t.batch_size); break;
    case store::kFailureReason:
      if (t.failure_reason == TaskFailureReason::kNone) {
        p.null();
      } else {
        p.text(std::string(to_string(t.failure_reason)));
      }
      break;
    case store::kFailureMessage: p.text_or_null(t.failure_message); break;
    case store::kResult: p.text_or_null(t.result); break;
    case store::kCreatedAt: add_time(p, l.kind(f), t.created_at); break;
    case store::kQueuedAt: add_time(p, l.kind(f), t.queued_at); break;
    case store::kStartedAt: add_time(p, l.kind(f), t.started_at); break;
    case store::kFinishedAt: add_time(p, l.kind(f), t.finished_at); break;
    case store::kEstimatedMemory: p.opt_integer(t.estimated_memory_mb); break;
    case store::kActualMemory: p.opt_integer(t.actual_memory_mb); break;
    case store::kAssignedDevice: p.opt_text(t.assigned_device); break;
    case store::kServiceInstance: p.opt_text(t.service_instance_id); break;
    case store::kCleanupCompleted: p.boolean(t.resource_cleanup_completed); break;
    case store::kRequestedDevice: p.opt_text(t.requested_device); break;
    case store::kHost: p.opt_text(t.host); break;
    case store::kFieldCount: break;
  }
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

}  // namespace

Task read_task(const PGresult* r, int row, const TaskLayout& l) {
  Task t;
  bool service_seen = false;
  for (int f = 0; f < store::kFieldCount; ++f) {
    if (is_null(r, row, f)) continue;
    if (f == store::kService) service_seen = true;
    const std::string v = text(r, row, f);
    if (f == store::kInputData && (PQftype(r, f) == 23 || PQftype(r, f) == 20)) {
      // Left out: its length, an int4 (TaskLayout::select_list).
      try {
        t.input.left_out_bytes = std::stoull(v);
      } catch (const std::exception&) {
        throw pg::PgError(ErrorCode::kIoError, "", false, "cannot read the length of input_data");
      }
      continue;
    }
    if (f == store::kInputData) {
      auto bytes = pg::parse_bytea(v);
      if (!bytes) throw pg::PgError(ErrorCode::kIoError, "", false, "cannot read input_data");
      t.input.data = std::move(*bytes);
      continue;
    }
    if (f >= store::kCreatedAt && f <= store::kFinishedAt) {
      // TIMESTAMP as the session writes it (to the microsecond) first.
      if (const auto when = pg::parse_timestamp(v)) {
        if (f == store::kCreatedAt) t.created_at = *when;
        if (f == store::kQueuedAt) t.queued_at = *when;
        if (f == store::kStartedAt) t.started_at = *when;
        if (f == store::kFinishedAt) t.finished_at = *when;
        continue;
      }
      if (!l.adopted()) {
        throw pg::PgError(ErrorCode::kIoError, "", false,
                          "cannot read timestamp '" + v + "' (out of the range taskmgr keeps)");
      }
    }
    l.set_field(t, Field(f), v);
  }
  if (is_null(r, row, store::kStatus)) t.status = TaskStatus::kUnrecognized;
  const auto& extra = l.extra();
  for (std::size_t i = 0; i < extra.size(); ++i) {
    const int col = store::kFieldCount + static_cast<int>(i);
    if (!is_null(r, row, col)) t.extra[extra[i]] = text(r, row, col);
  }
  l.finish(t, service_seen);
  return t;
}

std::vector<Task> read_tasks(const PGresult* r, const TaskLayout& l) {
  std::vector<Task> out;
  const int n = PQntuples(r);
  out.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(read_task(r, i, l));
  return out;
}

namespace {

// A field's column as an operand of a comparison with a text parameter: an
// enum column as text (a word that is not one of its labels then matches
// nothing, where comparing with the enum would fail the statement).
std::string compared(const TaskLayout& l, Field f) {
  return l.is_user_defined(f) ? quote(l.column(f)) + "::text" : quote(l.column(f));
}

// "status IN ($k, ...)" for the words of `statuses`, added to `p`.
std::string status_in(const TaskLayout& l, std::initializer_list<TaskStatus> statuses,
                      pg::Params& p) {
  if (!l.has(store::kStatus)) return "FALSE";  // no status column: every row is unrecognized
  std::string list;
  for (TaskStatus s : statuses) {
    for (const auto& w : l.words_for(s)) {
      p.text(w);
      list += (list.empty() ? "$" : ", $") + std::to_string(p.size());
    }
  }
  return compared(l, store::kStatus) + " IN (" + list + ")";
}

std::string order_by(const TaskLayout& l, const char* dir) {
  std::string out = " ORDER BY ";
  if (l.has(store::kCreatedAt)) out += quote(l.column(store::kCreatedAt)) + dir + ", ";
  return out + quote(l.column(store::kId)) + dir;
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

namespace {

// The schema's `tasks` columns, in table order.
std::vector<store::Column> columns_of(pg::Conn& conn, const std::string& schema) {
  pg::Params s;
  s.text(schema);
  pg::Result r = conn.exec(
      "SELECT column_name, CASE WHEN is_generated = 'ALWAYS' THEN 'generated' ELSE data_type "
      "END, coalesce(character_maximum_length, 0), is_nullable = 'NO', coalesce(column_default, "
      "'') FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'tasks' "
      "ORDER BY ordinal_position",
      s);
  std::vector<store::Column> out;
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    out.push_back({text(r.get(), i, 0), text(r.get(), i, 1),
                   static_cast<int>(integer(r.get(), i, 2)), text(r.get(), i, 3) == "t",
                   text(r.get(), i, 4)});
  }
  return out;
}

// Why an unversioned `tasks` table cannot be adopted, or "".
std::string adoption_problem(pg::Conn& conn, const std::string& schema,
                             const std::vector<std::string>& tables) {
  for (const char* t : {"task_events", "task_metrics"}) {
    if (std::find(tables.begin(), tables.end(), t) != tables.end()) {
      return std::string("it has a ") + t +
             " table already, which taskmgr would create: it does not know that table's columns";
    }
  }
  const auto cols = columns_of(conn, schema);
  const auto id =
      std::find_if(cols.begin(), cols.end(), [](const store::Column& c) { return c.name == "id"; });
  if (id == cols.end()) {
    const auto other = std::find_if(cols.begin(), cols.end(), [](const store::Column& c) {
      return c.name.size() == 2 && std::tolower(static_cast<unsigned char>(c.name[0])) == 'i' &&
             std::tolower(static_cast<unsigned char>(c.name[1])) == 'd';
    });
    if (other != cols.end()) {
      return "its id column is named \"" + other->name +
             "\", and the spec's task_events and task_metrics reference tasks(id), which "
             "PostgreSQL reads as a column named id in lower case (rename it: ALTER TABLE tasks "
             "RENAME COLUMN \"" +
             other->name + "\" TO id)";
    }
    return "its tasks table has no id column";
  }
  if (id->type != "character varying" && id->type != "text" && id->type != "character") {
    return "its tasks.id column is " + id->type +
           ", not text: the spec's task_events and task_metrics reference it from a "
           "VARCHAR(36) column";
  }
  if (!store::TaskLayout::of(cols, {}, "").has(store::kStatus)) {
    return "its tasks table has no status column taskmgr can write (a column named status or "
           "state, of a text or enum type, not generated and not an array): every task would "
           "read back with no status";
  }
  const std::string table = pg::quote_ident(schema) + ".tasks";
  pg::Params t;
  t.text(table);
  pg::Result unique = conn.exec(
      "SELECT count(*) FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a ON "
      "a.attrelid = i.indrelid AND a.attnum = i.indkey[0] WHERE i.indrelid = $1::regclass "
      "AND i.indisunique AND i.indnkeyatts = 1 AND a.attname = 'id' AND i.indpred IS NULL",
      t);
  if (integer(unique.get(), 0, 0) == 0) {
    return "its tasks.id column is neither the primary key nor unique: the spec's task_events "
           "and task_metrics reference tasks(id)";
  }
  pg::Result len = conn.exec(
      "SELECT coalesce(max(length(id)), 0), count(*) FILTER (WHERE id IS "
      "NULL) FROM " +
      table);
  if (integer(len.get(), 0, 0) > 36) {
    return "its tasks.id values are up to " + text(len.get(), 0, 0) +
           " characters long; the spec's task_id columns are VARCHAR(36)";
  }
  if (integer(len.get(), 0, 1) > 0)
    return text(len.get(), 0, 1) + " of its tasks have no id (NULL)";
  return "";
}

}  // namespace

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
    const auto record = [&](int v) {
      pg::Params p;
      p.integer(v);
      conn.exec("INSERT INTO " + pg::quote_ident(schema) + ".taskmgr_schema (version) VALUES ($1)",
                p);
    };
    if (version == 0 && has("tasks")) {
      // An earlier application's tasks table: adopted in place by the
      // spec's changes, in this one transaction; its own columns and rows
      // are not touched. Recorded as version 2 alone (no version 1: the
      // table is not taskmgr's version 1).
      const std::string why = adoption_problem(conn, schema, tables);
      if (!why.empty()) {
        throw Error(ErrorCode::kIncompatible,
                    "database " + named +
                        " has a tasks table that taskmgr did not create, and cannot adopt it: " +
                        why + " (tables found: " + join(tables) + "); it was not modified");
      }
      (void)task_layout(conn, o);  // a status column it could not write is refused here
      if (!has("taskmgr_schema")) conn.exec_script(kSchemaTable);
      conn.exec_script(kSpecChanges);
      record(2);
      conn.exec_script(kPausesTable);
      record(3);
      conn.exec_script(kSharedQueue);
      record(4);
      return 0;
    }
    if (version == 0 && !tables.empty() && !o.allow_other_tables) {
      throw Error(ErrorCode::kIncompatible,
                  "database " + named + " holds " + std::to_string(tables.size()) +
                      " table(s) that are not taskmgr's (" + join(tables) +
                      ") and no tasks table; taskmgr does not create its tables among data it "
                      "does not know: use an empty schema (storage.postgres.schema) or set "
                      "storage.postgres.allow_other_tables; it was not modified");
    }
    if (version < 1) {
      if (!has("taskmgr_schema")) conn.exec_script(kSchemaTable);
      conn.exec_script(kSchemaV1);
      record(1);
    }
    if (version < 2) {
      conn.exec_script(kSpecChanges);
      conn.exec_script(kOwnTaskIndexes);
      record(2);
    }
    if (version < 3) {
      conn.exec_script(kPausesTable);
      record(3);
    }
    if (version < 4) {
      conn.exec_script(kSharedQueue);
      // Taskmgr's own table has version 1 recorded (an adopted one starts at 2).
      if (PQntuples(conn.exec("SELECT 1 FROM " + pg::quote_ident(schema) +
                              ".taskmgr_schema WHERE version = 1")
                        .get()) > 0) {
        conn.exec_script(kSharedQueueIndexes);
      }
      record(4);
    }
    return 0;
  });
}

store::TaskLayout task_layout(pg::Conn& conn, const PostgresStoreOptions& o) {
  const std::string schema = target_schema(conn, o);
  store::TaskLayout l =
      store::TaskLayout::of(columns_of(conn, schema), o.adopt.status_map, o.adopt.default_service);
  if (l.has(store::kStatus) && l.is_user_defined(store::kStatus)) {
    // A status column of an enum type holds only its labels: taskmgr writes
    // each status as one of them, or refuses the table, saying which.
    pg::Params p;
    p.text(pg::quote_ident(schema) + ".tasks").text(l.column(store::kStatus));
    pg::Result r = conn.exec(
        "SELECT e.enumlabel, format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute a JOIN "
        "pg_catalog.pg_enum e ON e.enumtypid = a.atttypid WHERE a.attrelid = $1::regclass AND "
        "a.attname = $2 ORDER BY e.enumsortorder",
        p);
    std::vector<std::string> labels;
    for (int i = 0; i < PQntuples(r.get()); ++i) labels.push_back(text(r.get(), i, 0));
    if (!labels.empty()) {
      const std::string type = text(r.get(), 0, 1);
      const std::string missing = l.use_status_words(labels);
      if (!missing.empty()) {
        throw Error(ErrorCode::kIncompatible,
                    "the tasks." + l.column(store::kStatus) + " column is of the enum type " +
                        type + ", which has no label for taskmgr's " + missing +
                        " (nor a label that storage.adopt.status_map maps to it): add one (ALTER "
                        "TYPE " +
                        type +
                        " ADD VALUE '...') or map one of its labels to it; the database "
                        "was not modified");
      }
    }
  }
  if (const int n = l.max_length(store::kStatus); n > 0 && !l.is_user_defined(store::kStatus)) {
    // A VARCHAR(n) status column: each status written in a word that fits.
    std::vector<std::string> fit;
    for (const auto& w : l.known_words()) {
      if (static_cast<int>(w.size()) <= n) fit.push_back(w);
    }
    const std::string missing = l.use_status_words(fit);
    if (!missing.empty()) {
      throw Error(ErrorCode::kIncompatible,
                  "the tasks." + l.column(store::kStatus) + " column is VARCHAR(" +
                      std::to_string(n) + "), too short for taskmgr's " + missing +
                      " (nor a word that storage.adopt.status_map maps to it fits): widen it "
                      "(ALTER TABLE tasks ALTER COLUMN " +
                      l.column(store::kStatus) +
                      " TYPE VARCHAR(50)) or map a shorter word to it; the database was not "
                      "modified");
    }
  }
  if (!l.has(store::kAttempt)) {
    // An adopted table with no attempt column: a task's attempt is the one
    // its last `started` event names (task_events is ours), so that
    // attempts are counted across restarts (a task the process dies under
    // again and again runs out of them).
    l.derive(store::kAttempt,
             "SELECT MAX((e.details->>'attempt')::integer) FROM task_events e WHERE e.task_id = "
             "tasks." +
                 quote(l.column(store::kId)) + " AND e.event_type = 'started'");
  }
  return l;
}

bool lock_store(pg::Conn& conn, const std::string& schema, double wait_seconds, bool shared) {
  const auto ms = std::max<long long>(1, static_cast<long long>(wait_seconds * 1000));
  conn.exec_script("SET lock_timeout = " + std::to_string(ms));
  pg::Params p;
  p.text(schema);
  try {
    conn.exec(std::string("SELECT ") + (shared ? "pg_advisory_lock_shared" : "pg_advisory_lock") +
                  "(hashtext('taskmgr.store'), hashtext($1))",
              p);
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

Statement insert_task_statement(const TaskLayout& l) {
  std::string cols, values;
  int n = 0;
  auto add = [&](Field f) {
    if (!l.has(f)) return;
    cols += (n == 0 ? "" : ", ") + quote(l.column(f));
    ++n;
    values += (n == 1 ? "" : ", ") + l.written(f, "$" + std::to_string(n));
  };
  for (Field f : store::kInsertOnlyFields) add(f);
  for (Field f : store::kMutableFields) add(f);
  return {"taskmgr_insert_task", "INSERT INTO tasks (" + cols + ") VALUES (" + values + ")"};
}

Statement update_task_statement(const TaskLayout& l) {
  std::string sets;
  int i = 1;
  for (Field f : store::kMutableFields) {
    if (!l.has(f)) continue;
    sets +=
        (i == 1 ? "" : ", ") + quote(l.column(f)) + " = " + l.written(f, "$" + std::to_string(i));
    ++i;
  }
  return {"taskmgr_update_task", "UPDATE tasks SET " + sets + " WHERE " +
                                     quote(l.column(store::kId)) + " = $" + std::to_string(i)};
}

Statement fenced_update_statement(const TaskLayout& l, double lease_seconds) {
  Statement s = update_task_statement(l);
  // "... WHERE id = $n": the claim's parameters follow the id.
  const auto where = s.sql.rfind(" WHERE ");
  const int id = std::stoi(s.sql.substr(s.sql.rfind('$') + 1));
  const std::string host = "$" + std::to_string(id + 1), claim = "$" + std::to_string(id + 2),
                    last = "$" + std::to_string(id + 3);
  return {"taskmgr_fenced_update",
          s.sql.substr(0, where) + ", lease_expires_at = CASE WHEN " + last +
              "::boolean THEN NULL ELSE (now() AT TIME ZONE 'UTC') + make_interval(secs => " +
              std::to_string(lease_seconds) + ") END, claimed_by = CASE WHEN " + last +
              "::boolean THEN NULL ELSE claimed_by END" + s.sql.substr(where) +
              " AND claimed_by = " + host + "::varchar AND claim = " + claim + "::bigint"};
}

Statement fenced_event_statement() {
  return {"taskmgr_fenced_event",
          "INSERT INTO task_events (task_id, event_type, timestamp, details) SELECT $1::varchar, "
          "$2::varchar, $3::timestamp, $4::jsonb WHERE EXISTS (SELECT 1 FROM tasks WHERE id = "
          "$1::varchar AND claim = $5::bigint FOR SHARE)"};
}

Statement fenced_metric_statement() {
  return {"taskmgr_fenced_metric",
          "INSERT INTO task_metrics (task_id, timestamp, memory_usage_mb, device, "
          "processing_stage) SELECT $1::varchar, $2::timestamp, $3::integer, $4::varchar, "
          "$5::varchar WHERE EXISTS (SELECT 1 FROM tasks WHERE id = $1::varchar AND claim = "
          "$6::bigint FOR SHARE)"};
}

Statement insert_event_statement() {
  return {
      "taskmgr_insert_event",
      "INSERT INTO task_events (task_id, event_type, timestamp, details) VALUES ($1, $2, $3, $4)"};
}

Statement insert_metric_statement() {
  return {
      "taskmgr_insert_metric",
      "INSERT INTO task_metrics (task_id, timestamp, memory_usage_mb, device, processing_stage) "
      "VALUES ($1, $2, $3, $4, $5)"};
}

pg::Params insert_task_params(const TaskLayout& l, const Task& t) {
  pg::Params p;
  for (Field f : store::kInsertOnlyFields) {
    if (l.has(f)) add_field(p, l, f, t);
  }
  for (Field f : store::kMutableFields) {
    if (l.has(f)) add_field(p, l, f, t);
  }
  return p;
}

pg::Params update_task_params(const TaskLayout& l, const Task& t) {
  pg::Params p;
  for (Field f : store::kMutableFields) {
    if (l.has(f)) add_field(p, l, f, t);
  }
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

std::optional<Task> select_task(pg::Conn& c, const TaskLayout& l, const std::string& id) {
  pg::Params p;
  p.text(id);
  pg::Result r = c.exec_prepared("taskmgr_select_task",
                                 "SELECT " + l.select_list(quote, "octet_length", true) +
                                     " FROM tasks WHERE " + quote(l.column(store::kId)) + " = $1",
                                 p);
  if (PQntuples(r.get()) == 0) return std::nullopt;
  return read_task(r.get(), 0, l);
}

std::vector<Task> select_tasks(pg::Conn& c, const TaskLayout& l, const TaskFilter& f) {
  // One prepared statement per shape of filter.
  std::string name = "taskmgr_list";
  std::string sql = "SELECT " +
                    l.select_list(quote, "octet_length", f.with_payloads, f.with_input_bytes) +
                    " FROM tasks WHERE TRUE";
  pg::Params p;
  if (f.status) {
    if (*f.status == TaskStatus::kUnrecognized) {
      if (l.has(store::kStatus)) {
        std::string list;
        for (const auto& w : l.known_words()) {
          p.text(w);
          list += (list.empty() ? "$" : ", $") + std::to_string(p.size());
        }
        const std::string col = compared(l, store::kStatus);
        sql += " AND (" + col + " IS NULL OR " + col + " NOT IN (" + list + "))";
      }
      name += "_unrecognized";
    } else {
      sql += " AND " + status_in(l, {*f.status}, p);
      name += "_status";
    }
  }
  if (!f.service.empty()) {
    if (l.has(store::kService)) {
      const std::string col = compared(l, store::kService);
      p.text(f.service);
      // Rows that name no service are the default service's.
      sql += " AND (" + col + " = $" + std::to_string(p.size()) +
             (f.service == l.default_service() ? " OR " + col + " IS NULL)" : std::string(")"));
      name += f.service == l.default_service() ? "_default_service" : "_service";
    } else if (f.service != l.default_service()) {
      sql += " AND FALSE";
      name += "_no_service";
    }
  }
  // Paging: before the cursor in the order below (created_at, then id).
  if (f.before) {
    const std::string id_col = quote(l.column(store::kId));
    if (l.has(store::kCreatedAt)) {
      const std::string created = quote(l.column(store::kCreatedAt));
      add_time(p, l.kind(store::kCreatedAt), f.before->created_at);
      const std::string at = "$" + std::to_string(p.size());
      p.text(f.before->id);
      sql += " AND (" + created + " < " + at + " OR (" + created + " = " + at + " AND " + id_col +
             " < $" + std::to_string(p.size()) + "))";
    } else {
      p.text(f.before->id);
      sql += " AND " + id_col + " < $" + std::to_string(p.size());
    }
    name += "_before";
  }
  sql += order_by(l, " DESC");
  if (f.limit != 0) {
    p.integer(static_cast<std::int64_t>(std::min<std::size_t>(f.limit, INT64_MAX)));
    sql += " LIMIT $" + std::to_string(p.size());
    name += "_limit";
  }
  if (!f.with_payloads) name += "_brief";
  if (f.with_payloads && !f.with_input_bytes) name += "_results";
  // The status words' count is part of the shape.
  name += "_" + std::to_string(p.size());
  pg::Result r = c.exec_prepared(name, sql, p);
  std::vector<Task> out = read_tasks(r.get(), l);
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

// Rows from before the upgrade (no assigned_device) never ran under this
// schema: their cleanup is not ours to redo. (On taskmgr's own table
// idx_tasks_unfinished has the same predicate.)
std::vector<Task> select_unfinished(pg::Conn& c, const TaskLayout& l) {
  pg::Params p;
  const std::string waiting =
      status_in(l, {TaskStatus::kPending, TaskStatus::kQueued, TaskStatus::kRunning}, p);
  // Ended with its cleanup due: a task taskmgr ran (in an adopted table,
  // one with events: the earlier application's ended rows are not taskmgr's
  // to clean up, whatever their assigned_device).
  const std::string ran =
      l.adopted() ? " AND EXISTS (SELECT 1 FROM task_events e WHERE e.task_id = tasks." +
                        quote(l.column(store::kId)) + ")"
                  : std::string();
  pg::Result r = c.exec_prepared(
      "taskmgr_select_unfinished",
      "SELECT " + l.select_list(quote, "octet_length", true, /*with_input=*/false) +
          " FROM tasks WHERE " + waiting +
          " OR (resource_cleanup_completed = FALSE AND assigned_device IS NOT NULL" + ran + ")" +
          order_by(l, ""),
      p);
  return read_tasks(r.get(), l);
}

namespace {
// The ended tasks (completed, failed or cancelled, cleanup done) that
// `extra` selects (an SQL condition on `tasks` whose parameters it adds to
// `p` after the status words), deleted with their samples and events in the
// caller's transaction. In an adopted table: only the rows taskmgr ran (it
// wrote their events); the earlier application's own rows are never
// deleted, also when its table had an assigned_device column of its own.
std::size_t delete_ended(pg::Conn& c, const TaskLayout& l,
                         const std::function<std::string(pg::Params&)>& extra) {
  // The status words first: they are $1.. (one statement at a time, so
  // that the numbering follows the order the parameters are added in).
  pg::Params p;
  const std::string done =
      status_in(l, {TaskStatus::kCompleted, TaskStatus::kFailed, TaskStatus::kCancelled}, p);
  std::string sql = "SELECT " + quote(l.column(store::kId)) + " FROM tasks WHERE " + done +
                    " AND resource_cleanup_completed AND " + extra(p);
  if (l.adopted()) {
    sql += " AND EXISTS (SELECT 1 FROM task_events e WHERE e.task_id = tasks." +
           quote(l.column(store::kId)) + ")";
  }
  // The ids first: deleting a task's events changes which tasks `ended`
  // selects in an adopted table (those with events).
  c.exec_script(
      "CREATE TEMP TABLE IF NOT EXISTS taskmgr_prune (id TEXT PRIMARY KEY) ON COMMIT DELETE ROWS");
  c.exec_script("DELETE FROM taskmgr_prune");
  // FOR UPDATE: a change of a row under way (another host's retry of the
  // task, in a shared queue) ends first, and a row it queued again is not
  // deleted; one that changes it after waits for this delete (and finds the
  // task gone).
  c.exec("INSERT INTO taskmgr_prune " + sql + " FOR UPDATE OF tasks ON CONFLICT DO NOTHING", p);
  const std::string gone = " IN (SELECT id FROM taskmgr_prune)";
  c.exec_script("DELETE FROM task_metrics WHERE task_id" + gone);
  c.exec_script("DELETE FROM task_events WHERE task_id" + gone);
  pg::Result r = c.exec("DELETE FROM tasks WHERE " + quote(l.column(store::kId)) + gone);
  return static_cast<std::size_t>(std::strtoull(PQcmdTuples(r.get()), nullptr, 10));
}
}  // namespace

std::size_t delete_finished(pg::Conn& c, const TaskLayout& l, Timestamp finished_before) {
  if (!l.has(store::kFinishedAt)) return 0;  // an adopted table with no end times: nothing known
  return in_transaction(c, [&] {
    return delete_ended(c, l, [&](pg::Params& p) {
      add_time(p, l.kind(store::kFinishedAt), finished_before);
      const std::string at = quote(l.column(store::kFinishedAt));
      return at + " IS NOT NULL AND " + at + " < $" + std::to_string(p.size());
    });
  });
}

std::size_t delete_tasks(pg::Conn& c, const TaskLayout& l, const std::vector<std::string>& ids) {
  if (ids.empty()) return 0;
  constexpr std::size_t kChunk = 10000;  // parameters per statement stay far below 65535
  return in_transaction(c, [&] {
    std::size_t n = 0;
    for (std::size_t from = 0; from < ids.size(); from += kChunk) {
      const std::size_t to = std::min(ids.size(), from + kChunk);
      n += delete_ended(c, l, [&](pg::Params& p) {
        std::string in = quote(l.column(store::kId)) + " IN (";
        for (std::size_t i = from; i < to; ++i) {
          p.text(ids[i]);
          in += (i == from ? "$" : ", $") + std::to_string(p.size());
        }
        return in + ")";
      });
    }
    return n;
  });
}

std::vector<PauseState> load_pauses(pg::Conn& c) {
  pg::Result r = c.exec("SELECT scope, name, since FROM task_pauses ORDER BY scope, name");
  std::vector<PauseState> out;
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    auto scope = parse_pause_scope(text(r.get(), i, 0));
    auto since = timestamp(r.get(), i, 2);
    if (!scope || !since) continue;  // not a row taskmgr wrote: left as it is
    out.push_back(PauseState{*scope, text(r.get(), i, 1), *since});
  }
  return out;
}

void save_pause(pg::Conn& c, const PauseState& p, bool paused) {
  pg::Params q;
  q.text(std::string(to_string(p.scope))).text(p.name);
  if (paused) {
    q.timestamp(p.since);
    c.exec(
        "INSERT INTO task_pauses (scope, name, since) VALUES ($1, $2, $3) "
        "ON CONFLICT (scope, name) DO UPDATE SET since = EXCLUDED.since",
        q);
  } else {
    c.exec("DELETE FROM task_pauses WHERE scope = $1 AND name = $2", q);
  }
}

}  // namespace detail::postgres

int postgres_schema_version() noexcept { return detail::postgres::kSchemaVersion; }

}  // namespace taskmgr
