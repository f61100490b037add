// The SQLite store on real database files: migrations, round trips, the
// lock file, fault injection, and recovery through TaskManager.
#include <doctest/doctest.h>

#include <SQLiteCpp/SQLiteCpp.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// A fresh directory per test, removed at the end.

// The "existing" schema of the spec (version 1), as a fixture made by SQL.
constexpr const char* kV1Fixture = R"sql(
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
);
CREATE INDEX idx_tasks_status ON tasks(status);
INSERT INTO tasks (id, service, input_path, status, attempt, batch_size, result, created_at, finished_at)
  VALUES ('00000000-0000-7000-8000-000000000001', 'ocr', '/old/page1.png', 'completed', 1, 1,
          '{"text":"old"}', '2025-01-02T03:04:05.000Z', '2025-01-02T03:04:06.000Z');
INSERT INTO tasks (id, service, input_path, status, priority, created_at)
  VALUES ('00000000-0000-7000-8000-000000000002', 'ocr', '/old/page2.png', 'pending', 3,
          '2025-01-02T03:04:07.000Z');
PRAGMA user_version = 1;
)sql";

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Opening `path` is refused (kIncompatible) with a message that contains
// `says` and that it was not modified, and the file is byte-identical.
void check_refused_untouched(const std::string& path, const std::string& says) {
  const std::string before = slurp(path);
  try {
    open_sqlite_store(path);
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(m.find(says) != std::string::npos);
    CHECK(m.find("not modified") != std::string::npos);
  }
  CHECK(slurp(path) == before);
}

Task sample_task() {
  Task t;
  t.id = generate_task_id();
  t.service = "ocr";
  t.input.data = {0x89, 'P', 'N', 'G', 0, 1, 2};
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

}  // namespace

TEST_CASE("a write an adopted table's CHECK refuses is given up, and the writes after it go in") {
  TempDir dir;
  {
    SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec(
        "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, service TEXT, status TEXT CHECK "
        "(status IN ('pending', 'queued', 'running')), created_at TIMESTAMP)");
  }
  auto store = open_sqlite_store(dir.db());
  Task t = sample_task();
  Task u = sample_task();
  store->insert_task(t, event_for(t, TaskEvent::kCreated));
  store->insert_task(u, event_for(u, TaskEvent::kCreated));
  t.status = TaskStatus::kCompleted;  // a word the CHECK does not allow
  store->update_task(t, {event_for(t, TaskEvent::kCompleted)});
  store->flush();
  u.status = TaskStatus::kQueued;
  store->update_task(u, {event_for(u, TaskEvent::kQueued)});
  store->flush();
  const StoreStats st = store->stats();
  CHECK(st.dropped_writes == 1);
  CHECK(st.backlog == 0);
  CHECK(st.last_error.find("an update of task " + t.id + " was refused and given up") !=
        std::string::npos);
  CHECK(st.last_error.find("CHECK constraint failed") != std::string::npos);
  CHECK(store->load_task(u.id)->status == TaskStatus::kQueued);  // went in
  SQLite::Database db(dir.db(), SQLite::OPEN_READONLY);
  CHECK(db.execAndGet("SELECT status FROM tasks WHERE id = '" + u.id + "'").getString() ==
        "queued");
}

TEST_CASE("an insert committed with a write the database refuses is stored: one fails alone") {
  // A stranger's creates failed ("FOREIGN KEY constraint failed; the task
  // was not created") while updates of a deleted task were refused beside
  // them. Each round queues an update of a task with no row (its events
  // break the foreign key), then inserts a new task: the insert leads the
  // group commit that holds both.
  TempDir dir;
  auto store = open_sqlite_store(dir.db());
  for (int i = 0; i < 50; ++i) {
    Task ghost = sample_task();
    ghost.status = TaskStatus::kFailed;
    store->update_task(ghost, {event_for(ghost, TaskEvent::kFailed)});
    Task t = sample_task();
    CHECK_NOTHROW(store->insert_task(t, event_for(t, TaskEvent::kCreated)));
    CHECK(store->load_task(t.id).has_value());
  }
  store->flush();
  const StoreStats st = store->stats();
  CHECK(st.dropped_writes == 50);
  CHECK(st.backlog == 0);
  CHECK(store->list_tasks({}).size() == 50);
}

TEST_CASE(
    "close() reports writes the database refused for their data once: no retry can store them") {
  TempDir dir;
  {
    SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec(
        "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, service TEXT, status TEXT CHECK "
        "(status IN ('pending', 'queued', 'running')), created_at TIMESTAMP)");
  }
  Config c = test_config();
  c.storage.path = dir.db();
  TaskManagerOptions o;
  o.builtin_ocr = false;
  o.log_sink = [](LogLevel, std::string_view) {};
  o.services.push_back(make_function_service("svc", [](TaskContext&) {}));
  TaskManager tm(c, o);
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const std::string id = tm.create_task(r).id;
  REQUIRE(tm.wait_task(id, std::chrono::seconds(30)).has_value());
  try {
    tm.close();
    FAIL("expected kUnpersisted");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kUnpersisted);
    const std::string m = e.what();
    CHECK(m.find("refused by the database for their data and given up") != std::string::npos);
    CHECK(m.find("CHECK constraint failed") != std::string::npos);
    CHECK(m.find("No retry can store") != std::string::npos);
    CHECK(m.find("make room") == std::string::npos);  // room would not help
  }
  CHECK_NOTHROW(tm.close());  // reported once; nothing waits for a retry
  CHECK(tm.get_task_metrics().store.dropped_writes >= 1);
}

TEST_CASE("a v1 database with rows is upgraded in place: old rows keep their data") {
  TempDir dir;
  {
    SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec(kV1Fixture);
  }
  {
    auto store = open_sqlite_store(dir.db());
    const auto old = store->load_task("00000000-0000-7000-8000-000000000001");
    REQUIRE(old.has_value());
    CHECK(old->status == TaskStatus::kCompleted);
    CHECK(old->input.path == "/old/page1.png");
    CHECK(old->result == R"({"text":"old"})");
    CHECK(format_timestamp(old->created_at) == "2025-01-02T03:04:05.000Z");
    // The new columns carry their defaults.
    CHECK_FALSE(old->estimated_memory_mb.has_value());
    CHECK_FALSE(old->actual_memory_mb.has_value());
    CHECK_FALSE(old->assigned_device.has_value());
    CHECK_FALSE(old->service_instance_id.has_value());
    CHECK(old->resource_cleanup_completed == false);
    const auto unfinished = store->load_unfinished();
    REQUIRE(unfinished.size() == 1);
    CHECK(unfinished[0].priority == 3);
  }
  SQLite::Database db(dir.db(), SQLite::OPEN_READONLY);
  CHECK(db.execAndGet("PRAGMA user_version").getInt() == sqlite_schema_version());
  // Columns exactly as the spec lists them, with its default.
  std::map<std::string, std::pair<std::string, std::string>> cols;
  SQLite::Statement q(db, "SELECT name, type, dflt_value FROM pragma_table_info('tasks')");
  while (q.executeStep()) {
    cols[q.getColumn(0).getString()] = {q.getColumn(1).getString(),
                                        q.getColumn(2).isNull() ? "" : q.getColumn(2).getString()};
  }
  CHECK(cols.at("estimated_memory_mb").first == "INTEGER");
  CHECK(cols.at("actual_memory_mb").first == "INTEGER");
  CHECK(cols.at("assigned_device").first == "VARCHAR(50)");
  CHECK(cols.at("service_instance_id").first == "VARCHAR(100)");
  CHECK(cols.at("resource_cleanup_completed").first == "BOOLEAN");
  CHECK(cols.at("resource_cleanup_completed").second == "FALSE");
  for (const char* table : {"task_metrics", "task_events"}) {
    CAPTURE(table);
    CHECK(db.tableExists(table));
  }
  std::set<std::string> fk_targets;
  SQLite::Statement fk(db, "SELECT \"table\" FROM pragma_foreign_key_list('task_events')");
  while (fk.executeStep()) fk_targets.insert(fk.getColumn(0).getString());
  CHECK(fk_targets.count("tasks") == 1);
  CHECK(db.execAndGet("SELECT count(*) FROM tasks").getInt() == 2);
  CHECK(db.execAndGet("SELECT resource_cleanup_completed FROM tasks LIMIT 1").getInt() == 0);
}

TEST_CASE("opening twice is a no-op: a newer schema is refused and left untouched") {
  TempDir dir;
  {
    auto store = open_sqlite_store(dir.db());
    const Task t = sample_task();
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
  }
  std::string before;
  {
    auto store = open_sqlite_store(dir.db());  // already current
    CHECK(store->list_tasks({}).size() == 1);
  }
  {
    SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE);
    CHECK(db.execAndGet("PRAGMA user_version").getInt() == sqlite_schema_version());
    db.exec("PRAGMA user_version = 99");
  }
  before = slurp(dir.db());
  try {
    open_sqlite_store(dir.db());
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(std::string(e.what()).find("schema version 99") != std::string::npos);
  }
  CHECK(slurp(dir.db()) == before);
}

TEST_CASE("tasks, events and metric samples round-trip through the file") {
  TempDir dir;
  Task t = sample_task();
  {
    auto store = open_sqlite_store(dir.db());
    store->insert_task(t, event_for(t, TaskEvent::kCreated, R"({"device":"cpu"})"));
    t.status = TaskStatus::kRunning;
    t.attempt = 1;
    t.started_at = std::chrono::system_clock::now();
    t.service_instance_id = "ocr@cpu#1";
    store->update_task(
        t, {event_for(t, TaskEvent::kResourceAcquired), event_for(t, TaskEvent::kStarted)});
    MetricSample s;
    s.task_id = t.id;
    s.timestamp = std::chrono::system_clock::now();
    s.memory_usage_mb = 99;
    s.device = "cpu";
    s.processing_stage = "recognize";
    store->append_metrics({s});
    t.status = TaskStatus::kCompleted;
    t.result = R"({"text":"hi"})";
    t.actual_memory_mb = 99;
    t.finished_at = std::chrono::system_clock::now();
    t.resource_cleanup_completed = true;
    store->update_task(t, {event_for(t, TaskEvent::kCompleted)});
  }
  auto store = open_sqlite_store(dir.db());
  const auto back = store->load_task(t.id);
  REQUIRE(back.has_value());
  CHECK(back->input.data == t.input.data);
  CHECK(back->input.media_type == "image/png");
  CHECK(back->options_json == t.options_json);
  CHECK(back->status == TaskStatus::kCompleted);
  CHECK(back->result == t.result);
  CHECK(back->actual_memory_mb == 99);
  CHECK(back->estimated_memory_mb == 321);
  CHECK(back->service_instance_id == "ocr@cpu#1");
  CHECK(back->resource_cleanup_completed);
  CHECK(format_timestamp(back->created_at) == format_timestamp(t.created_at));
  CHECK(names(store->load_events(t.id)) ==
        std::vector<std::string>{"created", "resource_acquired", "started", "completed"});
  CHECK(store->load_events(t.id)[0].details_json == R"({"device":"cpu"})");
  const auto samples = store->load_metrics(t.id);
  REQUIRE(samples.size() == 1);
  CHECK(samples[0].processing_stage == "recognize");
  CHECK(store->load_unfinished().empty());
  TaskFilter f;
  f.status = TaskStatus::kCompleted;
  CHECK(store->list_tasks(f).size() == 1);
  f.status = TaskStatus::kFailed;
  CHECK(store->list_tasks(f).empty());
}

TEST_CASE("a second store on the same file is refused as in use") {
  TempDir dir;
  auto first = open_sqlite_store(dir.db());
  try {
    open_sqlite_store(dir.db());
    FAIL("expected kBusy");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kBusy);
    CHECK(std::string(e.what()).find("in use") != std::string::npos);
    CHECK(std::string(e.what()).find(std::to_string(::getpid())) != std::string::npos);
  }
  first.reset();
  CHECK_NOTHROW(open_sqlite_store(dir.db()));
}

// A database file whose growth a test can stop (a full disk) and allow again,
// behind a manager's options: the fault-injection tests share it.
struct DiskFile {
  TempDir dir;
  SqliteStoreOptions o;
  Config c = test_config();
  TaskManagerOptions mo;
  DiskFile() {
    o.page_limit = std::make_shared<std::atomic<std::int64_t>>(0);
    c.storage.path = dir.db();
    mo.store = open_sqlite_store(dir.db(), o);
    mo.log_sink = [](LogLevel, std::string_view) {};
  }
  // The file may not grow past its size now.
  void fill() {
    SQLite::Database db(dir.db(), SQLite::OPEN_READONLY);
    o.page_limit->store(db.execAndGet("PRAGMA page_count").getInt64());
  }
  void free_space() { o.page_limit->store(0); }
};

TEST_CASE("a full disk fails create_task clearly: accepted tasks are untouched: it recovers") {
  DiskFile f;
  TaskManager tm(f.c, f.mo);
  tm.register_service(make_function_service("svc", [](TaskContext&) {}));
  TaskCreateRequest r;
  r.service = "svc";
  std::vector<std::string> accepted;
  for (int i = 0; i < 5; ++i) accepted.push_back(tm.create_task(r).id);
  // The disk fills up: the database may not grow any more.
  f.fill();
  r.options_json = "{\"pad\":\"" + std::string(20000, 'x') + "\"}";
  int refused = 0;
  for (int i = 0; i < 20; ++i) {
    try {
      tm.create_task(r);
    } catch (const Error& e) {
      ++refused;
      CHECK(e.code() == ErrorCode::kIoError);
      CHECK(std::string(e.what()).find("full") != std::string::npos);
      CHECK(std::string(e.what()).find("not created") != std::string::npos);
    }
  }
  CHECK(refused > 0);
  for (const auto& id : accepted) CHECK(tm.get_task(id).status == TaskStatus::kPending);
  // Space returns: work goes on.
  f.free_space();
  r.options_json = "";
  const Task t = tm.create_task(r);
  tm.start_task(t.id);
  REQUIRE(eventually([&] { return tm.get_task(t.id).status == TaskStatus::kCompleted; }));
  for (const auto& id : accepted) tm.start_task(id);
  REQUIRE(tm.wait_idle(30s));
  for (const auto& id : accepted) CHECK(tm.get_task(id).status == TaskStatus::kCompleted);
}

TEST_CASE(
    "writes that fail while tasks run (disk full) are kept and retried in order: the file ends "
    "right") {
  DiskFile f;
  auto tm = std::make_unique<TaskManager>(f.c, f.mo);
  // Each task writes a large result and events: the row updates need pages.
  tm->register_service(make_function_service("svc", [](TaskContext& ctx) {
    ctx.stage("work");
    ctx.set_result("{\"pad\":\"" + std::string(8000, 'y') + "\"}");
  }));
  TaskCreateRequest r;
  r.service = "svc";
  std::vector<std::string> ids;
  for (int i = 0; i < 20; ++i) ids.push_back(tm->create_task(r).id);  // stored: durable
  tm->get_task_metrics();                                             // (nothing pending)
  f.fill();                                                           // the disk is full now
  for (const auto& id : ids) tm->start_task(id);
  REQUIRE(tm->wait_idle(30s));
  // In memory every task completed, with its events, whatever the file says.
  for (const auto& id : ids) CHECK(tm->get_task(id).status == TaskStatus::kCompleted);
  {
    SQLite::Database db(f.dir.db(), SQLite::OPEN_READONLY);
    CHECK(db.execAndGet("SELECT count(*) FROM tasks WHERE status='completed'").getInt() < 20);
  }
  // Monitoring sees it: failed writes, a backlog waiting (a read first:
  // every write queued before it has been tried).
  tm->list_tasks();
  const StoreStats full = tm->get_task_metrics().store;
  CHECK(full.failed_writes > 0);
  CHECK(full.backlog > 0);
  CHECK(full.dropped_writes == 0);
  CHECK(full.last_error.find("full") != std::string::npos);
  CHECK(full.last_error.find(f.dir.db()) != std::string::npos);
  CHECK(tm->get_task_metrics().to_json().find("\"last_error\":\"cannot write to ") !=
        std::string::npos);
  CHECK(tm->get_task_metrics().to_prometheus().find("taskmgr_store_backlog ") != std::string::npos);
  // Space returns: the backlog is written, in order, without any new write.
  f.free_space();
  REQUIRE(eventually([&] {
    SQLite::Database db(f.dir.db(), SQLite::OPEN_READONLY);
    return db.execAndGet(
                 "SELECT count(*) FROM tasks WHERE status='completed' AND "
                 "resource_cleanup_completed=1")
               .getInt() == 20;
  }));
  REQUIRE(eventually([&] { return tm->get_task_metrics().store.backlog == 0; }));
  // The manager kept serving, and the file now holds each task's full story.
  const Task t = tm->create_task(r);
  tm->start_task(t.id);
  REQUIRE(tm->wait_task(t.id, 30s));
  tm.reset();
  f.mo.store.reset();  // the last owner: closes the file
  TaskManagerOptions again;
  again.log_sink = f.mo.log_sink;
  TaskManager reopened(f.c, again);
  for (const auto& id : ids) {
    const Task back = reopened.get_task(id);
    CHECK(back.status == TaskStatus::kCompleted);
    CHECK(back.result.size() > 8000);
    CHECK(names(reopened.get_task_events(id)) ==
          std::vector<std::string>{"created", "queued", "resource_acquired", "started", "completed",
                                   "cleanup_started", "resource_released", "cleanup_completed"});
  }
}

// Log lines a manager wrote, for the tests that look for a warning.
class LogLines {
 public:
  LogSink sink() {
    return [this](LogLevel level, std::string_view line) {
      std::lock_guard<std::mutex> g(mu_);
      lines_.emplace_back(level, std::string(line));
    };
  }
  // How many lines at `level` hold `text`.
  int count(LogLevel level, const std::string& text) const {
    std::lock_guard<std::mutex> g(mu_);
    int n = 0;
    for (const auto& [l, line] : lines_) n += l == level && line.find(text) != std::string::npos;
    return n;
  }
  std::string first(const std::string& text) const {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& l : lines_) {
      if (l.second.find(text) != std::string::npos) return l.second;
    }
    return "";
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::pair<LogLevel, std::string>> lines_;
};

int completed_in_file(const std::string& db) {
  SQLite::Database d(db, SQLite::OPEN_READONLY);
  return d.execAndGet("SELECT count(*) FROM tasks WHERE status='completed'").getInt();
}

// get_task (memory) and list_tasks (the store) say the same of every task.
void check_reads_agree(TaskManager& tm, const std::vector<std::string>& ids) {
  std::map<std::string, TaskStatus> listed;
  for (const Task& t : tm.list_tasks()) listed[t.id] = t.status;
  TaskFilter completed;
  completed.status = TaskStatus::kCompleted;
  std::set<std::string> listed_completed;
  for (const Task& t : tm.list_tasks(completed)) listed_completed.insert(t.id);
  for (const auto& id : ids) {
    CAPTURE(id);
    const TaskStatus got = tm.get_task(id).status;
    REQUIRE(listed.count(id) == 1);
    CHECK(listed[id] == got);
    CHECK(listed_completed.count(id) == (got == TaskStatus::kCompleted ? 1u : 0u));
  }
}

TEST_CASE(
    "disk full mid-run: one warning, get and list agree, close() reports the unpersisted writes, "
    "and once space returns a second close() stores them") {
  DiskFile f;
  LogLines log;
  f.mo.log_sink = log.sink();
  auto tm = std::make_unique<TaskManager>(f.c, f.mo);
  tm->register_service(make_function_service("svc", [](TaskContext& ctx) {
    ctx.set_result("{\"pad\":\"" + std::string(8000, 'y') + "\"}");
  }));
  TaskCreateRequest r;
  r.service = "svc";
  std::vector<std::string> ids;
  for (int i = 0; i < 10; ++i) ids.push_back(tm->create_task(r).id);  // stored: durable
  f.fill();                                                           // the disk is full from here
  for (const auto& id : ids) tm->start_task(id);
  REQUIRE(tm->wait_idle(30s));
  for (const auto& id : ids) CHECK(tm->get_task(id).status == TaskStatus::kCompleted);
  // The file lags behind; the reads do not, and they agree with each other.
  CHECK(completed_in_file(f.dir.db()) < 10);
  check_reads_agree(*tm, ids);
  // A warning with the store's message, once for the whole episode.
  REQUIRE(eventually([&] { return log.count(LogLevel::kWarn, "store: writes fail") == 1; }));
  CHECK(log.first("store: writes fail").find("database or disk is full") != std::string::npos);
  const std::uint64_t waiting = tm->get_task_metrics().store.backlog;
  CHECK(waiting > 0);
  // close() names what is not in the store; the manager is closed all the same.
  try {
    tm->close();
    FAIL("close() returned normally with writes not in the store");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kUnpersisted);
    const std::string why = e.what();
    CHECK(why.find("not in the store") != std::string::npos);
    CHECK(why.find("database or disk is full") != std::string::npos);
    CHECK(why.find(f.dir.db()) != std::string::npos);
    CHECK(why.find(std::to_string(tm->get_task_metrics().store.unpersisted()) + " write(s)") !=
          std::string::npos);
  }
  CHECK(log.count(LogLevel::kError, "not in the store") >= 1);
  CHECK(log.count(LogLevel::kWarn, "store: writes fail") == 1);  // no flood
  CHECK_THROWS_AS(tm->create_task(r), Error);                    // closed
  check_reads_agree(*tm, ids);
  CHECK_THROWS_AS(tm->close(), Error);  // still full: said again
  // Space returns: a second close() stores the backlog and returns.
  f.free_space();
  CHECK_NOTHROW(tm->close());
  CHECK(completed_in_file(f.dir.db()) == 10);
  CHECK(tm->get_task_metrics().store.unpersisted() == 0);
  tm.reset();
  f.mo.store.reset();
  TaskManagerOptions again;
  again.log_sink = [](LogLevel, std::string_view) {};
  TaskManager reopened(f.c, again);
  for (const auto& id : ids) {
    const Task back = reopened.get_task(id);
    CHECK(back.status == TaskStatus::kCompleted);
    CHECK(back.resource_cleanup_completed);
    CHECK(names(reopened.get_task_events(id)) ==
          std::vector<std::string>{"created", "queued", "resource_acquired", "started", "completed",
                                   "cleanup_started", "resource_released", "cleanup_completed"});
  }
}

TEST_CASE(
    "a read-only database mid-run (SQLite's own SQLITE_READONLY): warned, reads agree, creates "
    "refused, and writable again the store catches up by itself") {
  // chmod cannot make the file read-only for the store: its connection has
  // the file open already, and the tests run as root. PRAGMA query_only on
  // the writer connection (SqliteStoreOptions::read_only) makes SQLite
  // itself refuse every write as on a read-only file.
  TempDir dir;
  SqliteStoreOptions o;
  o.read_only = std::make_shared<std::atomic<bool>>(false);
  LogLines log;
  Config c = test_config();
  TaskManagerOptions mo;
  mo.store = open_sqlite_store(dir.db(), o);
  mo.log_sink = log.sink();
  TaskManager tm(c, mo);
  tm.register_service(make_function_service("svc", [](TaskContext&) {}));
  TaskCreateRequest r;
  r.service = "svc";
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(tm.create_task(r).id);
  o.read_only->store(true);
  for (const auto& id : ids) tm.start_task(id);
  REQUIRE(tm.wait_idle(30s));
  CHECK(completed_in_file(dir.db()) == 0);
  check_reads_agree(tm, ids);
  for (const auto& id : ids) CHECK(tm.get_task(id).status == TaskStatus::kCompleted);
  REQUIRE(eventually([&] { return log.count(LogLevel::kWarn, "store: writes fail") == 1; }));
  CHECK(log.first("store: writes fail").find("readonly") != std::string::npos);
  std::string refused;
  try {
    tm.create_task(r);
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIoError);
    refused = e.what();
  }
  CHECK(refused.find("readonly") != std::string::npos);
  CHECK(refused.find("the task was not created") != std::string::npos);
  // Writable again: the backlog goes in without any new write, and the
  // manager says so.
  o.read_only->store(false);
  REQUIRE(eventually([&] { return completed_in_file(dir.db()) == 5; }));
  REQUIRE(eventually([&] { return log.count(LogLevel::kInfo, "store: caught up") == 1; }));
  check_reads_agree(tm, ids);
  CHECK_NOTHROW(tm.close());
  CHECK(log.count(LogLevel::kWarn, "store: writes fail") == 1);
}

TEST_CASE("storage.wal_max_mb bounds the WAL file: many writes, checkpoints keep it under 1 MiB") {
  TempDir dir;
  SqliteStoreOptions o;
  o.wal_max_mb = 1;
  auto store = open_sqlite_store(dir.db(), o);
  const std::string wal = dir.db() + "-wal";
  std::uintmax_t largest = 0;
  std::size_t written = 0;
  // ~8 MB through the WAL, one commit per task (each ~4 pages of 4 KiB).
  for (int i = 0; i < 600; ++i) {
    Task t = sample_task();
    t.id = generate_task_id();
    t.input = TaskInput{};
    t.options_json = "{\"pad\":\"" + std::string(12000, static_cast<char>('a' + i % 26)) + "\"}";
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
    written += t.options_json.size();
    largest = std::max(largest, fs::file_size(wal));
  }
  CHECK(written > 7000000u);
  CHECK(largest > 0);
  CHECK(largest <= 1024u * 1024);
  CHECK(store->list_tasks({}).size() == 600);
  CHECK(Config::from_yaml_string("storage: {wal_max_mb: 8}").storage.wal_max_mb == 8);
  CHECK_THROWS_WITH_AS(Config::from_yaml_string("storage: {wal_max_mb: 0}"),
                       doctest::Contains("storage.wal_max_mb"), ConfigError);
  CHECK_THROWS_WITH_AS(Config::from_yaml_string("storage: {max_backlog: 0}"),
                       doctest::Contains("storage.max_backlog"), ConfigError);
  CHECK_THROWS_WITH_AS(Config::from_yaml_string("storage: {url: 'postgresql:///x', wal_max_mb: 8}"),
                       doctest::Contains("storage.wal_max_mb"), ConfigError);
}

TEST_CASE(
    "storage.max_size_mb caps the database: past it create_task is refused, as on a full disk") {
  TempDir dir;
  Config c = test_config();
  c.storage.path = dir.db();
  c.storage.max_size_mb = 1;
  TaskManagerOptions mo;
  mo.log_sink = [](LogLevel, std::string_view) {};
  TaskManager tm(c, mo);
  tm.register_service(make_function_service("svc", [](TaskContext&) {}));
  TaskCreateRequest r;
  r.service = "svc";
  r.options_json = "{\"pad\":\"" + std::string(100000, 'x') + "\"}";  // ~100 KB a task
  int created = 0;
  std::string refusal;
  for (int i = 0; i < 40 && refusal.empty(); ++i) {
    try {
      tm.create_task(r);
      ++created;
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kIoError);
      refusal = e.what();
    }
  }
  CHECK(created >= 3);   // about 1 MiB of them fit
  CHECK(created <= 11);  // and not much more
  CHECK(refusal.find("full") != std::string::npos);
  CHECK(refusal.find("the task was not created") != std::string::npos);
  CHECK(tm.list_tasks().size() == static_cast<std::size_t>(created));
  CHECK(Config::from_yaml_string("storage: {max_size_mb: 5}").storage.max_size_mb == 5);
  CHECK_THROWS_WITH_AS(Config::from_yaml_string("storage: {max_size_mb: -1}"),
                       doctest::Contains("storage.max_size_mb"), ConfigError);
}

TEST_CASE(
    "reopening recovers: queued tasks run in priority order, interrupted ones are retried or "
    "failed") {
  TempDir dir;
  std::string queued_low, queued_high, interrupted, exhausted, pending, done;
  {
    auto store = open_sqlite_store(dir.db());
    auto put = [&](TaskStatus status, int priority, int attempt) {
      Task t = sample_task();
      t.input = TaskInput{};
      t.service = "svc";
      t.status = status;
      t.priority = priority;
      t.attempt = attempt;
      t.estimated_memory_mb = 10;
      t.queued_at = std::chrono::system_clock::now();
      store->insert_task(t, event_for(t, TaskEvent::kCreated));
      return t.id;
    };
    queued_low = put(TaskStatus::kQueued, 0, 0);
    queued_high = put(TaskStatus::kQueued, 5, 0);
    interrupted = put(TaskStatus::kRunning, 0, 1);
    exhausted = put(TaskStatus::kRunning, 0, 5);  // tasks.retry.max_interrupted_attempts
    pending = put(TaskStatus::kPending, 0, 0);
    done = put(TaskStatus::kCompleted, 0, 1);
  }
  Config c = test_config();
  c.storage.path = dir.db();
  c.executor.worker_threads = 1;
  std::vector<std::string> order;
  std::mutex mu;
  TaskManagerOptions mo;
  mo.log_sink = [](LogLevel, std::string_view) {};
  mo.services.push_back(make_function_service("svc", [&](TaskContext& ctx) {
    std::lock_guard<std::mutex> g(mu);
    order.push_back(ctx.task_id());
  }));
  TaskManager tm(c, mo);
  REQUIRE(tm.wait_idle(30s));
  CHECK(tm.get_task(queued_high).status == TaskStatus::kCompleted);
  CHECK(tm.get_task(queued_low).status == TaskStatus::kCompleted);
  const Task retried = tm.get_task(interrupted);
  CHECK(retried.status == TaskStatus::kCompleted);
  CHECK(retried.attempt == 2);
  const auto ev = tm.get_task_events(interrupted);
  bool saw_interrupted = false;
  for (const auto& e : ev) {
    if (e.event == TaskEvent::kRetried) {
      saw_interrupted = e.details_json.find("\"interrupted\"") != std::string::npos;
    }
  }
  CHECK(saw_interrupted);
  const Task gave_up = tm.get_task(exhausted);
  CHECK(gave_up.status == TaskStatus::kFailed);
  CHECK(gave_up.failure_reason == TaskFailureReason::kInterrupted);
  CHECK(gave_up.resource_cleanup_completed);
  CHECK(tm.get_task(pending).status == TaskStatus::kPending);
  CHECK(tm.get_task(done).status == TaskStatus::kCompleted);
  // The higher priority ran first among the recovered queue.
  REQUIRE(order.size() == 3);
  CHECK(order[0] == queued_high);
}

TEST_CASE(
    "after a restart an interrupted task, and a retry that was waiting, wait their backoff before "
    "they run again") {
  TempDir dir;
  std::string interrupted, queued, waiting;
  {
    auto store = open_sqlite_store(dir.db());
    auto put = [&](TaskStatus status, int attempt) {
      Task t = sample_task();
      t.input = TaskInput{};
      t.service = "svc";
      t.status = status;
      t.attempt = attempt;
      t.estimated_memory_mb = 10;
      t.queued_at = std::chrono::system_clock::now();
      store->insert_task(t, event_for(t, TaskEvent::kCreated));
      return t.id;
    };
    interrupted = put(TaskStatus::kRunning, 2);
    queued = put(TaskStatus::kQueued, 0);
    waiting = put(TaskStatus::kQueued, 1);  // ran once, waiting for its retry
  }
  Config c = test_config();
  c.storage.path = dir.db();
  c.tasks.retry.backoff_base_seconds = 10;  // after attempt 2: 10 s x 2
  auto clock = std::make_shared<ManualClock>();
  TaskManagerOptions mo;
  mo.clock = clock;
  mo.log_sink = [](LogLevel, std::string_view) {};
  mo.services.push_back(make_function_service("svc", [](TaskContext&) {}));
  TaskManager tm(c, mo);
  // The queued task runs at once; the interrupted one waits (status queued,
  // no new attempt), its retried event announcing the delay.
  REQUIRE(tm.wait_task(queued, 30s).has_value());
  std::this_thread::sleep_for(50ms);
  CHECK(tm.get_task(interrupted).status == TaskStatus::kQueued);
  CHECK(tm.get_task(interrupted).attempt == 2);
  CHECK_FALSE(tm.wait_idle(0s));
  tm.flush_events();
  std::string details;
  for (const auto& e : tm.get_task_events(interrupted)) {
    if (e.event == TaskEvent::kRetried) details = e.details_json;
  }
  CHECK(details.find("\"interrupted\"") != std::string::npos);
  CHECK(details.find("\"delay_s\":20") != std::string::npos);
  // A retry that was waiting when the process stopped waits its backoff
  // again, in full (10 s after attempt 1), and keeps its priority.
  CHECK(tm.get_task(waiting).attempt == 1);
  const int priority = tm.get_task(waiting).priority;
  clock->advance(11s);
  const auto second = tm.wait_task(waiting, 30s);
  REQUIRE(second.has_value());
  CHECK(second->attempt == 2);
  CHECK(second->priority == priority);
  clock->advance(8s);
  std::this_thread::sleep_for(50ms);
  CHECK(tm.get_task(interrupted).attempt == 2);
  clock->advance(2s);
  const auto done = tm.wait_task(interrupted, 30s);
  REQUIRE(done.has_value());
  CHECK(done->status == TaskStatus::kCompleted);
  CHECK(done->attempt == 3);
}

TEST_CASE("a manager on a database file keeps tasks and history across close and reopen") {
  TempDir dir;
  Config c = test_config();
  c.storage.path = dir.db();
  std::string id;
  {
    TaskManagerOptions mo;
    mo.services.push_back(make_function_service("svc", [](TaskContext& ctx) {
      ctx.stage("work");
      ctx.report_memory(7);
      ctx.set_result("{\"n\":1}");
    }));
    TaskManager tm(c, mo);
    TaskCreateRequest r;
    r.service = "svc";
    id = tm.create_task(r).id;
    tm.start_task(id);
    REQUIRE(tm.wait_task(id, 30s).has_value());
    // A second manager on the same file is refused while this one has it.
    try {
      TaskManager other(c);
      FAIL("expected kBusy");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kBusy);
    }
  }
  TaskManager tm(c);
  const Task t = tm.get_task(id);
  CHECK(t.status == TaskStatus::kCompleted);
  CHECK(t.result == "{\"n\":1}");
  CHECK(t.actual_memory_mb == 7);
  CHECK(t.resource_cleanup_completed);
  CHECK(names(tm.get_task_events(id)) ==
        std::vector<std::string>{"created", "queued", "resource_acquired", "started", "completed",
                                 "cleanup_started", "resource_released", "cleanup_completed"});
  CHECK(tm.get_task_samples(id).size() == 1);
  CHECK(tm.get_task_health(id).memory_usage_mb == 7);
}

TEST_CASE(
    "storage.retention_days deletes finished tasks, their events and samples: at open and hourly") {
  TempDir dir;
  Config c = test_config();
  c.storage.path = dir.db();
  c.storage.retention_days = 1;
  auto clock = std::make_shared<ManualClock>();
  auto svc = make_function_service("svc", [](TaskContext& ctx) {
    ctx.stage("work");
    ctx.set_result("{}");
  });
  auto open = [&] {
    TaskManagerOptions mo;
    mo.clock = clock;
    mo.services = {svc};
    return std::make_unique<TaskManager>(c, mo);
  };
  TaskCreateRequest r;
  r.service = "svc";
  std::string old_done, pending, recent_done;
  {
    auto tm = open();
    old_done = tm->create_task(r).id;
    tm->start_task(old_done);
    REQUIRE(tm->wait_task(old_done, 30s));
    pending = tm->create_task(r).id;  // never started: never pruned
    CHECK(tm->get_task_samples(old_done).size() == 1);

    // 25 hours later: the hourly sweep deletes the finished task (store and
    // memory); the pending one stays.
    clock->advance(std::chrono::hours(25));
    REQUIRE(eventually([&] {
      try {
        tm->get_task(old_done);
        return false;
      } catch (const Error& e) {
        return e.code() == ErrorCode::kNotFound;
      }
    }));
    CHECK(tm->get_task(pending).status == TaskStatus::kPending);
    recent_done = tm->create_task(r).id;
    tm->start_task(recent_done);
    REQUIRE(tm->wait_task(recent_done, 30s));
  }
  {
    SQLite::Database db(dir.db());
    CHECK(db.execAndGet("SELECT count(*) FROM tasks WHERE id='" + old_done + "'").getInt() == 0);
    CHECK(db.execAndGet("SELECT count(*) FROM task_events WHERE task_id='" + old_done + "'")
              .getInt() == 0);
    CHECK(db.execAndGet("SELECT count(*) FROM task_metrics WHERE task_id='" + old_done + "'")
              .getInt() == 0);
    CHECK(db.execAndGet("SELECT count(*) FROM tasks").getInt() == 2);
  }
  // Reopened two days later: the other finished task goes at open; the
  // pending one (unfinished) is still there, whatever its age.
  clock->advance(std::chrono::hours(48));
  auto tm = open();
  CHECK_THROWS_AS(tm->get_task(recent_done), Error);
  CHECK(tm->get_task(pending).status == TaskStatus::kPending);
  CHECK(tm->list_tasks().size() == 1);
  // With retention off (0), nothing is deleted.
  tm.reset();
  c.storage.retention_days = 0;
  clock->advance(std::chrono::hours(24 * 365));
  tm = open();
  CHECK(tm->get_task(pending).status == TaskStatus::kPending);
}

TEST_CASE("insert_tasks stores many tasks with their events in one commit, all or none") {
  TempDir dir;
  auto store = open_sqlite_store(dir.db());
  std::vector<NewTask> batch;
  for (int i = 0; i < 3; ++i) {
    NewTask n;
    n.task = sample_task();
    n.task.status = TaskStatus::kQueued;
    n.events = {event_for(n.task, TaskEvent::kCreated), event_for(n.task, TaskEvent::kQueued)};
    batch.push_back(n);
  }
  store->insert_tasks(batch);
  for (const auto& n : batch) {
    const auto t = store->load_task(n.task.id);
    REQUIRE(t.has_value());
    CHECK(t->status == TaskStatus::kQueued);
    CHECK(names(store->load_events(n.task.id)) == std::vector<std::string>{"created", "queued"});
  }
  // A batch with an id stored already fails as a whole: its new tasks are not kept.
  std::vector<NewTask> bad(2);
  bad[0].task = sample_task();
  bad[0].events = {event_for(bad[0].task, TaskEvent::kCreated)};
  bad[1] = batch[1];
  try {
    store->insert_tasks(bad);
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("none of them was created") != std::string::npos);
  }
  CHECK_FALSE(store->load_task(bad[0].task.id).has_value());
  CHECK(store->load_events(bad[0].task.id).empty());
  CHECK(store->list_tasks({}).size() == 3);
  // The memory store keeps the same promise.
  auto mem = make_memory_store();
  mem->insert_tasks(batch);
  CHECK_THROWS_AS(mem->insert_tasks(bad), Error);
  CHECK_FALSE(mem->load_task(bad[0].task.id).has_value());
  CHECK(mem->list_tasks({}).size() == 3);
  std::vector<NewTask> twice = {bad[0], bad[0]};
  CHECK_THROWS_AS(mem->insert_tasks(twice), Error);
  CHECK_FALSE(mem->load_task(bad[0].task.id).has_value());
  CHECK(mem->list_tasks({}).size() == 3);
}

TEST_CASE("a full disk fails create_tasks as a whole: nothing of the batch is kept") {
  DiskFile f;
  TaskManager tm(f.c, f.mo);
  tm.register_service(make_function_service("svc", [](TaskContext&) {}));
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const Task before = tm.create_task(r);
  REQUIRE(tm.wait_idle(30s));
  f.fill();
  r.options_json = "{\"pad\":\"" + std::string(20000, 'x') + "\"}";
  const std::vector<TaskCreateRequest> reqs(20, r);
  try {
    tm.create_tasks(reqs);
    FAIL("expected kIoError");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIoError);
    CHECK(std::string(e.what()).find("none of them was created") != std::string::npos);
  }
  CHECK(tm.list_tasks().size() == 1);
  CHECK(tm.get_task_metrics().queued_tasks.at("total") == 0);
  f.free_space();
  const auto made = tm.create_tasks(reqs);
  REQUIRE(tm.wait_idle(30s));
  for (const auto& t : made) CHECK(tm.get_task(t.id).status == TaskStatus::kCompleted);
  CHECK(tm.get_task(before.id).status == TaskStatus::kCompleted);
}

TEST_CASE("tasks created with start are in the file as queued when create_tasks returns") {
  TempDir dir;
  Config c = test_config();
  c.storage.path = dir.db();
  c.executor.worker_threads = 1;
  Gate gate;
  TaskManagerOptions mo;
  mo.log_sink = [](LogLevel, std::string_view) {};
  mo.services.push_back(make_function_service("svc", [&](TaskContext&) { gate.wait(); }));
  TaskManager tm(c, mo);
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const auto tasks = tm.create_tasks(std::vector<TaskCreateRequest>(4, r));
  // Another connection reads the file: every row is there, none pending, and
  // each has its created and queued events (one commit, before the return).
  SQLite::Database db(dir.db(), SQLite::OPEN_READONLY);
  for (const auto& t : tasks) {
    CAPTURE(t.id);
    SQLite::Statement q(db, "SELECT status FROM tasks WHERE id=?");
    q.bind(1, t.id);
    REQUIRE(q.executeStep());
    CHECK(q.getColumn(0).getString() != "pending");
    SQLite::Statement ev(db,
                         "SELECT event_type FROM task_events WHERE task_id=? ORDER BY id LIMIT 2");
    ev.bind(1, t.id);
    std::vector<std::string> names;
    while (ev.executeStep()) names.push_back(ev.getColumn(0).getString());
    CHECK(names == std::vector<std::string>{"created", "queued"});
  }
  gate.open();
  REQUIRE(tm.wait_idle(30s));
  for (const auto& t : tasks) CHECK(tm.get_task(t.id).status == TaskStatus::kCompleted);
}

TEST_CASE("group commit: callers that wait while a commit is in progress share the next one") {
  TempDir dir;
  auto store = open_sqlite_store(dir.db());
  SQLite::Database blocker(dir.db(), SQLite::OPEN_READWRITE);
  constexpr int kCallers = 8;
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const std::uint64_t before = store->stats().commits;
    // Another connection holds the write lock: the first caller's commit
    // waits for it (busy timeout) and every other caller queues meanwhile.
    blocker.exec("BEGIN IMMEDIATE");
    std::vector<std::thread> threads;
    for (int p = 0; p < kCallers; ++p) {
      threads.emplace_back([&] {
        const Task t = sample_task();
        store->insert_task(t, event_for(t, TaskEvent::kCreated));
      });
    }
    REQUIRE(eventually([&] { return store->stats().queued == kCallers; }));
    blocker.exec("COMMIT");
    for (auto& t : threads) t.join();
    // The first caller's commit, then one for the seven that waited (not one each).
    CHECK(store->stats().commits - before == 2);
    CHECK(store->stats().queued == 0);
  }
  CHECK(store->list_tasks({}).size() == 3 * kCallers);
  CHECK(store->stats().writes == 3 * kCallers);
}

TEST_CASE("group commit: callers calling again and again from many threads (informational ratio)") {
  TempDir dir;
  auto store = open_sqlite_store(dir.db());
  constexpr int kThreads = 8, kEach = 100;
  std::vector<std::thread> threads;
  for (int p = 0; p < kThreads; ++p) {
    threads.emplace_back([&] {
      for (int i = 0; i < kEach; ++i) {
        const Task t = sample_task();
        store->insert_task(t, event_for(t, TaskEvent::kCreated));
      }
    });
  }
  for (auto& t : threads) t.join();
  const StoreStats s = store->stats();
  // How much they share depends on scheduling (not asserted); every write
  // is in, each in exactly one commit.
  MESSAGE("commits " << s.commits << " for " << s.writes << " inserts from " << kThreads
                     << " threads");
  CHECK(s.writes == kThreads * kEach);
  CHECK(s.commits <= s.writes);
  CHECK(store->list_tasks({}).size() == kThreads * kEach);
}

TEST_CASE("both stores list tasks without their payloads when asked: everything else is there") {
  TempDir dir;
  const std::vector<std::shared_ptr<TaskStore>> stores = {make_memory_store(),
                                                          open_sqlite_store(dir.db())};
  for (const auto& store : stores) {
    CAPTURE(store->describe());
    Task a = sample_task(), b = sample_task();
    a.input = TaskInput{};
    a.input.data = {1, 2, 3};
    a.result = R"({"text":"a"})";
    a.status = TaskStatus::kCompleted;
    b.result = R"({"text":"b"})";
    store->insert_task(a, event_for(a, TaskEvent::kCreated));
    store->insert_task(b, event_for(b, TaskEvent::kCreated));
    TaskFilter f;
    f.with_payloads = false;
    const auto brief = store->list_tasks(f);
    REQUIRE(brief.size() == 2);
    CHECK(brief[0].id == a.id);  // oldest first, as always
    CHECK(brief[1].id == b.id);
    for (const auto& t : brief) {
      CHECK(t.result.empty());
      CHECK(t.input.data.empty());
    }
    CHECK(brief[0].status == TaskStatus::kCompleted);
    CHECK(brief[0].options_json == a.options_json);
    CHECK(brief[1].input.path == b.input.path);
    const auto whole = store->list_tasks(TaskFilter{});
    CHECK(whole[0].result == a.result);
    CHECK(whole[0].input.data == a.input.data);
    f.limit = 1;
    const auto newest = store->list_tasks(f);
    REQUIRE(newest.size() == 1);
    CHECK(newest[0].id == b.id);
  }
}

TEST_CASE("both stores keep each task's events in order with their details across updates") {
  TempDir dir;
  const std::vector<std::shared_ptr<TaskStore>> stores = {make_memory_store(),
                                                          open_sqlite_store(dir.db())};
  for (const auto& store : stores) {
    CAPTURE(store->describe());
    Task a = sample_task(), b = sample_task();
    std::vector<NewTask> batch(2);
    batch[0].task = a;
    batch[0].events = {event_for(a, TaskEvent::kCreated, R"({"n":"a0"})")};
    batch[1].task = b;
    batch[1].events = {
        event_for(b, TaskEvent::kCreated, R"({"n":"b0","long":")" + std::string(300, 'x') + "\"}")};
    store->insert_tasks(batch);
    // Interleaved updates of two tasks, several events each.
    a.status = TaskStatus::kRunning;
    store->update_task(a, {event_for(a, TaskEvent::kQueued, R"({"n":"a1"})"),
                           event_for(a, TaskEvent::kStarted, R"({"n":"a2"})")});
    b.status = TaskStatus::kQueued;
    store->update_task(b, {event_for(b, TaskEvent::kQueued, "{}")});
    a.status = TaskStatus::kCompleted;
    store->update_task(a, {event_for(a, TaskEvent::kCompleted, R"({"n":"a3"})")});
    const auto ea = store->load_events(a.id);
    REQUIRE(ea.size() == 4);
    CHECK(names(ea) == std::vector<std::string>{"created", "queued", "started", "completed"});
    CHECK(ea[0].details_json == R"({"n":"a0"})");
    CHECK(ea[2].details_json == R"({"n":"a2"})");
    CHECK(ea[3].details_json == R"({"n":"a3"})");
    for (const auto& e : ea) CHECK(e.task_id == a.id);
    const auto eb = store->load_events(b.id);
    REQUIRE(eb.size() == 2);
    CHECK(eb[0].details_json.size() > 300);
    CHECK(eb[1].details_json == "{}");
    CHECK(store->load_task(a.id)->status == TaskStatus::kCompleted);
    CHECK(store->load_task(b.id)->status == TaskStatus::kQueued);
    // Both number events in the order they were stored, from 1 up.
    CHECK(ea[0].sequence >= 1);
    CHECK(ea[0].sequence < eb[0].sequence);  // a's created, then b's created
    CHECK(eb[0].sequence < ea[1].sequence);  // then a's queued and started
    CHECK(ea[1].sequence < ea[2].sequence);
    CHECK(ea[2].sequence < eb[1].sequence);  // then b's queued
    CHECK(eb[1].sequence < ea[3].sequence);  // then a's completed
  }
}

// A commit that SqliteStoreOptions::before_commit can hold at a gate.
struct HeldCommit {
  std::atomic<bool> hold{false};
  std::thread::id held_on;  // the thread whose commit was held (first arrival)
  Gate gate;
};

TEST_CASE(
    "before_commit holds a commit: insert_tasks and reads wait for it, update_task does not") {
  TempDir dir;
  // Shared with the hook, which the store's threads call until it closes.
  auto held = std::make_shared<HeldCommit>();
  SqliteStoreOptions o;
  o.before_commit = [held] {
    if (!held->hold.load()) return;
    if (held->gate.arrived() == 0) held->held_on = std::this_thread::get_id();
    held->gate.arrive();
    held->gate.wait();
  };
  auto store = open_sqlite_store(dir.db(), o);
  struct OpenAtExit {
    Gate& gate;
    ~OpenAtExit() { gate.open(); }  // before the store closes, whatever failed
  } open_at_exit{held->gate};
  Task a = sample_task();
  store->insert_task(a, event_for(a, TaskEvent::kCreated));
  held->hold = true;
  // An update is queued: the writer thread commits it and stops at the gate.
  a.status = TaskStatus::kQueued;
  store->update_task(a, {event_for(a, TaskEvent::kQueued)});
  REQUIRE(eventually([&] { return held->gate.arrived() == 1; }));
  CHECK(held->held_on != std::this_thread::get_id());
  // While the commit is held, another update returns: it waits for a later commit.
  std::atomic<bool> updated{false}, inserted{false}, read_back{false};
  std::thread updater([&] {
    Task running = a;
    running.status = TaskStatus::kRunning;
    store->update_task(running, {event_for(running, TaskEvent::kStarted)});
    updated = true;
  });
  CHECK(eventually([&] { return updated.load(); }));
  // An insert and a read wait for it: neither returns while the gate is
  // closed (polled a while; not an assertion about time).
  const Task b = sample_task();
  std::thread inserter([&] {
    store->insert_task(b, event_for(b, TaskEvent::kCreated));
    inserted = true;
  });
  std::optional<Task> seen;
  std::thread reader([&] {
    seen = store->load_task(a.id);
    read_back = true;
  });
  CHECK_FALSE(eventually([&] { return inserted.load() || read_back.load(); }, 200ms));
  CHECK(held->gate.arrived() == 1);  // no other commit began meanwhile
  held->gate.open();
  updater.join();
  inserter.join();
  reader.join();
  CHECK(inserted.load());
  CHECK(read_back.load());
  // The read saw every write queued before it, the one queued during the hold too.
  REQUIRE(seen.has_value());
  CHECK(seen->status == TaskStatus::kRunning);
  CHECK(store->load_task(b.id).has_value());
  CHECK(names(store->load_events(a.id)) ==
        std::vector<std::string>{"created", "queued", "started"});
}

// Commits that fail: before_commit throws on the next `left` commits.
struct FailingCommits {
  std::atomic<int> left{0};
  bool std_exception = false;  // std::runtime_error, or an int (no std::exception)
  std::mutex mu;
  std::vector<std::thread::id> threads;  // where each failed commit ran
};

TEST_CASE(
    "a commit that throws anything fails only that commit: the writer thread goes on, writes are "
    "kept and retried") {
  TempDir dir;
  auto fail = std::make_shared<FailingCommits>();
  SqliteStoreOptions o;
  o.before_commit = [fail] {  // commits never run two at a time
    if (fail->left.load() == 0) return;
    fail->left.fetch_sub(1);
    {
      std::lock_guard<std::mutex> g(fail->mu);
      fail->threads.push_back(std::this_thread::get_id());
    }
    if (fail->std_exception) throw std::runtime_error("injected commit failure");
    throw 42;
  };
  auto store = open_sqlite_store(dir.db(), o);
  Task a = sample_task();
  store->insert_task(a, event_for(a, TaskEvent::kCreated));
  // The writer thread's commit of an update fails, and so does its retry
  // alone: the update waits in the backlog; the thread goes on.
  fail->left = 2;
  a.status = TaskStatus::kQueued;
  store->update_task(a, {event_for(a, TaskEvent::kQueued)});
  store->flush();  // returns once the write was tried
  CHECK(fail->left.load() == 0);
  {
    std::lock_guard<std::mutex> g(fail->mu);
    CHECK(fail->threads.size() == 2);
    for (const auto& id : fail->threads) CHECK(id != std::this_thread::get_id());
  }
  StoreStats s = store->stats();
  CHECK(s.failed_writes == 1);
  CHECK(s.dropped_writes == 0);
  // The writer thread retries the backlog by itself, and keeps writing.
  REQUIRE(eventually([&] { return store->stats().backlog == 0; }));
  CHECK(store->load_task(a.id)->status == TaskStatus::kQueued);
  a.status = TaskStatus::kRunning;
  store->update_task(a, {event_for(a, TaskEvent::kStarted)});
  CHECK(store->load_task(a.id)->status == TaskStatus::kRunning);
  CHECK(names(store->load_events(a.id)) ==
        std::vector<std::string>{"created", "queued", "started"});
  // An insert whose commits fail is refused to its caller as an Error, with
  // the failure's message when it has one; nothing of it is kept.
  for (const bool std_exception : {false, true}) {
    CAPTURE(std_exception);
    fail->std_exception = std_exception;
    fail->left = 2;
    const Task b = sample_task();
    try {
      store->insert_task(b, event_for(b, TaskEvent::kCreated));
      FAIL("expected an Error");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kIoError);
      CHECK(std::string(e.what()).find("the task was not created") != std::string::npos);
      if (std_exception) {
        CHECK(std::string(e.what()).find("injected commit failure") != std::string::npos);
      }
    }
    CHECK_FALSE(store->load_task(b.id).has_value());
  }
  const Task c = sample_task();
  store->insert_task(c, event_for(c, TaskEvent::kCreated));
  CHECK(store->load_task(c.id).has_value());
  CHECK(store->stats().failed_writes == 1);
}

TEST_CASE(
    "a -wal file of another database beside ours is refused: the file is left byte-identical") {
  TempDir dir;
  std::vector<std::string> ids;
  {
    auto store = open_sqlite_store(dir.db());
    for (int i = 0; i < 3; ++i) {
      Task t = sample_task();
      t.status = TaskStatus::kCompleted;
      t.resource_cleanup_completed = true;
      store->insert_task(t, event_for(t, TaskEvent::kCreated));
      ids.push_back(t.id);
    }
  }
  REQUIRE_FALSE(fs::exists(dir.db() + "-wal"));  // a clean close leaves none
  // Another database in WAL mode, open, whose last commit left it without
  // tables: its -wal file, copied beside ours (as an operator might).
  const std::string other = (dir.path / "other.db").string();
  {
    SQLite::Database o(other, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    o.exec("PRAGMA journal_mode=WAL");
    o.exec("PRAGMA wal_autocheckpoint=0");
    o.exec("CREATE TABLE scratch (x INTEGER)");
    o.exec("DROP TABLE scratch");
    REQUIRE(fs::file_size(other + "-wal") > 0);
    fs::copy_file(other + "-wal", dir.db() + "-wal");
  }
  const std::string db_before = slurp(dir.db());
  const std::string wal_before = slurp(dir.db() + "-wal");
  try {
    open_sqlite_store(dir.db());
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(m.find("reads as empty through the -wal file beside it") != std::string::npos);
    CHECK(m.find("the file alone holds tables task_events, task_inputs, task_metrics, task_pauses, "
                 "tasks") != std::string::npos);
    CHECK(m.find("nothing was modified") != std::string::npos);
  }
  CHECK(slurp(dir.db()) == db_before);
  CHECK(slurp(dir.db() + "-wal") == wal_before);
  // With the stray file moved away, every task is there.
  fs::remove(dir.db() + "-wal");
  fs::remove(dir.db() + "-shm");
  auto store = open_sqlite_store(dir.db());
  for (const auto& id : ids) {
    CAPTURE(id);
    REQUIRE(store->load_task(id).has_value());
    CHECK(store->load_task(id)->status == TaskStatus::kCompleted);
  }
}

TEST_CASE("a file that is not a SQLite database is refused, byte-identical, saying what it is") {
  TempDir dir;
  {
    std::ofstream out(dir.db(), std::ios::binary);
    for (int i = 0; i < 200; ++i) out << "id,status\n" << i << ",done\n";
  }
  const std::string before = slurp(dir.db());
  try {
    open_sqlite_store(dir.db());
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(m.find("is not a SQLite database") != std::string::npos);
    CHECK(m.find("beginning \"id,status.") != std::string::npos);
    CHECK(m.find("not modified") != std::string::npos);
  }
  CHECK(slurp(dir.db()) == before);
  CHECK_FALSE(fs::exists(dir.db() + "-wal"));
}

TEST_CASE(
    "adopting: an id unique only by a partial index or in another collation is refused "
    "untouched, and one unique in its own collation is adopted and its events are written") {
  struct Case {
    const char* ddl;
    bool adoptable;
  };
  const Case cases[] = {
      {"CREATE TABLE tasks (id VARCHAR(36), status TEXT); CREATE UNIQUE INDEX t_id ON tasks(id) "
       "WHERE id IS NOT NULL",
       false},
      {"CREATE TABLE tasks (id VARCHAR(36), status TEXT); CREATE UNIQUE INDEX t_id ON tasks(id "
       "COLLATE NOCASE)",
       false},
      {"CREATE TABLE tasks (id VARCHAR(36) COLLATE NOCASE UNIQUE, status TEXT)", true},
      {"CREATE TABLE tasks (id VARCHAR(36), status TEXT); CREATE UNIQUE INDEX t_id ON tasks(id)",
       true},
  };
  for (const auto& k : cases) {
    CAPTURE(k.ddl);
    TempDir dir;
    {
      SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
      db.exec(k.ddl);
      db.exec("INSERT INTO tasks (id, status) VALUES ('old-1', 'pending')");
    }
    if (!k.adoptable) {
      check_refused_untouched(dir.db(), "neither the primary key nor unique");
      continue;
    }
    auto store = open_sqlite_store(dir.db());
    Task t = *store->load_task("old-1");
    t.status = TaskStatus::kQueued;
    t.assigned_device = "cpu";
    store->update_task(t, {event_for(t, TaskEvent::kQueued)});
    store->flush();
    CHECK(store->stats().dropped_writes == 0);
    CHECK(store->stats().backlog == 0);
    CHECK(names(store->load_events("old-1")) == std::vector<std::string>{"queued"});
  }
}

TEST_CASE("adopting: ids that are not UTF-8 text are refused untouched, saying how many") {
  TempDir dir;
  {
    SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec("CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, status TEXT)");
    db.exec("INSERT INTO tasks VALUES ('good', 'pending')");
    db.exec("INSERT INTO tasks VALUES (CAST(X'6261642dff' AS TEXT), 'pending')");  // "bad-\xff"
    db.exec("INSERT INTO tasks VALUES (X'00ff', 'pending')");                      // a BLOB
  }
  check_refused_untouched(dir.db(), "2 of its tasks.id values are not UTF-8 text");
  check_refused_untouched(dir.db(), "the first reads 'bad-\xef\xbf\xbd'");  // with U+FFFD
}

TEST_CASE(
    "adopting: a STRICT table, or one whose status is generated or missing, is refused untouched") {
  struct Case {
    const char* ddl;
    const char* says;
  };
  const Case cases[] = {
      {"CREATE TABLE tasks (id TEXT PRIMARY KEY, status TEXT) STRICT", "the spec's changes failed"},
      {"CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, code INTEGER, status TEXT GENERATED "
       "ALWAYS AS (CASE WHEN code = 1 THEN 'completed' ELSE 'pending' END) VIRTUAL)",
       "no status column taskmgr can write"},
      {"CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, note TEXT)",
       "no status column taskmgr can write"},
  };
  for (const auto& k : cases) {
    CAPTURE(k.ddl);
    TempDir dir;
    {
      SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
      db.exec(k.ddl);
      db.exec("INSERT INTO tasks (id) VALUES ('old-1')");
    }
    check_refused_untouched(dir.db(), k.says);
  }
}

TEST_CASE(
    "allow_other_tables: taskmgr's tables beside another application's, which stay as they "
    "are") {
  TempDir dir;
  {
    SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)");
    db.exec("INSERT INTO users VALUES (7, 'ada')");
  }
  const std::string before = slurp(dir.db());
  try {
    open_sqlite_store(dir.db());
    FAIL("expected kIncompatible");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kIncompatible);
    CHECK(std::string(e.what()).find("storage.allow_other_tables") != std::string::npos);
  }
  CHECK(slurp(dir.db()) == before);
  SqliteStoreOptions o;
  o.allow_other_tables = true;
  {
    auto store = open_sqlite_store(dir.db(), o);
    const Task t = sample_task();
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
  }
  {
    auto store = open_sqlite_store(dir.db());  // versioned now: no option needed
    CHECK(store->list_tasks({}).size() == 1);
  }
  SQLite::Database db(dir.db(), SQLite::OPEN_READONLY);
  CHECK(db.execAndGet("SELECT name FROM users WHERE id = 7").getString() == "ada");
  // And through the configuration.
  Config c = test_config();
  c.storage.path = dir.db();
  CHECK_NOTHROW(TaskManager{c});
}

TEST_CASE("a status map that maps taskmgr's own words, or to 'unrecognized', is refused") {
  TempDir dir;
  SqliteStoreOptions o;
  o.adopt.status_map = {{"failed", TaskStatus::kCompleted}};
  CHECK_THROWS_WITH_AS(open_sqlite_store(dir.db(), o),
                       doctest::Contains("'failed' is taskmgr's own status word"), Error);
  o.adopt.status_map = {{"done", TaskStatus::kUnrecognized}};
  CHECK_THROWS_WITH_AS(open_sqlite_store(dir.db(), o), doctest::Contains("'done'"), Error);
  CHECK_FALSE(fs::exists(dir.db()));
}

TEST_CASE(
    "schema 3: input bytes live in task_inputs (moved there from an older database), a task's "
    "row stays small, listings give their length, and pruning deletes them") {
  TempDir dir;
  {
    SQLite::Database db(dir.db(), SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec(kV1Fixture);
    db.exec(
        "INSERT INTO tasks (id, service, input_data, input_media_type, status, created_at) "
        "VALUES ('00000000-0000-7000-8000-000000000003', 'ocr', X'89504E470001', 'image/png', "
        "'pending', '2025-01-02T03:04:08.000Z')");
  }
  Task big = sample_task();
  big.input.data.assign(std::size_t{1} << 20, 7);
  {
    auto store = open_sqlite_store(dir.db());
    const auto old = store->load_task("00000000-0000-7000-8000-000000000003");
    REQUIRE(old.has_value());
    CHECK(old->input.data == std::vector<std::uint8_t>{0x89, 'P', 'N', 'G', 0, 1});
    const auto unfinished = store->load_unfinished();
    REQUIRE(unfinished.size() == 2);
    CHECK(unfinished[1].input.data.empty());
    CHECK(unfinished[1].input.bytes() == 6);
    store->insert_task(big, event_for(big, TaskEvent::kCreated));
    TaskFilter f;
    f.with_payloads = false;
    const auto brief = store->list_tasks(f);
    REQUIRE(brief.size() == 4);
    CHECK(brief.back().id == big.id);
    CHECK(brief.back().input.data.empty());
    CHECK(brief.back().input.bytes() == big.input.data.size());
    CHECK(brief.front().input.bytes() == 0);  // a path input
    CHECK(store->load_task(big.id)->input.data == big.input.data);
    // Ended long ago, cleaned up: pruned with its input.
    big.status = TaskStatus::kCompleted;
    big.finished_at = big.created_at;
    big.resource_cleanup_completed = true;
    store->update_task(big, {});
    store->flush();
    {
      SQLite::Database db(dir.db(), SQLite::OPEN_READONLY);
      CHECK(db.execAndGet("PRAGMA user_version").getInt() == sqlite_schema_version());
      REQUIRE(db.tableExists("task_inputs"));
      // No task row holds input bytes: each is in task_inputs.
      CHECK(db.execAndGet("SELECT count(*) FROM tasks WHERE input_data IS NOT NULL").getInt() == 0);
      CHECK(db.execAndGet("SELECT count(*) FROM task_inputs").getInt() == 2);
      CHECK(db.execAndGet("SELECT max(length(data)) FROM task_inputs").getInt() == 1 << 20);
    }
    CHECK(store->prune_finished(big.created_at + std::chrono::seconds(1)) >= 1);
  }
  SQLite::Database db(dir.db(), SQLite::OPEN_READONLY);
  CHECK(db.execAndGet("SELECT count(*) FROM task_inputs").getInt() == 1);
  CHECK(db.execAndGet("SELECT count(*) FROM task_inputs WHERE task_id = "
                      "'00000000-0000-7000-8000-000000000003'")
            .getInt() == 1);
}

// ---- storage.vacuum ------------------------------------------------------------------------
namespace {
// A store on `db` with 120 ended tasks of 64 KiB inputs each (7.5 MiB),
// closed; returns their ids.
std::vector<std::string> fill_ended(const std::string& db, VacuumMode mode) {
  SqliteStoreOptions o;
  o.vacuum = mode;
  auto store = open_sqlite_store(db, o);
  std::vector<std::string> ids;
  for (int i = 0; i < 120; ++i) {
    Task t = sample_task();
    t.input.data.assign(64 * 1024, static_cast<std::uint8_t>(i));
    store->insert_task(t, event_for(t, TaskEvent::kCreated));
    t.status = TaskStatus::kCompleted;
    t.finished_at = std::chrono::system_clock::now();
    t.resource_cleanup_completed = true;
    store->update_task(t, {event_for(t, TaskEvent::kCompleted)});
    ids.push_back(t.id);
  }
  store->flush();
  return ids;
}

std::int64_t auto_vacuum_of(const std::string& db) {
  SQLite::Database f(db);
  return f.execAndGet("PRAGMA auto_vacuum").getInt64();
}
}  // namespace

TEST_CASE("storage.vacuum: after deletes the file shrinks (incremental, full) or keeps its size") {
  for (VacuumMode mode : {VacuumMode::kIncremental, VacuumMode::kFull, VacuumMode::kNone}) {
    CAPTURE(to_string(mode));
    TempDir dir;
    const std::string db = dir.db();
    const auto ids = fill_ended(db, mode);
    const auto full_size = fs::file_size(db);  // closed: the WAL is in the file
    CHECK(full_size > 7u * 1024 * 1024);
    CHECK(auto_vacuum_of(db) == (mode == VacuumMode::kIncremental ? 2 : 0));
    {
      SqliteStoreOptions o;
      o.vacuum = mode;
      auto store = open_sqlite_store(db, o);
      CHECK(store->delete_tasks(ids) == ids.size());
      CHECK(store->notices().empty());
      // What is on disk shrinks at once, the store still open: the WAL the
      // delete filled is emptied (it stayed until close: a stranger saw
      // db + WAL keep their size).
      const std::string wal = db + "-wal";
      const auto on_disk = fs::file_size(db) + (fs::exists(wal) ? fs::file_size(wal) : 0);
      CAPTURE(on_disk);
      CHECK(fs::file_size(wal) == 0);
      if (mode != VacuumMode::kNone) CHECK(on_disk < full_size / 8);
    }
    SQLite::Database f(db);
    CHECK(f.execAndGet("SELECT count(*) FROM tasks").getInt() == 0);
    CHECK(f.execAndGet("SELECT count(*) FROM task_inputs").getInt() == 0);
    const auto after = fs::file_size(db);
    CAPTURE(full_size);
    CAPTURE(after);
    if (mode == VacuumMode::kNone) {
      CHECK(after == full_size);  // the pages stay, free for reuse
    } else {
      CHECK(after < full_size / 8);
    }
  }
}

TEST_CASE(
    "storage.vacuum incremental converts a file made without it at a delete that frees a quarter "
    "of it, through retention's prune") {
  TempDir dir;
  const std::string db = dir.db();
  fill_ended(db, VacuumMode::kNone);  // an older file: auto_vacuum NONE
  REQUIRE(auto_vacuum_of(db) == 0);
  const auto full_size = fs::file_size(db);
  {
    auto store = open_sqlite_store(db);  // the default: incremental
    CHECK(store->prune_finished(std::chrono::system_clock::now() + std::chrono::hours(1)) == 120);
  }
  CHECK(auto_vacuum_of(db) == 2);  // converted: later deletes give pages back at once
  CHECK(fs::file_size(db) < full_size / 8);
  // And the next deletes shrink it without a VACUUM.
  const auto ids = fill_ended(db, VacuumMode::kIncremental);
  const auto again = fs::file_size(db);
  {
    auto store = open_sqlite_store(db);
    CHECK(store->delete_tasks(ids) == ids.size());
  }
  CHECK(fs::file_size(db) < again / 8);
}
