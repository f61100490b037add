// The shared queue of the PostgreSQL store (src/store/shared_queue.hpp),
// below the manager: stores opened shared on one schema claim without
// overlap and in priority order, write only while they hold a task's claim
// (the fence), find claims they lost, rescue tasks whose leases ran out,
// wake each other through notifications, and show the cluster. Run through
// tests/with_postgres.sh.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <boost/json.hpp>

#include "pg_test_support.hpp"
#include "store/shared_queue.hpp"
// A C header (shared with test_c_api.c): C casts.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wold-style-cast"
#include "strict_json.h"
#pragma GCC diagnostic pop
#include "taskmgr.h"
#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;
namespace pg = taskmgr::detail::pg;
using taskmgr::detail::ClaimRequest;
using taskmgr::detail::SharedQueue;

namespace {

PostgresStoreOptions shared_options(const PgSchema& s, const std::string& name, double lease = 30) {
  PostgresStoreOptions o = s.options();
  o.shared = true;
  o.cluster.host_name = name;
  o.cluster.lease_seconds = lease;
  return o;
}

Task queued_task(int priority, const std::string& service = "ocr") {
  Task t;
  t.id = generate_task_id();
  t.service = service;
  t.priority = priority;
  t.status = TaskStatus::kQueued;
  t.created_at = std::chrono::system_clock::now();
  t.queued_at = t.created_at;
  t.estimated_memory_mb = 100;
  return t;
}

EventRecord event_for(const std::string& id, TaskEvent e) {
  EventRecord r;
  r.task_id = id;
  r.event = e;
  r.timestamp = std::chrono::system_clock::now();
  r.details_json = "{}";
  return r;
}

void insert(TaskStore& store, const std::vector<Task>& tasks) {
  std::vector<NewTask> n;
  for (const Task& t : tasks) n.push_back({t, {event_for(t.id, TaskEvent::kCreated)}});
  store.insert_tasks(n);
}

ClaimRequest request(std::size_t n) {
  ClaimRequest r;
  r.max_tasks = n;
  r.services = {"ocr"};
  r.devices = {"cpu"};
  r.max_memory_mb = 1000;
  return r;
}

SharedQueue& queue_of(const std::shared_ptr<TaskStore>& store) {
  SharedQueue* q = detail::shared_queue_of(*store);
  REQUIRE(q != nullptr);
  return *q;
}

}  // namespace

TEST_CASE("shared queue: hosts share a schema, and a store that does not share it is kept out") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  auto b = open_postgres_store(s.url(), shared_options(s, "b"));
  CHECK(queue_of(a).host_id() != queue_of(b).host_id());
  CHECK(queue_of(a).host_id().rfind("a/", 0) == 0);
  CHECK(detail::shared_queue_of(*make_memory_store()) == nullptr);
  try {
    PostgresStoreOptions o = s.options();
    o.connect_timeout_seconds = 0.5;
    (void)open_postgres_store(s.url(), o);
    FAIL("a store that does not share the schema opened beside shared ones");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kBusy);
    CHECK(std::string(e.what()).find("storage.shared") != std::string::npos);
  }
  a.reset();
  b.reset();
  auto alone = open_postgres_store(s.url(), s.options());
  try {
    PostgresStoreOptions o = shared_options(s, "c");
    o.connect_timeout_seconds = 0.5;
    (void)open_postgres_store(s.url(), o);
    FAIL("a shared store opened beside one that does not share the schema");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kBusy);
    CHECK(std::string(e.what()).find("does not share it") != std::string::npos);
  }
}

TEST_CASE("shared queue: claims take the highest priorities first, never a task twice") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  auto b = open_postgres_store(s.url(), shared_options(s, "b"));
  std::vector<Task> tasks;
  for (int i = 0; i < 20; ++i) tasks.push_back(queued_task(i % 5));
  Task gpu_only = queued_task(9);
  gpu_only.requested_device = "cuda:0";
  Task other_kind = queued_task(9, "translate");
  Task too_big = queued_task(9);
  too_big.estimated_memory_mb = 5000;
  tasks.push_back(gpu_only);
  tasks.push_back(other_kind);
  tasks.push_back(too_big);
  insert(*a, tasks);

  auto first = queue_of(a).claim(request(4));
  REQUIRE(first.size() == 4);
  for (const auto& c : first) {
    CHECK(c.task.priority == 4);  // the four of priority 4, oldest first
    CHECK(c.claim > 0);
    CHECK(c.task.host == "a");
    CHECK(queue_of(a).fence_of(c.task.id) == c.claim);
  }
  CHECK(std::is_sorted(first.begin(), first.end(), [](const auto& x, const auto& y) {
    return x.task.created_at < y.task.created_at;
  }));
  auto rest = queue_of(b).claim(request(100));
  CHECK(rest.size() == 16);  // not the GPU one, the other kind, the one too big
  std::set<std::string> ids;
  for (const auto& c : first) ids.insert(c.task.id);
  for (const auto& c : rest) {
    CHECK(ids.insert(c.task.id).second);
    CHECK(c.task.id != gpu_only.id);
    CHECK(c.task.id != other_kind.id);
    CHECK(c.task.id != too_big.id);
    CHECK(queue_of(a).fence_of(c.task.id) == 0);
  }
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE claimed_by IS NOT NULL") == 20);
  CHECK(s.scalar("SELECT count(DISTINCT claim) FROM tasks WHERE claim IS NOT NULL") == 20);
  ClaimRequest gpu = request(10);
  gpu.devices = {"cpu", "cuda:0"};
  auto g = queue_of(b).claim(gpu);
  REQUIRE(g.size() == 1);
  CHECK(g[0].task.id == gpu_only.id);
}

TEST_CASE("shared queue: claiming hosts at once take every task exactly once") {
  PgSchema s;
  std::vector<std::shared_ptr<TaskStore>> hosts;
  for (int i = 0; i < 3; ++i) hosts.push_back(open_postgres_store(s.url(), shared_options(s, "h")));
  std::vector<Task> tasks;
  for (int i = 0; i < 300; ++i) tasks.push_back(queued_task(i % 3));
  insert(*hosts[0], tasks);
  std::vector<std::vector<std::string>> got(3);
  std::vector<std::thread> threads;
  for (int h = 0; h < 3; ++h) {
    threads.emplace_back([&, h] {
      for (;;) {
        auto c = queue_of(hosts[h]).claim(request(7));
        if (c.empty()) return;
        for (const auto& x : c) got[h].push_back(x.task.id);
      }
    });
  }
  for (auto& t : threads) t.join();
  std::set<std::string> all;
  std::size_t n = 0;
  for (const auto& g : got) {
    n += g.size();
    all.insert(g.begin(), g.end());
  }
  CHECK(n == 300);
  CHECK(all.size() == 300);
}

TEST_CASE("shared queue: the claim query reads the claimable index") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  std::vector<Task> tasks;
  for (int i = 0; i < 2000; ++i) {
    Task t = queued_task(i % 10);
    if (i % 4 != 0) t.status = TaskStatus::kCompleted;
    tasks.push_back(t);
  }
  insert(*a, tasks);
  s.exec("ANALYZE tasks");
  std::string whole;
  pg::Result r = s.conn().exec(
      "EXPLAIN SELECT id FROM tasks WHERE status = 'queued' AND claimed_by IS NULL AND service = "
      "ANY('{ocr}'::text[]) AND coalesce(estimated_memory_mb, 0) <= 1000 AND (requested_device "
      "IS NULL OR requested_device = ANY('{cpu}'::text[])) ORDER BY priority DESC, queued_at, id "
      "LIMIT 8 FOR UPDATE SKIP LOCKED");
  for (int i = 0; i < PQntuples(r.get()); ++i)
    whole += std::string(PQgetvalue(r.get(), i, 0)) + "\n";
  CAPTURE(whole);
  CHECK(whole.find("idx_tasks_claimable") != std::string::npos);
  CHECK(whole.find("Sort") == std::string::npos);  // the index gives the order
}

TEST_CASE("shared queue: a write whose claim was lost is refused, with its events and samples") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  auto b = open_postgres_store(s.url(), shared_options(s, "b"));
  Task t = queued_task(0);
  insert(*a, {t});
  auto c = queue_of(a).claim(request(1));
  REQUIRE(c.size() == 1);
  // A's write while it holds the claim: stored, lease renewed.
  Task running = c[0].task;
  running.status = TaskStatus::kRunning;
  running.attempt = 1;
  running.started_at = std::chrono::system_clock::now();
  a->update_task(running, {event_for(t.id, TaskEvent::kStarted)});
  a->flush();
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + t.id + "'") == "running");
  CHECK(queue_of(a).confirm(t.id));

  // The lease runs out (as if A stood still) and B rescues the task.
  s.exec("UPDATE tasks SET lease_expires_at = (now() AT TIME ZONE 'UTC') - interval '1 second'");
  std::string lost_host;
  auto answer = queue_of(b).heartbeat(
      "{}",
      [&](Task& task, const std::string& host) {
        lost_host = host;
        task.status = TaskStatus::kQueued;
        task.assigned_device.reset();
        return std::vector<EventRecord>{event_for(task.id, TaskEvent::kRetried),
                                        event_for(task.id, TaskEvent::kQueued)};
      },
      std::nullopt);
  CHECK(answer.rescued == 1);
  CHECK(lost_host == queue_of(a).host_id());
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE claimed_by IS NULL AND claim IS NULL AND "
                 "status = 'queued'") == 1);

  // A finishes late: its completion, events and samples are fenced out.
  Task done = running;
  done.status = TaskStatus::kCompleted;
  done.result = "{\"text\":\"late\"}";
  done.finished_at = std::chrono::system_clock::now();
  a->update_task(done, {event_for(t.id, TaskEvent::kCompleted)});
  MetricSample m;
  m.task_id = t.id;
  m.timestamp = std::chrono::system_clock::now();
  m.memory_usage_mb = 10;
  m.device = "cpu";
  m.processing_stage = "ocr";
  a->append_metrics({m});
  a->flush();
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + t.id + "'") == "queued");
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'completed'") == 0);
  CHECK(s.scalar("SELECT count(*) FROM task_metrics") == 0);
  CHECK(queue_of(a).lost_claims() == 1);
  CHECK(queue_of(a).take_lost() == std::vector<std::string>{t.id});
  CHECK(queue_of(a).fence_of(t.id) == 0);
  CHECK_FALSE(queue_of(a).confirm(t.id));

  // B claims it again and completes it: one completed, B's.
  auto again = queue_of(b).claim(request(1));
  REQUIRE(again.size() == 1);
  CHECK(again[0].claim != c[0].claim);
  Task fin = again[0].task;
  fin.status = TaskStatus::kCompleted;
  fin.resource_cleanup_completed = true;
  b->update_task(fin, {event_for(t.id, TaskEvent::kCompleted)});
  b->flush();
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'completed'") == 1);
  CHECK(s.text("SELECT coalesce(claimed_by, 'none') FROM tasks") == "none");  // the last write
  CHECK(queue_of(b).fence_of(t.id) == 0);
  CHECK(queue_of(b).lost_claims() == 0);
}

TEST_CASE("shared queue: a heartbeat finds lost claims and cancellations asked by other hosts") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  auto b = open_postgres_store(s.url(), shared_options(s, "b"));
  Task t1 = queued_task(1), t2 = queued_task(0);
  insert(*b, {t1, t2});
  auto c = queue_of(a).claim(request(2));
  REQUIRE(c.size() == 2);
  CHECK(queue_of(b).request_cancel(t2.id));
  CHECK_FALSE(queue_of(b).request_cancel(generate_task_id()));
  // Another host took t1 over (as a rescue does).
  s.exec("UPDATE tasks SET claimed_by = 'x/1/1', claim = nextval('task_claims') WHERE id = '" +
         t1.id + "'");
  auto none = [](Task&, const std::string&) { return std::vector<EventRecord>{}; };
  auto answer = queue_of(a).heartbeat("{\"devices\":[]}", none, std::nullopt);
  CHECK(answer.lost == std::vector<std::string>{t1.id});
  CHECK(answer.cancel_requested == std::vector<std::string>{t2.id});
  CHECK(queue_of(a).fence_of(t1.id) == 0);
  CHECK(queue_of(a).fence_of(t2.id) != 0);
  CHECK(queue_of(a).lost_claims() == 1);
  // Leases are renewed: far in the future of the server's clock.
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE id = '" + t2.id +
                 "' AND lease_expires_at > (now() AT TIME ZONE 'UTC') + interval '20 seconds'") ==
        1);
}

TEST_CASE(
    "shared queue: a control on an unclaimed task is applied under its lock, not on a claimed "
    "one") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  auto b = open_postgres_store(s.url(), shared_options(s, "b"));
  Task t = queued_task(0), u = queued_task(0);
  insert(*a, {t, u});
  auto r = queue_of(b).change_unclaimed(t.id, [](Task& task) {
    task.status = TaskStatus::kCancelled;
    return std::optional<std::vector<EventRecord>>(
        std::vector<EventRecord>{event_for(task.id, TaskEvent::kCancelled)});
  });
  CHECK(r.applied);
  REQUIRE(r.task);
  CHECK(r.task->status == TaskStatus::kCancelled);
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + t.id + "'") == "cancelled");
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'cancelled'") == 1);
  REQUIRE(queue_of(a).claim(request(5)).size() == 1);  // u only
  bool called = false;
  auto held = queue_of(b).change_unclaimed(u.id, [&](Task&) {
    called = true;
    return std::optional<std::vector<EventRecord>>();
  });
  CHECK_FALSE(held.applied);
  CHECK_FALSE(called);
  REQUIRE(held.task);
  CHECK(held.task->host == "a");
  CHECK_FALSE(queue_of(b)
                  .change_unclaimed(generate_task_id(),
                                    [](Task&) { return std::optional<std::vector<EventRecord>>(); })
                  .task);
}

TEST_CASE("shared queue: a task queued by one host wakes another that waits") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  auto b = open_postgres_store(s.url(), shared_options(s, "b"));
  CHECK_FALSE(queue_of(b).wait_for_work(0.2));  // nothing: the poll's timeout
  std::atomic<bool> woke{false};
  std::thread waiter([&] { woke = queue_of(b).wait_for_work(60); });
  std::this_thread::sleep_for(200ms);  // (the waiter listens before: either way it wakes)
  insert(*a, {queued_task(0)});
  waiter.join();
  CHECK(woke.load());
  // wake() ends a wait at once (close).
  std::thread waiter2([&] { woke = queue_of(b).wait_for_work(60); });
  queue_of(b).wake();
  waiter2.join();
  CHECK(woke.load());
}

TEST_CASE("shared queue: the cluster view lists the hosts, their claims, and those that closed") {
  PgSchema s;
  auto a = open_postgres_store(s.url(), shared_options(s, "a"));
  auto b = open_postgres_store(s.url(), shared_options(s, "b", 1));
  insert(*a, {queued_task(0), queued_task(0), queued_task(0)});
  REQUIRE(queue_of(a).claim(request(2)).size() == 2);
  auto none = [](Task&, const std::string&) { return std::vector<EventRecord>{}; };
  queue_of(a).heartbeat("{\"devices\":[{\"id\":\"cpu\"}]}", none, std::nullopt);
  ClusterStatus c = queue_of(a).cluster();
  CHECK(c.host_id == queue_of(a).host_id());
  REQUIRE(c.hosts.size() == 2);
  CHECK(c.queued == 1);
  const auto& ha = c.hosts[0].host_name == "a" ? c.hosts[0] : c.hosts[1];
  CHECK(ha.claimed == 2);
  CHECK(ha.report_json == "{\"devices\":[{\"id\":\"cpu\"}]}");
  CHECK_FALSE(ha.lost);
  const std::string json = to_json(c);
  CHECK(json.find("\"state\":\"alive\"") != std::string::npos);
  // b (a lease of 1 s) stops heartbeating: lost; then it closes: closed.
  std::this_thread::sleep_for(1500ms);
  c = queue_of(a).cluster();
  const auto& hb = c.hosts[0].host_name == "b" ? c.hosts[0] : c.hosts[1];
  CHECK(hb.lost);
  b.reset();
  c = queue_of(a).cluster();
  const auto& hb2 = c.hosts[0].host_name == "b" ? c.hosts[0] : c.hosts[1];
  CHECK(hb2.closed_at.has_value());
  CHECK_FALSE(hb2.lost);
}

// ---- managers sharing the queue ---------------------------------------------

namespace {

Config shared_config(const PgSchema& s, const std::string& host) {
  Config c = test_config();
  c.storage.path = StorageConfig{}.path;
  c.storage.url = s.url();
  c.storage.postgres.schema = s.name();
  c.storage.shared = true;
  c.storage.cluster.host_name = host;
  c.storage.cluster.lease_seconds = 5;
  c.storage.cluster.heartbeat_seconds = 0.2;
  c.storage.cluster.poll_seconds = 0.5;
  return c;
}

// A host that heartbeats at open, then not for 5 minutes, with a lease of
// 10: nothing of it renews a lease or finds a claim gone meanwhile.
Config still_config(const PgSchema& s, const std::string& host) {
  Config c = shared_config(s, host);
  c.storage.cluster.lease_seconds = 600;
  c.storage.cluster.heartbeat_seconds = 300;
  return c;
}

// Creates one started task of `service` on `tm`: its id.
std::string start_one(TaskManager& tm, const std::string& service) {
  TaskCreateRequest r;
  r.service = service;
  r.start = true;
  return tm.create_task(r).id;
}

struct Execution {
  std::string task_id;
  int attempt;
  std::string host;
};

}  // namespace

TEST_CASE("shared queue: two managers share one queue and run every task exactly once") {
  PgSchema s;
  std::mutex mu;
  std::vector<Execution> runs;
  auto open = [&](const std::string& host) {
    TaskManagerOptions o;
    o.builtin_ocr = false;
    o.log_sink = [](LogLevel, std::string_view) {};
    o.services.push_back(make_function_service("svc", [&, host](TaskContext& ctx) {
      std::this_thread::sleep_for(std::chrono::microseconds(ctx.task_id()[35] % 8 * 300));
      std::lock_guard<std::mutex> g(mu);
      runs.push_back({ctx.task_id(), ctx.attempt(), host});
    }));
    return std::make_unique<TaskManager>(shared_config(s, host), o);
  };
  auto a = open("a");
  auto b = open("b");
  std::vector<std::string> ids;
  for (int i = 0; i < 200; ++i) {
    TaskCreateRequest r;
    r.service = "svc";
    r.start = true;
    r.priority = i % 3;
    ids.push_back((i % 2 == 0 ? *a : *b).create_task(r).id);
  }
  for (const auto& id : ids) {
    CAPTURE(id);
    const auto done = a->wait_task(id, 60s);
    REQUIRE(done);
    CHECK(done->status == TaskStatus::kCompleted);
    CHECK(done->attempt == 1);
    REQUIRE(done->host.has_value());
    CHECK((*done->host == "a" || *done->host == "b"));
  }
  std::map<std::string, int> per_task;
  std::set<std::string> hosts;
  {
    std::lock_guard<std::mutex> g(mu);
    for (const auto& r : runs) {
      ++per_task[r.task_id];
      hosts.insert(r.host);
    }
  }
  CHECK(per_task.size() == 200);
  for (const auto& task_runs : per_task) {  // not a structured binding: clang 14 cannot capture one
    CAPTURE(task_runs.first);
    CHECK(task_runs.second == 1);
  }
  CHECK(hosts.size() == 2);  // both hosts claimed work
  a->close();
  b->close();
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'completed'") == 200);
  CHECK(s.scalar("SELECT count(DISTINCT task_id) FROM task_events WHERE event_type = "
                 "'completed'") == 200);
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE claimed_by IS NOT NULL") == 0);
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE status = 'completed' AND "
                 "resource_cleanup_completed") == 200);
}

TEST_CASE("shared queue: a manager whose claim was taken over finishes late and is fenced out") {
  PgSchema s;
  Gate gate;
  std::atomic<int> b_runs{0};
  TaskManagerOptions oa;
  oa.builtin_ocr = false;
  oa.log_sink = [](LogLevel, std::string_view) {};
  oa.services.push_back(make_function_service("svc", [&](TaskContext& ctx) {
    gate.arrive();
    gate.wait();
    ctx.set_result("{\"by\":\"a\"}");
  }));
  std::mutex mu;
  std::vector<EventRecord> a_events;
  oa.subscribers.push_back([&](const EventRecord& e) {
    std::lock_guard<std::mutex> g(mu);
    a_events.push_back(e);
  });
  auto a = std::make_unique<TaskManager>(shared_config(s, "a"), oa);
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const std::string id = a->create_task(r).id;
  while (gate.arrived() == 0) std::this_thread::sleep_for(1ms);
  // Another host takes it over, as a rescue does once A's lease has run
  // out (here while A is alive: A's heartbeat finds the claim gone).
  s.exec(
      "UPDATE tasks SET claimed_by = NULL, claim = NULL, lease_expires_at = NULL, status = "
      "'queued', assigned_device = NULL, run_host = NULL WHERE id = '" +
      id + "'");
  TaskManagerOptions ob;
  ob.builtin_ocr = false;
  ob.log_sink = [](LogLevel, std::string_view) {};
  ob.services.push_back(make_function_service("svc", [&](TaskContext& ctx) {
    ++b_runs;
    ctx.set_result("{\"by\":\"b\"}");
  }));
  auto b = std::make_unique<TaskManager>(shared_config(s, "b"), ob);
  const auto done = b->wait_task(id, 60s);
  REQUIRE(done);
  CHECK(done->status == TaskStatus::kCompleted);
  CHECK(done->host == "b");
  // A finishes late: fenced out. The row keeps B's completion.
  gate.open();
  for (int i = 0; i < 200 && b->cluster().hosts.size() < 2; ++i) std::this_thread::sleep_for(10ms);
  a->close();
  const Task row = *b->wait_task(id, 1s);
  CHECK(row.result == "{\"by\":\"b\"}");
  CHECK(row.host == "b");
  CHECK(b_runs.load() == 1);
  // A learnt it: its attempt ended "cancelled" on the lost claim (told to
  // its own subscribers; nothing of it stored).
  {
    std::lock_guard<std::mutex> g(mu);
    bool told = false;
    for (const auto& e : a_events) {
      if (e.task_id == id && e.event == TaskEvent::kCancelled &&
          e.details_json.find("lost claim") != std::string::npos)
        told = true;
      CHECK(e.event != TaskEvent::kCompleted);
    }
    CHECK(told);
  }
  const ClusterStatus c = b->cluster();
  REQUIRE(c.hosts.size() == 2);
  const HostStatus& ha = c.hosts[0].host_name == "a" ? c.hosts[0] : c.hosts[1];
  CHECK(ha.closed_at.has_value());
  b->close();  // its writes are in the store
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'completed'") == 1);
  CHECK(s.text("SELECT result FROM tasks WHERE id = '" + id + "'") == "{\"by\":\"b\"}");
}

TEST_CASE("shared queue: start, priority and retry of tasks no host holds change the shared row") {
  PgSchema s;
  std::atomic<int> runs{0};
  TaskManagerOptions o;
  o.builtin_ocr = false;
  o.log_sink = [](LogLevel, std::string_view) {};
  o.services.push_back(make_function_service("svc", [&](TaskContext& ctx) {
    ++runs;
    if (ctx.options_json().find("fail") != std::string::npos && ctx.attempt() == 1) {
      throw InvalidInputError("the first attempt fails");
    }
    ctx.set_result("{\"attempt\":" + std::to_string(ctx.attempt()) + "}");
  }));
  Config c = shared_config(s, "a");
  c.tasks.retry.max_attempts = 1;
  auto a = std::make_unique<TaskManager>(c, o);
  TaskCreateRequest r;
  r.service = "svc";
  const std::string id = a->create_task(r).id;
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + id + "'") == "pending");

  // Priority of a pending task: the row changes, with its event.
  CHECK(a->set_task_priority(id, 6).priority == 6);
  CHECK(s.scalar("SELECT priority FROM tasks WHERE id = '" + id + "'") == 6);
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'priority_changed'") == 1);

  // Start: queued in the shared table for any host; this one claims and runs it.
  TaskStartRequest sr;
  sr.options_json = "{\"fail\":true}";
  const Task started = a->start_task(id, sr);
  CHECK(started.status == TaskStatus::kQueued);
  CHECK(started.input.data.empty());
  auto failed = a->wait_task(id, 60s);
  REQUIRE(failed);
  CHECK(failed->status == TaskStatus::kFailed);
  CHECK(failed->host == "a");
  CHECK(runs.load() == 1);
  // A second start is refused, with the status it has.
  CHECK_THROWS_WITH_AS(a->start_task(id), doctest::Contains("is failed"), Error);
  // ... and its priority cannot change once it ended.
  CHECK_THROWS_AS(a->set_task_priority(id, 1), Error);

  // Retry: the task ended here; it is queued again in the shared table and
  // this host claims it again (its finished record gives way), attempt 2.
  for (int i = 0; i < 2000 && s.text("SELECT resource_cleanup_completed FROM tasks WHERE id = '" +
                                     id + "'") != "t";
       ++i)
    std::this_thread::sleep_for(5ms);
  const Task retried = a->retry_task(id);
  CHECK(retried.status == TaskStatus::kQueued);
  CHECK(retried.attempt == 1);
  auto done = a->wait_task(id, 60s);
  REQUIRE(done);
  CHECK(done->status == TaskStatus::kCompleted);
  CHECK(done->attempt == 2);
  CHECK(done->result == "{\"attempt\":2}");
  CHECK(runs.load() == 2);
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'retried' AND "
                 "details->>'reason' = 'host'") == 1);
  CHECK_THROWS_WITH_AS(a->retry_task(id), doctest::Contains("only a failed or cancelled task"),
                       Error);
  CHECK_THROWS_AS(a->start_task("00000000-0000-0000-0000-000000000000"), Error);
  // Delete: the row goes, with its events.
  a->delete_task(id);
  CHECK(s.scalar("SELECT count(*) FROM tasks") == 0);
  CHECK(s.scalar("SELECT count(*) FROM task_events") == 0);
  a->close();
}

TEST_CASE("shared queue: a task no host claims within its queue timeout fails QUEUE_TIMEOUT") {
  PgSchema s;
  TaskManagerOptions o;
  o.builtin_ocr = false;
  o.log_sink = [](LogLevel, std::string_view) {};
  o.services.push_back(make_function_service("svc", [](TaskContext&) {}));
  Config c = shared_config(s, "a");
  c.tasks.queue_timeout_seconds = 0.5;
  auto a = std::make_unique<TaskManager>(c, o);
  // Queued for a kind no host runs: nobody claims it.
  s.exec(
      "INSERT INTO tasks (id, service, status, priority, attempt, batch_size, created_at, "
      "queued_at, resource_cleanup_completed) VALUES ('t-nobody', 'nobody', 'queued', 0, 0, "
      "1, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC', FALSE)");
  // One this host runs is not touched.
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const std::string id = a->create_task(r).id;
  const auto ended = a->wait_task("t-nobody", 60s);
  REQUIRE(ended);
  CHECK(ended->status == TaskStatus::kFailed);
  CHECK(ended->failure_reason == TaskFailureReason::kQueueTimeout);
  CHECK(ended->failure_message.find("no host claimed it") != std::string::npos);
  CHECK(ended->resource_cleanup_completed);
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE task_id = 't-nobody' AND event_type = "
                 "'failed'") == 1);
  CHECK(a->wait_task(id, 60s)->status == TaskStatus::kCompleted);
  a->close();
}

TEST_CASE("shared queue: taskmgr_cluster gives the cluster view as strict JSON through the C ABI") {
  PgSchema s;
  const std::string yaml = "storage:\n  url: \"" + s.url() + "\"\n  shared: true\n  postgres:\n" +
                           "    schema: " + s.name() + "\n  cluster:\n    host_name: c-host\n" +
                           "devices:\n  probe_nvidia: false\n";
  taskmgr_open_options o;
  taskmgr_open_options_init(&o);
  o.config_yaml = yaml.c_str();
  taskmgr_manager* tm = nullptr;
  REQUIRE_MESSAGE(taskmgr_open(&o, &tm) == TASKMGR_OK, taskmgr_last_error());
  char* json = nullptr;
  REQUIRE(taskmgr_cluster(tm, &json) == TASKMGR_OK);
  REQUIRE(json != nullptr);
  const std::string text = json;
  taskmgr_free(json);
  CHECK(strict_json_error(text.data(), text.size()) < 0);
  const boost::json::object v = boost::json::parse(text).as_object();
  REQUIRE(v.at("hosts").as_array().size() == 1);
  const boost::json::object& h = v.at("hosts").as_array()[0].as_object();
  CHECK(h.at("host_name").as_string() == "c-host");
  CHECK(h.at("state").as_string() == "alive");
  CHECK(h.at("id").as_string() == v.at("host_id").as_string());
  CHECK(v.at("queued").as_int64() == 0);
  taskmgr_destroy(tm);
  // Closed: its row says so.
  CHECK(s.text("SELECT closed_at IS NOT NULL FROM task_hosts") == "t");
}

TEST_CASE(
    "shared queue: close gives back a task backing off before its retry, for any host at once") {
  PgSchema s;
  std::atomic<int> runs{0};
  auto options = [&](const std::string& host) {
    TaskManagerOptions o;
    o.builtin_ocr = false;
    o.log_sink = [](LogLevel, std::string_view) {};
    o.services.push_back(make_function_service("svc", [&, host](TaskContext& ctx) {
      ++runs;
      if (ctx.attempt() == 1) throw OutOfMemoryError("first attempt: out of memory");
      ctx.set_result("{\"by\":\"" + host + "\"}");
    }));
    return o;
  };
  Config c = shared_config(s, "a");
  c.tasks.retry.backoff_base_seconds = 600;  // A would wait 10 minutes to retry it
  c.tasks.retry.backoff_max_seconds = 600;
  c.tasks.retry.backoff_jitter = 0;
  auto a = std::make_unique<TaskManager>(c, options("a"));
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const std::string id = a->create_task(r).id;
  for (int i = 0; i < 3000 && s.scalar("SELECT count(*) FROM task_events WHERE event_type = "
                                       "'retried' AND task_id = '" +
                                       id + "'") == 0;
       ++i)
    std::this_thread::sleep_for(10ms);
  REQUIRE(runs.load() == 1);
  a->close();
  // Given back: queued, no claim, its attempt counted.
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + id + "'") == "queued");
  CHECK(s.text("SELECT claimed_by IS NULL FROM tasks WHERE id = '" + id + "'") == "t");
  CHECK(s.scalar("SELECT attempt FROM tasks WHERE id = '" + id + "'") == 1);
  // B runs it now, not after A's lease or backoff.
  auto b = std::make_unique<TaskManager>(shared_config(s, "b"), options("b"));
  const auto done = b->wait_task(id, 60s);
  REQUIRE(done);
  CHECK(done->status == TaskStatus::kCompleted);
  CHECK(done->attempt == 2);
  CHECK(done->result == "{\"by\":\"b\"}");
  b->close();
}

TEST_CASE("shared queue: a rescue and a lost claim are counted in each host's metrics") {
  PgSchema s;
  Gate gate;
  std::atomic<int> a_runs{0};
  TaskManagerOptions oa;
  oa.builtin_ocr = false;
  oa.log_sink = [](LogLevel, std::string_view) {};
  oa.services.push_back(make_function_service("svc", [&](TaskContext& ctx) {
    ++a_runs;
    gate.wait();
    ctx.set_result("{\"by\":\"a\"}");
  }));
  // A's lease is made to run out below, and nothing of A renews it.
  auto a = std::make_unique<TaskManager>(still_config(s, "a"), oa);
  const std::string id = start_one(*a, "svc");
  while (a_runs.load() == 0) std::this_thread::sleep_for(1ms);
  // A stands still as far as the table tells: its lease has run out.
  s.exec("UPDATE tasks SET lease_expires_at = (now() AT TIME ZONE 'UTC') - interval '1 second'");
  TaskManagerOptions ob;
  ob.builtin_ocr = false;
  ob.log_sink = [](LogLevel, std::string_view) {};
  ob.services.push_back(
      make_function_service("svc", [&](TaskContext& ctx) { ctx.set_result("{\"by\":\"b\"}"); }));
  auto b = std::make_unique<TaskManager>(shared_config(s, "b"), ob);
  const auto done = b->wait_task(id, 60s);
  REQUIRE(done);
  CHECK(done->status == TaskStatus::kCompleted);
  CHECK(done->attempt == 2);
  CHECK(done->result == "{\"by\":\"b\"}");
  CHECK(b->get_task_metrics().tasks_rescued == 1);
  CHECK(b->get_task_metrics().lost_claims == 0);
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'retried' AND "
                 "details->>'reason' = 'host_lost'") == 1);
  // A finishes late: its result is discarded, the claim counted lost.
  gate.open();
  for (int i = 0; i < 3000 && a->get_task_metrics().lost_claims == 0; ++i)
    std::this_thread::sleep_for(5ms);
  const TaskMetrics m = a->get_task_metrics();
  CHECK(m.lost_claims == 1);
  CHECK(m.tasks_rescued == 0);
  CHECK(m.to_json().find("\"lost_claims\":1") != std::string::npos);
  CHECK(m.to_prometheus().find("taskmgr_lost_claims_total 1") != std::string::npos);
  // A's own view of the task is the row's: B's result.
  const auto seen = a->wait_task(id, 60s);
  REQUIRE(seen);
  CHECK(seen->result == "{\"by\":\"b\"}");
  CHECK(seen->host == "b");
  a->close();
  b->close();
  CHECK(s.text("SELECT result FROM tasks WHERE id = '" + id + "'") == "{\"by\":\"b\"}");
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'completed'") == 1);
}

TEST_CASE(
    "shared queue: an outcome the fence refuses after the claim check is told as cancelled, never "
    "as completed") {
  // The window after the claim check: A's claim is confirmed, its outcome
  // committed here, then (while A stands in its service's cleanup hook)
  // another host takes the task over. A's write of `completed` is refused
  // by the fence; A's subscribers must not hear `completed`.
  PgSchema s;
  std::atomic<int> taken{-1};  // rows the hook took over (1), or -2: its statement failed
  struct Svc : Service {
    explicit Svc(std::function<void(const std::string&)> f) : hook(std::move(f)) {}
    void process(TaskContext& ctx) override { ctx.set_result("{\"by\":\"a\"}"); }
    void cleanup_task(const std::string& task_id) noexcept override { hook(task_id); }
    std::function<void(const std::string&)> hook;
  };
  struct Factory : ServiceFactory {
    explicit Factory(std::function<void(const std::string&)> f) : hook(std::move(f)) {}
    std::string kind() const override { return "svc"; }
    std::unique_ptr<Service> create(const std::string&) override {
      return std::make_unique<Svc>(hook);
    }
    std::function<void(const std::string&)> hook;
  };
  TaskManagerOptions oa;
  oa.builtin_ocr = false;
  std::mutex mu;
  std::vector<std::string> a_log;
  std::vector<EventRecord> a_events;
  oa.log_sink = [&](LogLevel, std::string_view line) {
    std::lock_guard<std::mutex> g(mu);
    a_log.emplace_back(line);
  };
  oa.services.push_back(std::make_shared<Factory>([&](const std::string& task_id) {
    try {
      // As another host does once A's lease ran out (a rescue, then its
      // claim): the row carries that host's claim (only if A's outcome is
      // not in yet: it must not be).
      taken = static_cast<int>(s.scalar(
          "WITH u AS (UPDATE tasks SET claimed_by = 'other/1/x', claim = nextval('task_claims'), "
          "lease_expires_at = (now() AT TIME ZONE 'UTC') + interval '1 hour', run_host = 'other' "
          "WHERE id = '" +
          task_id + "' AND status = 'running' RETURNING 1) SELECT count(*) FROM u"));
    } catch (...) {
      taken = -2;
    }
  }));
  oa.subscribers.push_back([&](const EventRecord& e) {
    std::lock_guard<std::mutex> g(mu);
    a_events.push_back(e);
  });
  // No heartbeat of A's (which would find the claim gone first).
  auto a = std::make_unique<TaskManager>(still_config(s, "a"), oa);
  const std::string id = start_one(*a, "svc");
  for (int i = 0; i < 6000 && taken.load() == -1; ++i) std::this_thread::sleep_for(5ms);
  REQUIRE(taken.load() == 1);
  // A's write is refused: counted as a lost claim.
  for (int i = 0; i < 3000 && a->get_task_metrics().lost_claims == 0; ++i)
    std::this_thread::sleep_for(5ms);
  CHECK(a->get_task_metrics().lost_claims == 1);
  a->close();
  {
    std::lock_guard<std::mutex> g(mu);
    int told_lost = 0;
    for (const auto& e : a_events) {
      if (e.task_id != id) continue;
      CAPTURE(e.details_json);
      CHECK(e.event != TaskEvent::kCompleted);
      if (e.event == TaskEvent::kCancelled) {
        CHECK(e.details_json.find("lost claim") != std::string::npos);
        CHECK(e.details_json.find("\"while\":\"running\"") != std::string::npos);
        CHECK(strict_json_error(e.details_json.data(), e.details_json.size()) < 0);
        ++told_lost;
      }
    }
    CHECK(told_lost == 1);
    bool warned = false;
    for (const auto& line : a_log)
      warned = warned || line.find("the store refused its completed") != std::string::npos;
    CHECK(warned);
  }
  // The row is the other host's, untouched by A's outcome.
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type IN ('completed', "
                 "'cancelled')") == 0);
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + id + "'") == "running");
  CHECK(s.text("SELECT claimed_by FROM tasks WHERE id = '" + id + "'") == "other/1/x");
}

TEST_CASE(
    "shared queue: a claim lost while its task waited here: no start told, a cancelled while "
    "queued, and the next run has the same attempt") {
  PgSchema s;
  std::atomic<int> runs{0};
  TaskManagerOptions oa;
  oa.builtin_ocr = false;
  oa.log_sink = [](LogLevel, std::string_view) {};
  oa.services.push_back(make_function_service("svc", [&](TaskContext& ctx) {
    ++runs;
    ctx.set_result("{\"attempt\":" + std::to_string(ctx.attempt()) + "}");
  }));
  std::mutex mu;
  std::vector<EventRecord> a_events;
  oa.subscribers.push_back([&](const EventRecord& e) {
    std::lock_guard<std::mutex> g(mu);
    a_events.push_back(e);
  });
  // One start per 4 s: the second task is claimed (2 workers, 1 running)
  // and waits here for its turn.
  Config ca = still_config(s, "a");
  ca.services["svc"].rate_limit_per_second = 0.25;
  ca.services["svc"].rate_limit_burst = 1;
  auto a = std::make_unique<TaskManager>(ca, oa);
  const std::string first = start_one(*a, "svc");
  REQUIRE(a->wait_task(first, 60s)->status == TaskStatus::kCompleted);
  const std::string id = start_one(*a, "svc");
  // Claimed by A and waiting; then taken from A, as a rescue gives back a
  // task that only waited (A stood still past its lease).
  bool claimed = false;
  for (int i = 0; i < 2000 && !claimed; ++i) {
    claimed = s.scalar("SELECT count(*) FROM tasks WHERE id = '" + id +
                       "' AND status = 'queued' AND claimed_by IS NOT NULL") == 1;
    if (!claimed) std::this_thread::sleep_for(1ms);
  }
  REQUIRE(claimed);
  REQUIRE(s.scalar("WITH u AS (UPDATE tasks SET claimed_by = NULL, claim = NULL, "
                   "lease_expires_at = NULL WHERE id = '" +
                   id + "' AND status = 'queued' RETURNING 1) SELECT count(*) FROM u") == 1);
  CHECK(runs.load() == 1);
  // A's start of it is refused; A claims it again later and runs it.
  for (int i = 0;
       i < 12000 && s.text("SELECT status FROM tasks WHERE id = '" + id + "'") != "completed"; ++i)
    std::this_thread::sleep_for(5ms);
  REQUIRE(s.text("SELECT status FROM tasks WHERE id = '" + id + "'") == "completed");
  CHECK(s.scalar("SELECT attempt FROM tasks WHERE id = '" + id + "'") == 1);
  CHECK(s.text("SELECT result FROM tasks WHERE id = '" + id + "'") == "{\"attempt\":1}");
  CHECK(runs.load() == 2);
  a->close();
  std::lock_guard<std::mutex> g(mu);
  std::vector<std::string> told;
  for (const auto& e : a_events) {
    if (e.task_id != id) continue;
    told.emplace_back(to_string(e.event));
    if (e.event == TaskEvent::kCancelled) {
      CAPTURE(e.details_json);
      CHECK(e.details_json.find("\"while\":\"queued\"") != std::string::npos);
      CHECK(e.details_json.find("it did not run here") != std::string::npos);
    }
  }
  std::string sequence;
  for (const auto& name : told) sequence += name + " ";
  CAPTURE(sequence);
  CHECK(std::count(told.begin(), told.end(), "started") == 1);
  CHECK(std::count(told.begin(), told.end(), "cancelled") == 1);
  CHECK(std::count(told.begin(), told.end(), "completed") == 1);
  const auto cancelled = std::find(told.begin(), told.end(), "cancelled");
  const auto started = std::find(told.begin(), told.end(), "started");
  CHECK(cancelled < started);  // the start told is the run's
}

TEST_CASE(
    "shared queue: a retry on one host and a delete on another of one ended task: exactly one "
    "wins") {
  PgSchema s;
  auto open = [&](const std::string& host) {
    TaskManagerOptions o;
    o.builtin_ocr = false;
    o.log_sink = [](LogLevel, std::string_view) {};
    o.services.push_back(make_function_service("svc", [](TaskContext& ctx) {
      if (ctx.attempt() == 1) throw InvalidInputError("the first attempt fails");
    }));
    Config c = shared_config(s, host);
    c.tasks.retry.max_attempts = 1;
    return std::make_unique<TaskManager>(c, o);
  };
  auto a = open("a");
  auto b = open("b");
  int retried = 0;
  int deleted = 0;
  for (int round = 0; round < 20; ++round) {
    CAPTURE(round);
    TaskCreateRequest r;
    r.service = "svc";
    r.start = true;
    const std::string id = a->create_task(r).id;
    const auto failed = a->wait_task(id, 60s);
    REQUIRE(failed);
    REQUIRE(failed->status == TaskStatus::kFailed);
    std::atomic<int> ready{0};
    std::optional<ErrorCode> retry_error;
    std::optional<ErrorCode> delete_error;
    std::thread t1([&] {
      ++ready;
      while (ready.load() < 2) {
      }
      try {
        (round % 2 == 0 ? b : a)->retry_task(id);
      } catch (const Error& e) {
        retry_error = e.code();
      }
    });
    std::thread t2([&] {
      ++ready;
      while (ready.load() < 2) {
      }
      try {
        (round % 2 == 0 ? a : b)->delete_task(id);
      } catch (const Error& e) {
        delete_error = e.code();
      }
    });
    t1.join();
    t2.join();
    // Exactly one of them succeeded, and the other says why.
    CHECK(retry_error.has_value() != delete_error.has_value());
    if (!retry_error) {
      ++retried;
      CHECK(*delete_error == ErrorCode::kInvalidState);
      const auto done = b->wait_task(id, 60s);
      REQUIRE(done);
      CHECK(done->status == TaskStatus::kCompleted);
      CHECK(s.scalar("SELECT count(*) FROM tasks WHERE id = '" + id + "'") == 1);
    } else {
      ++deleted;
      CHECK(*retry_error == ErrorCode::kNotFound);
      CHECK(s.scalar("SELECT count(*) FROM tasks WHERE id = '" + id + "'") == 0);
      CHECK(s.scalar("SELECT count(*) FROM task_events WHERE task_id = '" + id + "'") == 0);
      CHECK_THROWS_AS(a->get_task(id), Error);
      CHECK_THROWS_AS(b->get_task(id), Error);
    }
  }
  MESSAGE(retried << " retried, " << deleted << " deleted");
  a->close();
  b->close();
}

TEST_CASE("shared queue: controls on a host whose copy of an ended task is stale act on the row") {
  PgSchema s;
  TaskManagerOptions oa;
  oa.builtin_ocr = false;
  oa.log_sink = [](LogLevel, std::string_view) {};
  oa.services.push_back(make_function_service(
      "svc", [](TaskContext&) { throw InvalidInputError("this attempt fails"); }));
  Config ca = shared_config(s, "a");
  ca.tasks.retry.max_attempts = 1;
  auto a = std::make_unique<TaskManager>(ca, oa);
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const std::string id = a->create_task(r).id;
  REQUIRE(a->wait_task(id, 60s)->status == TaskStatus::kFailed);
  for (int i = 0; i < 2000 && s.text("SELECT resource_cleanup_completed FROM tasks WHERE id = '" +
                                     id + "'") != "t";
       ++i)
    std::this_thread::sleep_for(5ms);
  a->pause(PauseScope::kService, "svc");  // A claims it no more
  // B (which does not run the kind) retries it: queued in the table, unclaimed.
  TaskManagerOptions ob;
  ob.builtin_ocr = false;
  ob.log_sink = [](LogLevel, std::string_view) {};
  auto b = std::make_unique<TaskManager>(shared_config(s, "b"), ob);
  CHECK(b->retry_task(id).status == TaskStatus::kQueued);
  // A's own copy says failed; its controls act on the row.
  CHECK(a->get_task(id).status == TaskStatus::kQueued);
  CHECK(a->get_task_health(id).status == TaskStatus::kQueued);
  CHECK(a->set_task_priority(id, 4).priority == 4);
  CHECK(s.scalar("SELECT priority FROM tasks WHERE id = '" + id + "'") == 4);
  CHECK_THROWS_WITH_AS(a->start_task(id), doctest::Contains("is queued"), Error);
  CHECK_THROWS_WITH_AS(a->delete_task(id), doctest::Contains("is queued"), Error);
  CHECK(a->cancel_task(id));
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + id + "'") == "cancelled");
  CHECK_FALSE(a->cancel_task(id));  // ended now
  a->delete_task(id);
  CHECK(s.scalar("SELECT count(*) FROM tasks") == 0);
  a->close();
  b->close();
}

TEST_CASE("shared queue: close gives back a task it interrupted, for any host at once") {
  PgSchema s;
  std::atomic<int> a_runs{0};
  TaskManagerOptions oa;
  oa.builtin_ocr = false;
  oa.log_sink = [](LogLevel, std::string_view) {};
  oa.services.push_back(make_function_service("svc", [&](TaskContext& ctx) {
    ++a_runs;
    while (!ctx.cancelled()) std::this_thread::sleep_for(1ms);  // stops when asked
    ctx.throw_if_cancelled();
  }));
  Config ca = shared_config(s, "a");
  ca.tasks.close_grace_seconds = 0.2;
  auto a = std::make_unique<TaskManager>(ca, oa);
  TaskCreateRequest r;
  r.service = "svc";
  r.start = true;
  const std::string id = a->create_task(r).id;
  while (a_runs.load() == 0) std::this_thread::sleep_for(1ms);
  a->close();
  // Given back: queued, no claim.
  CHECK(s.text("SELECT status FROM tasks WHERE id = '" + id + "'") == "queued");
  CHECK(s.text("SELECT claimed_by IS NULL FROM tasks WHERE id = '" + id + "'") == "t");
  TaskManagerOptions ob;
  ob.builtin_ocr = false;
  ob.log_sink = [](LogLevel, std::string_view) {};
  ob.services.push_back(
      make_function_service("svc", [](TaskContext& ctx) { ctx.set_result("{\"by\":\"b\"}"); }));
  auto b = std::make_unique<TaskManager>(shared_config(s, "b"), ob);
  const auto done = b->wait_task(id, 60s);
  REQUIRE(done);
  CHECK(done->status == TaskStatus::kCompleted);
  CHECK(done->result == "{\"by\":\"b\"}");
  b->close();
}
