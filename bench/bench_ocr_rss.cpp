// 1,000 consecutive OCR tasks on one pooled engine: resident memory after
// warm-up must stay flat (no leak per task). Prints RSS every 100 tasks.
// Tasks are kept in a SQLite file (as in production), so that the history
// the store keeps does not count as process memory.
//
//   bench_ocr_rss IMAGE [--tasks N] [--db PATH]
#include <taskmgr/taskmgr.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_ocr_rss IMAGE [--tasks N]\n");
    return 2;
  }
  int tasks = 1000;
  std::string db = "/tmp/bench_ocr_rss.db";
  for (int i = 2; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tasks")) tasks = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--db")) db = argv[i + 1];
  }
  for (const char* sfx : {"", "-wal", "-shm", ".lock"}) std::remove((db + sfx).c_str());
  taskmgr::Config config;
  config.storage.path = db;
  config.executor.worker_threads = 1;
  config.pools.devices["cpu"] = taskmgr::PoolSettings{1, 1, 30};
  taskmgr::TaskManager tm(config);
  taskmgr::TaskCreateRequest req;
  req.service = "ocr";
  req.input.path = argv[1];
  std::int64_t after_warmup = 0, peak_after = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 1; i <= tasks; ++i) {
    const taskmgr::Task t = tm.create_task(req);
    tm.start_task(t.id);
    const auto done = tm.wait_task(t.id, std::chrono::minutes(5));
    if (!done || done->status != taskmgr::TaskStatus::kCompleted) {
      std::fprintf(stderr, "task %d did not complete\n", i);
      return 1;
    }
    if (i % 100 == 0) {
      const std::int64_t rss = taskmgr::process_rss_mb();
      if (i == 100) after_warmup = rss;
      if (i > 100) peak_after = std::max(peak_after, rss);
      std::printf("after %4d tasks: RSS %lld MB (instance %s)\n", i, static_cast<long long>(rss),
                  done->service_instance_id.value_or("?").c_str());
      std::fflush(stdout);
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "%d tasks in %.1f s; RSS after warm-up (100 tasks) %lld MB, highest after %lld MB, growth "
      "%lld MB\n",
      tasks, s, static_cast<long long>(after_warmup), static_cast<long long>(peak_after),
      static_cast<long long>(peak_after - after_warmup));
  return 0;
}
