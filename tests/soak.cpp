// The soak: a steady mixed load for a set time, sampling the process's
// resources, failing when any of them grows without bound after warm-up or
// when a task is lost or ends twice (docs/RELIABILITY.md).
//
//   taskmgr_soak [--seconds N] [--sample-seconds S] [--dir DIR] [--page IMAGE]
//
// Load (one host thread submitting, paced): no-op tasks; OCR pages (a page
// rendered with text2image, or --page); tasks that run out of memory on a
// declared GPU and fall back to the CPU; slow tasks cancelled while queued
// or running; bursts that overflow tasks.max_queue_size (the refused tasks
// are cancelled); retention pruning (storage.retention_days = 20 s). Every
// --sample-seconds it records resident memory, open file descriptors, the
// task temp dirs on disk, the database and WAL sizes, and the queue wait of
// the tasks that started in the interval. After the run: every task created
// has exactly one terminal event; the resources of the last third of the run
// are no higher than those of the middle third (plus a small tolerance); the
// store holds no more tasks than were created within the retention period
// (plus a prune interval). The queue wait and the database file's size are
// reported beside them, not judged: they follow the task rate, which other
// processes on the machine change.
// Exit status 0 when all holds, 1 otherwise.
#include <taskmgr/taskmgr.hpp>

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

int count_entries(const fs::path& dir, int depth) {
  std::error_code ec;
  int n = 0;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it.depth() < depth) ++n;
  }
  return n;
}

int open_fds() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/fd")) {
    while (readdir(d) != nullptr) ++n;
    closedir(d);
  }
  return n - 3;  // ".", ".." and the DIR itself
}

std::int64_t file_kb(const fs::path& p) {
  std::error_code ec;
  const auto s = fs::file_size(p, ec);
  return ec ? 0 : static_cast<std::int64_t>(s / 1024);
}

struct Sample {
  double t = 0;
  std::int64_t rss_mb = 0;
  int fds = 0;
  int temp_dirs = 0;
  std::int64_t db_kb = 0, wal_kb = 0;
  double wait_mean_s = 0, wait_max_s = 0;
  std::uint64_t tasks = 0;
  std::int64_t task_rows = 0;  // tasks in the store (what retention bounds)
};

// Which tasks have not ended yet, bounded so that the soak's own
// bookkeeping does not read as growth: a task leaves `open` at its terminal
// event; ended ids are remembered for 2 minutes to catch a second end (a
// second terminal event comes within the same attempt's events, milliseconds
// apart). An end that arrives before the host recorded the id waits in `early`.
struct Ledger {
  std::mutex mu;
  std::unordered_set<std::string> open, early;
  std::deque<std::pair<Clock::time_point, std::string>> ended_fifo;
  std::unordered_set<std::string> ended;
  std::vector<double> waits;
  std::uint64_t events = 0, created = 0, ended_once = 0, ended_twice = 0;

  void on_terminal(const std::string& id) {
    const auto now = Clock::now();
    while (!ended_fifo.empty() && now - ended_fifo.front().first > std::chrono::minutes(2)) {
      ended.erase(ended_fifo.front().second);
      ended_fifo.pop_front();
    }
    if (!ended.insert(id).second) {
      if (++ended_twice <= 5) std::fprintf(stderr, "task %s ended twice\n", id.c_str());
      return;
    }
    ended_fifo.emplace_back(now, id);
    ++ended_once;
    if (open.erase(id) == 0) early.insert(id);
  }
  void on_created(const std::string& id) {
    ++created;
    if (early.erase(id) == 0) open.insert(id);
  }
};

}  // namespace

int main(int argc, char** argv) {
  double seconds = 120, sample_s = 5;
  fs::path dir = fs::temp_directory_path() / ("taskmgr-soak-" + std::to_string(::getpid()));
  std::string page;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--seconds")
      seconds = std::stod(argv[i + 1]);
    else if (a == "--sample-seconds")
      sample_s = std::stod(argv[i + 1]);
    else if (a == "--dir")
      dir = argv[i + 1];
    else if (a == "--page")
      page = argv[i + 1];
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  fs::remove_all(dir);
  fs::create_directories(dir / "temp");
  if (page.empty()) {
    std::ofstream(dir / "page.txt")
        << "Soak test page. The quick brown fox jumps over the lazy dog.\n"
           "Pack my box with five dozen liquor jugs: 1234567890.\n";
    const std::string cmd = "text2image --text='" + (dir / "page.txt").string() +
                            "' --outputbase='" + (dir / "page").string() +
                            "' --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu"
                            " --resolution=150 --ptsize=12 --margin=30 --xsize=1000 --ysize=300"
                            " > /dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "could not render the soak page with text2image\n");
      return 2;
    }
    page = (dir / "page.tif").string();
  }

  taskmgr::Config c;
  c.storage.path = (dir / "soak.db").string();
  c.storage.retention_days = 20.0 / 86400;  // finished tasks live 20 s
  c.executor.worker_threads = 2;
  c.tasks.max_queue_size = 64;
  c.tasks.temp_dir = (dir / "temp").string();
  c.tasks.retry.backoff_base_seconds = 0.01;
  c.tasks.retry.backoff_jitter = 0;
  c.devices.probe_nvidia = false;
  c.devices.declared.push_back({"cuda:0", "gpu", 1024});
  c.logging.level = "error";
  std::atomic<std::uint64_t> log_errors{0};
  taskmgr::TaskManagerOptions o;
  o.log_sink = [&](taskmgr::LogLevel, std::string_view m) {
    ++log_errors;
    std::fprintf(stderr, "log: %.*s\n", static_cast<int>(m.size()), m.data());
  };
  taskmgr::TaskManager tm(c, o);
  tm.register_service(taskmgr::make_function_service("noop", [](taskmgr::TaskContext& ctx) {
    ctx.report_memory(1);
    ctx.set_result("{}");
  }));
  tm.register_service(taskmgr::make_function_service("flaky", [](taskmgr::TaskContext& ctx) {
    if (ctx.device() != "cpu") throw taskmgr::OutOfMemoryError("simulated GPU out of memory");
    (void)ctx.temp_dir();  // a temp dir per task, removed by its cleanup
    ctx.report_memory(8);
  }));
  tm.register_service(taskmgr::make_function_service("slow", [](taskmgr::TaskContext& ctx) {
    for (int i = 0; i < 20; ++i) {
      ctx.throw_if_cancelled();
      std::this_thread::sleep_for(2ms);
    }
  }));

  Ledger ledger;
  tm.subscribe([&](const taskmgr::EventRecord& e) {
    std::lock_guard<std::mutex> g(ledger.mu);
    ++ledger.events;
    if (e.event == taskmgr::TaskEvent::kCompleted || e.event == taskmgr::TaskEvent::kFailed ||
        e.event == taskmgr::TaskEvent::kCancelled) {
      ledger.on_terminal(e.task_id);
    } else if (e.event == taskmgr::TaskEvent::kStarted) {
      const auto at = e.details_json.find("\"wait_s\":");
      if (at != std::string::npos)
        ledger.waits.push_back(std::atof(e.details_json.c_str() + at + 9));
    }
  });

  std::mt19937 rng(12345);
  std::uint64_t refused_full = 0, cancelled_by_host = 0, ocr = 0, flaky = 0, bursts = 0;
  std::vector<Sample> samples;
  const auto t0 = Clock::now();
  auto next_sample = t0;
  std::printf("%8s %8s %5s %6s %9s %9s %10s %10s %9s %9s\n", "t_s", "rss_mb", "fds", "temps",
              "db_kb", "wal_kb", "wait_mean", "wait_max", "tasks", "task_rows");
  auto submit = [&](const std::string& service, const std::string& input, const std::string& device,
                    bool start) -> std::string {
    taskmgr::TaskCreateRequest r;
    r.service = service;
    r.input.path = input;
    r.device = device;
    const taskmgr::Task t = tm.create_task(r);
    {
      std::lock_guard<std::mutex> g(ledger.mu);
      ledger.on_created(t.id);
    }
    if (start) {
      try {
        tm.start_task(t.id);
      } catch (const taskmgr::Error& e) {
        if (e.code() != taskmgr::ErrorCode::kQueueFull) throw;
        ++refused_full;
        tm.cancel_task(t.id);  // refused: it stays pending until cancelled
        ++cancelled_by_host;
      }
    }
    return t.id;
  };

  for (;;) {
    const auto now = Clock::now();
    const double t = std::chrono::duration<double>(now - t0).count();
    if (now >= next_sample) {
      Sample s;
      s.t = t;
      s.rss_mb = taskmgr::process_rss_mb();
      s.fds = open_fds();
      s.temp_dirs = count_entries(dir / "temp", 2);
      s.db_kb = file_kb(dir / "soak.db");
      s.wal_kb = file_kb(dir / "soak.db-wal");
      s.task_rows = static_cast<std::int64_t>(tm.list_tasks({}).size());
      {
        std::lock_guard<std::mutex> g(ledger.mu);
        for (double w : ledger.waits) {
          s.wait_mean_s += w;
          s.wait_max_s = std::max(s.wait_max_s, w);
        }
        if (!ledger.waits.empty()) s.wait_mean_s /= static_cast<double>(ledger.waits.size());
        ledger.waits.clear();
      }
      {
        std::lock_guard<std::mutex> g(ledger.mu);
        s.tasks = ledger.created;
      }
      samples.push_back(s);
      std::printf("%8.0f %8lld %5d %6d %9lld %9lld %10.4f %10.4f %9llu %9lld\n", s.t,
                  static_cast<long long>(s.rss_mb), s.fds, s.temp_dirs,
                  static_cast<long long>(s.db_kb), static_cast<long long>(s.wal_kb), s.wait_mean_s,
                  s.wait_max_s, static_cast<unsigned long long>(s.tasks),
                  static_cast<long long>(s.task_rows));
      std::fflush(stdout);
      next_sample +=
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(sample_s));
    }
    if (t >= seconds) break;
    const int roll = static_cast<int>(rng() % 1000);
    if (roll < 600) {
      submit("noop", "", "", true);
    } else if (roll < 700) {
      submit("ocr", page, "", true);
      ++ocr;
    } else if (roll < 800) {
      submit("flaky", "", "cuda:0", true);
      ++flaky;
    } else if (roll < 990) {
      const std::string id = submit("slow", "", "", true);
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
      if (tm.cancel_task(id)) ++cancelled_by_host;
    } else {
      ++bursts;  // more than the queue holds at once
      for (int i = 0; i < 80; ++i) submit("noop", "", "", true);
    }
    // A steady load: pace the host, and let the queue drain when it is long.
    std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng() % 4000));
    while (tm.get_task_metrics().queued_tasks["total"] > 48) std::this_thread::sleep_for(5ms);
  }

  const bool idle = tm.wait_idle(std::chrono::minutes(5));
  tm.flush_events();
  int lost = 0, twice = 0;
  std::uint64_t created = 0;
  {
    std::lock_guard<std::mutex> g(ledger.mu);
    lost = static_cast<int>(ledger.open.size() + ledger.early.size());
    twice = static_cast<int>(ledger.ended_twice);
    created = ledger.created;
    for (const auto& id : ledger.open) {
      if (lost <= 5) std::fprintf(stderr, "task %s never ended\n", id.c_str());
    }
  }
  const taskmgr::TaskMetrics m = tm.get_task_metrics();
  std::printf(
      "\n%zu tasks in %.0f s (%llu OCR, %llu OOM+fallback, %llu refused by a full queue, "
      "%llu cancelled by the host, %llu bursts); %llu events; completed %llu, failed %llu, "
      "cancelled %llu; retries %llu, cpu fallbacks %llu\n",
      static_cast<std::size_t>(created), seconds, static_cast<unsigned long long>(ocr),
      static_cast<unsigned long long>(flaky), static_cast<unsigned long long>(refused_full),
      static_cast<unsigned long long>(cancelled_by_host), static_cast<unsigned long long>(bursts),
      static_cast<unsigned long long>(ledger.events),
      static_cast<unsigned long long>(m.tasks_completed),
      static_cast<unsigned long long>(m.tasks_failed),
      static_cast<unsigned long long>(m.tasks_cancelled),
      static_cast<unsigned long long>(m.retries), static_cast<unsigned long long>(m.cpu_fallbacks));

  bool ok = idle && lost == 0 && twice == 0 && m.cleanup_failures == 0 && m.events_dropped == 0;
  if (!idle) std::printf("FAIL: the manager did not become idle\n");
  if (lost || twice) std::printf("FAIL: %d task(s) lost, %d ended more than once\n", lost, twice);
  if (m.cleanup_failures)
    std::printf("FAIL: %llu cleanup failures\n",
                static_cast<unsigned long long>(m.cleanup_failures));

  // Flat after warm-up: the last third's peak against the middle third's.
  const std::size_t n = samples.size();
  if (n >= 6) {
    const std::size_t a = n / 3, b = 2 * n / 3;
    auto peak = [&](std::size_t from, std::size_t to, auto get) {
      double v = 0;
      for (std::size_t i = from; i < to; ++i) v = std::max(v, static_cast<double>(get(samples[i])));
      return v;
    };
    struct Check {
      const char* name;
      double tolerance;  // absolute slack on top of 10%
      std::function<double(const Sample&)> get;
      // A timing is reported, never judged: on a shared machine it follows
      // the other processes' load (the queue wait "grew" in a CI run while
      // other builds ran beside it).
      bool judged = true;
    };
    const Check checks[] = {
        {"rss_mb", 16, [](const Sample& s) { return static_cast<double>(s.rss_mb); }},
        {"fds", 4, [](const Sample& s) { return static_cast<double>(s.fds); }},
        {"temp_dirs", 4, [](const Sample& s) { return static_cast<double>(s.temp_dirs); }},
        // The file's size is the high-water mark of the rows retention keeps,
        // which follow the task rate (higher when other processes leave the
        // machine): reported; the rows themselves are judged below.
        {"db_kb", 2048, [](const Sample& s) { return static_cast<double>(s.db_kb); }, false},
        {"wal_kb", 8192, [](const Sample& s) { return static_cast<double>(s.wal_kb); }},
        {"wait_mean_s", 0.05, [](const Sample& s) { return s.wait_mean_s; }, false},
    };
    for (const auto& ch : checks) {
      const double mid = peak(a, b, ch.get), last = peak(b, n, ch.get);
      const bool flat = last <= mid * 1.10 + ch.tolerance;
      std::printf("%-12s middle third peak %10.3f, last third peak %10.3f: %s%s\n", ch.name, mid,
                  last, flat ? "flat" : "GROWING", ch.judged ? "" : " (reported, not judged)");
      if (ch.judged) ok = ok && flat;
    }
    // Retention: the store holds no more tasks than were created within the
    // retention period plus a prune interval and a sample (20 + 5 + the
    // sample's seconds), whatever the rate.
    const double window = 25 + sample_s;
    std::int64_t worst = 0, worst_allowed = 0;
    bool retained_ok = true, any = false;
    for (std::size_t i = a; i < n; ++i) {
      if (samples[i].t < window) continue;
      std::uint64_t before = 0;  // created by the latest sample at least `window` s earlier
      for (std::size_t j = 0; j < i && samples[j].t <= samples[i].t - window; ++j) {
        before = samples[j].tasks;
      }
      const auto allowed =
          static_cast<std::int64_t>(static_cast<double>(samples[i].tasks - before) * 1.10 + 300);
      if (samples[i].task_rows > allowed) retained_ok = false;
      if (!any || samples[i].task_rows - allowed >= worst - worst_allowed) {
        worst = samples[i].task_rows;
        worst_allowed = allowed;
        any = true;
      }
    }
    if (any) {
      std::printf(
          "%-12s closest to the bound: %lld rows, %lld allowed (created within %.0f s): %s\n",
          "task_rows", static_cast<long long>(worst), static_cast<long long>(worst_allowed), window,
          retained_ok ? "pruned" : "GROWING");
    }
    if (!any) std::printf("task_rows    not judged: the run is shorter than %.0f s\n", window);
    ok = ok && retained_ok;
  } else {
    std::printf("too few samples (%zu) to judge growth\n", n);
    ok = false;
  }
  std::printf("%s\n", ok ? "soak ok" : "soak FAILED");
  tm.close();
  fs::remove_all(dir);
  return ok ? 0 : 1;
}
