// The PostgreSQL store's own cases (test_store_conformance.cpp has the
// contract every store keeps): the schema as created, migrations run at
// once, a tasks table taskmgr cannot adopt, one store per schema, broken
// connections, deadlocks, the statement timeout, data the database refuses,
// what messages show of the connection string, the configuration and the C
// ABI, and kill -9 at random points. Run through tests/with_postgres.sh.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "crash_support.hpp"
#include "event_keys.hpp"
#include "pg_test_support.hpp"
#include "store/postgres_internal.hpp"
#include "taskmgr.h"
#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;
namespace pg = taskmgr::detail::pg;

namespace {

Task new_task(const std::string& service = "ocr") {
  Task t;
  t.id = generate_task_id();
  t.service = service;
  t.created_at = std::chrono::system_clock::now();
  t.assigned_device = "cpu";
  return t;
}

EventRecord event_for(const Task& t, TaskEvent e, const std::string& details = "{}") {
  EventRecord r;
  r.task_id = t.id;
  r.event = e;
  r.timestamp = std::chrono::system_clock::now();
  r.details_json = details;
  return r;
}

// `url` with one more libpq parameter in its query string.
std::string with_param(const std::string& url, const std::string& param) {
  return url + (url.find('?') == std::string::npos ? "?" : "&") + param;
}

// The server processes of this process's store connections (not `mine`).
std::vector<std::string> store_backends(PgSchema& s) {
  pg::Result r =
      s.conn().exec("SELECT pid FROM pg_stat_activity WHERE application_name = 'taskmgr pid " +
                    std::to_string(::getpid()) + "' AND pid <> pg_backend_pid() ORDER BY pid");
  std::vector<std::string> out;
  for (int i = 0; i < PQntuples(r.get()); ++i) out.emplace_back(PQgetvalue(r.get(), i, 0));
  return out;
}

}  // namespace

TEST_CASE("postgres store: the schema is the spec's, in PostgreSQL's dialect") {
  PgSchema s;
  auto store = s.open();
  CHECK(postgres_schema_version() == 4);
  CHECK(s.text("SELECT string_agg(version::text, ',' ORDER BY version) FROM taskmgr_schema") ==
        "1,2,3,4");
  std::map<std::string, std::string> cols;
  pg::Result r = s.conn().exec(
      "SELECT table_name || '.' || column_name, "
      "format_type(a.atttypid, a.atttypmod) || coalesce(' default ' || "
      "pg_get_expr(d.adbin, d.adrelid), '') "
      "FROM information_schema.columns c "
      "JOIN pg_attribute a ON a.attrelid = (quote_ident(c.table_schema) || '.' || "
      "quote_ident(c.table_name))::regclass AND a.attname = c.column_name "
      "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
      "WHERE c.table_schema = '" +
      s.name() + "'");
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    cols[PQgetvalue(r.get(), i, 0)] = PQgetvalue(r.get(), i, 1);
  }
  CHECK(cols.at("tasks.id") == "character varying(36)");
  CHECK(cols.at("tasks.estimated_memory_mb") == "integer");
  CHECK(cols.at("tasks.actual_memory_mb") == "integer");
  CHECK(cols.at("tasks.assigned_device") == "character varying(50)");
  CHECK(cols.at("tasks.service_instance_id") == "character varying(100)");
  CHECK(cols.at("tasks.resource_cleanup_completed") == "boolean default false");
  CHECK(cols.at("tasks.created_at") == "timestamp without time zone");
  CHECK(cols.at("tasks.input_data") == "bytea");
  // SERIAL: an integer from its own sequence (named without the schema: it
  // is on the test connection's search_path).
  CHECK(cols.at("task_metrics.id") == "integer default nextval('task_metrics_id_seq'::regclass)");
  CHECK(cols.at("task_metrics.task_id") == "character varying(36)");
  CHECK(cols.at("task_metrics.timestamp") == "timestamp without time zone");
  CHECK(cols.at("task_metrics.memory_usage_mb") == "integer");
  CHECK(cols.at("task_metrics.device") == "character varying(50)");
  CHECK(cols.at("task_metrics.processing_stage") == "character varying(100)");
  CHECK(cols.at("task_events.id") == "integer default nextval('task_events_id_seq'::regclass)");
  CHECK(cols.at("task_events.task_id") == "character varying(36)");
  CHECK(cols.at("task_events.event_type") == "character varying(50)");
  CHECK(cols.at("task_events.timestamp") == "timestamp without time zone");
  CHECK(cols.at("task_events.details") == "jsonb");
  // Primary keys, and the foreign keys to tasks(id).
  CHECK(s.scalar("SELECT count(*) FROM information_schema.table_constraints WHERE "
                 "table_schema = '" +
                 s.name() + "' AND constraint_type = 'PRIMARY KEY'") ==
        6);  // taskmgr_schema, tasks, task_metrics, task_events, task_pauses, task_hosts
  CHECK(s.text("SELECT string_agg(conrelid::regclass::text || '->' || confrelid::regclass::text, "
               "',' ORDER BY conrelid::regclass::text) FROM pg_constraint WHERE contype = 'f' "
               "AND connamespace = '" +
               s.name() + "'::regnamespace") == "task_events->tasks,task_metrics->tasks");
  // The indexes the queries use.
  for (const char* idx : {"idx_tasks_status", "idx_tasks_created", "idx_tasks_unfinished",
                          "idx_tasks_finished", "idx_task_events_task", "idx_task_metrics_task"}) {
    CAPTURE(idx);
    CHECK(s.scalar("SELECT count(*) FROM pg_indexes WHERE schemaname = '" + s.name() +
                   "' AND indexname = '" + idx + "'") == 1);
  }
}

TEST_CASE("postgres store: stores migrating at once migrate the schema once") {
  PgSchema s;
  constexpr int kThreads = 6;
  std::atomic<int> ok{0};
  std::vector<std::string> failures(kThreads);
  std::vector<std::thread> threads;
  Gate go;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      try {
        pg::Conn c(s.url(), 10, detail::postgres::session_setup(s.options()));
        go.wait();
        detail::postgres::migrate(c, s.options(), "test");
        ++ok;
      } catch (const std::exception& e) {
        failures[static_cast<std::size_t>(i)] = e.what();
      }
    });
  }
  go.open();
  for (auto& t : threads) t.join();
  for (const auto& f : failures) CHECK(f == "");
  CHECK(ok.load() == kThreads);
  CHECK(s.text("SELECT string_agg(version::text, ',' ORDER BY version) FROM taskmgr_schema") ==
        "1,2,3,4");
  CHECK(s.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = '" + s.name() + "'") == 6);
  auto store = s.open();  // and a store opens on it
  const Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
}

TEST_CASE("postgres store: a tasks table taskmgr cannot adopt is refused, naming it") {
  PgSchema s;
  s.exec(
      "CREATE TABLE tasks (id INTEGER PRIMARY KEY, state TEXT); INSERT INTO tasks VALUES (1, "
      "'x')");
  s.exec("CREATE TABLE jobs (id INTEGER)");
  try {
    s.open();
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(m.find("tasks table that taskmgr did not create") != std::string::npos);
    CHECK(m.find("tables found: jobs, tasks") != std::string::npos);
    CHECK(m.find("cannot adopt it: its tasks.id column is integer") != std::string::npos);
    CHECK(m.find("schema " + s.name()) != std::string::npos);
  }
  // Nothing changed: no column added, no table of ours.
  CHECK(s.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = '" +
                 s.name() + "' AND table_name = 'tasks'") == 2);
  CHECK(s.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = '" + s.name() + "'") == 2);
  // allow_other_tables does not change that.
  PostgresStoreOptions o = s.options();
  o.allow_other_tables = true;
  CHECK_THROWS_AS(open_postgres_store(s.url(), o), Error);
}

TEST_CASE(
    "postgres store: a status column of an enum type is adopted: its labels are written, "
    "filters compare as text, and one with no label for a status is refused untouched") {
  PgSchema s;
  s.exec(
      "CREATE TYPE job_state AS ENUM ('waiting', 'queued', 'processing', 'done', 'error', "
      "'cancelled', 'on_hold');"
      "CREATE TYPE job_kind AS ENUM ('ocr', 'thumbs');"
      "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, kind job_kind, status job_state NOT NULL, "
      "created_at TIMESTAMPTZ DEFAULT now());"
      "INSERT INTO tasks (id, kind, status) VALUES ('w', 'ocr', 'waiting'), ('d', 'ocr', 'done'), "
      "('h', 'ocr', 'on_hold'), ('t', 'thumbs', 'waiting')");
  PostgresStoreOptions o = s.options();
  o.adopt.status_map = {{"waiting", TaskStatus::kPending},
                        {"processing", TaskStatus::kRunning},
                        {"done", TaskStatus::kCompleted},
                        {"error", TaskStatus::kFailed}};
  // Without the map it cannot write 'pending', 'running', ...: refused,
  // naming them and the type, and nothing changed.
  const auto columns_before =
      s.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = '" + s.name() +
               "' AND table_name = 'tasks'");
  try {
    open_postgres_store(s.url(), s.options());
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(m.find("enum type job_state") != std::string::npos);
    CHECK(m.find("'pending', 'running', 'completed', 'failed'") != std::string::npos);
    CHECK(m.find("not modified") != std::string::npos);
  }
  CHECK(s.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = '" +
                 s.name() + "' AND table_name = 'tasks'") == columns_before);
  CHECK(s.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = '" + s.name() + "'") == 1);
  {
    auto store = open_postgres_store(s.url(), o);
    TaskFilter f;
    f.status = TaskStatus::kPending;
    CHECK(store->list_tasks(f).size() == 2);
    f.status = TaskStatus::kUnrecognized;
    REQUIRE(store->list_tasks(f).size() == 1);
    CHECK(store->list_tasks(f)[0].stored_status == "on_hold");
    f = TaskFilter{};
    f.service = "nothing-like-a-label";  // compared as text: no match, no error
    CHECK(store->list_tasks(f).empty());
    f.service = "thumbs";
    CHECK(store->list_tasks(f).size() == 1);
  }
  Config c = test_config();
  c.storage.path = StorageConfig{}.path;
  TaskManagerOptions mo;
  mo.store = open_postgres_store(s.url(), o);
  mo.builtin_ocr = false;
  mo.log_sink = [](LogLevel, std::string_view) {};
  mo.services.push_back(
      make_function_service("ocr", [](TaskContext& ctx) { ctx.set_result(R"({"ok":1})"); }));
  {
    TaskManager tm(c, mo);
    tm.start_task("w");
    const auto done = tm.wait_task("w", 30s);
    REQUIRE(done.has_value());
    CHECK(done->status == TaskStatus::kCompleted);
    // A new task: its own words where they are labels ('queued', 'cancelled').
    TaskCreateRequest r;
    r.service = "ocr";
    const Task n = tm.create_task(r);
    tm.cancel_task(n.id);
    CHECK(tm.get_task(n.id).status == TaskStatus::kCancelled);
  }
  mo.store.reset();
  // Written as labels: 'done' for completed (the map's word), 'cancelled'.
  CHECK(s.text("SELECT status FROM tasks WHERE id = 'w'") == "done");
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE status = 'cancelled'") == 1);
  CHECK(s.text("SELECT status FROM tasks WHERE id = 'h'") == "on_hold");
  auto store = open_postgres_store(s.url(), o);
  CHECK(store->load_task("w")->status == TaskStatus::kCompleted);
}

TEST_CASE(
    "postgres store: an id column named \"Id\" and a status column too short for taskmgr's "
    "words are refused untouched, saying what to change") {
  struct Case {
    const char* ddl;
    const char* says;
  };
  const Case cases[] = {
      {"CREATE TABLE tasks (\"Id\" VARCHAR(36) PRIMARY KEY, status TEXT)",
       "RENAME COLUMN \"Id\" TO id"},
      {"CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, status VARCHAR(8))",
       "VARCHAR(8), too short for taskmgr's 'completed', 'cancelled'"},
  };
  for (const auto& k : cases) {
    CAPTURE(k.ddl);
    PgSchema s;
    s.exec(k.ddl);
    try {
      s.open();
      FAIL("expected kIncompatible");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kIncompatible);
      CHECK(std::string(e.what()).find(k.says) != std::string::npos);
      CHECK(std::string(e.what()).find("not modified") != std::string::npos);
    }
    CHECK(s.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = '" +
                   s.name() + "' AND table_name = 'tasks'") == 2);
    CHECK(s.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = '" + s.name() + "'") == 1);
  }
  // A short column with a map of short words for the long ones: adopted,
  // and a completed task is written in the mapped word.
  PgSchema s;
  s.exec("CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, status VARCHAR(8))");
  s.exec("INSERT INTO tasks VALUES ('old-1', 'pending')");
  PostgresStoreOptions o = s.options();
  o.adopt.status_map = {{"done", TaskStatus::kCompleted}, {"dropped", TaskStatus::kCancelled}};
  auto store = open_postgres_store(s.url(), o);
  Task t = *store->load_task("old-1");
  t.status = TaskStatus::kCompleted;
  store->update_task(t, {event_for(t, TaskEvent::kCompleted)});
  store->flush();
  CHECK(store->stats().dropped_writes == 0);
  CHECK(s.text("SELECT status FROM tasks WHERE id = 'old-1'") == "done");
  CHECK(store->load_task("old-1")->status == TaskStatus::kCompleted);
}

TEST_CASE(
    "postgres store: a status column that is generated or an array is no status column: "
    "refused untouched") {
  const std::string shapes[] = {
      std::string("CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, code INTEGER, status TEXT ") +
          "GENERATED ALWAYS AS (CASE WHEN code = 1 THEN 'completed' ELSE 'pending' END) STORED)",
      "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, status TEXT[])",
      "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, note TEXT)",
  };
  for (const std::string& ddl : shapes) {
    CAPTURE(ddl);
    PgSchema s;
    s.exec(ddl);
    const auto columns =
        s.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = '" +
                 s.name() + "' AND table_name = 'tasks'");
    try {
      s.open();
      FAIL("expected kIncompatible");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kIncompatible);
      CHECK(std::string(e.what()).find("no status column taskmgr can write") != std::string::npos);
    }
    CHECK(s.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = '" +
                   s.name() + "' AND table_name = 'tasks'") == columns);
    CHECK(s.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = '" + s.name() + "'") == 1);
  }
}

TEST_CASE(
    "postgres store: CHAR(n) id and status columns are read without their padding, pending rows "
    "wait, ended ones read as written") {
  PgSchema s;
  s.exec(
      "CREATE TABLE tasks (id CHAR(36) PRIMARY KEY, status CHAR(12), created_at TIMESTAMP);"
      "INSERT INTO tasks VALUES ('old-1', 'pending', '2024-05-01 10:00:00'),"
      "('old-2', 'completed', '2024-05-01 10:00:01')");
  Config c = test_config();
  c.storage.path = StorageConfig{}.path;
  TaskManagerOptions mo;
  mo.store = s.open();
  mo.builtin_ocr = false;
  mo.log_sink = [](LogLevel, std::string_view) {};
  mo.services.push_back(make_function_service("ocr", [](TaskContext&) {}));
  {
    TaskManager tm(c, mo);
    const Task old = tm.get_task("old-1");
    CHECK(old.id == "old-1");
    CHECK(old.status == TaskStatus::kPending);  // not failed at open
    std::vector<std::string> ids;
    for (const Task& t : tm.list_tasks()) ids.push_back(t.id);
    CHECK(ids == std::vector<std::string>{"old-1", "old-2"});
    tm.start_task("old-1");
    const auto done = tm.wait_task("old-1", 30s);
    REQUIRE(done.has_value());
    CHECK(done->status == TaskStatus::kCompleted);
  }
  mo.store.reset();
  auto store = s.open();
  CHECK(store->load_task("old-1")->status == TaskStatus::kCompleted);
  CHECK(store->load_task("old-2")->status == TaskStatus::kCompleted);
}

TEST_CASE("postgres store: allow_other_tables creates taskmgr's tables beside others") {
  PgSchema s;
  s.exec("CREATE TABLE users (id INTEGER PRIMARY KEY); INSERT INTO users VALUES (7)");
  CHECK_THROWS_AS(s.open(), Error);
  PostgresStoreOptions o = s.options();
  o.allow_other_tables = true;
  auto store = open_postgres_store(s.url(), o);
  const Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
  CHECK(store->load_task(t.id).has_value());
  CHECK(s.scalar("SELECT id FROM users") == 7);
  store.reset();
  CHECK_NOTHROW(s.open());  // now it is taskmgr's schema (with a table beside)
}

TEST_CASE("postgres store: one store per schema, a second is refused as busy, naming the first") {
  PgSchema s;
  auto first = s.open();
  PostgresStoreOptions o = s.options();
  o.connect_timeout_seconds = 0.3;  // how long the second waits for the lock
  try {
    open_postgres_store(s.url(), o);
    FAIL("expected kBusy");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kBusy);
    CHECK(std::string(e.what()).find("in use by another task manager") != std::string::npos);
    CHECK(std::string(e.what()).find("taskmgr pid " + std::to_string(::getpid())) !=
          std::string::npos);
  }
  // Another schema in the same database is another store's.
  PgSchema other;
  CHECK_NOTHROW(other.open());
  first.reset();
  CHECK_NOTHROW(s.open());
}

TEST_CASE("postgres store: describe() and messages never show the password") {
  PgSchema s;
  const std::string url = with_param(s.url(), "password=s3cret-pw");
  auto store = open_postgres_store(url, s.options());
  const std::string d = store->describe();
  CHECK(d.rfind("postgresql://", 0) == 0);
  CHECK(d.find("/taskmgr") != std::string::npos);
  CHECK(d.find("s3cret") == std::string::npos);
  CHECK(d.find("user") == std::string::npos);
  store.reset();
  // A database that does not exist: the message names it, not the password.
  const std::string missing = "postgresql://postgres:s3cret-pw@/no_such_db?host=" +
                              std::string(std::getenv("TASKMGR_TEST_PG_SOCKET_DIR")
                                              ? std::getenv("TASKMGR_TEST_PG_SOCKET_DIR")
                                              : "/nonexistent");
  try {
    open_postgres_store(missing);
    FAIL("expected kIoError");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIoError);
    CHECK(std::string(e.what()).find("no_such_db") != std::string::npos);
    CHECK(std::string(e.what()).find("s3cret") == std::string::npos);
  }
  try {
    open_postgres_store("postgresql://u:s3cr%zzet@/db");
    FAIL("expected kInvalidArgument");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kInvalidArgument);
    CHECK(std::string(e.what()).find("s3cr") == std::string::npos);
  }
}

TEST_CASE(
    "postgres store: a failure libpq reports without a SQLSTATE counts as a lost connection") {
  // After a server restart the first statement on a pooled connection
  // fails "server closed the connection unexpectedly", with no SQLSTATE and
  // (until libpq reads again) a connection status of OK. Such a read must
  // be run again on a new connection, not fail its caller.
  PgSchema s;
  PGconn* live = s.conn().get();
  REQUIRE(PQstatus(live) == CONNECTION_OK);
  pg::Result r(PQmakeEmptyPGresult(live, PGRES_FATAL_ERROR));
  CHECK(pg::error_of(live, r.get()).connection_lost());
  // A server's answer with a SQLSTATE is judged by it.
  pg::Result ok(PQexec(live, "SELECT 1/0"));
  REQUIRE(PQresultStatus(ok.get()) == PGRES_FATAL_ERROR);
  CHECK_FALSE(pg::error_of(live, ok.get()).connection_lost());
}

TEST_CASE("postgres store: broken connections are made again, writes and reads go on") {
  PgSchema s;
  auto store = s.open();
  Task a = new_task();
  store->insert_task(a, event_for(a, TaskEvent::kCreated));
  CHECK(store->load_task(a.id).has_value());
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const auto before = store_backends(s);
    REQUIRE(before.size() >= 2);  // the writer and a reader
    s.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
        "'taskmgr pid " +
        std::to_string(::getpid()) + "' AND pid <> pg_backend_pid()");
    REQUIRE(eventually([&] { return store_backends(s).empty(); }));
    // An update (the writer thread), an insert (the caller), reads.
    a.priority = round;
    store->update_task(a, {event_for(a, TaskEvent::kQueued)});
    const Task b = new_task();
    store->insert_task(b, event_for(b, TaskEvent::kCreated));
    CHECK(store->load_task(a.id)->priority == round);
    CHECK(store->load_task(b.id).has_value());
    const auto after = store_backends(s);
    CHECK_FALSE(after.empty());
    for (const auto& pid : after) {
      CHECK(std::find(before.begin(), before.end(), pid) == before.end());
    }
  }
  CHECK(store->load_events(a.id).size() == 4);
  const StoreStats st = store->stats();
  CHECK(st.failed_writes == 0);
  CHECK(st.dropped_writes == 0);
  // The store lock came back with the writer: a second store is still refused.
  PostgresStoreOptions o = s.options();
  o.connect_timeout_seconds = 0.3;
  CHECK_THROWS_AS(open_postgres_store(s.url(), o), Error);
}

TEST_CASE("postgres store: while the server cannot be reached, writes are kept, then caught up") {
  PgSchema s;
  PostgresStoreOptions o = s.options();
  o.connect_timeout_seconds = 0.5;
  auto store = open_postgres_store(s.url(), o);
  Task a = new_task();
  store->insert_task(a, event_for(a, TaskEvent::kCreated));
  // No new connection to the database from now on (said from another
  // database), and the store's go.
  const std::string db = s.text("SELECT current_database()");
  pg::Conn admin(with_param(s.url(), "dbname=postgres&application_name=test-admin"), 10, "");
  struct Reopen {
    pg::Conn& admin;
    std::string db;
    ~Reopen() {
      try {
        admin.exec_script("ALTER DATABASE " + db + " ALLOW_CONNECTIONS true");
      } catch (...) {
      }
    }
  } reopen{admin, db};
  admin.exec_script("ALTER DATABASE " + db + " ALLOW_CONNECTIONS false");
  s.exec(
      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
      "'taskmgr pid " +
      std::to_string(::getpid()) + "' AND pid <> pg_backend_pid()");
  REQUIRE(eventually([&] { return store_backends(s).empty(); }));
  a.status = TaskStatus::kQueued;
  store->update_task(a, {event_for(a, TaskEvent::kQueued)});
  a.status = TaskStatus::kRunning;
  store->update_task(a, {event_for(a, TaskEvent::kStarted)});
  store->flush();  // tried, and kept
  StoreStats st = store->stats();
  CHECK(st.failed_writes >= 1);
  CHECK(st.backlog == 2);
  CHECK(st.last_error.find("cannot connect to " + store->describe()) != std::string::npos);
  const Task b = new_task();
  try {
    store->insert_task(b, event_for(b, TaskEvent::kCreated));
    FAIL("expected kIoError");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIoError);
    CHECK(std::string(e.what()).find("the task was not created") != std::string::npos);
  }
  try {
    store->load_task(a.id);
    FAIL("expected kIoError");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIoError);
    CHECK(std::string(e.what()).find("cannot connect") != std::string::npos);
  }
  // The server takes connections again: the backlog goes in by itself.
  admin.exec_script("ALTER DATABASE " + db + " ALLOW_CONNECTIONS true");
  REQUIRE(eventually([&] { return store->stats().backlog == 0; }));
  CHECK(store->load_task(a.id)->status == TaskStatus::kRunning);
  CHECK(names(store->load_events(a.id)) ==
        std::vector<std::string>{"created", "queued", "started"});
  CHECK_FALSE(store->load_task(b.id).has_value());
  CHECK(store->stats().dropped_writes == 0);
  store->insert_task(b, event_for(b, TaskEvent::kCreated));
  CHECK(store->load_task(b.id).has_value());
}

TEST_CASE("postgres store: a transaction that loses a deadlock is run again") {
  PgSchema s;
  // The store's sessions look for the deadlock 3 s into a wait (the test
  // makes the cycle well within that); the test's own session only after
  // 30 s: the store is the one the server aborts.
  auto store =
      open_postgres_store(with_param(s.url(), "options=-c%20deadlock_timeout%3D3s"), s.options());
  store->flush();
  s.exec("SET deadlock_timeout = '30s'");
  const std::int64_t deadlocks_before =
      s.scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()");
  const Task x = new_task(), y = new_task();
  // The test's transaction inserts y (uncommitted): the store's insert of
  // x then y waits for it, holding x.
  s.exec("BEGIN");
  s.exec("INSERT INTO tasks (id, service, status, created_at) VALUES ('" + y.id +
         "', 'ocr', 'pending', now())");
  std::atomic<bool> inserted{false};
  std::string error;
  std::thread caller([&] {
    try {
      store->insert_tasks({NewTask{x, {event_for(x, TaskEvent::kCreated)}},
                           NewTask{y, {event_for(y, TaskEvent::kCreated)}}});
      inserted = true;
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  REQUIRE(eventually([&] {
    return s.scalar(
               "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
               "application_name = 'taskmgr pid " +
               std::to_string(::getpid()) + "' AND pid <> pg_backend_pid()") == 1;
  }));
  // Now the test waits for x: a cycle. The store's session is aborted
  // (deadlock), our insert of x goes through, and the store tries again.
  s.exec("INSERT INTO tasks (id, service, status, created_at) VALUES ('" + x.id +
         "', 'ocr', 'pending', now())");
  CHECK_FALSE(inserted.load());
  s.exec("ROLLBACK");  // the store's second try can now go through
  caller.join();
  CHECK(error == "");
  CHECK(inserted.load());
  CHECK(s.scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()") >
        deadlocks_before);
  CHECK(store->load_task(x.id).has_value());
  CHECK(store->load_task(y.id).has_value());
  CHECK(store->load_events(y.id).size() == 1);
  CHECK(store->stats().failed_writes == 0);
}

TEST_CASE("postgres store: statement_timeout_seconds bounds a statement") {
  PgSchema s;
  PostgresStoreOptions o = s.options();
  o.statement_timeout_seconds = 0.2;
  auto store = open_postgres_store(s.url(), o);
  const Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
  s.exec("BEGIN");
  s.exec("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE");
  try {
    store->load_task(t.id);
    FAIL("expected kTimeout");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kTimeout);
    CHECK(std::string(e.what()).find("statement timeout") != std::string::npos);
  }
  s.exec("ROLLBACK");
  CHECK(store->load_task(t.id).has_value());
}

TEST_CASE("postgres store: text the database cannot hold is stored with U+FFFD in its place") {
  PgSchema s;
  auto store = s.open();
  Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated, R"({"msg":"nul \u0000 here"})"));
  t.status = TaskStatus::kFailed;
  t.failure_message = std::string("bad \xff byte and a \0 nul", 22);
  t.result = R"({"text":"caf\u00e9"})";
  store->update_task(t, {event_for(t, TaskEvent::kFailed)});
  const auto back = store->load_task(t.id);
  REQUIRE(back.has_value());
  CHECK(back->failure_message == "bad \xEF\xBF\xBD byte and a \xEF\xBF\xBD nul");
  CHECK(back->result == t.result);  // TEXT: byte for byte
  // (JSONB keeps characters, not escapes: U+FFFD comes back as itself.)
  CHECK(store->load_events(t.id)[0].details_json == "{\"msg\":\"nul \xEF\xBF\xBD here\"}");
}

TEST_CASE("postgres store: a write the database refuses for its data is given up, not retried") {
  PgSchema s;
  auto store = s.open();
  Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
  // assigned_device is VARCHAR(50): this update can never be stored.
  Task bad = t;
  bad.assigned_device = std::string(60, 'd');
  store->update_task(bad, {event_for(bad, TaskEvent::kQueued)});
  store->flush();  // alone in its commit (a later update of the row would supersede it)
  t.status = TaskStatus::kQueued;
  store->update_task(t, {event_for(t, TaskEvent::kStarted)});
  store->flush();
  const StoreStats st = store->stats();
  CHECK(st.dropped_writes == 1);
  CHECK(st.backlog == 0);
  CHECK(st.last_error.find("an update of task " + t.id + " was refused and given up") !=
        std::string::npos);
  CHECK(st.last_error.find("too long") != std::string::npos);
  // The writes after it went on.
  CHECK(store->load_task(t.id)->status == TaskStatus::kQueued);
  CHECK(names(store->load_events(t.id)) == std::vector<std::string>{"created", "started"});
  // An insert the database refuses fails its caller, with the reason.
  const Task long_service = new_task(std::string(51, 's'));
  try {
    store->insert_task(long_service, event_for(long_service, TaskEvent::kCreated));
    FAIL("expected an Error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("too long") != std::string::npos);
    CHECK(std::string(e.what()).find("the task was not created") != std::string::npos);
  }
}

TEST_CASE("postgres store: a manager configured with storage.url keeps its tasks across reopen") {
  PgSchema s;
  Config c = test_config();
  c.storage.path = StorageConfig{}.path;
  c.storage.url = s.url();
  c.storage.postgres.schema = s.name();
  c.storage.postgres.connect_timeout_seconds = 0.3;
  auto svc = make_function_service("svc", [](TaskContext& ctx) {
    ctx.stage("work");
    ctx.report_memory(7);
    ctx.set_result("{\"n\":1}");
  });
  std::string id;
  {
    TaskManagerOptions mo;
    mo.services.push_back(svc);
    mo.log_sink = [](LogLevel, std::string_view) {};
    TaskManager tm(c, mo);
    TaskCreateRequest r;
    r.service = "svc";
    id = tm.create_task(r).id;
    tm.start_task(id);
    REQUIRE(tm.wait_task(id, 30s).has_value());
    CHECK(tm.get_task_metrics().store.writes > 0);
    // A second manager on the same schema is refused while this one has it.
    try {
      TaskManager other(c);
      FAIL("expected kBusy");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kBusy);
    }
  }
  TaskManagerOptions mo;
  mo.services.push_back(svc);
  TaskManager tm(c, mo);
  const Task t = tm.get_task(id);
  CHECK(t.status == TaskStatus::kCompleted);
  CHECK(t.result == "{\"n\":1}");
  CHECK(t.resource_cleanup_completed);
  CHECK(names(tm.get_task_events(id)) ==
        std::vector<std::string>{"created", "queued", "resource_acquired", "started", "completed",
                                 "cleanup_started", "resource_released", "cleanup_completed"});
  CHECK(tm.get_task_samples(id).size() == 1);
}

TEST_CASE("postgres store: the C ABI opens it through taskmgr_open_options.database_url") {
  PgSchema s;
  const std::string yaml = "storage: {postgres: {schema: " + s.name() + "}}";
  taskmgr_open_options o;
  taskmgr_open_options_init(&o);
  o.config_yaml = yaml.c_str();
  o.database_url = s.url().c_str();
  o.disable_builtin_ocr = 1;
  taskmgr_manager* m = nullptr;
  REQUIRE_MESSAGE(taskmgr_open(&o, &m) == TASKMGR_OK, taskmgr_last_error());
  char* json = nullptr;
  REQUIRE(taskmgr_list_tasks(m, nullptr, nullptr, 0, &json) == TASKMGR_OK);
  CHECK(std::string(json) == "[]");
  taskmgr_free(json);
  CHECK(taskmgr_destroy(m) == TASKMGR_OK);
  CHECK(s.scalar("SELECT max(version) FROM taskmgr_schema") == 4);
  // Not together with database_path.
  o.database_path = "x.db";
  m = nullptr;
  CHECK(taskmgr_open(&o, &m) == TASKMGR_E_INVALID_ARGUMENT);
  CHECK(std::string(taskmgr_last_error()).find("database_url") != std::string::npos);
  CHECK(m == nullptr);
}

namespace {

// Checks the database as the killed process left it; returns the number of
// tasks. One snapshot for every query: the server may still commit what the
// process sent before it was killed.
std::size_t check_database(PgSchema& s, const std::set<std::string>& acked) {
  s.exec("BEGIN ISOLATION LEVEL REPEATABLE READ");
  struct End {
    PgSchema& s;
    ~End() { s.exec("COMMIT"); }
  } end{s};
  std::map<std::string, std::string> status;
  pg::Result tasks = s.conn().exec("SELECT id, status FROM tasks");
  for (int i = 0; i < PQntuples(tasks.get()); ++i) {
    status[PQgetvalue(tasks.get(), i, 0)] = PQgetvalue(tasks.get(), i, 1);
  }
  for (const auto& id : acked) {
    CAPTURE(id);
    CHECK(status.count(id) == 1);  // every acknowledged task survived
  }
  std::map<std::string, std::string> replay;
  std::map<std::string, int> terminal;
  pg::Result ev =
      s.conn().exec("SELECT task_id, event_type, details::text FROM task_events ORDER BY id");
  for (int i = 0; i < PQntuples(ev.get()); ++i) {
    const std::string id = PQgetvalue(ev.get(), i, 0);
    const std::string name = PQgetvalue(ev.get(), i, 1);
    replay[id] = status_after(name, replay[id]);
    if (is_terminal_event(name)) ++terminal[id];
    const auto e = parse_task_event(name);
    REQUIRE(e.has_value());
    const std::string problem =
        event_keys_problem(*e, pg::compact_jsonb(PQgetvalue(ev.get(), i, 2)), /*any_order=*/true);
    CHECK_MESSAGE(problem.empty(), problem);
  }
  for (const auto& entry : status) {
    const std::string& id = entry.first;
    CAPTURE(id);
    CHECK(terminal[id] <= 1);           // never two terminal states
    CHECK(replay[id] == entry.second);  // the history gives the current status
  }
  return status.size();
}

}  // namespace

TEST_CASE("postgres store: kill -9 at random points loses no acknowledged task") {
  PgSchema s;
  const KillLoop loop =
      kill_loop(crash_kills(), 2024, {s.url(), s.name()},
                [&](const std::set<std::string>& acked) { check_database(s, acked); });
  const std::set<std::string>& acked = loop.acked;

  // Recovery: every task reaches exactly one terminal state.
  Config c = test_config();
  c.storage.path = StorageConfig{}.path;
  c.storage.url = s.url();
  c.storage.postgres.schema = s.name();
  recover_after_kills(c);
  CHECK(s.scalar("SELECT count(*) FROM (SELECT task_id FROM task_events WHERE event_type IN "
                 "('completed','failed','cancelled') GROUP BY task_id HAVING count(*) != 1) x") ==
        0);
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE status NOT IN "
                 "('completed','failed','cancelled')") == 0);
  CHECK(s.scalar("SELECT count(*) FROM tasks") ==
        static_cast<std::int64_t>(check_database(s, acked)));
  MESSAGE("postgres kill -9 test: " << loop.killed << " kills, " << acked.size()
                                    << " acknowledged tasks, all present");
}
