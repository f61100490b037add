// Concurrency stress (run under every preset, TSan included): many host
// threads create, start, cancel, wait, read, subscribe and unsubscribe while
// a GPU goes unavailable and comes back. No data race (TSan), no deadlock
// (the test ends), no lost task: every task ends in exactly one terminal
// state or is still pending (never started), and the manager agrees with
// the events it published.
#include <doctest/doctest.h>

#include <atomic>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;

TEST_CASE(
    "stress: host threads, callbacks and device changes at once lose no task and end none twice") {
  Config c = test_config();
  c.executor.worker_threads = 3;
  c.tasks.max_queue_size = 200;
  c.tasks.retry.backoff_base_seconds = 0.001;
  c.devices.declared.push_back({"cuda:0", "gpu", 2000});
  TaskManagerOptions o;
  o.log_sink = [](LogLevel, std::string_view) {};
  TaskManager tm(c, o);
  tm.register_service(make_function_service("svc", [](TaskContext& ctx) {
    if (ctx.options_json().find("oom") != std::string::npos && ctx.device() != "cpu") {
      throw OutOfMemoryError("simulated");
    }
    for (int i = 0; i < 3; ++i) {
      ctx.throw_if_cancelled();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    ctx.report_memory(2);
  }));

  std::mutex mu;
  std::map<std::string, int> terminal;  // terminal events per task
  std::vector<std::string> created;
  tm.subscribe([&](const EventRecord& e) {
    if (e.event == TaskEvent::kCompleted || e.event == TaskEvent::kFailed ||
        e.event == TaskEvent::kCancelled) {
      std::lock_guard<std::mutex> g(mu);
      ++terminal[e.task_id];
    }
  });

  std::atomic<bool> stop{false};
  std::atomic<int> subscribed_calls{0};
  std::vector<std::thread> threads;
  constexpr int kHosts = 6;
  for (int h = 0; h < kHosts; ++h) {
    threads.emplace_back([&, h] {
      std::mt19937 rng(static_cast<unsigned>(h + 1));
      for (int i = 0; i < 150 && !stop; ++i) {
        TaskCreateRequest r;
        r.service = "svc";
        r.priority = static_cast<int>(rng() % 5);
        if (rng() % 4 == 0) r.device = "cuda:0";
        if (rng() % 5 == 0) r.options_json = "{\"oom\":true}";
        std::string id;
        try {
          id = tm.create_task(r).id;
        } catch (const Error& e) {
          // cuda:0 may be unavailable right now: a clear refusal, nothing kept
          CHECK(e.code() == ErrorCode::kDeviceUnavailable);
          continue;
        }
        {
          std::lock_guard<std::mutex> g(mu);
          created.push_back(id);
        }
        try {
          tm.start_task(id);
        } catch (const Error& e) {
          CHECK((e.code() == ErrorCode::kQueueFull || e.code() == ErrorCode::kDeviceUnavailable));
          tm.cancel_task(id);
          continue;
        }
        switch (rng() % 6) {
          case 0: tm.cancel_task(id); break;
          case 1: tm.wait_task(id, 5ms); break;
          case 2: (void)tm.get_task_health(id); break;
          case 3: (void)tm.get_task_metrics(); break;
          case 4: {
            const SubscriptionId s = tm.subscribe([&](const EventRecord&) { ++subscribed_calls; });
            std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
            tm.unsubscribe(s);
            break;
          }
          default:
            (void)tm.list_tasks(TaskFilter{std::nullopt, "", 10, true, true, std::nullopt});
            break;
        }
      }
    });
  }
  threads.emplace_back([&] {  // the GPU comes and goes
    for (int i = 0; i < 40 && !stop; ++i) {
      tm.set_device_available("cuda:0", i % 2 == 1);
      std::this_thread::sleep_for(2ms);
    }
    tm.set_device_available("cuda:0", true);
  });
  for (auto& t : threads) t.join();

  REQUIRE(tm.wait_idle(120s));
  tm.flush_events();
  std::lock_guard<std::mutex> g(mu);
  CHECK(created.size() > 300);
  int ended = 0, pending = 0;
  for (const auto& id : created) {
    const Task t = tm.get_task(id);
    const int n = terminal.count(id) ? terminal.at(id) : 0;
    if (is_terminal(t.status)) {
      ++ended;
      CHECK_MESSAGE(n == 1, "task " << id << " ended " << n << " times");
      CHECK(t.resource_cleanup_completed);
    } else {
      ++pending;
      CHECK(t.status == TaskStatus::kPending);
      CHECK(n == 0);
    }
  }
  CHECK(ended + pending == static_cast<int>(created.size()));
  const TaskMetrics m = tm.get_task_metrics();
  CHECK(m.active_tasks.at("total") == 0);
  CHECK(m.queued_tasks.at("total") == 0);
  CHECK(m.memory_by_device.at("cpu").reserved_mb == 0);
  CHECK(m.memory_by_device.at("cuda:0").reserved_mb == 0);
  CHECK(m.cleanup_failures == 0);
  CHECK(m.events_dropped == 0);
}
