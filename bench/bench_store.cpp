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
#include <sqlite3.h>
#include <taskmgr/taskmgr.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
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

Result taskmgr_sqlite(const std::string& path, int n, int producers, int batch) {
  taskmgr::Config config;
  config.storage.path = path;
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
  verify(path, n);
  std::sort(create_us.begin(), create_us.end());
  r.create_p50_us = create_us[create_us.size() / 2];
  r.create_p99_us = create_us[create_us.size() * 99 / 100];
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int tasks = 20000, runs = 3, producers = 16, batch = 100;
  std::string dir = fs::temp_directory_path().string();
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
  }
  if (tasks < 1 || runs < 1 || producers < 1 || batch < 2) {
    std::fprintf(
        stderr,
        "usage: bench_store [--tasks N] [--runs R] [--producers P] [--batch B>=2] [--dir D]\n");
    return 2;
  }
  std::printf(
      "bench_store: %d tasks, 2 workers, %d runs, files in %s; modes: create_task + start_task "
      "(1 host thread), create_task(start) from %d host threads, create_tasks of %d\n",
      tasks, runs, dir.c_str(), producers, batch);
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
    clean(a);
    const double rr = raw_sqlite(a, tasks);
    clean(a);
    raw.push_back(rr);
    std::printf("run %d: raw sqlite3 %.0f lifecycles/s\n", r + 1, rr);
    for (int m = 0; m < 3; ++m) {
      clean(b);
      const Result t = taskmgr_sqlite(b, tasks, modes[m].producers, modes[m].batch);
      clean(b);
      rate[m].push_back(t.rate);
      p50[m].push_back(t.create_p50_us);
      p99[m].push_back(t.create_p99_us);
      std::printf("  %-26s %6.0f lifecycles/s (%.2f of raw)  call p50 %7.1f us p99 %8.1f us\n",
                  modes[m].name, t.rate, t.rate / rr, t.create_p50_us, t.create_p99_us);
    }
  }
  std::printf("median of %d runs: raw sqlite3 %.0f lifecycles/s (target: taskmgr >= 20000/s)\n",
              runs, median(raw));
  for (int m = 0; m < 3; ++m) {
    std::printf("  %-26s %6.0f lifecycles/s (%.2f of raw)  call p50 %7.1f us p99 %8.1f us\n",
                modes[m].name, median(rate[m]), median(rate[m]) / median(raw), median(p50[m]),
                median(p99[m]));
  }
  return 0;
}
