// One suite for every durable store: the TaskStore contract (store.hpp)
// checked the same way on each backend. This file is compiled twice: into
// taskmgr_tests for the SQLite store (a temporary file per case), and, with
// TASKMGR_CONFORMANCE_POSTGRES, into taskmgr_pg_tests for the PostgreSQL
// store (a fresh schema per case on the cluster tests/with_postgres.sh
// starts). Each case takes a fresh database from its fixture, opens the
// store on it as often as it needs, and looks at the database through a
// connection of its own.
#include <doctest/doctest.h>

#include <SQLiteCpp/SQLiteCpp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/json.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

// A C header (shared with test_c_api.c): C casts.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wold-style-cast"
#include "strict_json.h"
#pragma GCC diagnostic pop
#include "test_support.hpp"
#if TASKMGR_CONFORMANCE_POSTGRES
#include "pg_test_support.hpp"
#endif

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// What a case needs of a backend beyond the TaskStore interface.
class Backend {
 public:
  virtual ~Backend() = default;
  // The store on the case's database (the same database every call). While
  // fail_writes(true), every commit it makes fails.
  virtual std::shared_ptr<TaskStore> open() = 0;
  // Timestamps are kept to this resolution (floored).
  virtual std::chrono::microseconds resolution() const = 0;
  // SQL on the case's database through the test's own connection.
  virtual void exec(const std::string& sql) = 0;
  virtual std::int64_t scalar(const std::string& sql) = 0;
  // Records schema version `v` as a newer taskmgr would.
  virtual void record_schema_version(int v) = 0;
  // Everything a migration could change (tables, columns, rows), as text.
  virtual std::string fingerprint() = 0;
  virtual void fail_writes(bool on) = 0;
  // The store's max_backlog for the next open() (0: its default).
  std::size_t max_backlog = 0;
  // The store as open() opens it, reading an adopted table with `adopt`.
  virtual std::shared_ptr<TaskStore> open_adopting(const AdoptOptions& adopt) = 0;
  // One value (as text; "" for NULL) of a query on the case's database.
  virtual std::string text(const std::string& sql) = 0;
  // The columns of `table`: name -> type (and " DEFAULT ..." when it has
  // one), as the backend spells them.
  virtual std::map<std::string, std::string> columns(const std::string& table) = 0;
  // The spec's columns (tasks' five new ones, and the two new tables'), as
  // this backend writes the spec's DDL: "table.column" -> columns() text.
  virtual std::map<std::string, std::string> spec_columns() const = 0;
  // taskmgr's version-1 schema with its version recorded (no rows).
  virtual void create_v1_schema() = 0;
};

// The shared queue's columns of tasks (PostgreSQL schema 4: claimed_by,
// claim, lease_expires_at, cancel_requested, requested_device, run_host).
#if TASKMGR_CONFORMANCE_POSTGRES
constexpr std::size_t kSharedQueueColumns = 6;
#else
constexpr std::size_t kSharedQueueColumns = 0;
#endif

// The spec's new columns and tables as both backends spell them.
const char* const kSpecColumnNames[] = {
    "tasks.estimated_memory_mb", "tasks.actual_memory_mb",           "tasks.assigned_device",
    "tasks.service_instance_id", "tasks.resource_cleanup_completed", "task_metrics.id",
    "task_metrics.task_id",      "task_metrics.timestamp",           "task_metrics.memory_usage_mb",
    "task_metrics.device",       "task_metrics.processing_stage",    "task_events.id",
    "task_events.task_id",       "task_events.event_type",           "task_events.timestamp",
    "task_events.details"};

#if !TASKMGR_CONFORMANCE_POSTGRES

#define STORE_CASE(title) TEST_CASE_FIXTURE(SqliteBackend, "sqlite store conformance: " title)

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class SqliteBackend : public Backend {
 public:
  SqliteBackend()
      : dir_(fs::temp_directory_path() /
             ("taskmgr-conf-" + std::to_string(::getpid()) + "-" + generate_task_id().substr(24))),
        failing_(std::make_shared<std::atomic<bool>>(false)) {
    fs::create_directories(dir_);
  }
  ~SqliteBackend() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::shared_ptr<TaskStore> open() override {
    SqliteStoreOptions o;
    o.before_commit = [f = failing_] {
      if (f->load()) throw std::runtime_error("injected write failure");
    };
    if (max_backlog != 0) o.max_backlog = max_backlog;
    return open_sqlite_store(db(), o);
  }
  std::chrono::microseconds resolution() const override { return 1ms; }
  void exec(const std::string& sql) override {
    SQLite::Database d(db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    d.exec(sql);
  }
  std::int64_t scalar(const std::string& sql) override {
    SQLite::Database d(db(), SQLite::OPEN_READONLY);
    return d.execAndGet(sql).getInt64();
  }
  void record_schema_version(int v) override { exec("PRAGMA user_version = " + std::to_string(v)); }
  std::string fingerprint() override {
    std::string out = slurp(db());
    if (fs::exists(db() + "-wal")) out += slurp(db() + "-wal");
    return out;
  }
  void fail_writes(bool on) override { failing_->store(on); }
  std::shared_ptr<TaskStore> open_adopting(const AdoptOptions& adopt) override {
    SqliteStoreOptions o;
    o.adopt = adopt;
    return open_sqlite_store(db(), o);
  }
  std::string text(const std::string& sql) override {
    SQLite::Database d(db(), SQLite::OPEN_READONLY);
    SQLite::Statement q(d, sql);
    REQUIRE(q.executeStep());
    return q.getColumn(0).isNull() ? "" : q.getColumn(0).getString();
  }
  std::map<std::string, std::string> columns(const std::string& table) override {
    SQLite::Database d(db(), SQLite::OPEN_READONLY);
    SQLite::Statement q(d, "SELECT name, type, dflt_value FROM pragma_table_info(?)");
    q.bind(1, table);
    std::map<std::string, std::string> out;
    while (q.executeStep()) {
      out[q.getColumn(0).getString()] =
          q.getColumn(1).getString() +
          (q.getColumn(2).isNull() ? "" : " DEFAULT " + q.getColumn(2).getString());
    }
    return out;
  }
  std::map<std::string, std::string> spec_columns() const override {
    // SERIAL is SQLite's INTEGER PRIMARY KEY, JSONB is JSON text.
    return {{"tasks.estimated_memory_mb", "INTEGER"},
            {"tasks.actual_memory_mb", "INTEGER"},
            {"tasks.assigned_device", "VARCHAR(50)"},
            {"tasks.service_instance_id", "VARCHAR(100)"},
            {"tasks.resource_cleanup_completed", "BOOLEAN DEFAULT FALSE"},
            {"task_metrics.id", "INTEGER"},
            {"task_metrics.task_id", "VARCHAR(36)"},
            {"task_metrics.timestamp", "TIMESTAMP"},
            {"task_metrics.memory_usage_mb", "INTEGER"},
            {"task_metrics.device", "VARCHAR(50)"},
            {"task_metrics.processing_stage", "VARCHAR(100)"},
            {"task_events.id", "INTEGER"},
            {"task_events.task_id", "VARCHAR(36)"},
            {"task_events.event_type", "VARCHAR(50)"},
            {"task_events.timestamp", "TIMESTAMP"},
            {"task_events.details", "TEXT"}};
  }
  void create_v1_schema() override {
    exec(R"sql(
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
      PRAGMA user_version = 1;
    )sql");
  }
  std::string path() const { return db(); }

 private:
  std::string db() const { return (dir_ / "tasks.db").string(); }
  fs::path dir_;
  std::shared_ptr<std::atomic<bool>> failing_;
};

#else

#define STORE_CASE(title) TEST_CASE_FIXTURE(PostgresBackend, "postgres store conformance: " title)

class PostgresBackend : public Backend {
 public:
  std::shared_ptr<TaskStore> open() override {
    PostgresStoreOptions o = schema_.options();
    if (max_backlog != 0) o.max_backlog = max_backlog;
    return open_postgres_store(schema_.url(), o);
  }
  std::chrono::microseconds resolution() const override { return 1us; }
  void exec(const std::string& sql) override { schema_.exec(sql); }
  std::int64_t scalar(const std::string& sql) override { return schema_.scalar(sql); }
  void record_schema_version(int v) override {
    exec("INSERT INTO taskmgr_schema (version) VALUES (" + std::to_string(v) + ")");
  }
  std::string fingerprint() override {
    const std::string s = "'" + schema_.name() + "'";
    std::string out = schema_.text(
        "SELECT string_agg(x, E'\\n' ORDER BY x) FROM ("
        "SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || "
        "coalesce(column_default, '') AS x FROM information_schema.columns WHERE table_schema = " +
        s + " UNION ALL SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = " + s +
        " UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger t JOIN pg_class c ON "
        "c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = " +
        s + ") f");
    // Every row of every table.
    detail::pg::Result tables = schema_.conn().exec(
        "SELECT tablename FROM pg_tables WHERE schemaname = " + s + " ORDER BY tablename");
    for (int i = 0; i < PQntuples(tables.get()); ++i) {
      const std::string t = PQgetvalue(tables.get(), i, 0);
      out += "\n" + t + ": " +
             schema_.text("SELECT coalesce(string_agg(r::text, ',' ORDER BY r::text), '') FROM " +
                          t + " r");
    }
    return out;
  }
  void fail_writes(bool on) override {
    if (!trigger_) {
      // A trigger on every table of the store that raises while the flag
      // table has a row (RAISE: SQLSTATE P0001, a failure that may pass).
      exec(R"sql(
        CREATE TABLE test_fail_writes (on_ BOOLEAN);
        CREATE FUNCTION test_fail_writes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF EXISTS (SELECT 1 FROM test_fail_writes) THEN
            RAISE EXCEPTION 'injected write failure';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER fail BEFORE INSERT OR UPDATE ON tasks
          FOR EACH ROW EXECUTE FUNCTION test_fail_writes();
        CREATE TRIGGER fail BEFORE INSERT OR UPDATE ON task_events
          FOR EACH ROW EXECUTE FUNCTION test_fail_writes();
        CREATE TRIGGER fail BEFORE INSERT OR UPDATE ON task_metrics
          FOR EACH ROW EXECUTE FUNCTION test_fail_writes();
      )sql");
      trigger_ = true;
    }
    exec(on ? "INSERT INTO test_fail_writes VALUES (TRUE)" : "DELETE FROM test_fail_writes");
  }
  std::shared_ptr<TaskStore> open_adopting(const AdoptOptions& adopt) override {
    PostgresStoreOptions o = schema_.options();
    o.adopt = adopt;
    return open_postgres_store(schema_.url(), o);
  }
  std::string text(const std::string& sql) override { return schema_.text(sql); }
  std::map<std::string, std::string> columns(const std::string& table) override {
    detail::pg::Result r = schema_.conn().exec(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) || coalesce(' DEFAULT ' || "
        "pg_get_expr(d.adbin, d.adrelid), '') FROM pg_attribute a LEFT JOIN pg_attrdef d ON "
        "d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE a.attrelid = '" +
        schema_.name() + "." + table + "'::regclass AND a.attnum > 0 AND NOT a.attisdropped");
    std::map<std::string, std::string> out;
    for (int i = 0; i < PQntuples(r.get()); ++i) {
      out[PQgetvalue(r.get(), i, 0)] = PQgetvalue(r.get(), i, 1);
    }
    return out;
  }
  std::map<std::string, std::string> spec_columns() const override {
    return {{"tasks.estimated_memory_mb", "integer"},
            {"tasks.actual_memory_mb", "integer"},
            {"tasks.assigned_device", "character varying(50)"},
            {"tasks.service_instance_id", "character varying(100)"},
            {"tasks.resource_cleanup_completed", "boolean DEFAULT false"},
            {"task_metrics.id", "integer DEFAULT nextval('task_metrics_id_seq'::regclass)"},
            {"task_metrics.task_id", "character varying(36)"},
            {"task_metrics.timestamp", "timestamp without time zone"},
            {"task_metrics.memory_usage_mb", "integer"},
            {"task_metrics.device", "character varying(50)"},
            {"task_metrics.processing_stage", "character varying(100)"},
            {"task_events.id", "integer DEFAULT nextval('task_events_id_seq'::regclass)"},
            {"task_events.task_id", "character varying(36)"},
            {"task_events.event_type", "character varying(50)"},
            {"task_events.timestamp", "timestamp without time zone"},
            {"task_events.details", "jsonb"}};
  }
  void create_v1_schema() override {
    exec(R"sql(
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
      INSERT INTO taskmgr_schema (version) VALUES (1);
    )sql");
  }

 private:
  PgSchema schema_;
  bool trigger_ = false;
};

#endif

Timestamp floor_to(Timestamp t, std::chrono::microseconds res) {
  const auto us = std::chrono::floor<std::chrono::microseconds>(t.time_since_epoch());
  const auto r = us - (((us % res) + res) % res);
  return Timestamp(std::chrono::duration_cast<Timestamp::duration>(r));
}

Task new_task(const std::string& service = "ocr") {
  Task t;
  t.id = generate_task_id();
  t.service = service;
  t.input.data = {0x89, 'P', 'N', 'G', 0, 1, 2, 0xff};
  t.input.media_type = "image/png";
  t.options_json = R"({"psm":6})";
  t.priority = 4;
  t.batch_size = 2;
  t.created_at = std::chrono::system_clock::now();
  t.estimated_memory_mb = 321;
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

NewTask with_created(const Task& t, const std::string& details = "{}") {
  return NewTask{t, {event_for(t, TaskEvent::kCreated, details)}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The two documents hold the same JSON value (object keys in any order).
bool same_json(const std::string& a, const std::string& b) {
  return boost::json::parse(a) == boost::json::parse(b);
}

}  // namespace

STORE_CASE("insert_tasks stores a batch with its events, all or none") {
  auto store = open();
  CHECK(store->notices().empty());  // taskmgr's own table keeps every field
  std::vector<NewTask> batch;
  for (int i = 0; i < 3; ++i) {
    Task t = new_task();
    t.status = TaskStatus::kQueued;
    batch.push_back(
        NewTask{t, {event_for(t, TaskEvent::kCreated), event_for(t, TaskEvent::kQueued)}});
  }
  store->insert_tasks(batch);
  for (const auto& n : batch) {
    const auto t = store->load_task(n.task.id);
    REQUIRE(t.has_value());
    CHECK(t->status == TaskStatus::kQueued);
    CHECK(names(store->load_events(n.task.id)) == std::vector<std::string>{"created", "queued"});
  }
  // A batch with an id stored already fails as a whole.
  const Task fresh = new_task();
  std::vector<NewTask> clash = {with_created(fresh), batch[1]};
  const std::string why = error_of([&] { store->insert_tasks(clash); });
  CHECK(why.find("none of them was created") != std::string::npos);
  CHECK_FALSE(store->load_task(fresh.id).has_value());
  CHECK(store->load_events(fresh.id).empty());
  // So does a batch that holds the same new id twice.
  std::vector<NewTask> twice = {with_created(fresh), with_created(fresh)};
  CHECK(error_of([&] { store->insert_tasks(twice); }).find("none of them was created") !=
        std::string::npos);
  CHECK_FALSE(store->load_task(fresh.id).has_value());
  // And one task alone, stored already.
  CHECK(error_of([&] {
          store->insert_task(batch[0].task, batch[0].events[0]);
        }).find("the task was not created") != std::string::npos);
  CHECK(store->list_tasks({}).size() == 3);
  CHECK(names(store->load_events(batch[0].task.id)) ==
        std::vector<std::string>{"created", "queued"});
  // The store goes on after the refusals.
  store->insert_task(fresh, event_for(fresh, TaskEvent::kCreated));
  CHECK(store->load_task(fresh.id).has_value());
  CHECK(scalar("SELECT count(*) FROM tasks") == 4);
}

STORE_CASE("update_task stores the row with its events, atomically and in call order") {
  auto store = open();
  Task a = new_task(), b = new_task();
  store->insert_tasks({with_created(a, R"({"n":"a0"})"), with_created(b, R"({"n":"b0"})")});
  a.status = TaskStatus::kQueued;
  a.queued_at = std::chrono::system_clock::now();
  store->update_task(a, {event_for(a, TaskEvent::kQueued, R"({"n":"a1"})")});
  a.status = TaskStatus::kRunning;
  a.attempt = 1;
  a.service_instance_id = "ocr@cpu#1";
  store->update_task(a, {event_for(a, TaskEvent::kResourceAcquired, R"({"n":"a2"})"),
                         event_for(a, TaskEvent::kStarted, R"({"n":"a3"})")});
  b.status = TaskStatus::kCancelled;
  b.finished_at = std::chrono::system_clock::now();
  store->update_task(b, {event_for(b, TaskEvent::kCancelled, R"({"n":"b1"})")});
  a.status = TaskStatus::kFailed;
  a.failure_reason = TaskFailureReason::kOutOfMemory;
  a.failure_message = "no memory left";
  a.actual_memory_mb = 4096;
  a.resource_cleanup_completed = true;
  store->update_task(a, {event_for(a, TaskEvent::kFailed, R"({"n":"a4"})")});
  store->flush();
  // Straight from the database: the last update's row, every event.
  CHECK(scalar("SELECT count(*) FROM task_events") == 7);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE status = 'failed' AND attempt = 1 AND "
               "actual_memory_mb = 4096") == 1);
  const auto back = store->load_task(a.id);
  REQUIRE(back.has_value());
  CHECK(back->status == TaskStatus::kFailed);
  CHECK(back->failure_reason == TaskFailureReason::kOutOfMemory);
  CHECK(back->failure_message == "no memory left");
  CHECK(back->service_instance_id == "ocr@cpu#1");
  CHECK(back->resource_cleanup_completed);
  CHECK(back->input.data == a.input.data);  // never rewritten
  const auto ea = store->load_events(a.id);
  REQUIRE(ea.size() == 5);
  CHECK(names(ea) ==
        std::vector<std::string>{"created", "queued", "resource_acquired", "started", "failed"});
  for (std::size_t i = 0; i < ea.size(); ++i) {
    CAPTURE(i);
    CHECK(same_json(ea[i].details_json, "{\"n\":\"a" + std::to_string(i) + "\"}"));
    CHECK(ea[i].task_id == a.id);
    if (i > 0) CHECK(ea[i - 1].sequence < ea[i].sequence);
  }
  const auto eb = store->load_events(b.id);
  REQUIRE(eb.size() == 2);
  // Numbered in the order stored, across tasks too.
  CHECK(eb[0].sequence < ea[1].sequence);
  CHECK(ea[3].sequence < eb[1].sequence);
  CHECK(eb[1].sequence < ea[4].sequence);
  CHECK(store->load_task(b.id)->status == TaskStatus::kCancelled);
  // An update of a task never stored changes nothing else.
  CHECK(store->list_tasks({}).size() == 2);
}

STORE_CASE("reads see the caller's own writes at once, without a flush") {
  auto store = open();
  Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
  for (int i = 0; i < 30; ++i) {
    CAPTURE(i);
    t.priority = i;
    t.status = i % 2 == 0 ? TaskStatus::kQueued : TaskStatus::kRunning;
    store->update_task(t, {event_for(t, TaskEvent::kQueued)});
    const auto back = store->load_task(t.id);
    REQUIRE(back.has_value());
    CHECK(back->priority == i);
    CHECK(back->status == t.status);
    MetricSample s;
    s.task_id = t.id;
    s.timestamp = std::chrono::system_clock::now();
    s.memory_usage_mb = i;
    s.device = "cpu";
    s.processing_stage = "stage" + std::to_string(i);
    store->append_metrics({s});
    CHECK(store->load_metrics(t.id).size() == static_cast<std::size_t>(i + 1));
    CHECK(store->load_events(t.id).size() == static_cast<std::size_t>(i + 2));
    TaskFilter f;
    f.status = t.status;
    CHECK(store->list_tasks(f).size() == 1);
  }
}

STORE_CASE("list_tasks filters by status and service, keeps the newest `limit`, oldest first") {
  auto store = open();
  const auto base = std::chrono::system_clock::now();
  std::vector<Task> tasks;
  const TaskStatus statuses[] = {TaskStatus::kPending, TaskStatus::kQueued, TaskStatus::kCompleted,
                                 TaskStatus::kQueued,  TaskStatus::kFailed, TaskStatus::kQueued};
  for (int i = 0; i < 6; ++i) {
    Task t = new_task(i % 2 == 0 ? "ocr" : "thumbs");
    t.created_at = base + std::chrono::milliseconds(i);
    t.status = statuses[i];
    t.result = R"({"text":"page )" + std::to_string(i) + "\"}";
    tasks.push_back(t);
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
  }
  auto ids = [](const std::vector<Task>& ts) {
    std::vector<std::string> out;
    for (const auto& t : ts) out.push_back(t.id);
    return out;
  };
  CHECK(ids(store->list_tasks({})) == std::vector<std::string>{tasks[0].id, tasks[1].id,
                                                               tasks[2].id, tasks[3].id,
                                                               tasks[4].id, tasks[5].id});
  TaskFilter f;
  f.status = TaskStatus::kQueued;
  CHECK(ids(store->list_tasks(f)) ==
        std::vector<std::string>{tasks[1].id, tasks[3].id, tasks[5].id});
  f.service = "thumbs";
  CHECK(ids(store->list_tasks(f)) ==
        std::vector<std::string>{tasks[1].id, tasks[3].id, tasks[5].id});
  f.service = "ocr";
  CHECK(store->list_tasks(f).empty());
  f = TaskFilter{};
  f.service = "ocr";
  CHECK(ids(store->list_tasks(f)) ==
        std::vector<std::string>{tasks[0].id, tasks[2].id, tasks[4].id});
  f.limit = 2;  // the newest two, oldest first
  CHECK(ids(store->list_tasks(f)) == std::vector<std::string>{tasks[2].id, tasks[4].id});
  f = TaskFilter{};
  f.limit = 1;
  f.with_payloads = false;
  const auto brief = store->list_tasks(f);
  REQUIRE(brief.size() == 1);
  CHECK(brief[0].id == tasks[5].id);
  CHECK(brief[0].result.empty());
  CHECK(brief[0].input.data.empty());
  REQUIRE_FALSE(tasks[5].input.data.empty());
  CHECK(brief[0].input.left_out_bytes == tasks[5].input.data.size());  // the length, kept
  CHECK(brief[0].input.bytes() == tasks[5].input.data.size());
  CHECK(brief[0].input.media_type == "image/png");
  CHECK(brief[0].options_json == tasks[5].options_json);
  CHECK(brief[0].estimated_memory_mb == 321);
  f.with_payloads = true;
  const auto whole = store->list_tasks(f);
  REQUIRE(whole.size() == 1);
  CHECK(whole[0].result == tasks[5].result);
  CHECK(whole[0].input.data == tasks[5].input.data);
  CHECK(whole[0].input.bytes() == tasks[5].input.data.size());
  f.with_input_bytes = false;  // results, not input bytes
  const auto results = store->list_tasks(f);
  REQUIRE(results.size() == 1);
  CHECK(results[0].result == tasks[5].result);
  CHECK(results[0].input.data.empty());
  CHECK(results[0].input.bytes() == tasks[5].input.data.size());
}

STORE_CASE(
    "list_tasks pages back in creation order with a cursor: every task once, none skipped, "
    "ties of created_at ordered by id, with filters") {
  auto store = open();
  const auto base = std::chrono::floor<std::chrono::milliseconds>(std::chrono::system_clock::now());
  std::vector<Task> tasks;
  for (int i = 0; i < 9; ++i) {
    Task t = new_task();
    t.created_at = base + std::chrono::milliseconds(i / 3);  // three share each instant
    t.status = i % 2 == 0 ? TaskStatus::kQueued : TaskStatus::kPending;
    tasks.push_back(t);
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
  }
  std::vector<Task> order = tasks;  // creation order: created_at, then id
  std::sort(order.begin(), order.end(), [](const Task& a, const Task& b) {
    return a.created_at != b.created_at ? a.created_at < b.created_at : a.id < b.id;
  });
  auto walk = [&](TaskFilter f) {
    std::vector<std::string> seen;  // newest first
    for (int pages = 0; pages < 20; ++pages) {
      const auto page = store->list_tasks(f);  // oldest first
      for (auto it = page.rbegin(); it != page.rend(); ++it) seen.push_back(it->id);
      if (page.size() < f.limit) break;
      f.before = page_cursor(page);
      REQUIRE(f.before.has_value());
    }
    return seen;
  };
  TaskFilter f;
  f.limit = 4;
  f.with_payloads = false;
  std::vector<std::string> want;
  for (auto it = order.rbegin(); it != order.rend(); ++it) want.push_back(it->id);
  CHECK(walk(f) == want);
  f.limit = 3;  // pages that end exactly at the end
  CHECK(walk(f) == want);
  f.limit = 2;
  f.status = TaskStatus::kQueued;
  want.clear();
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    if (it->status == TaskStatus::kQueued) want.push_back(it->id);
  }
  CHECK(walk(f) == want);
  // Before the oldest: nothing.
  TaskFilter none;
  none.before = TaskCursor{order.front().created_at, order.front().id};
  CHECK(store->list_tasks(none).empty());
}

STORE_CASE("load_unfinished returns tasks not ended and ended ones whose cleanup is due") {
  auto store = open();
  const auto base = std::chrono::system_clock::now();
  auto put = [&](TaskStatus status, bool cleaned, int order) {
    Task t = new_task();
    t.status = status;
    t.created_at = base + std::chrono::milliseconds(order);
    t.resource_cleanup_completed = cleaned;
    if (is_terminal(status)) t.finished_at = t.created_at;
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
    return t.id;
  };
  const std::string running = put(TaskStatus::kRunning, false, 5);
  const std::string pending = put(TaskStatus::kPending, false, 1);
  put(TaskStatus::kCompleted, true, 2);
  const std::string uncleaned = put(TaskStatus::kFailed, false, 3);
  const std::string queued = put(TaskStatus::kQueued, false, 4);
  put(TaskStatus::kCancelled, true, 0);
  std::vector<std::string> got;
  for (const Task& t : store->load_unfinished()) {
    got.push_back(t.id);
    // Input bytes are left out (a queue of large inputs is not read at
    // once), their length kept; load_task reads them.
    CHECK(t.input.data.empty());
    CHECK(t.input.bytes() == new_task().input.data.size());
    const auto whole = store->load_task(t.id);
    REQUIRE(whole);
    CHECK(whole->input.data.size() == new_task().input.data.size());
  }
  CHECK(got == std::vector<std::string>{pending, uncleaned, queued, running});
}

STORE_CASE("prune_finished deletes ended tasks with their events and samples, never others") {
  auto store = open();
  const auto now = std::chrono::system_clock::now();
  const auto cutoff = now - std::chrono::hours(24);
  auto put = [&](TaskStatus status, bool cleaned, std::optional<Timestamp> finished) {
    Task t = new_task();
    t.status = status;
    t.created_at = now - std::chrono::hours(100);
    t.finished_at = finished;
    t.resource_cleanup_completed = cleaned;
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
    store->update_task(t, {event_for(t, TaskEvent::kStarted)});
    MetricSample s;
    s.task_id = t.id;
    s.timestamp = now;
    s.memory_usage_mb = 1;
    s.device = "cpu";
    s.processing_stage = "work";
    store->append_metrics({s, s});
    return t.id;
  };
  const std::string old_done = put(TaskStatus::kCompleted, true, now - std::chrono::hours(48));
  const std::string old_failed = put(TaskStatus::kFailed, true, now - std::chrono::hours(30));
  const std::string recent = put(TaskStatus::kCompleted, true, now - std::chrono::hours(1));
  const std::string uncleaned = put(TaskStatus::kFailed, false, now - std::chrono::hours(48));
  const std::string pending = put(TaskStatus::kPending, false, std::nullopt);
  const std::string running = put(TaskStatus::kRunning, false, now - std::chrono::hours(48));
  CHECK(store->prune_finished(cutoff) == 2);
  for (const auto& id : {old_done, old_failed}) {
    CAPTURE(id);
    CHECK_FALSE(store->load_task(id).has_value());
    CHECK(store->load_events(id).empty());
    CHECK(store->load_metrics(id).empty());
    CHECK(scalar("SELECT count(*) FROM task_events WHERE task_id = '" + id + "'") == 0);
    CHECK(scalar("SELECT count(*) FROM task_metrics WHERE task_id = '" + id + "'") == 0);
  }
  for (const auto& id : {recent, uncleaned, pending, running}) {
    CAPTURE(id);
    CHECK(store->load_task(id).has_value());
    CHECK(store->load_events(id).size() == 2);
    CHECK(store->load_metrics(id).size() == 2);
  }
  CHECK(store->prune_finished(cutoff) == 0);
  CHECK(scalar("SELECT count(*) FROM tasks") == 4);
}

STORE_CASE(
    "delete_tasks deletes the named ended tasks with their events, samples and inputs, never "
    "others") {
  auto store = open();
  const auto now = std::chrono::system_clock::now();
  auto put = [&](TaskStatus status, bool cleaned) {
    Task t = new_task();
    t.status = status;
    t.finished_at = is_terminal(status) ? std::optional<Timestamp>(now) : std::nullopt;
    t.resource_cleanup_completed = cleaned;
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
    store->update_task(t, {event_for(t, TaskEvent::kStarted)});
    MetricSample s;
    s.task_id = t.id;
    s.timestamp = now;
    s.memory_usage_mb = 1;
    s.device = "cpu";
    s.processing_stage = "work";
    store->append_metrics({s, s});
    return t.id;
  };
  const std::string done = put(TaskStatus::kCompleted, true);
  const std::string failed = put(TaskStatus::kFailed, true);
  const std::string cancelled = put(TaskStatus::kCancelled, true);
  const std::string kept_done = put(TaskStatus::kCompleted, true);  // not named
  const std::string uncleaned = put(TaskStatus::kFailed, false);
  const std::string pending = put(TaskStatus::kPending, false);
  const std::string queued = put(TaskStatus::kQueued, false);
  const std::string running = put(TaskStatus::kRunning, false);
  const std::int64_t inputs_before = scalar("SELECT count(*) FROM tasks");
  // Unknown ids, duplicates, and tasks that have not ended are left alone.
  CHECK(store->delete_tasks({done, failed, cancelled, done, "no-such-task", uncleaned, pending,
                             queued, running}) == 3);
  CHECK(store->delete_tasks({}) == 0);
  for (const auto& id : {done, failed, cancelled}) {
    CAPTURE(id);
    CHECK_FALSE(store->load_task(id).has_value());
    CHECK(store->load_events(id).empty());
    CHECK(store->load_metrics(id).empty());
    CHECK(scalar("SELECT count(*) FROM task_events WHERE task_id = '" + id + "'") == 0);
    CHECK(scalar("SELECT count(*) FROM task_metrics WHERE task_id = '" + id + "'") == 0);
    CHECK(scalar("SELECT count(*) FROM tasks WHERE id = '" + id + "'") == 0);
  }
  for (const auto& id : {kept_done, uncleaned, pending, queued, running}) {
    CAPTURE(id);
    const auto t = store->load_task(id);
    REQUIRE(t.has_value());
    CHECK(t->input.data == new_task().input.data);  // its input bytes are still there
    CHECK(store->load_events(id).size() == 2);
    CHECK(store->load_metrics(id).size() == 2);
  }
  CHECK(scalar("SELECT count(*) FROM tasks") == inputs_before - 3);
#if !TASKMGR_CONFORMANCE_POSTGRES
  // SQLite keeps input bytes in a table of their own (schema 3).
  CHECK(scalar("SELECT count(*) FROM task_inputs") == inputs_before - 3);
#endif
  // Deleting again finds nothing.
  CHECK(store->delete_tasks({done}) == 0);
  // A listing and a reopened store agree.
  CHECK(store->list_tasks({}).size() == 5);
  store.reset();
  store = open();
  CHECK(store->list_tasks({}).size() == 5);
  CHECK(store->delete_tasks({kept_done}) == 1);
  CHECK(store->list_tasks({}).size() == 4);
}

STORE_CASE("delete_tasks waits for the writes queued before it: a task's last update counts") {
  auto store = open();
  Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
  // Queued, not yet committed when delete_tasks is called.
  t.status = TaskStatus::kCompleted;
  t.finished_at = std::chrono::system_clock::now();
  t.resource_cleanup_completed = true;
  store->update_task(t, {event_for(t, TaskEvent::kCompleted)});
  CHECK(store->delete_tasks({t.id}) == 1);
  CHECK_FALSE(store->load_task(t.id).has_value());
  CHECK(scalar("SELECT count(*) FROM task_events") == 0);
}

STORE_CASE("metric samples are kept in order with every field") {
  auto store = open();
  Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
  std::vector<MetricSample> in;
  for (int i = 0; i < 5; ++i) {
    MetricSample s;
    s.task_id = t.id;
    s.timestamp =
        floor_to(std::chrono::system_clock::now(), resolution()) + std::chrono::seconds(i);
    s.memory_usage_mb = 1000 + i;
    s.device = i % 2 == 0 ? "cpu" : "cuda:0";
    s.processing_stage = "stage \xC3\xA9 " + std::to_string(i);
    in.push_back(s);
  }
  store->append_metrics({in[0], in[1]});
  store->append_metrics({in[2]});
  store->append_metrics({in[3], in[4]});
  const auto out = store->load_metrics(t.id);
  REQUIRE(out.size() == in.size());
  for (std::size_t i = 0; i < in.size(); ++i) {
    CAPTURE(i);
    CHECK(out[i].task_id == t.id);
    CHECK(out[i].timestamp == in[i].timestamp);
    CHECK(out[i].memory_usage_mb == in[i].memory_usage_mb);
    CHECK(out[i].device == in[i].device);
    CHECK(out[i].processing_stage == in[i].processing_stage);
  }
  CHECK(store->load_metrics("no-such-task").empty());
}

STORE_CASE("event details come back as the same strict JSON, in UTF-8") {
  auto store = open();
  const std::vector<std::string> details = {
      "{}",
      R"({"device":"cpu","memory_mb":512,"fraction":0.5,"tiny":-1e-7,"big":12345678901234567890})",
      R"({"text":"caf\u00e9 \u4e2d\u6587 \ud83d\ude00","raw":"café 中文 😀"})",
      R"({"escapes":"quote \" backslash \\ slash \/ tab \t newline \n ctl \u0001"})",
      R"({"nested":{"list":[1,[2,[3,{}]],null,true,false],"empty":[]},"a":"x","b":"y"})",
      R"({"z": 1, "a" : [ 1 , 2 ]})",
  };
  Task t = new_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated, details[0]));
  std::vector<EventRecord> evs;
  for (std::size_t i = 1; i < details.size(); ++i) {
    evs.push_back(event_for(t, TaskEvent::kMemoryWarning, details[i]));
  }
  store->update_task(t, evs);
  const auto back = store->load_events(t.id);
  REQUIRE(back.size() == details.size());
  for (std::size_t i = 0; i < details.size(); ++i) {
    CAPTURE(i);
    CAPTURE(back[i].details_json);
    const std::string& s = back[i].details_json;
    CHECK(strict_json_error(s.data(), s.size()) == -1);
    CHECK(same_json(s, details[i]));
  }
}

STORE_CASE("timestamps come back exactly, to the store's resolution") {
  auto store = open();
  using std::chrono::microseconds;
  const auto at = [](std::int64_t us) {
    return Timestamp(std::chrono::duration_cast<Timestamp::duration>(microseconds(us)));
  };
  const std::vector<Timestamp> times = {
      Timestamp{},                       // the epoch
      at(981173106789012),               // 2001-02-03 04:05:06.789012
      at(-1),                            // 1969-12-31 23:59:59.999999
      at(7258118399999999),              // 2199-12-31 23:59:59.999999
      std::chrono::system_clock::now(),  // with nanoseconds
      at(1700000000000000) + std::chrono::nanoseconds(999),
  };
  for (const Timestamp& when : times) {
    const Timestamp want = floor_to(when, resolution());
    CAPTURE(format_timestamp(when));
    Task t = new_task();
    t.created_at = when;
    t.queued_at = when;
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
    t.started_at = when;
    t.finished_at = when;
    EventRecord e = event_for(t, TaskEvent::kStarted);
    e.timestamp = when;
    store->update_task(t, {e});
    MetricSample s;
    s.task_id = t.id;
    s.timestamp = when;
    store->append_metrics({s});
    const auto back = store->load_task(t.id);
    REQUIRE(back.has_value());
    CHECK(back->created_at == want);
    CHECK(back->queued_at == want);
    CHECK(back->started_at == want);
    CHECK(back->finished_at == want);
    CHECK(store->load_events(t.id).back().timestamp == want);
    CHECK(store->load_metrics(t.id).at(0).timestamp == want);
  }
  // Storing a value read back changes nothing.
  const Task first = *store->load_task(store->list_tasks({}).front().id);
  Task again = first;
  again.id = generate_task_id();
  store->insert_task(again, event_for(again, TaskEvent::kCreated));
  CHECK(store->load_task(again.id)->created_at == first.created_at);
}

STORE_CASE("migrations: opening again changes nothing, a newer schema is refused untouched") {
  {
    auto store = open();
    Task t = new_task();
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
  }
  const std::string first = fingerprint();
  {
    auto store = open();
    CHECK(store->list_tasks({}).size() == 1);
  }
  CHECK(fingerprint() == first);
  record_schema_version(99);
  const std::string before = fingerprint();
  try {
    open();
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(std::string(e.what()).find("schema version 99") != std::string::npos);
    CHECK(std::string(e.what()).find("not modified") != std::string::npos);
  }
  CHECK(fingerprint() == before);
}

STORE_CASE("migrations: a database with tables taskmgr does not know is refused, untouched") {
  exec("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)");
  exec("INSERT INTO users (id, name) VALUES (1, 'ada')");
  const std::string before = fingerprint();
  try {
    open();
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(std::string(e.what()).find("users") != std::string::npos);
    CHECK(std::string(e.what()).find("not modified") != std::string::npos);
  }
  CHECK(fingerprint() == before);
  CHECK(scalar("SELECT count(*) FROM users") == 1);
}

STORE_CASE("concurrent writers from several threads: every write stored, each task in order") {
  auto store = open();
  constexpr int kThreads = 6, kEach = 25;
  std::vector<std::thread> threads;
  std::mutex mu;
  std::vector<std::string> ids;
  std::atomic<int> failures{0};
  for (int p = 0; p < kThreads; ++p) {
    threads.emplace_back([&, p] {
      try {
        for (int i = 0; i < kEach; ++i) {
          Task t = new_task(p % 2 == 0 ? "ocr" : "thumbs");
          store->insert_task(t, event_for(t, TaskEvent::kCreated));
          t.status = TaskStatus::kQueued;
          store->update_task(t, {event_for(t, TaskEvent::kQueued, R"({"step":1})")});
          t.status = TaskStatus::kRunning;
          store->update_task(t, {event_for(t, TaskEvent::kStarted, R"({"step":2})")});
          MetricSample s;
          s.task_id = t.id;
          s.timestamp = std::chrono::system_clock::now();
          s.memory_usage_mb = i;
          store->append_metrics({s});
          t.status = TaskStatus::kCompleted;
          t.result = "{\"thread\":" + std::to_string(p) + "}";
          store->update_task(t, {event_for(t, TaskEvent::kCompleted, R"({"step":3})")});
          std::lock_guard<std::mutex> g(mu);
          ids.push_back(t.id);
        }
      } catch (...) {
        ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(failures.load() == 0);
  REQUIRE(ids.size() == kThreads * kEach);
  store->flush();
  CHECK(scalar("SELECT count(*) FROM tasks WHERE status = 'completed'") == kThreads * kEach);
  CHECK(scalar("SELECT count(*) FROM task_events") == 4 * kThreads * kEach);
  for (const auto& id : ids) {
    CAPTURE(id);
    CHECK(names(store->load_events(id)) ==
          std::vector<std::string>{"created", "queued", "started", "completed"});
    CHECK(store->load_metrics(id).size() == 1);
  }
  const StoreStats s = store->stats();
  CHECK(s.writes == 5 * kThreads * kEach);  // inserts, updates, sample batches
  CHECK(s.commits <= s.writes);
  CHECK(s.failed_writes == 0);
  CHECK(s.queued == 0);
}

STORE_CASE("a write that fails is kept and retried in order: the store catches up") {
  auto store = open();
  Task a = new_task();
  store->insert_task(a, event_for(a, TaskEvent::kCreated));
  fail_writes(true);
  a.status = TaskStatus::kQueued;
  store->update_task(a, {event_for(a, TaskEvent::kQueued)});
  a.status = TaskStatus::kRunning;
  store->update_task(a, {event_for(a, TaskEvent::kStarted)});
  MetricSample s;
  s.task_id = a.id;
  s.timestamp = std::chrono::system_clock::now();
  s.memory_usage_mb = 9;
  store->append_metrics({s});
  store->flush();  // returns once they were tried
  StoreStats st = store->stats();
  CHECK(st.failed_writes >= 1);
  CHECK(st.backlog == 3);
  CHECK(st.dropped_writes == 0);
  CHECK(st.last_error.find("injected write failure") != std::string::npos);
  CHECK(st.last_error.find(store->describe().substr(store->describe().find(':') + 1)) !=
        std::string::npos);
  // An insert meanwhile is refused to its caller, and nothing of it kept.
  const Task b = new_task();
  const std::string why =
      error_of([&] { store->insert_task(b, event_for(b, TaskEvent::kCreated)); });
  CHECK(why.find("the task was not created") != std::string::npos);
  CHECK(why.find("injected write failure") != std::string::npos);
  // More writes queue behind the backlog, in order.
  a.status = TaskStatus::kCompleted;
  a.resource_cleanup_completed = true;
  store->update_task(a, {event_for(a, TaskEvent::kCompleted)});
  fail_writes(false);
  // The store catches up by itself (no new write needed), in order.
  REQUIRE(eventually([&] { return store->stats().backlog == 0 && store->stats().queued == 0; }));
  const auto back = store->load_task(a.id);
  REQUIRE(back.has_value());
  CHECK(back->status == TaskStatus::kCompleted);
  CHECK(back->resource_cleanup_completed);
  CHECK(names(store->load_events(a.id)) ==
        std::vector<std::string>{"created", "queued", "started", "completed"});
  CHECK(store->load_metrics(a.id).size() == 1);
  CHECK_FALSE(store->load_task(b.id).has_value());
  CHECK(store->stats().dropped_writes == 0);
  store->insert_task(b, event_for(b, TaskEvent::kCreated));
  CHECK(store->load_task(b.id).has_value());
}

STORE_CASE("while writes fail, reads answer with each task's latest state: get and list agree") {
  auto store = open();
  std::vector<Task> ts;
  for (int i = 0; i < 3; ++i) {
    ts.push_back(new_task());
    store->insert_task(ts.back(), event_for(ts.back(), TaskEvent::kCreated));
  }
  fail_writes(true);
  Task& a = ts[0];
  a.status = TaskStatus::kCompleted;
  a.result = R"({"text":"done"})";
  a.finished_at = std::chrono::system_clock::now();
  a.resource_cleanup_completed = true;
  store->update_task(a, {event_for(a, TaskEvent::kCompleted)});
  store->flush();
  REQUIRE(store->stats().backlog == 1);
  // Not in the database: the answers below come from the unpersisted update.
  CHECK(scalar("SELECT count(*) FROM tasks WHERE status = 'completed'") == 0);
  const auto one = store->load_task(a.id);
  REQUIRE(one.has_value());
  CHECK(one->status == TaskStatus::kCompleted);
  CHECK(one->result == a.result);
  CHECK(one->resource_cleanup_completed);
  CHECK(one->input.data == a.input.data);  // the row's input: updates never carry it
  auto ids = [](const std::vector<Task>& v) {
    std::vector<std::string> out;
    for (const auto& t : v) out.push_back(t.id);
    return out;
  };
  const auto all = store->list_tasks({});
  REQUIRE(all.size() == 3);
  CHECK(ids(all) == std::vector<std::string>{ts[0].id, ts[1].id, ts[2].id});  // creation order
  CHECK(all[0].status == TaskStatus::kCompleted);
  CHECK(all[0].result == a.result);
  TaskFilter done;
  done.status = TaskStatus::kCompleted;
  CHECK(ids(store->list_tasks(done)) == std::vector<std::string>{a.id});
  TaskFilter pending;
  pending.status = TaskStatus::kPending;
  CHECK(ids(store->list_tasks(pending)) == std::vector<std::string>{ts[1].id, ts[2].id});
  TaskFilter newest;
  newest.limit = 1;
  CHECK(ids(store->list_tasks(newest)) == std::vector<std::string>{ts[2].id});
  TaskFilter oldest_done;
  oldest_done.limit = 2;
  oldest_done.status = TaskStatus::kCompleted;
  CHECK(ids(store->list_tasks(oldest_done)) == std::vector<std::string>{a.id});
  TaskFilter other_service;
  other_service.service = "not-ocr";
  CHECK(store->list_tasks(other_service).empty());
  TaskFilter light;
  light.with_payloads = false;
  const auto no_payloads = store->list_tasks(light);
  REQUIRE(no_payloads.size() == 3);
  CHECK(no_payloads[0].status == TaskStatus::kCompleted);
  CHECK(no_payloads[0].result.empty());
  CHECK(no_payloads[0].input.data.empty());
  // The store catches up; the answers stay the same, now from the database.
  fail_writes(false);
  REQUIRE(eventually([&] { return store->stats().backlog == 0; }));
  CHECK(scalar("SELECT count(*) FROM tasks WHERE status = 'completed'") == 1);
  CHECK(ids(store->list_tasks(done)) == std::vector<std::string>{a.id});
  CHECK(store->load_task(a.id)->result == a.result);
}

STORE_CASE("the backlog is bounded: once full new tasks are refused, nothing accepted is dropped") {
  max_backlog = 4;
  auto store = open();
  Task a = new_task();
  store->insert_task(a, event_for(a, TaskEvent::kCreated));
  fail_writes(true);
  // Ten accepted updates: all kept, past the bound (they are never dropped).
  for (int i = 1; i <= 10; ++i) {
    a.attempt = i;
    store->update_task(a, {event_for(a, TaskEvent::kRetried, "{\"n\":" + std::to_string(i) + "}")});
  }
  store->flush();
  StoreStats st = store->stats();
  CHECK(st.backlog == 10);
  CHECK(st.dropped_writes == 0);
  CHECK(st.unpersisted() == 10);
  // A new task is refused at once, with the store's own message.
  Task b = new_task();
  const std::string why =
      error_of([&] { store->insert_task(b, event_for(b, TaskEvent::kCreated)); });
  CHECK(why.find("max_backlog = 4") != std::string::npos);
  CHECK(why.find("10 earlier writes wait") != std::string::npos);
  CHECK(why.find("injected write failure") != std::string::npos);
  CHECK(why.find("the task was not created") != std::string::npos);
  std::vector<NewTask> two{with_created(new_task()), with_created(new_task())};
  CHECK(error_of([&] { store->insert_tasks(two); }).find("none of them was created") !=
        std::string::npos);
  // The database takes writes again: the backlog goes in by itself, in
  // order, every write of it; then new tasks are taken again.
  fail_writes(false);
  REQUIRE(eventually([&] { return store->stats().backlog == 0; }));
  const auto events = store->load_events(a.id);
  REQUIRE(events.size() == 11);
  for (int i = 1; i <= 10; ++i) {
    CHECK(same_json(events[static_cast<std::size_t>(i)].details_json,
                    "{\"n\":" + std::to_string(i) + "}"));
  }
  CHECK(store->load_task(a.id)->attempt == 10);
  CHECK(store->stats().dropped_writes == 0);
  store->insert_task(b, event_for(b, TaskEvent::kCreated));
  CHECK(store->load_task(b.id).has_value());
}

// ---- adopting an existing database (docs/STORAGE.md) ----------------------------------------

namespace {

// The earlier service's database: its tasks table (an id of its own form,
// columns of its own, its own status words, times in several forms) and a
// table beside it. Valid SQL for both backends.
constexpr const char* kLegacyFixture = R"sql(
CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
INSERT INTO users (id, name) VALUES (7, 'ada');
CREATE TABLE tasks (
  id VARCHAR(36) PRIMARY KEY,
  type VARCHAR(50),
  status VARCHAR(20) NOT NULL,
  priority INTEGER DEFAULT 0,
  input_path TEXT,
  result TEXT,
  error TEXT,
  created_at TIMESTAMP,
  started_at BIGINT,
  completed_at TEXT,
  user_id INTEGER,
  callback_url TEXT
);
INSERT INTO tasks (id, type, status, priority, input_path, created_at, user_id, callback_url)
  VALUES ('legacy-pending', 'ocr', 'pending', 5, '/in/a.png', '2024-05-01 10:00:00', 7,
          'https://example.com/a');
INSERT INTO tasks (id, type, status, input_path, result, created_at, started_at, completed_at,
                   user_id)
  VALUES ('legacy-done', 'ocr', 'done', '/in/b.png', '{"text":"hello"}',
          '2024-05-01 10:00:01.250', 1714557600, '2024-05-01T12:00:02+02:00', 7);
INSERT INTO tasks (id, type, status, created_at, callback_url)
  VALUES ('legacy-waiting', NULL, 'waiting', '2024-05-01 10:00:03', 'https://example.com/c');
INSERT INTO tasks (id, type, status, error, created_at)
  VALUES ('legacy-odd', 'ocr', 'on_hold', 'held by an operator', '2024-05-01 10:00:04');
INSERT INTO tasks (id, type, status, created_at)
  VALUES ('legacy-thumbs', 'thumbs', 'queued', '2024-05-01 10:00:05');
)sql";

AdoptOptions legacy_adopt() {
  AdoptOptions a;
  a.status_map = {{"done", TaskStatus::kCompleted}, {"waiting", TaskStatus::kPending}};
  return a;
}

std::vector<std::string> ids_of(const std::vector<Task>& tasks) {
  std::vector<std::string> out;
  for (const auto& t : tasks) out.push_back(t.id);
  return out;
}

bool has_warning(const TaskHealth& h, const std::string& part) {
  for (const auto& w : h.warnings) {
    if (w.find(part) != std::string::npos) return true;
  }
  return false;
}

}  // namespace

STORE_CASE(
    "adopting: times in mixed forms are listed and paged in creation order, each task once") {
  // SQL's CURRENT_TIMESTAMP form, RFC 3339, seconds since 1970 and a
  // fraction, all in one text column: as text they sort neither by time nor
  // alike ("2020-01-01 10" < "2020-01-01T"), and a cursor compared as text
  // paged forever.
  exec(
      "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, service VARCHAR(50), status VARCHAR(20), "
      "created_at TEXT)");
  exec(
      "INSERT INTO tasks VALUES ('e', 's', 'pending', '2020-01-01 10:00:05'), "
      "('a', 's', 'pending', '2020-01-01T10:00:01Z'), ('', 's', 'pending', '1577872803'), "
      "('d', 's', 'pending', '2020-01-01 10:00:04.5'), ('b', 's', 'pending', "
      "'2020-01-01 10:00:02'), ('c', 's', 'pending', '2020-01-01T10:00:03Z')");
  auto store = open_adopting(legacy_adopt());
  // '' and c both at 10:00:03: by id.
  const std::vector<std::string> order{"a", "b", "", "c", "d", "e"};
  CHECK(ids_of(store->list_tasks({})) == order);
  for (std::size_t page : {1u, 2u, 4u}) {
    CAPTURE(page);
    std::vector<std::string> seen;
    TaskFilter f;
    f.limit = page;
    f.with_payloads = false;
    for (int i = 0; i < 20; ++i) {
      const auto got = store->list_tasks(f);
      const auto ids = ids_of(got);
      seen.insert(seen.begin(), ids.begin(), ids.end());  // pages go back in time
      if (got.size() < page) break;
      f.before = page_cursor(got);
      // The library's own cursor text reads back, an empty id too.
      REQUIRE(parse_task_cursor(to_string(*f.before)).has_value());
      f.before = parse_task_cursor(to_string(*f.before));
    }
    CHECK(seen == order);
  }
  TaskFilter newest;
  newest.limit = 2;
  CHECK(ids_of(store->list_tasks(newest)) == std::vector<std::string>{"d", "e"});
}

STORE_CASE(
    "adopting: an earlier service's tasks table is upgraded in place, rows and columns "
    "intact") {
  exec(kLegacyFixture);
  const auto legacy_columns = columns("tasks");
  REQUIRE(legacy_columns.size() == 12);
  {
    auto store = open_adopting(legacy_adopt());
    const auto p = store->load_task("legacy-pending");
    REQUIRE(p.has_value());
    CHECK(p->status == TaskStatus::kPending);
    CHECK(p->service == "ocr");
    CHECK(p->priority == 5);
    CHECK(p->input.path == "/in/a.png");
    CHECK(format_timestamp(p->created_at) == "2024-05-01T10:00:00.000Z");
    CHECK_FALSE(p->started_at.has_value());
    CHECK(p->extra == std::map<std::string, std::string>{{"callback_url", "https://example.com/a"},
                                                         {"user_id", "7"}});
    CHECK_FALSE(p->assigned_device.has_value());
    CHECK_FALSE(p->resource_cleanup_completed);
    const auto d = store->load_task("legacy-done");
    REQUIRE(d.has_value());
    CHECK(d->status == TaskStatus::kCompleted);  // "done", mapped
    CHECK(d->stored_status.empty());
    CHECK(d->result == R"({"text":"hello"})");
    CHECK(format_timestamp(d->created_at) == "2024-05-01T10:00:01.250Z");
    REQUIRE(d->started_at.has_value());
    CHECK(format_timestamp(*d->started_at) == "2024-05-01T10:00:00.000Z");  // epoch seconds
    REQUIRE(d->finished_at.has_value());
    CHECK(format_timestamp(*d->finished_at) == "2024-05-01T10:00:02.000Z");  // +02:00
    CHECK(d->extra == std::map<std::string, std::string>{{"user_id", "7"}});
    const auto w = store->load_task("legacy-waiting");
    REQUIRE(w.has_value());
    CHECK(w->status == TaskStatus::kPending);  // "waiting", mapped
    CHECK(w->service == "ocr");                // no type: the default service
    const auto odd = store->load_task("legacy-odd");
    REQUIRE(odd.has_value());
    CHECK(odd->status == TaskStatus::kUnrecognized);  // never "failed"
    CHECK(odd->stored_status == "on_hold");
    CHECK(odd->failure_reason == TaskFailureReason::kNone);
    CHECK(odd->failure_message == "held by an operator");
    const auto json = boost::json::parse(to_json(*odd));
    CHECK(json.at("status").as_string() == "unrecognized");
    CHECK(json.at("stored_status").as_string() == "on_hold");
    CHECK(json.at("extra").as_object().empty());
    const auto pj = boost::json::parse(to_json(*p));
    CHECK(pj.at("extra").at("user_id").as_string() == "7");
    CHECK(pj.at("stored_status").is_null());
    // Filters know the old words.
    TaskFilter f;
    f.status = TaskStatus::kCompleted;
    CHECK(ids_of(store->list_tasks(f)) == std::vector<std::string>{"legacy-done"});
    f.status = TaskStatus::kPending;
    CHECK(ids_of(store->list_tasks(f)) ==
          std::vector<std::string>{"legacy-pending", "legacy-waiting"});
    f.status = TaskStatus::kUnrecognized;
    CHECK(ids_of(store->list_tasks(f)) == std::vector<std::string>{"legacy-odd"});
    f = TaskFilter{};
    f.service = "ocr";
    CHECK(store->list_tasks(f).size() == 4);  // legacy-waiting names none: the default
    f.service = "thumbs";
    CHECK(ids_of(store->list_tasks(f)) == std::vector<std::string>{"legacy-thumbs"});
    CHECK(ids_of(store->load_unfinished()) ==
          std::vector<std::string>{"legacy-pending", "legacy-waiting", "legacy-thumbs"});
    CHECK(store->list_tasks({}).size() == 5);
    // What the table cannot keep is said, with the remedy (attempts are
    // read from the task's events).
    const auto notices = store->notices();
    REQUIRE(notices.size() == 1);
    CHECK(notices[0].find("has no column for: options, batch_size, failure_reason, queued_at.") !=
          std::string::npos);
    CHECK(notices[0].find("add a column of that name") != std::string::npos);
  }
  CHECK(open()->notices().empty() == false);  // still the adopted table
  // The spec's columns and tables, exactly; the old columns as they were.
  const auto spec = spec_columns();
  for (const char* key : kSpecColumnNames) {
    CAPTURE(key);
    const std::string k = key;
    const std::string table = k.substr(0, k.find('.')), column = k.substr(k.find('.') + 1);
    const auto cols = columns(table);
    REQUIRE(cols.count(column) == 1);
    CHECK(cols.at(column) == spec.at(k));
  }
  const auto after = columns("tasks");
  CHECK(after.size() == legacy_columns.size() + 5 + kSharedQueueColumns);
  for (const auto& column : legacy_columns) {
    CAPTURE(column.first);
    CHECK(after.at(column.first) == column.second);
  }
  CHECK(columns("task_events").size() == 5);
  CHECK(columns("task_metrics").size() == 6);
  // Old rows as they were (the words too), the new columns at the spec's defaults.
  CHECK(scalar("SELECT count(*) FROM tasks WHERE id = 'legacy-pending' AND type = 'ocr' AND "
               "status = 'pending' AND priority = 5 AND input_path = '/in/a.png' AND "
               "created_at = '2024-05-01 10:00:00' AND user_id = 7 AND "
               "callback_url = 'https://example.com/a' AND resource_cleanup_completed = FALSE "
               "AND assigned_device IS NULL AND estimated_memory_mb IS NULL") == 1);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE status = 'done' AND started_at = 1714557600 AND "
               "completed_at = '2024-05-01T12:00:02+02:00'") == 1);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE status = 'on_hold'") == 1);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE resource_cleanup_completed = FALSE") == 5);
  CHECK(text("SELECT name FROM users WHERE id = 7") == "ada");
  // Opening again changes nothing.
  const std::string first = fingerprint();
  open_adopting(legacy_adopt()).reset();
  CHECK(fingerprint() == first);
}

STORE_CASE(
    "adopting: old pending tasks start and complete, a queued one waits for its service, "
    "an unknown status is left as it is") {
  exec(kLegacyFixture);
  Config c = test_config();
  c.tasks.retry.backoff_base_seconds = 0;
  {
    TaskManagerOptions mo;
    mo.store = open_adopting(legacy_adopt());
    mo.builtin_ocr = false;
    std::mutex warnings_mu;
    std::vector<std::string> warnings;
    mo.log_sink = [&](LogLevel l, std::string_view m) {
      std::lock_guard<std::mutex> g(warnings_mu);
      if (l == LogLevel::kWarn) warnings.emplace_back(m);
    };
    mo.services.push_back(make_function_service("ocr", [](TaskContext& ctx) {
      ctx.report_memory(3);
      ctx.set_result(R"({"text":"new"})");
    }));
    TaskManager tm(c, mo);
    // The store's notice is logged when the manager opens.
    std::unique_lock<std::mutex> wg(warnings_mu);
    CHECK(std::count_if(warnings.begin(), warnings.end(), [](const std::string& w) {
            return w.find("has no column for: options") != std::string::npos;
          }) == 1);
    wg.unlock();
    // Queued for a service not registered: it waits, and its health says so.
    CHECK(tm.get_task("legacy-thumbs").status == TaskStatus::kQueued);
    CHECK(has_warning(tm.get_task_health("legacy-thumbs"), "waiting for service 'thumbs'"));
    // Every old pending task (no device assigned) is placed when started.
    for (const char* id : {"legacy-pending", "legacy-waiting"}) {
      CAPTURE(id);
      const Task started = tm.start_task(id);
      CHECK(started.assigned_device == "cpu");
      const auto done = tm.wait_task(id, 30s);
      REQUIRE(done.has_value());
      CHECK(done->status == TaskStatus::kCompleted);
      CHECK(done->result == R"({"text":"new"})");
      CHECK(done->resource_cleanup_completed);
    }
    CHECK(tm.get_task("legacy-pending").extra.at("callback_url") == "https://example.com/a");
    // An unknown status: not started, not failed, and said why.
    try {
      tm.start_task("legacy-odd");
      FAIL("expected kInvalidState");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kInvalidState);
      CHECK(std::string(e.what()).find("'on_hold'") != std::string::npos);
      CHECK(std::string(e.what()).find("status_map") != std::string::npos);
    }
    CHECK(tm.get_task("legacy-odd").status == TaskStatus::kUnrecognized);
    CHECK_THROWS_WITH_AS(tm.wait_task("legacy-odd", 1s), doctest::Contains("'on_hold'"), Error);
    CHECK(has_warning(tm.get_task_health("legacy-odd"), "'on_hold' is not a taskmgr status"));
    // The service comes: the waiting task runs.
    tm.register_service(make_function_service(
        "thumbs", [](TaskContext& ctx) { ctx.set_result(R"({"thumb":1})"); }));
    const auto thumbs = tm.wait_task("legacy-thumbs", 30s);
    REQUIRE(thumbs.has_value());
    CHECK(thumbs->status == TaskStatus::kCompleted);
    CHECK(tm.get_task("legacy-done").status == TaskStatus::kCompleted);
  }
  // In the table: taskmgr's words for what it ran, the columns' own forms
  // for times, the old columns untouched.
  CHECK(scalar("SELECT count(*) FROM tasks WHERE status = 'completed'") == 3);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE id = 'legacy-pending' AND user_id = 7 AND "
               "callback_url = 'https://example.com/a' AND started_at >= 1714557600 AND "
               "completed_at IS NOT NULL AND assigned_device = 'cpu' AND "
               "resource_cleanup_completed = TRUE AND actual_memory_mb = 3") == 1);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE id = 'legacy-done' AND status = 'done'") == 1);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE id = 'legacy-odd' AND status = 'on_hold'") == 1);
  auto store = open_adopting(legacy_adopt());
  const auto back = store->load_task("legacy-pending");
  REQUIRE(back.has_value());
  CHECK(back->status == TaskStatus::kCompleted);
  CHECK(back->started_at.has_value());
  CHECK(back->finished_at.has_value());
  CHECK(format_timestamp(back->created_at) == "2024-05-01T10:00:00.000Z");
  const auto events = names(store->load_events("legacy-pending"));
  REQUIRE_FALSE(events.empty());
  CHECK(events.back() == "cleanup_completed");
  CHECK(std::count(events.begin(), events.end(), "completed") == 1);
  // Retention deletes what taskmgr ran, never the earlier service's own rows.
  CHECK(store->prune_finished(std::chrono::system_clock::now() + std::chrono::hours(1)) == 3);
  CHECK_FALSE(store->load_task("legacy-pending").has_value());
  CHECK(store->load_events("legacy-pending").empty());
  CHECK(store->load_task("legacy-done").has_value());
  CHECK(ids_of(store->list_tasks({})) == std::vector<std::string>{"legacy-done", "legacy-odd"});
  // Nor does a host's delete: the earlier service's own rows stay (also
  // one that reads as ended with its cleanup done).
  store.reset();
  exec("UPDATE tasks SET resource_cleanup_completed = TRUE WHERE id = 'legacy-done'");
  store = open_adopting(legacy_adopt());
  REQUIRE(store->load_task("legacy-done")->status == TaskStatus::kCompleted);
  REQUIRE(store->load_task("legacy-done")->resource_cleanup_completed);
  CHECK(store->delete_tasks({"legacy-done", "legacy-odd"}) == 0);
  CHECK(store->load_task("legacy-done").has_value());
}

STORE_CASE(
    "adopting: with no attempt column, a task's attempts are read from its events, so a task "
    "the process dies under runs out of them") {
  exec(kLegacyFixture);
  open_adopting(legacy_adopt()).reset();
  // What a process killed while the task ran leaves: the row running, one
  // `started` event per attempt (the table has no attempt column).
  auto died_running = [&](const std::string& id, int attempts) {
    exec("UPDATE tasks SET status = 'running', assigned_device = 'cpu' WHERE id = '" + id + "'");
    for (int a = 1; a <= attempts; ++a) {
      exec("INSERT INTO task_events (task_id, event_type, timestamp, details) VALUES ('" + id +
           "', 'started', '2024-05-01 10:00:00', '{\"attempt\":" + std::to_string(a) +
           ",\"batch_size\":1,\"wait_s\":0}')");
    }
  };
  died_running("legacy-pending", 3);
  died_running("legacy-waiting", 1);
  {
    auto store = open_adopting(legacy_adopt());
    CHECK(store->load_task("legacy-pending")->attempt == 3);
    CHECK(store->load_task("legacy-waiting")->attempt == 1);
    CHECK(store->load_task("legacy-done")->attempt == 0);  // never started by taskmgr
    for (const Task& t : store->load_unfinished()) {
      if (t.id == "legacy-pending") CHECK(t.attempt == 3);
    }
    TaskFilter f;
    f.with_payloads = false;
    for (const Task& t : store->list_tasks(f)) {
      if (t.id == "legacy-pending") CHECK(t.attempt == 3);
    }
  }
  Config c = test_config();
  c.tasks.retry.backoff_base_seconds = 0;
  c.tasks.retry.max_attempts = 3;
  c.tasks.retry.max_interrupted_attempts = 3;
  {
    TaskManagerOptions mo;
    mo.store = open_adopting(legacy_adopt());
    mo.builtin_ocr = false;
    mo.log_sink = [](LogLevel, std::string_view) {};
    mo.services.push_back(
        make_function_service("ocr", [](TaskContext& ctx) { ctx.set_result(R"({"ok":1})"); }));
    TaskManager tm(c, mo);
    // Out of attempts: failed `interrupted`, not run a fourth time.
    const Task spent = tm.get_task("legacy-pending");
    CHECK(spent.status == TaskStatus::kFailed);
    CHECK(spent.failure_reason == TaskFailureReason::kInterrupted);
    CHECK(spent.failure_message.find("attempt 3 of 3") != std::string::npos);
    // One attempt used: retried, as its second.
    const auto again = tm.wait_task("legacy-waiting", 30s);
    REQUIRE(again.has_value());
    CHECK(again->status == TaskStatus::kCompleted);
    CHECK(again->attempt == 2);
  }
  auto store = open_adopting(legacy_adopt());
  CHECK(store->load_task("legacy-waiting")->attempt == 2);
  CHECK(store->load_task("legacy-pending")->status == TaskStatus::kFailed);
}

STORE_CASE(
    "adopting: the earlier application's ended rows are never cleaned up nor pruned, also "
    "with an assigned_device column of its own") {
  exec(
      "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, status VARCHAR(20), assigned_device "
      "VARCHAR(50), created_at TIMESTAMP, finished_at TIMESTAMP, note TEXT)");
  exec(
      "INSERT INTO tasks VALUES ('old-1', 'completed', 'gpu0', '2024-01-01 00:00:00', "
      "'2024-01-01 00:00:01', 'a')");
  exec(
      "INSERT INTO tasks VALUES ('old-2', 'failed', 'cpu', '2024-01-01 00:00:02', "
      "'2024-01-01 00:00:03', 'b')");
  {
    auto store = open();
    CHECK(store->load_unfinished().empty());
  }
  Config c = test_config();
  c.storage.retention_days = 1;
  {
    TaskManagerOptions mo;
    mo.store = open();
    mo.builtin_ocr = false;
    mo.log_sink = [](LogLevel, std::string_view) {};
    TaskManager tm(c, mo);  // recovery and a retention sweep at open
    CHECK(tm.get_task("old-1").status == TaskStatus::kCompleted);
    CHECK(tm.get_task_events("old-1").empty());
  }
  auto store = open();
  CHECK(store->prune_finished(std::chrono::system_clock::now() + std::chrono::hours(1)) == 0);
  CHECK(scalar("SELECT count(*) FROM tasks") == 2);
  CHECK(scalar("SELECT count(*) FROM task_events") == 0);
}

STORE_CASE("adopting: times in a floating-point epoch column are written with their fraction") {
  exec(
      "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, status VARCHAR(20), created_at DOUBLE "
      "PRECISION, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION)");
  exec("INSERT INTO tasks VALUES ('old-1', 'pending', 1714557600.25, NULL, NULL)");
  auto store = open();
  Task t = *store->load_task("old-1");
  CHECK(format_timestamp(t.created_at) == "2024-05-01T10:00:00.250Z");
  t.status = TaskStatus::kCompleted;
  t.started_at = t.created_at + std::chrono::milliseconds(1338);
  t.finished_at = t.created_at + std::chrono::milliseconds(1750);
  store->update_task(t, {event_for(t, TaskEvent::kCompleted)});
  store->flush();
  CHECK(store->stats().dropped_writes == 0);
  const Task back = *store->load_task("old-1");
  REQUIRE(back.started_at.has_value());
  REQUIRE(back.finished_at.has_value());
  CHECK(format_timestamp(*back.started_at) == "2024-05-01T10:00:01.588Z");
  CHECK(format_timestamp(*back.finished_at) == "2024-05-01T10:00:02.000Z");
  CHECK(*back.started_at < *back.finished_at);
  CHECK(scalar("SELECT count(*) FROM tasks WHERE started_at > 1714557601.5 AND started_at < "
               "1714557601.6") == 1);
}

STORE_CASE(
    "adopting: NOT NULL columns with a default get it where taskmgr has no value, and an empty "
    "failure reason is none") {
  exec(
      "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, service VARCHAR(50), status VARCHAR(20) "
      "NOT NULL DEFAULT 'pending', result TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT "
      "'', failure_reason VARCHAR(50) NOT NULL DEFAULT '', options TEXT NOT NULL DEFAULT '{}', "
      "created_at TIMESTAMP)");
  exec("INSERT INTO tasks (id, service, status) VALUES ('old-1', 'ocr', 'pending')");
  Config c = test_config();
  c.tasks.retry.backoff_base_seconds = 0;
  TaskManagerOptions mo;
  mo.store = open();
  mo.builtin_ocr = false;
  mo.log_sink = [](LogLevel, std::string_view) {};
  mo.services.push_back(make_function_service("ocr", [](TaskContext& ctx) {
    if (ctx.options_json().find("fail") != std::string::npos) throw std::runtime_error("asked to");
    ctx.set_result(R"({"ok":1})");
  }));
  std::string fresh, failing;
  {
    TaskManager tm(c, mo);
    CHECK(tm.get_task("old-1").failure_reason == TaskFailureReason::kNone);  // '' is none
    tm.start_task("old-1");
    REQUIRE(tm.wait_task("old-1", 30s).has_value());
    TaskCreateRequest r;
    r.service = "ocr";
    r.start = true;
    fresh = tm.create_task(r).id;  // no result, no error, no reason yet: the defaults
    r.options_json = R"({"fail":true})";
    failing = tm.create_task(r).id;
    REQUIRE(tm.wait_task(fresh, 30s).has_value());
    REQUIRE(tm.wait_task(failing, 30s).has_value());
    CHECK(tm.get_task_metrics().store.dropped_writes == 0);
    CHECK(tm.get_task_metrics().store.backlog == 0);
  }
  mo.store.reset();
  auto store = open();
  CHECK(store->load_task("old-1")->status == TaskStatus::kCompleted);
  const Task ok = *store->load_task(fresh);
  CHECK(ok.status == TaskStatus::kCompleted);
  CHECK(ok.result == R"({"ok":1})");
  CHECK(ok.failure_reason == TaskFailureReason::kNone);
  const Task bad = *store->load_task(failing);
  CHECK(bad.status == TaskStatus::kFailed);
  CHECK(bad.failure_reason == TaskFailureReason::kProcessingError);
  CHECK(bad.failure_message.find("asked to") != std::string::npos);
  CHECK(bad.options_json == R"({"fail":true})");
  // The completed task has no error and no reason: the columns' defaults.
  CHECK(scalar("SELECT count(*) FROM tasks WHERE error = '' AND failure_reason = '' AND id = '" +
               fresh + "'") == 1);
}

STORE_CASE("adopting: a tasks table that cannot be adopted is refused, untouched, saying why") {
  struct Case {
    const char* sql;
    const char* says;
  };
  const std::string long_id(40, 'x');
  const Case cases[] = {
      {"CREATE TABLE tasks (id INTEGER PRIMARY KEY, status TEXT); "
       "INSERT INTO tasks (id, status) VALUES (1, 'pending')",
       "tasks.id column is"},
      {"CREATE TABLE tasks (id VARCHAR(36), status TEXT); "
       "INSERT INTO tasks (id, status) VALUES ('a', 'pending')",
       "neither the primary key nor unique"},
      {"CREATE TABLE tasks (task_id VARCHAR(36) PRIMARY KEY, status TEXT); "
       "INSERT INTO tasks (task_id, status) VALUES ('a', 'pending')",
       "has no id column"},
      {"CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, status TEXT); "
       "INSERT INTO tasks (id, status) VALUES ('a', 'pending'); "
       "CREATE TABLE task_events (id INTEGER, what TEXT)",
       "task_events table already"},
  };
  for (const auto& k : cases) {
    CAPTURE(k.sql);
    exec("DROP TABLE IF EXISTS task_events; DROP TABLE IF EXISTS tasks");
    exec(k.sql);
    const std::string before = fingerprint();
    const std::string why = error_of([&] { open(); });
    CHECK(why.find(k.says) != std::string::npos);
    CHECK(why.find("cannot adopt") != std::string::npos);
    CHECK(why.find("not modified") != std::string::npos);
    CHECK(fingerprint() == before);
  }
  exec("DROP TABLE task_events; DROP TABLE tasks");
  exec("CREATE TABLE tasks (id VARCHAR(64) PRIMARY KEY, status TEXT)");
  exec("INSERT INTO tasks (id, status) VALUES ('" + long_id + "', 'pending')");
  const std::string before = fingerprint();
  const std::string why = error_of([&] { open(); });
  CHECK(why.find("its tasks.id values are up to 40 characters long") != std::string::npos);
  CHECK(fingerprint() == before);
}

STORE_CASE(
    "migrations: a taskmgr v1 database upgrades in place, its pending, queued and running "
    "tasks complete") {
  create_v1_schema();
  const char* const kRows[] = {
      "('00000000-0000-7000-8000-00000000000a', 'ocr', 2, 'pending', 0, NULL, "
      "'2024-05-01 10:00:00', NULL, NULL, NULL)",
      "('00000000-0000-7000-8000-00000000000b', 'ocr', 0, 'queued', 0, NULL, "
      "'2024-05-01 10:00:01', '2024-05-01 10:00:01.5', NULL, NULL)",
      "('00000000-0000-7000-8000-00000000000c', 'ocr', 0, 'running', 1, NULL, "
      "'2024-05-01 10:00:02', '2024-05-01 10:00:02', '2024-05-01 10:00:03', NULL)",
      "('00000000-0000-7000-8000-00000000000d', 'ocr', 0, 'completed', 1, '{\"text\":\"old\"}', "
      "'2024-05-01 10:00:04', '2024-05-01 10:00:04', '2024-05-01 10:00:05', "
      "'2024-05-01 10:00:06')",
  };
  for (const char* row : kRows) {
    exec(std::string("INSERT INTO tasks (id, service, priority, status, attempt, result, "
                     "created_at, queued_at, started_at, finished_at) VALUES ") +
         row);
  }
  {
    auto store = open();
    const auto pending = store->load_task("00000000-0000-7000-8000-00000000000a");
    REQUIRE(pending.has_value());
    CHECK(pending->status == TaskStatus::kPending);
    CHECK(pending->priority == 2);
    CHECK(format_timestamp(pending->created_at) == "2024-05-01T10:00:00.000Z");
    CHECK(pending->extra.empty());
    const auto queued = store->load_task("00000000-0000-7000-8000-00000000000b");
    REQUIRE(queued.has_value());
    CHECK(queued->status == TaskStatus::kQueued);
    CHECK(format_timestamp(*queued->queued_at) == "2024-05-01T10:00:01.500Z");
    const auto done = store->load_task("00000000-0000-7000-8000-00000000000d");
    REQUIRE(done.has_value());
    CHECK(done->status == TaskStatus::kCompleted);
    CHECK(format_timestamp(*done->finished_at) == "2024-05-01T10:00:06.000Z");
    CHECK(done->result == R"({"text":"old"})");
  }
  const auto spec = spec_columns();
  const auto cols = columns("tasks");
  CHECK(cols.size() == 17 + 5 + kSharedQueueColumns);
  for (const char* key : kSpecColumnNames) {
    const std::string k = key;
    CAPTURE(k);
    const std::string table = k.substr(0, k.find('.')), column = k.substr(k.find('.') + 1);
    CHECK(columns(table).at(column) == spec.at(k));
  }
  const std::string first = fingerprint();
  open().reset();
  CHECK(fingerprint() == first);

  Config c = test_config();
  c.tasks.retry.backoff_base_seconds = 0;
  TaskManagerOptions mo;
  mo.store = open();
  mo.builtin_ocr = false;
  mo.services.push_back(
      make_function_service("ocr", [](TaskContext& ctx) { ctx.set_result(R"({"text":"new"})"); }));
  TaskManager tm(c, mo);
  tm.start_task("00000000-0000-7000-8000-00000000000a");
  for (const char* id :
       {"00000000-0000-7000-8000-00000000000a", "00000000-0000-7000-8000-00000000000b",
        "00000000-0000-7000-8000-00000000000c"}) {
    CAPTURE(id);
    const auto t = tm.wait_task(id, 30s);
    REQUIRE(t.has_value());
    CHECK(t->status == TaskStatus::kCompleted);
    CHECK(t->result == R"({"text":"new"})");
  }
  const Task old = tm.get_task("00000000-0000-7000-8000-00000000000d");
  CHECK(old.status == TaskStatus::kCompleted);
  CHECK(old.result == R"({"text":"old"})");
  CHECK(tm.get_task("00000000-0000-7000-8000-00000000000c").attempt ==
        2);  // interrupted, run again
}

STORE_CASE("pauses: save_pause records and removes them, durably: a reopened store has them") {
  const Timestamp t0 = floor_to(std::chrono::system_clock::now(), std::chrono::milliseconds(1));
  {
    auto store = open();
    CHECK(store->load_pauses().empty());
    store->save_pause(PauseState{PauseScope::kDevice, "cuda:0", t0}, true);
    store->save_pause(PauseState{PauseScope::kService, "ocr \xC3\xA9", t0 + 1s}, true);
    store->save_pause(PauseState{PauseScope::kManager, "", t0 + 2s}, true);
    store->save_pause(PauseState{PauseScope::kManager, "", t0 + 3s}, true);  // again: its new since
    store->save_pause(PauseState{PauseScope::kService, "ocr \xC3\xA9", t0}, false);
    store->save_pause(PauseState{PauseScope::kService, "never paused", t0}, false);  // no row
  }
  auto store = open();
  const auto got = store->load_pauses();
  REQUIRE(got.size() == 2);
  CHECK(got[0].scope == PauseScope::kDevice);
  CHECK(got[0].name == "cuda:0");
  CHECK(got[0].since == t0);
  CHECK(got[1].scope == PauseScope::kManager);
  CHECK(got[1].name == "");
  CHECK(got[1].since == t0 + 3s);
  CHECK(scalar("SELECT count(*) FROM task_pauses") == 2);
}
