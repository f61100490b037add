#include <doctest/doctest.h>

#include <limits>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/clock.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/task_queue.hpp"

using namespace taskmgr;
using namespace std::chrono_literals;

namespace {

struct Fixture {
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>();
  DeviceRegistry devices{std::vector<DeviceInfo>{
      {"cpu", DeviceKind::kCpu, 1000, 0, 0, true, "", ""},
      {"cuda:0", DeviceKind::kGpu, 1000, 0, 0, true, "", ""},
  }};
  TaskQueue::Options options;
  std::unique_ptr<TaskQueue> queue;

  explicit Fixture(TaskQueue::Options o = {}) : options(o) {
    queue = std::make_unique<TaskQueue>(options, devices, clock);
  }

  void add(const std::string& id, int priority, std::int64_t mb = 10,
           const std::string& device = "cpu") {
    QueuedTask t;
    t.task_id = id;
    t.device = device;
    t.service = "svc";
    t.estimated_memory_mb = mb;
    queue->add_task(t, priority);
  }

  std::vector<std::string> drain(const std::string& device = "cpu") {
    std::vector<std::string> out;
    while (auto t = queue->get_next_task(device)) out.push_back(t->task_id);
    return out;
  }
};

}  // namespace

TEST_CASE("higher priority first, FIFO among equal priorities") {
  Fixture f;
  f.add("a", 0);
  f.add("b", 5);
  f.add("c", 0);
  f.add("d", 5);
  f.add("e", -1);
  f.add("f", 0);
  CHECK(f.drain() == std::vector<std::string>{"b", "d", "a", "c", "f", "e"});
  CHECK(f.queue->size() == 0);
}

TEST_CASE("with enable_priority_queue false the order is strict FIFO") {
  TaskQueue::Options o;
  o.enable_priority_queue = false;
  o.ordering = QueueOrdering::kLargestFirst;  // ignored too
  Fixture f(o);
  f.add("a", 0, 10);
  f.add("b", 9, 500);
  f.add("c", -3, 20);
  f.add("d", 9, 5);
  CHECK(f.drain() == std::vector<std::string>{"a", "b", "c", "d"});
}

TEST_CASE("largest_first orders equal priorities by estimate, then FIFO") {
  TaskQueue::Options o;
  o.ordering = QueueOrdering::kLargestFirst;
  Fixture f(o);
  f.add("small", 0, 10);
  f.add("big", 0, 300);
  f.add("mid", 0, 100);
  f.add("mid2", 0, 100);
  f.add("urgent-small", 1, 5);
  CHECK(f.drain() == std::vector<std::string>{"urgent-small", "big", "mid", "mid2", "small"});
}

TEST_CASE("queues are per device") {
  Fixture f;
  f.add("c1", 0, 10, "cpu");
  f.add("g1", 9, 10, "cuda:0");
  f.add("c2", 1, 10, "cpu");
  CHECK(f.queue->size() == 3);
  CHECK(f.queue->size("cuda:0") == 1);
  CHECK(f.queue->sizes().at("cpu") == 2);
  CHECK(f.drain("cpu") == std::vector<std::string>{"c2", "c1"});
  CHECK(f.drain("cuda:0") == std::vector<std::string>{"g1"});
}

TEST_CASE("max_queue_size is enforced with QUEUE_FULL and nothing is dropped") {
  TaskQueue::Options o;
  o.max_queue_size = 3;
  Fixture f(o);
  f.add("a", 0);
  f.add("b", 0);
  f.add("c", 0);
  try {
    f.add("d", 0);
    FAIL("expected kQueueFull");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kQueueFull);
    CHECK(std::string(e.what()).find("tasks.max_queue_size = 3") != std::string::npos);
    CHECK(std::string(e.what()).find("d") != std::string::npos);
  }
  CHECK(f.queue->size() == 3);
  CHECK_FALSE(f.queue->contains("d"));
  // A retry is never refused, even at the limit.
  QueuedTask r;
  r.task_id = "retry";
  r.device = "cpu";
  r.priority = 0;
  f.queue->requeue_task(r);
  CHECK(f.queue->size() == 4);
  CHECK(f.drain() == std::vector<std::string>{"a", "b", "c", "retry"});
}

TEST_CASE("requeue_task re-adds one priority lower") {
  Fixture f;
  f.add("x", 3);
  f.add("y", 2);
  auto x = f.queue->get_next_task("cpu");
  REQUIRE(x);
  CHECK(x->task_id == "x");
  f.queue->requeue_task(*x);  // priority 2 now, behind y (FIFO)
  const auto snap = f.queue->snapshot("cpu");
  REQUIRE(snap.size() == 2);
  CHECK(snap[0].task_id == "y");
  CHECK(snap[1].task_id == "x");
  CHECK(snap[1].priority == 2);
}

TEST_CASE("requeue_task at the lowest priority stays there (no overflow)") {
  Fixture f;
  f.add("low", std::numeric_limits<int>::min());
  f.add("high", std::numeric_limits<int>::max());
  auto low = f.queue->snapshot("cpu").back();
  CHECK(low.task_id == "low");
  f.queue->requeue_task(low);
  const auto snap = f.queue->snapshot("cpu");
  REQUIRE(snap.size() == 2);
  CHECK(snap[0].task_id == "high");
  CHECK(snap[1].task_id == "low");
  CHECK(snap[1].priority == std::numeric_limits<int>::min());
}

TEST_CASE("get_next_task returns only a task that fits free memory now") {
  Fixture f;
  f.add("big", 5, 800);
  f.add("small", 0, 100);
  REQUIRE(f.devices.reserve("cpu", 500));  // 500 free
  auto t = f.queue->get_next_task("cpu");
  REQUIRE(t);
  CHECK(t->task_id == "small");  // big does not fit; small passes it
  CHECK_FALSE(f.queue->get_next_task("cpu"));
  f.devices.release("cpu", 500);
  t = f.queue->get_next_task("cpu");
  REQUIRE(t);
  CHECK(t->task_id == "big");
}

TEST_CASE("a large task is not starved by a stream of small ones") {
  TaskQueue::Options o;
  o.starvation_after = 10s;
  Fixture f(o);
  REQUIRE(f.devices.reserve("cpu", 600));  // 400 free: the big one never fits while this holds
  f.add("big", 0, 700);
  int small_started = 0;
  for (int i = 0; i < 5; ++i) {
    f.add("small" + std::to_string(i), 0, 100);
    auto t = f.queue->get_next_task("cpu");
    REQUIRE(t);
    CHECK(t->task_id != "big");
    ++small_started;
    f.clock->advance(1s);
  }
  CHECK(small_started == 5);
  // Passed over for 10 s: now it blocks every smaller task behind it.
  f.clock->advance(6s);
  f.add("late-small", 0, 100);
  CHECK_FALSE(f.queue->get_next_task("cpu"));
  CHECK(f.queue->contains("late-small"));
  // A higher-priority task ahead of it still runs.
  f.add("urgent", 9, 100);
  auto u = f.queue->get_next_task("cpu");
  REQUIRE(u);
  CHECK(u->task_id == "urgent");
  // Memory frees (running tasks end): the big one goes first.
  f.devices.release("cpu", 600);
  auto b = f.queue->get_next_task("cpu");
  REQUIRE(b);
  CHECK(b->task_id == "big");
  auto s = f.queue->get_next_task("cpu");
  REQUIRE(s);
  CHECK(s->task_id == "late-small");
}

TEST_CASE("an eligibility filter skips tasks without counting as starvation") {
  Fixture f;
  f.add("a", 1, 10);
  f.add("b", 0, 10);
  auto t = f.queue->get_next_task("cpu", [](const QueuedTask& q) { return q.task_id != "a"; });
  REQUIRE(t);
  CHECK(t->task_id == "b");
  CHECK(f.queue->peek_next_task("cpu")->task_id == "a");
}

TEST_CASE("take_expired returns tasks queued at or before the cutoff, oldest first") {
  Fixture f;
  f.add("old", 0);
  f.clock->advance(5s);
  f.add("newer", 9);
  f.clock->advance(5s);
  f.add("newest", 0);
  auto expired = f.queue->take_expired(f.clock->steady_now() - 4s);
  REQUIRE(expired.size() == 2);
  CHECK(expired[0].task_id == "old");
  CHECK(expired[1].task_id == "newer");
  CHECK(f.queue->size() == 1);
  CHECK(f.queue->contains("newest"));
}

TEST_CASE("bad queue calls are errors") {
  Fixture f;
  QueuedTask t;
  CHECK_THROWS_AS(f.queue->add_task(t, 0), Error);
  f.add("a", 0);
  try {
    f.add("a", 0);
    FAIL("expected kInvalidState");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kInvalidState);
  }
  CHECK(f.queue->remove("a"));
  CHECK_FALSE(f.queue->remove("a"));
}

TEST_CASE("add_task takes the spec's Task") {
  Fixture f;
  Task t;
  t.id = "task-1";
  t.service = "svc";
  t.assigned_device = "cuda:0";
  t.estimated_memory_mb = 42;
  f.queue->add_task(t, 7);
  auto q = f.queue->get_next_task("cuda:0");
  REQUIRE(q);
  CHECK(q->priority == 7);
  CHECK(q->estimated_memory_mb == 42);
}

TEST_CASE("entries removed and added again in rounds keep order, lookups and timeouts right") {
  // Removed entries' nodes are reused by later adds (any device, any id
  // length): every round checks the queue against a plain model.
  Fixture f(TaskQueue::Options{true, QueueOrdering::kFifo, 10000});
  struct Model {
    std::string id, device;
    int priority;
    int arrival;
  };
  std::vector<Model> model;
  int arrival = 0;
  auto add = [&](const std::string& id, int priority, const std::string& device) {
    f.add(id, priority, 10, device);
    model.push_back({id, device, priority, arrival++});
    f.clock->advance(std::chrono::milliseconds(1));
  };
  auto expected_order = [&](const std::string& device) {
    std::vector<Model> d;
    for (const auto& m : model) {
      if (m.device == device) d.push_back(m);
    }
    std::stable_sort(d.begin(), d.end(), [](const Model& a, const Model& b) {
      return a.priority != b.priority ? a.priority > b.priority : a.arrival < b.arrival;
    });
    std::vector<std::string> ids;
    for (const auto& m : d) ids.push_back(m.id);
    return ids;
  };
  auto snapshot_ids = [&](const std::string& device) {
    std::vector<std::string> ids;
    for (const auto& q : f.queue->snapshot(device)) ids.push_back(q.task_id);
    return ids;
  };
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 40; ++i) {
      // Short ids (held inline by std::string) and long ones (on the heap).
      const std::string id = (i % 3 == 0 ? "s" : "a-long-task-id-that-needs-the-heap-") +
                             std::to_string(round) + "-" + std::to_string(i);
      add(id, (i * 7) % 5 - 2, i % 2 ? "cpu" : "cuda:0");
    }
    // Take some from each device, remove some by id.
    for (const std::string device : {"cpu", "cuda:0"}) {
      for (int k = 0; k < 8; ++k) {
        const auto next = f.queue->get_next_task(device);
        REQUIRE(next.has_value());
        REQUIRE(expected_order(device).front() == next->task_id);
        model.erase(std::find_if(model.begin(), model.end(),
                                 [&](const Model& m) { return m.id == next->task_id; }));
      }
    }
    for (int k = 0; k < 6; ++k) {
      const std::string id = model[static_cast<std::size_t>(k * 3) % model.size()].id;
      CHECK(f.queue->remove(id));
      CHECK_FALSE(f.queue->contains(id));
      model.erase(
          std::find_if(model.begin(), model.end(), [&](const Model& m) { return m.id == id; }));
    }
    CHECK(f.queue->size() == model.size());
    for (const auto& m : model) CHECK(f.queue->contains(m.id));
    CHECK(snapshot_ids("cpu") == expected_order("cpu"));
    CHECK(snapshot_ids("cuda:0") == expected_order("cuda:0"));
  }
  // Timeouts: the oldest half by arrival, oldest first.
  std::vector<Model> by_arrival = model;
  std::sort(by_arrival.begin(), by_arrival.end(),
            [](const Model& a, const Model& b) { return a.arrival < b.arrival; });
  const std::size_t half = by_arrival.size() / 2;
  const auto cutoff =
      f.clock->steady_now() - std::chrono::milliseconds(arrival - by_arrival[half - 1].arrival);
  const auto expired = f.queue->take_expired(cutoff);
  REQUIRE(expired.size() == half);
  for (std::size_t i = 0; i < half; ++i) CHECK(expired[i].task_id == by_arrival[i].id);
  CHECK(f.queue->size() == model.size() - half);
}

TEST_CASE("set_priority moves a queued task at once and keeps its arrival among equals") {
  Fixture f;
  f.add("a", 0);
  f.clock->advance(1s);
  f.add("b", 0);
  f.clock->advance(1s);
  f.add("c", 0);
  f.clock->advance(1s);
  CHECK(f.queue->set_priority("c", 1));
  CHECK(f.queue->set_priority("a", 1));
  CHECK_FALSE(f.queue->set_priority("zz", 1));
  std::vector<std::string> got;
  for (const auto& t : f.queue->snapshot("cpu")) got.push_back(t.task_id);
  CHECK(got == std::vector<std::string>{"a", "c", "b"});
  // The queue timeout still counts from each task's arrival.
  const auto expired = f.queue->take_expired(f.clock->steady_now() - 3s + 1ms);
  REQUIRE(expired.size() == 1);
  CHECK(expired[0].task_id == "a");
  CHECK(f.drain() == std::vector<std::string>{"c", "b"});
}

TEST_CASE("priority aging: a waiting task gains a level per interval, and ties go to the older") {
  TaskQueue::Options o;
  o.priority_aging = 10s;
  Fixture f(o);
  f.add("low", 0);
  f.clock->advance(5s);
  f.add("p1", 1);  // low has aged half a level: p1 still goes first
  f.clock->advance(5s);
  f.add("p1b", 1);  // low has aged a whole level: equal, and low is older
  f.clock->advance(1s);
  f.add("p2", 2);
  std::vector<std::string> got;
  for (const auto& t : f.queue->snapshot("cpu")) got.push_back(t.task_id);
  CHECK(got == std::vector<std::string>{"p2", "p1", "low", "p1b"});
  // The order across devices is the same rank.
  f.add("gpu2", 2, 10, "cuda:0");
  const auto head_cpu = f.queue->peek_next_task("cpu");
  const auto head_gpu = f.queue->peek_next_task("cuda:0");
  REQUIRE(head_cpu);
  REQUIRE(head_gpu);
  CHECK(f.queue->precedes(*head_cpu, *head_gpu));  // equal rank: p2 was queued first
  CHECK_FALSE(f.queue->precedes(*head_gpu, *head_cpu));
  CHECK(f.drain() == got);
}

TEST_CASE("priority aging off: the spec's strict order, however long a task waits") {
  Fixture f;
  f.add("low", 0);
  f.clock->advance(std::chrono::hours(24 * 365));
  f.add("high", 1);
  CHECK(f.drain() == std::vector<std::string>{"high", "low"});
}

TEST_CASE("priority aging bounds a low priority's wait behind a steady stream of higher ones") {
  // One task leaves per second and one priority-5 task arrives per second.
  // With aging every I seconds, the priority-0 task ranks beside priority-5
  // tasks that arrive 5*I after it: it leaves within 5*I + 1 s. Without
  // aging it never leaves while the stream lasts.
  for (const bool aging : {true, false}) {
    CAPTURE(aging);
    TaskQueue::Options o;
    o.max_queue_size = 100000;
    if (aging) o.priority_aging = 7s;
    Fixture f(o);
    for (int i = 0; i < 3; ++i) f.add("early" + std::to_string(i), 5);  // a backlog ahead of it
    f.add("low", 0);
    const auto t0 = f.clock->steady_now();
    std::optional<std::chrono::seconds> left;
    for (int s = 1; s <= 200 && !left; ++s) {
      f.clock->advance(1s);
      f.add("p5-" + std::to_string(s), 5);
      auto t = f.queue->get_next_task("cpu");
      REQUIRE(t);
      if (t->task_id == "low") {
        left = std::chrono::duration_cast<std::chrono::seconds>(f.clock->steady_now() - t0);
      }
    }
    if (aging) {
      REQUIRE(left);
      // The bound: 5 levels * 7 s, plus the backlog of 3 queued before it,
      // plus the second it takes.
      CHECK(left->count() <= 5 * 7 + 3 + 1);
      CHECK(left->count() >= 5 * 7);  // and it does not jump the levels early
    } else {
      CHECK_FALSE(left);
    }
  }
}
