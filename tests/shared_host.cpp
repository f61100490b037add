// One host of a shared queue (storage.shared) for the multi-process tests
// (test_shared_hosts.cpp): a TaskManager on a PostgreSQL schema that other
// hosts share, with 2 workers and one service, "work", that sleeps for the
// milliseconds its options name ({"ms":N}) and records every execution.
//
//   taskmgr_shared_host URL SCHEMA HOST_NAME LOG_FILE CREATE
//                       [LEASE_S HEARTBEAT_S [MS_MIN MS_MAX]]
//
// It opens the manager and prints READY; creates CREATE tasks (started,
// random priority 0-9, each to sleep a random MS_MIN-MS_MAX ms, default
// 1-20) and prints "CREATED <n>"; then runs
// until SIGTERM, closes the manager and prints CLOSED. Every execution of
// the service appends to LOG_FILE (one write(2) per line, so a SIGKILL
// leaves whole lines):
//
//   start <task> <attempt> <pid>     the service began
//   end <task> <attempt> <pid>       it finished (and set its result)
//   fenced <task> <attempt> <pid>    the manager discarded that attempt's
//                                    result: its claim was lost
//
// The result a task keeps is {"pid":P,"attempt":A}: which execution's
// effect the store holds. With TASKMGR_HOST_SHARED=0 the store is not
// shared (one host owns the schema: the single-host baseline of
// bench/shared_hosts.sh).
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

#include "taskmgr/taskmgr.hpp"

namespace {

int g_log = -1;

void log_line(const char* what, const std::string& task, int attempt) {
  char line[160];
  const int n = std::snprintf(line, sizeof line, "%s %s %d %d\n", what, task.c_str(), attempt,
                              static_cast<int>(::getpid()));
  if (n > 0 && ::write(g_log, line, static_cast<std::size_t>(n)) != n) std::abort();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr,
                 "usage: taskmgr_shared_host URL SCHEMA HOST_NAME LOG_FILE CREATE [LEASE_S "
                 "HEARTBEAT_S [MS_MIN MS_MAX]]\n");
    return 2;
  }
  g_log = ::open(argv[4], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (g_log < 0) {
    std::perror(argv[4]);
    return 2;
  }
  // SIGTERM is taken by sigwait below: blocked in every thread the manager
  // starts.
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &term, nullptr);

  taskmgr::Config config;
  config.storage.url = argv[1];
  config.storage.postgres.schema = argv[2];
  // TASKMGR_HOST_SHARED=0: a single host that owns the schema (the
  // baseline of bench/shared_hosts.sh).
  const char* shared = std::getenv("TASKMGR_HOST_SHARED");
  config.storage.shared = shared == nullptr || std::string(shared) != "0";
  config.storage.cluster.host_name = argv[3];
  config.storage.cluster.lease_seconds = argc > 6 ? std::atof(argv[6]) : 5;
  config.storage.cluster.heartbeat_seconds = argc > 7 ? std::atof(argv[7]) : 1;
  config.storage.cluster.poll_seconds = 0.5;
  config.executor.worker_threads = 2;
  config.tasks.max_queue_size = 100000;
  config.devices.probe_nvidia = false;
  config.tasks.retry.max_attempts = 1000;  // a task killed many times still completes
  config.tasks.retry.backoff_base_seconds = 0.001;
  config.tasks.retry.backoff_jitter = 0;

  taskmgr::TaskManagerOptions options;
  options.builtin_ocr = false;
  options.log_sink = [](taskmgr::LogLevel level, std::string_view message) {
    if (level >= taskmgr::LogLevel::kWarn)
      std::fprintf(stderr, "host %d: %.*s\n", static_cast<int>(::getpid()),
                   static_cast<int>(message.size()), message.data());
  };
  options.services.push_back(taskmgr::make_function_service("work", [](taskmgr::TaskContext& ctx) {
    log_line("start", ctx.task_id(), ctx.attempt());
    // {"ms":N}, or {"ms": N} as a JSONB column gives it back.
    const std::string& o = ctx.options_json();
    const auto colon = o.find(':');
    const int ms = colon == std::string::npos ? 0 : std::atoi(o.c_str() + colon + 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    ctx.set_result("{\"pid\":" + std::to_string(::getpid()) +
                   ",\"attempt\":" + std::to_string(ctx.attempt()) + "}");
    log_line("end", ctx.task_id(), ctx.attempt());
  }));
  // What this host's subscribers are told: "fenced" (a lost claim's
  // cancelled) and "told" (completed), with the attempt.
  options.subscribers.push_back([](const taskmgr::EventRecord& e) {
    const bool fenced = e.event == taskmgr::TaskEvent::kCancelled &&
                        e.details_json.find("lost claim") != std::string::npos;
    if (fenced || e.event == taskmgr::TaskEvent::kCompleted) {
      int attempt = 0;
      const auto at = e.details_json.find("\"attempt\":");
      if (at != std::string::npos) attempt = std::atoi(e.details_json.c_str() + at + 10);
      log_line(fenced ? "fenced" : "told", e.task_id, attempt);
    }
  });

  taskmgr::TaskManager tm(config, options);
  std::printf("READY\n");
  std::fflush(stdout);
  const long create = std::atol(argv[5]);
  const int ms_min = argc > 8 ? std::atoi(argv[8]) : 1;
  const int ms_max = argc > 9 ? std::atoi(argv[9]) : 20;
  std::mt19937 rng(static_cast<unsigned>(::getpid()));
  for (long i = 0; i < create; ++i) {
    taskmgr::TaskCreateRequest req;
    req.service = "work";
    req.start = true;
    req.priority = static_cast<int>(rng() % 10);
    req.options_json =
        "{\"ms\":" +
        std::to_string(ms_min +
                       static_cast<int>(rng() % static_cast<unsigned>(ms_max - ms_min + 1))) +
        "}";
    tm.create_task(req);
  }
  std::printf("CREATED %ld\n", create);
  std::fflush(stdout);
  int sig = 0;
  sigwait(&term, &sig);
  tm.close();
  std::printf("CLOSED\n");
  std::fflush(stdout);
  return 0;
}
