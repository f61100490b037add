// Durable task lifecycles per second with the SQLite store (every state
// change and event committed, synchronous=NORMAL, WAL), 2 workers, a no-op
// service, against the raw ceiling of this machine in the same run: plain
// sqlite3 inserts and updates of the same rows, 1,000 tasks per transaction.
//
//   bench_store [--tasks N] [--runs R] [--producers P] [--batch B] [--dir DIR]
//
// Three ways to submit, each timed from the first call to the last write:
//  * create_task then start_task from one host thread: every task waits for a
//    commit of its own (the ceiling is one commit per task);
//  * create_task with start from P host threads at once (default 16):
//    concurrent calls share commits (group commit);
//  * create_tasks of B tasks with start (default 100): one commit per call.
// After each run the file is checked: every task completed with its cleanup
// done, and 8 events per task stored.
//
// With --postgres URL (e.g. under tests/with_postgres.sh, which exports
// TASKMGR_TEST_PG_URL for a throwaway cluster: --postgres env), the same
// three ways with the PostgreSQL store instead, against its own ceiling in
// the same run: plain libpq writing the same rows (per task 1 insert, 2
// updates and 8 event inserts, into the tables taskmgr's migration made)
// in pipeline mode, 1,000 tasks per transaction.
#include <libpq-fe.h>
#include <sqlite3.h>
#include <taskmgr/taskmgr.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using SteadyClock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void check(int rc, sqlite3* db, const char* what) {
  if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) {
    std::fprintf(stderr, "%s: %s\n", what, sqlite3_errmsg(db));
    std::exit(1);
  }
}

// Raw ceiling: per task 1 insert + 2 updates + 4 event inserts, the same
// columns and indexes as taskmgr's schema, 1,000 tasks per transaction.
double raw_sqlite(const std::string& path, int n) {
  sqlite3* db = nullptr;
  check(sqlite3_open(path.c_str(), &db), db, "open");
  check(sqlite3_exec(
            db,
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
            "CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY NOT NULL, service TEXT, status TEXT,"
            " attempt INTEGER, created_at TEXT, started_at TEXT, finished_at TEXT,"
            " estimated_memory_mb INTEGER, assigned_device TEXT, resource_cleanup_completed "
            "BOOLEAN DEFAULT FALSE);"
            "CREATE INDEX idx_tasks_status ON tasks(status);"
            "CREATE TABLE task_events (id INTEGER PRIMARY KEY, task_id VARCHAR(36) REFERENCES "
            "tasks(id),"
            " event_type TEXT, timestamp TEXT, details TEXT);"
            "CREATE INDEX idx_task_events_task ON task_events(task_id, id);",
            nullptr, nullptr, nullptr),
        db, "schema");
  sqlite3_stmt *ins, *upd, *ev;
  sqlite3_prepare_v2(db,
                     "INSERT INTO tasks (id, service, status, attempt, created_at, "
                     "estimated_memory_mb, assigned_device) VALUES (?,?,?,?,?,?,?)",
                     -1, &ins, nullptr);
  sqlite3_prepare_v2(db,
                     "UPDATE tasks SET status=?, attempt=?, started_at=?, finished_at=?, "
                     "resource_cleanup_completed=? WHERE id=?",
                     -1, &upd, nullptr);
  sqlite3_prepare_v2(
      db, "INSERT INTO task_events (task_id, event_type, timestamp, details) VALUES (?,?,?,?)", -1,
      &ev, nullptr);
  const std::string ts = taskmgr::format_timestamp(std::chrono::system_clock::now());
  const char* details = "{\"device\":\"cpu\",\"attempt\":1}";
  const auto t0 = SteadyClock::now();
  for (int i = 0; i < n; ++i) {
    if (i % 1000 == 0)
      check(sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), db, "begin");
    const std::string id = taskmgr::generate_task_id();
    sqlite3_bind_text(ins, 1, id.c_str(), -1, SQLITE_STATIC);
    sqlite3_bind_text(ins, 2, "noop", -1, SQLITE_STATIC);
    sqlite3_bind_text(ins, 3, "pending", -1, SQLITE_STATIC);
    sqlite3_bind_int(ins, 4, 0);
    sqlite3_bind_text(ins, 5, ts.c_str(), -1, SQLITE_STATIC);
    sqlite3_bind_int(ins, 6, 16);
    sqlite3_bind_text(ins, 7, "cpu", -1, SQLITE_STATIC);
    check(sqlite3_step(ins), db, "insert");
    sqlite3_reset(ins);
    for (const char* st : {"running", "completed"}) {
      sqlite3_bind_text(upd, 1, st, -1, SQLITE_STATIC);
      sqlite3_bind_int(upd, 2, 1);
      sqlite3_bind_text(upd, 3, ts.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_text(upd, 4, ts.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_int(upd, 5, 1);
      sqlite3_bind_text(upd, 6, id.c_str(), -1, SQLITE_STATIC);
      check(sqlite3_step(upd), db, "update");
      sqlite3_reset(upd);
    }
    for (const char* e : {"created", "started", "completed", "cleanup_completed"}) {
      sqlite3_bind_text(ev, 1, id.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_text(ev, 2, e, -1, SQLITE_STATIC);
      sqlite3_bind_text(ev, 3, ts.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_text(ev, 4, details, -1, SQLITE_STATIC);
      check(sqlite3_step(ev), db, "event");
      sqlite3_reset(ev);
    }
    if (i % 1000 == 999 || i == n - 1)
      check(sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr), db, "commit");
  }
  const double s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  sqlite3_finalize(ins);
  sqlite3_finalize(upd);
  sqlite3_finalize(ev);
  sqlite3_close(db);
  return n / s;
}

// Outside the timing: the file holds every task completed with its cleanup
// done and all 8 events of each lifecycle.
void verify(const std::string& path, int n) {
  sqlite3* db = nullptr;
  check(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), db, "open for verify");
  auto count = [db](const char* sql) {
    sqlite3_stmt* st = nullptr;
    check(sqlite3_prepare_v2(db, sql, -1, &st, nullptr), db, sql);
    check(sqlite3_step(st), db, sql);
    const long long v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
  };
  const long long done =
      count("SELECT count(*) FROM tasks WHERE status='completed' AND resource_cleanup_completed=1");
  const long long events = count("SELECT count(*) FROM task_events");
  sqlite3_close(db);
  if (done != n || events != 8LL * n) {
    std::fprintf(stderr, "verify %s: %lld of %d tasks completed, %lld events (expected %lld)\n",
                 path.c_str(), done, n, events, 8LL * n);
    std::exit(1);
  }
}

struct Result {
  double rate = 0, create_p50_us = 0, create_p99_us = 0;
};

// One run of taskmgr on the store `config.storage` names; `verify` checks
// the database afterwards, outside the timing.
Result taskmgr_run(taskmgr::Config config, int n, int producers, int batch,
                   const std::function<void()>& verify) {
  config.executor.worker_threads = 2;
  config.tasks.max_queue_size = n + 1;
  taskmgr::TaskManagerOptions options;
  options.services.push_back(taskmgr::make_function_service("noop", [](taskmgr::TaskContext&) {}));
  taskmgr::TaskManager tm(config, options);
  taskmgr::TaskCreateRequest req;
  req.service = "noop";
  std::vector<std::vector<double>> per(static_cast<std::size_t>(producers));
  const auto t0 = SteadyClock::now();
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      auto& us = per[static_cast<std::size_t>(p)];
      if (batch == 0) {  // create_task, then start_task
        for (int i = p; i < n; i += producers) {
          const auto c0 = SteadyClock::now();
          const taskmgr::Task t = tm.create_task(req);
          us.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - c0).count());
          tm.start_task(t.id);
        }
        return;
      }
      // create_tasks with start: `batch` tasks created, queued and committed per call
      taskmgr::TaskCreateRequest r = req;
      r.start = true;
      for (int i = p * batch; i < n; i += producers * batch) {
        const std::vector<taskmgr::TaskCreateRequest> reqs(
            static_cast<std::size_t>(std::min(batch, n - i)), r);
        const auto c0 = SteadyClock::now();
        if (batch == 1) {
          tm.create_task(r);
        } else {
          tm.create_tasks(reqs);
        }
        us.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - c0).count());
      }
    });
  }
  for (auto& t : threads) t.join();
  std::vector<double> create_us;
  for (auto& v : per) create_us.insert(create_us.end(), v.begin(), v.end());
  if (!tm.wait_idle(std::chrono::minutes(10))) std::abort();
  tm.close();  // every write committed
  Result r;
  r.rate = n / std::chrono::duration<double>(SteadyClock::now() - t0).count();
  verify();
  std::sort(create_us.begin(), create_us.end());
  r.create_p50_us = create_us[create_us.size() / 2];
  r.create_p99_us = create_us[create_us.size() * 99 / 100];
  return r;
}

// ---- PostgreSQL ------------------------------------------------------------------

[[noreturn]] void pg_die(PGconn* c, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", what.c_str(), c != nullptr ? PQerrorMessage(c) : "");
  std::exit(1);
}

PGconn* pg_connect(const std::string& url) {
  PGconn* c = PQconnectdb(url.c_str());
  if (PQstatus(c) != CONNECTION_OK) pg_die(c, "connect");
  return c;
}

void pg_exec(PGconn* c, const std::string& sql) {
  PGresult* r = PQexec(c, sql.c_str());
  const auto st = PQresultStatus(r);
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) pg_die(c, sql);
  PQclear(r);
}

long long pg_count(PGconn* c, const std::string& sql) {
  PGresult* r = PQexec(c, sql.c_str());
  if (PQresultStatus(r) != PGRES_TUPLES_OK) pg_die(c, sql);
  const long long v = std::atoll(PQgetvalue(r, 0, 0));
  PQclear(r);
  return v;
}

// A fresh schema with taskmgr's tables, made by its own migration.
void fresh_schema(const std::string& url, const std::string& schema) {
  PGconn* c = pg_connect(url);
  pg_exec(c, "SET client_min_messages = warning; DROP SCHEMA IF EXISTS " + schema + " CASCADE");
  PQfinish(c);
  taskmgr::PostgresStoreOptions o;
  o.schema = schema;
  taskmgr::open_postgres_store(url, o).reset();
}

// Raw ceiling: per task 1 insert (queued), 8 event inserts and 2 updates
// (running, completed with its cleanup), the rows and columns taskmgr
// writes, prepared statements in pipeline mode, 1,000 tasks per
// transaction (a sync point every 100 tasks inside it reads the answers, so
// that they never fill the socket while statements are still being sent).
double raw_libpq(const std::string& url, int n) {
  const std::string schema = "bench_raw";
  fresh_schema(url, schema);
  PGconn* c = pg_connect(url);
  pg_exec(c, "SET search_path TO " + schema + "; SET synchronous_commit = on");
  auto prepare = [&](const char* name, const char* sql) {
    PGresult* r = PQprepare(c, name, sql, 0, nullptr);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) pg_die(c, std::string("prepare ") + name);
    PQclear(r);
  };
  prepare("ins",
          "INSERT INTO tasks (id, service, options, priority, status, attempt, batch_size, "
          "created_at, queued_at, estimated_memory_mb, assigned_device, "
          "resource_cleanup_completed) VALUES ($1, $2, NULL, 0, 'queued', 0, 1, $3, $3, 16, "
          "'cpu', FALSE)");
  prepare("upd",
          "UPDATE tasks SET status = $2, attempt = 1, started_at = $3, finished_at = $4, "
          "service_instance_id = 'noop@cpu#1', resource_cleanup_completed = $5 WHERE id = $1");
  prepare("ev",
          "INSERT INTO task_events (task_id, event_type, timestamp, details) VALUES ($1, $2, $3, "
          "$4)");
  const std::string ts = "2026-12-02 20:00:00.123456";
  const char* details = "{\"device\":\"cpu\",\"attempt\":1}";
  static const char* kEvents[] = {"created",           "queued",           "resource_acquired",
                                  "started",           "completed",        "cleanup_started",
                                  "resource_released", "cleanup_completed"};
  if (PQenterPipelineMode(c) != 1) pg_die(c, "pipeline mode");
  int sent = 0;  // statements sent since the last sync
  auto send = [&](const char* stmt, int nparams, const char* const* values) {
    if (PQsendQueryPrepared(c, stmt, nparams, values, nullptr, nullptr, 0) != 1) pg_die(c, stmt);
    ++sent;
  };
  auto send_sql = [&](const char* sql) {
    if (PQsendQueryParams(c, sql, 0, nullptr, nullptr, nullptr, nullptr, 0) != 1) pg_die(c, sql);
    ++sent;
  };
  // Sends a sync point and reads every answer up to it.
  auto sync = [&] {
    if (PQpipelineSync(c) != 1) pg_die(c, "sync");
    int results = 0;
    for (;;) {
      PGresult* r = PQgetResult(c);
      if (r == nullptr) continue;  // the end of one statement's results
      const auto st = PQresultStatus(r);
      PQclear(r);
      if (st == PGRES_PIPELINE_SYNC) break;
      if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) pg_die(c, "a pipelined statement");
      ++results;
    }
    if (results != sent) pg_die(c, "pipeline: answers missing");
    sent = 0;
  };
  const auto t0 = SteadyClock::now();
  for (int i = 0; i < n; ++i) {
    if (i % 1000 == 0) send_sql("BEGIN ISOLATION LEVEL READ COMMITTED");
    const std::string id = taskmgr::generate_task_id();
    const char* ins[] = {id.c_str(), "noop", ts.c_str()};
    send("ins", 3, ins);
    for (const char* e : kEvents) {
      const char* ev[] = {id.c_str(), e, ts.c_str(), details};
      send("ev", 4, ev);
    }
    const char* running[] = {id.c_str(), "running", ts.c_str(), nullptr, "false"};
    send("upd", 5, running);
    const char* done[] = {id.c_str(), "completed", ts.c_str(), ts.c_str(), "true"};
    send("upd", 5, done);
    if (i % 1000 == 999 || i == n - 1) {
      send_sql("COMMIT");
      sync();
    } else if (i % 100 == 99) {
      sync();
    }
  }
  const double s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  PQexitPipelineMode(c);
  if (pg_count(c, "SELECT count(*) FROM tasks WHERE status = 'completed'") != n ||
      pg_count(c, "SELECT count(*) FROM task_events") != 8LL * n) {
    pg_die(c, "raw libpq: the rows are not all there");
  }
  PQfinish(c);
  return n / s;
}

void verify_pg(const std::string& url, const std::string& schema, int n) {
  PGconn* c = pg_connect(url);
  pg_exec(c, "SET search_path TO " + schema);
  const long long done = pg_count(
      c, "SELECT count(*) FROM tasks WHERE status = 'completed' AND resource_cleanup_completed");
  const long long events = pg_count(c, "SELECT count(*) FROM task_events");
  PQfinish(c);
  if (done != n || events != 8LL * n) {
    std::fprintf(stderr, "verify %s: %lld of %d tasks completed, %lld events (expected %lld)\n",
                 schema.c_str(), done, n, events, 8LL * n);
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int tasks = 20000, runs = 3, producers = 16, batch = 100;
  std::string dir = fs::temp_directory_path().string();
  std::string pg_url;  // --postgres: the PostgreSQL store instead of SQLite
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tasks"))
      tasks = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--runs"))
      runs = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--dir"))
      dir = argv[i + 1];
    else if (!std::strcmp(argv[i], "--producers"))
      producers = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--batch"))
      batch = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--postgres"))
      pg_url = argv[i + 1];
  }
  if (pg_url == "env") {
    const char* url = std::getenv("TASKMGR_TEST_PG_URL");
    if (url == nullptr || *url == '\0') {
      std::fprintf(stderr,
                   "bench_store: --postgres env, but TASKMGR_TEST_PG_URL is not set (run it "
                   "under tests/with_postgres.sh)\n");
      return 2;
    }
    pg_url = url;
  }
  if (tasks < 1 || runs < 1 || producers < 1 || batch < 2) {
    std::fprintf(stderr,
                 "usage: bench_store [--tasks N] [--runs R] [--producers P] [--batch B>=2] "
                 "[--dir D] [--postgres URL|env]\n");
    return 2;
  }
  const bool pg = !pg_url.empty();
  const char* ceiling = pg ? "raw libpq" : "raw sqlite3";
  std::printf(
      "bench_store: %s, %d tasks, 2 workers, %d runs%s%s; modes: create_task + start_task "
      "(1 host thread), create_task(start) from %d host threads, create_tasks of %d\n",
      pg ? "PostgreSQL" : "SQLite", tasks, runs, pg ? "" : ", files in ", pg ? "" : dir.c_str(),
      producers, batch);
  struct Mode {
    const char* name;
    int producers, batch;
  };
  const Mode modes[] = {{"create_task + start_task", 1, 0},
                        {"create_task(start) x P", producers, 1},
                        {"create_tasks", 1, batch}};
  std::vector<double> raw;
  std::vector<std::vector<double>> rate(3), p50(3), p99(3);
  for (int r = 0; r < runs; ++r) {
    const std::string a = dir + "/bench_raw.db", b = dir + "/bench_tm.db";
    auto clean = [](const std::string& f) {
      for (const char* sfx : {"", "-wal", "-shm", ".lock"}) fs::remove(f + sfx);
    };
    double rr = 0;
    if (pg) {
      rr = raw_libpq(pg_url, tasks);
    } else {
      clean(a);
      rr = raw_sqlite(a, tasks);
      clean(a);
    }
    raw.push_back(rr);
    std::printf("run %d: %s %.0f lifecycles/s\n", r + 1, ceiling, rr);
    for (int m = 0; m < 3; ++m) {
      taskmgr::Config config;
      std::function<void()> verify_run;
      if (pg) {
        const std::string schema = "bench_tm";
        {
          PGconn* c = pg_connect(pg_url);
          pg_exec(
              c, "SET client_min_messages = warning; DROP SCHEMA IF EXISTS " + schema + " CASCADE");
          PQfinish(c);
        }
        config.storage.url = pg_url;
        config.storage.postgres.schema = schema;
        verify_run = [&pg_url, schema, tasks] { verify_pg(pg_url, schema, tasks); };
      } else {
        clean(b);
        config.storage.path = b;
        verify_run = [b, tasks] { verify(b, tasks); };
      }
      const Result t = taskmgr_run(config, tasks, modes[m].producers, modes[m].batch, verify_run);
      if (!pg) clean(b);
      rate[m].push_back(t.rate);
      p50[m].push_back(t.create_p50_us);
      p99[m].push_back(t.create_p99_us);
      std::printf("  %-26s %6.0f lifecycles/s (%.2f of raw)  call p50 %7.1f us p99 %8.1f us\n",
                  modes[m].name, t.rate, t.rate / rr, t.create_p50_us, t.create_p99_us);
    }
  }
  if (pg) {
    std::printf("median of %d runs: %s %.0f lifecycles/s (bar: create_tasks >= 0.5 of it)\n", runs,
                ceiling, median(raw));
  } else {
    std::printf("median of %d runs: %s %.0f lifecycles/s (target: taskmgr >= 20000/s)\n", runs,
                ceiling, median(raw));
  }
  for (int m = 0; m < 3; ++m) {
    std::printf("  %-26s %6.0f lifecycles/s (%.2f of raw)  call p50 %7.1f us p99 %8.1f us\n",
                modes[m].name, median(rate[m]), median(rate[m]) / median(raw), median(p50[m]),
                median(p99[m]));
  }
  return 0;
}
