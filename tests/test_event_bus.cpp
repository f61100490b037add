#include <doctest/doctest.h>
#include <pthread.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "taskmgr/events.hpp"
#include "test_support.hpp"

using namespace taskmgr;
using namespace std::chrono_literals;

namespace {
EventRecord ev(const std::string& task, TaskEvent e) {
  EventRecord r;
  r.task_id = task;
  r.event = e;
  return r;
}
}  // namespace

TEST_CASE("events arrive in publication order on the dispatcher thread") {
  EventBus bus;
  std::vector<std::uint64_t> seqs;
  std::thread::id delivered_on;
  bus.subscribe([&](const EventRecord& e) {
    seqs.push_back(e.sequence);
    delivered_on = std::this_thread::get_id();
  });
  for (int i = 0; i < 1000; ++i) bus.publish(ev("t", TaskEvent::kQueued));
  bus.flush();
  REQUIRE(seqs.size() == 1000);
  for (std::size_t i = 0; i < seqs.size(); ++i) CHECK(seqs[i] == i + 1);
  const bool on_caller_thread = delivered_on == std::this_thread::get_id();
  CHECK_FALSE(on_caller_thread);
  CHECK(bus.delivered() == 1000);
}

TEST_CASE("delivered records come back for reuse, and republished ones are delivered again") {
  EventBus bus;
  std::vector<std::string> seen;
  bus.subscribe([&](const EventRecord& e) { seen.push_back(e.task_id + "/" + e.details_json); });
  std::vector<EventRecord> batch;
  for (int i = 0; i < 3; ++i) {
    EventRecord r = ev("task-" + std::to_string(i), TaskEvent::kQueued);
    r.details_json = R"({"n":)" + std::to_string(i) + "}";
    batch.push_back(r);
  }
  bus.publish(std::move(batch));
  CHECK(batch.empty());
  bus.flush();
  REQUIRE(seen.size() == 3);
  // The delivered batch is handed back once, contents stale, strings kept.
  std::vector<EventRecord> again = bus.take_recycled();
  REQUIRE(again.size() == 3);
  CHECK(bus.take_recycled().empty());
  for (auto& r : again) {
    r.task_id.replace(0, 4, "work");  // overwrite in place
    r.details_json = "{}";
  }
  bus.publish(std::move(again));
  bus.flush();
  REQUIRE(seen.size() == 6);
  CHECK(seen[3] == "work-0/{}");
  CHECK(seen[5] == "work-2/{}");
  CHECK(bus.delivered() == 6);
  CHECK(bus.published() == 6);
}

TEST_CASE("per-task order holds with many publishing threads") {
  EventBus bus;
  std::mutex mu;
  std::map<std::string, std::vector<int>> seen;
  bus.subscribe([&](const EventRecord& e) {
    std::lock_guard<std::mutex> g(mu);
    seen[e.task_id].push_back(std::stoi(e.details_json));
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&bus, t] {
      for (int i = 0; i < 2000; ++i) {
        EventRecord r = ev("task" + std::to_string(t), TaskEvent::kStarted);
        r.details_json = std::to_string(i);
        bus.publish(std::move(r));
      }
    });
  }
  for (auto& th : threads) th.join();
  bus.flush();
  REQUIRE(seen.size() == 4);
  for (const auto& [task, values] : seen) {
    REQUIRE(values.size() == 2000);
    for (int i = 0; i < 2000; ++i) CHECK(values[static_cast<std::size_t>(i)] == i);
  }
}

TEST_CASE("a throwing callback is counted and does not stop the others") {
  EventBus bus;
  std::atomic<int> good{0};
  bus.subscribe([](const EventRecord&) { throw std::runtime_error("host bug"); });
  bus.subscribe([&](const EventRecord&) { ++good; });
  for (int i = 0; i < 10; ++i) bus.publish(ev("t", TaskEvent::kCompleted));
  bus.flush();
  CHECK(good == 10);
  CHECK(bus.callback_errors() == 10);
}

TEST_CASE("a blocked callback never blocks publishers") {
  EventBus bus;
  test::Gate gate;
  std::atomic<int> got{0};
  bus.subscribe([&](const EventRecord&) {
    gate.wait();
    ++got;
  });
  for (int i = 0; i < 10000; ++i) bus.publish(ev("t", TaskEvent::kQueued));  // returns at once
  CHECK(bus.published() == 10000);
  gate.open();
  bus.flush();
  CHECK(got == 10000);
}

TEST_CASE("over max_pending, events are dropped for subscribers and counted") {
  EventBus bus(nullptr, 100);
  test::Gate gate;
  bus.subscribe([&](const EventRecord&) { gate.wait(); });
  for (int i = 0; i < 1000; ++i) bus.publish(ev("t", TaskEvent::kQueued));
  CHECK(bus.dropped() >= 800);
  gate.open();
  bus.flush();
  CHECK(bus.delivered() + bus.dropped() == 1000);
}

TEST_CASE("after unsubscribe returns the callback is not running and is never called again") {
  EventBus bus;
  std::atomic<int> calls{0};
  std::atomic<bool> inside{false};
  const auto id = bus.subscribe([&](const EventRecord&) {
    inside = true;
    std::this_thread::sleep_for(1ms);
    ++calls;
    inside = false;
  });
  std::thread publisher([&] {
    for (int i = 0; i < 200; ++i) bus.publish(ev("t", TaskEvent::kQueued));
  });
  test::eventually([&] { return calls.load() > 3; });
  CHECK(bus.unsubscribe(id));
  CHECK_FALSE(inside.load());
  const int after = calls.load();
  publisher.join();
  bus.flush();
  CHECK(calls.load() == after);
  CHECK_FALSE(bus.unsubscribe(id));
}

TEST_CASE("a callback may unsubscribe itself and subscribe others") {
  EventBus bus;
  std::atomic<int> self_calls{0}, other_calls{0};
  SubscriptionId self = 0;
  self = bus.subscribe([&](const EventRecord&) {
    ++self_calls;
    bus.unsubscribe(self);
    bus.subscribe([&](const EventRecord&) { ++other_calls; });
    bus.flush();  // returns at once on the dispatcher thread
  });
  bus.publish(ev("t", TaskEvent::kQueued));
  bus.flush();
  bus.publish(ev("t", TaskEvent::kStarted));
  bus.flush();
  CHECK(self_calls == 1);
  CHECK(other_calls >= 1);
}

TEST_CASE("to_json of an event carries the spec's columns") {
  EventRecord e = ev("abc", TaskEvent::kResourceAcquired);
  e.details_json = R"({"device":"cpu"})";
  const std::string j = to_json(e);
  CHECK(j.find("\"event_type\":\"resource_acquired\"") != std::string::npos);
  CHECK(j.find("\"task_id\":\"abc\"") != std::string::npos);
  CHECK(j.find("\"details\":{\"device\":\"cpu\"}") != std::string::npos);
  CHECK(j.find("\"timestamp\"") != std::string::npos);
}

TEST_CASE("an ended subscription's callback is destroyed with no lock of the bus held") {
  // The dispatcher drops its last reference to an unsubscribed callback when
  // it next reads the subscriber list; the callback's captures are the host's
  // and may call the bus from their destructor.
  EventBus bus;
  std::atomic<int> destroyed{0};
  struct Probe {
    EventBus* bus = nullptr;
    std::atomic<int>* destroyed = nullptr;
    ~Probe() {
      bus->subscriber_count();  // takes the subscriber lock
      ++*destroyed;
    }
  };
  auto probe = std::make_shared<Probe>();
  probe->bus = &bus;
  probe->destroyed = &destroyed;
  std::atomic<int> calls{0};
  const auto id = bus.subscribe([probe, &calls](const EventRecord&) { ++calls; });
  probe.reset();
  bus.publish(ev("t", TaskEvent::kQueued));
  bus.flush();  // the dispatcher holds the callback now
  CHECK(calls == 1);
  CHECK(bus.unsubscribe(id));
  CHECK(destroyed == 0);
  bus.publish(ev("t", TaskEvent::kStarted));
  bus.flush();
  CHECK(destroyed == 1);
  CHECK(calls == 1);
}

TEST_CASE("a callback that ends the dispatcher thread is not caught: the thread unwinds") {
  // pthread_exit unwinds with abi::__forced_unwind; a catch that swallowed
  // it would abort the process ("exception not rethrown"). Nothing is
  // delivered afterwards, and the bus can still be destroyed.
  std::atomic<bool> unwound{false};
  {
    EventBus bus;
    bus.subscribe([&](const EventRecord&) {
      struct Mark {
        std::atomic<bool>& flag;
        ~Mark() { flag = true; }
      } mark{unwound};
      pthread_exit(nullptr);
    });
    bus.publish(ev("t", TaskEvent::kQueued));
    REQUIRE(test::eventually([&] { return unwound.load(); }));
    CHECK(bus.callback_errors() == 0);
    CHECK(bus.dispatch_errors() == 0);
  }
}
