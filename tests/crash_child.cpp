// A host that the kill -9 tests kill at random points: it creates, starts
// and completes tasks on a database as fast as it can and prints "ACK <id>"
// for every task create_task accepted (the durability promise). The
// database is a SQLite file, or a PostgreSQL connection string (postgresql://
// or key=value) with the schema to use.
//
// With TASKMGR_CRASH_SELFKILL=1 it is instead a host whose one task kills
// it: the service sends SIGKILL to its own process at once. It creates that
// task when the database has none, waits until nothing runs, prints IDLE
// and exits 0 (once the task ran out of attempts).
//
// With TASKMGR_CRASH_CONTROL=1 it is a host killed right after its
// controls return: it makes a task that fails and a pending one, then
// retries the first and sets the second's priority to 7, prints "IDS
// <failed> <pending>" and sends itself SIGKILL at once.
#include <taskmgr/taskmgr.hpp>

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: taskmgr_crash_child SQLITE_FILE | PG_URL [SCHEMA]\n");
    return 2;
  }
  taskmgr::Config config;
  const std::string db = argv[1];
  if (db.rfind("postgres", 0) == 0 || db.find('=') != std::string::npos) {
    config.storage.url = db;
    if (argc > 2) config.storage.postgres.schema = argv[2];
  } else {
    config.storage.path = db;
  }
  config.executor.worker_threads = 2;
  config.tasks.max_queue_size = 100000;
  config.devices.probe_nvidia = false;
  config.tasks.retry.backoff_base_seconds = 0.001;
  config.tasks.retry.backoff_jitter = 0;
  taskmgr::TaskManagerOptions options;
  options.log_sink = [](taskmgr::LogLevel, std::string_view) {};
  if (const char* s = std::getenv("TASKMGR_CRASH_CONTROL"); s && std::string(s) == "1") {
    options.services.push_back(taskmgr::make_function_service("svc", [](taskmgr::TaskContext& ctx) {
      if (ctx.attempt() == 1) throw taskmgr::InvalidInputError("first attempt fails");
      std::this_thread::sleep_for(std::chrono::seconds(30));  // the retry: killed while it runs
    }));
    taskmgr::TaskManager tm(config, options);
    taskmgr::TaskCreateRequest req;
    req.service = "svc";
    req.start = true;
    const std::string failed = tm.create_task(req).id;
    if (!tm.wait_task(failed, std::chrono::seconds(60))) return 1;
    req.start = false;
    const std::string pending = tm.create_task(req).id;
    tm.retry_task(failed);
    tm.set_task_priority(pending, 7);
    std::printf("IDS %s %s\n", failed.c_str(), pending.c_str());
    std::fflush(stdout);
    ::raise(SIGKILL);
  }
  if (const char* s = std::getenv("TASKMGR_CRASH_SELFKILL"); s && std::string(s) == "1") {
    options.services.push_back(
        taskmgr::make_function_service("svc", [](taskmgr::TaskContext&) { ::raise(SIGKILL); }));
    taskmgr::TaskManager tm(config, options);
    std::printf("READY\n");
    std::fflush(stdout);
    if (tm.list_tasks().empty()) {
      taskmgr::TaskCreateRequest req;
      req.service = "svc";
      req.start = true;
      std::printf("ACK %s\n", tm.create_task(req).id.c_str());
      std::fflush(stdout);
    }
    if (!tm.wait_idle(std::chrono::seconds(60))) return 1;
    std::printf("IDLE\n");
    return 0;
  }
  options.services.push_back(taskmgr::make_function_service("svc", [](taskmgr::TaskContext& ctx) {
    thread_local std::mt19937 rng{std::random_device{}()};
    ctx.stage("work");
    ctx.report_memory(5);
    if (rng() % 10 == 0) throw taskmgr::OutOfMemoryError("injected");  // retried
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
    ctx.set_result("{}");
  }));
  taskmgr::TaskManager tm(config, options);
  std::printf("READY\n");
  std::fflush(stdout);
  taskmgr::TaskCreateRequest req;
  req.service = "svc";
  std::mt19937 rng{std::random_device{}()};
  for (;;) {
    const taskmgr::Task t = tm.create_task(req);
    std::printf("ACK %s\n", t.id.c_str());
    std::fflush(stdout);
    if (rng() % 8 != 0) tm.start_task(t.id);  // some stay pending
    if (rng() % 16 == 0) tm.cancel_task(t.id);
  }
}
