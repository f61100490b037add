// Full task lifecycles per second through TaskManager (create -> start ->
// run a no-op service -> complete -> cleanup, every event delivered to one
// subscriber, in-memory store), against the rate of posting the same no-op
// work straight to a Boost.Asio thread pool of the same size, in the same run.
//
//   bench_lifecycle [--tasks N] [--runs R] [--workers W]
//
// Prints one line per run and the medians; docs/PERFORMANCE.md records them.
#include <sys/resource.h>
#include <taskmgr/taskmgr.hpp>

#include <algorithm>
#include <atomic>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// CPU seconds (user + system) this process has used so far.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Raw ceiling: N posts of a no-op to a pool of `workers` threads.
double asio_rate(int n, int workers) {
  boost::asio::thread_pool pool(static_cast<std::size_t>(workers));
  std::atomic<int> done{0};
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    boost::asio::post(pool, [&done] { done.fetch_add(1, std::memory_order_relaxed); });
  }
  pool.join();
  const double s = seconds_since(t0);
  if (done.load() != n) std::abort();
  return n / s;
}

struct Lifecycle {
  double rate = 0;
  double wait_p50 = 0;
  double wait_p99 = 0;
  double create_p50_us = 0;
  double create_p99_us = 0;
  std::uint64_t events = 0;
  double submit_share = 0;  // part of the run the host spent creating and starting
  double cpu_us = 0;        // CPU time (all threads) per lifecycle
};

Lifecycle taskmgr_rate(int n, int workers, int batch) {
  taskmgr::Config config;
  config.executor.worker_threads = workers;
  config.tasks.max_queue_size = n + 1;
  config.storage.path = ":memory:";
  taskmgr::TaskManagerOptions options;
  options.services.push_back(taskmgr::make_function_service("noop", [](taskmgr::TaskContext&) {}));
  taskmgr::TaskManager tm(config, options);
  std::atomic<std::uint64_t> events{0};
  tm.subscribe(
      [&events](const taskmgr::EventRecord&) { events.fetch_add(1, std::memory_order_relaxed); });
  taskmgr::TaskCreateRequest req;
  req.service = "noop";
  std::vector<double> create_us;
  create_us.reserve(static_cast<std::size_t>(n));
  const auto t0 = Clock::now();
  const double cpu0 = cpu_seconds();
  if (batch == 0) {  // create_task, then start_task: two calls per task
    for (int i = 0; i < n; ++i) {
      const auto c0 = Clock::now();
      const taskmgr::Task t = tm.create_task(req);
      create_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - c0).count());
      tm.start_task(t.id);
    }
  } else {  // create_tasks with start: `batch` tasks created and queued per call
    req.start = true;
    const std::vector<taskmgr::TaskCreateRequest> reqs(static_cast<std::size_t>(batch), req);
    for (int i = 0; i < n; i += batch) {
      const auto c0 = Clock::now();
      if (batch == 1) {
        tm.create_task(req);
      } else {
        tm.create_tasks(reqs);
      }
      create_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - c0).count());
    }
  }
  const double submit_s = seconds_since(t0);
  if (!tm.wait_idle(std::chrono::minutes(10))) std::abort();
  tm.flush_events();  // every event delivered to the subscriber
  const double s = seconds_since(t0);
  Lifecycle r;
  r.cpu_us = (cpu_seconds() - cpu0) * 1e6 / n;
  r.rate = n / s;
  const auto m = tm.get_task_metrics();
  if (m.tasks_completed != static_cast<std::uint64_t>(n)) std::abort();
  r.wait_p50 = m.wait_time.p50_s;
  r.wait_p99 = m.wait_time.p99_s;
  std::sort(create_us.begin(), create_us.end());
  r.create_p50_us = create_us[create_us.size() / 2];
  r.create_p99_us = create_us[create_us.size() * 99 / 100];
  r.events = events.load();
  if (r.events != 8ULL * static_cast<std::uint64_t>(n))
    std::abort();  // 8 events per lifecycle, all delivered
  r.submit_share = submit_s / s;
  return r;
}

const char* mode_name(int batch) {
  return batch == 0   ? "create_task + start_task"
         : batch == 1 ? "create_task(start)"
                      : "create_tasks";
}

}  // namespace

int main(int argc, char** argv) {
  int tasks = 100000, runs = 5, workers = 2, batch = 100;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tasks"))
      tasks = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--runs"))
      runs = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--workers"))
      workers = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--batch"))
      batch = std::atoi(argv[i + 1]);
  }
  if (tasks < 1 || runs < 1 || workers < 1 || batch < 2) {
    std::fprintf(stderr,
                 "usage: bench_lifecycle [--tasks N] [--runs R] [--workers W] [--batch B>=2]\n");
    return 2;
  }
  std::printf(
      "bench_lifecycle: %d tasks, %d workers, %d runs; modes: create_task + start_task, "
      "create_task(start), create_tasks of %d (with start)\n",
      tasks, workers, runs, batch);
  const int modes[] = {0, 1, batch};
  std::vector<double> raw;
  std::vector<std::vector<double>> rate(3), ratio(3), p50(3), p99(3), c50(3), c99(3), cpu(3);
  for (int r = 0; r < runs; ++r) {
    const double a = asio_rate(tasks * 4, workers);
    raw.push_back(a);
    std::printf("run %d: asio %.0f posts/s\n", r + 1, a);
    for (int m = 0; m < 3; ++m) {
      const Lifecycle l = taskmgr_rate(tasks, workers, modes[m]);
      rate[m].push_back(l.rate);
      ratio[m].push_back(a / l.rate);
      p50[m].push_back(l.wait_p50 * 1e6);
      p99[m].push_back(l.wait_p99 * 1e6);
      c50[m].push_back(l.create_p50_us);
      c99[m].push_back(l.create_p99_us);
      cpu[m].push_back(l.cpu_us);
      std::printf(
          "  %-26s %7.0f lifecycles/s  asio/taskmgr %5.1fx  queue->start p50 %6.0f us p99 %7.0f us "
          " "
          "call p50 %6.1f us p99 %7.1f us  CPU %4.1f us/lifecycle  host busy %3.0f%%\n",
          mode_name(modes[m]), l.rate, a / l.rate, l.wait_p50 * 1e6, l.wait_p99 * 1e6,
          l.create_p50_us, l.create_p99_us, l.cpu_us, l.submit_share * 100);
    }
  }
  std::printf("median of %d runs: asio %.0f posts/s (target: taskmgr >= 1/30 of it)\n", runs,
              median(raw));
  for (int m = 0; m < 3; ++m) {
    std::printf(
        "  %-26s %7.0f lifecycles/s  asio/taskmgr %5.1fx  queue->start p50 %6.0f us p99 %7.0f us  "
        "call p50 %6.1f us p99 %7.1f us  CPU %4.1f us/lifecycle\n",
        mode_name(modes[m]), median(rate[m]), median(ratio[m]), median(p50[m]), median(p99[m]),
        median(c50[m]), median(c99[m]), median(cpu[m]));
  }
  return 0;
}
