#include <doctest/doctest.h>

#include <atomic>
#include <set>
#include <thread>
#include <vector>

#include "taskmgr/error.hpp"
#include "taskmgr/service_pool.hpp"
#include "test_support.hpp"

using namespace taskmgr;
using namespace std::chrono_literals;

namespace {

struct Counting : ServiceFactory {
  std::atomic<int> created{0};
  std::atomic<int> alive{0};
  std::atomic<bool> fail_create{false};
  struct Svc : Service {
    explicit Svc(Counting& f) : f_(f) { ++f_.alive; }
    ~Svc() override { --f_.alive; }
    void process(TaskContext&) override {}
    Counting& f_;
  };
  std::string kind() const override { return "count"; }
  std::unique_ptr<Service> create(const std::string&) override {
    if (fail_create) throw std::runtime_error("engine init failed");
    ++created;
    return std::make_unique<Svc>(*this);
  }
};

PoolsConfig pools(int max, double timeout_s = 30) {
  PoolsConfig c;
  c.defaults.max_instances = max;
  c.defaults.acquire_timeout_seconds = timeout_s;
  return c;
}

}  // namespace

TEST_CASE("instances are created lazily, reused, and carry stable ids") {
  auto f = std::make_shared<Counting>();
  ServicePool pool(f, pools(2), 2);
  std::string first_id;
  {
    auto lease = pool.acquire("cpu");
    CHECK(f->created == 0);  // lazily
    lease.service();
    CHECK(f->created == 1);
    first_id = lease.instance_id();
    CHECK(first_id == "count@cpu#1");
  }
  {
    auto lease = pool.acquire("cpu");
    lease.service();
    CHECK(f->created == 1);  // the warm one again
    CHECK(lease.instance_id() == first_id);
  }
  CHECK(pool.stats("cpu").idle == 1);
  CHECK(pool.stats("cpu").in_use == 0);
}

TEST_CASE("the pool never holds more than max instances under concurrency") {
  auto f = std::make_shared<Counting>();
  ServicePool pool(f, pools(3), 2);
  std::atomic<int> in_use{0}, peak{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        auto lease = pool.acquire("cpu", 10s);
        lease.service();
        const int now = ++in_use;
        int p = peak.load();
        while (now > p && !peak.compare_exchange_weak(p, now)) {
        }
        // The first lease of each thread is held until two are out at once,
        // so the threads overlap however the machine schedules them.
        if (i == 0) taskmgr::test::eventually([&] { return peak.load() >= 2; });
        std::this_thread::yield();
        --in_use;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(peak.load() <= 3);
  CHECK(peak.load() >= 2);  // the threads did overlap
  CHECK(f->created <= 3);
  CHECK(pool.stats("cpu").acquired == 1600);
}

TEST_CASE("acquire fails with POOL_EXHAUSTED after the timeout") {
  auto f = std::make_shared<Counting>();
  auto clock = std::make_shared<ManualClock>();
  ServicePool pool(f, pools(1, 5), 1, clock);
  auto held = pool.acquire("cpu");
  std::atomic<bool> threw{false};
  std::string message;
  std::thread waiter([&] {
    try {
      pool.acquire("cpu");
    } catch (const Error& e) {
      threw = e.code() == ErrorCode::kPoolExhausted;
      message = e.what();
    }
  });
  // Nothing happens until (fake) time passes the 5 s timeout.
  std::this_thread::sleep_for(20ms);
  CHECK_FALSE(threw.load());
  clock->advance(6s);
  waiter.join();
  CHECK(threw.load());
  CHECK(message.find("count") != std::string::npos);
  CHECK(message.find("cpu") != std::string::npos);
  CHECK(pool.stats("cpu").exhausted == 1);
  CHECK_FALSE(pool.try_acquire("cpu").has_value());
}

TEST_CASE("a waiting acquire gets the instance a release frees") {
  auto f = std::make_shared<Counting>();
  ServicePool pool(f, pools(1), 1);
  auto held = pool.acquire("cpu");
  held.service();
  std::string got;
  std::thread waiter([&] { got = pool.acquire("cpu", 30s).instance_id(); });
  std::this_thread::sleep_for(10ms);
  pool.release(std::move(held));  // the spec's release(service)
  waiter.join();
  CHECK(got == "count@cpu#1");
}

TEST_CASE("a discarded instance is destroyed and replaced") {
  auto f = std::make_shared<Counting>();
  ServicePool pool(f, pools(1), 1);
  {
    auto lease = pool.acquire("cpu");
    lease.service();
    lease.discard();  // e.g. it ran out of memory
  }
  CHECK(f->alive == 0);
  CHECK(pool.stats("cpu").destroyed == 1);
  auto lease = pool.acquire("cpu");
  lease.service();
  CHECK(f->created == 2);
  CHECK(lease.instance_id() == "count@cpu#2");
}

TEST_CASE("a failing factory leaves the slot free") {
  auto f = std::make_shared<Counting>();
  f->fail_create = true;
  ServicePool pool(f, pools(1), 1);
  {
    auto lease = pool.acquire("cpu");
    CHECK_THROWS_WITH_AS(lease.service(), "engine init failed", std::runtime_error);
  }
  f->fail_create = false;
  CHECK(pool.has_capacity("cpu"));
  auto lease = pool.acquire("cpu", 1s);
  lease.service();
  CHECK(f->created == 1);
}

TEST_CASE("warm() creates min_instances: auto max is the worker count on cpu, 1 on a GPU") {
  auto f = std::make_shared<Counting>();
  PoolsConfig c;
  c.defaults.min_instances = 2;
  c.devices["cuda:0"] = PoolSettings{0, 0, 30};
  ServicePool pool(f, c, 4);
  pool.warm("cpu");
  CHECK(f->created == 2);
  CHECK(pool.stats("cpu").idle == 2);
  CHECK(pool.settings("cpu").max_instances == 4);
  CHECK(pool.settings("cuda:0").max_instances == 1);
}

TEST_CASE("healthy() and an instance's destructor run without the pool's lock") {
  // Both are host code and may call the pool (here: its stats, which take
  // the pool's lock).
  struct Reentrant : ServiceFactory {
    ServicePool* pool = nullptr;
    std::atomic<int> healthy_calls{0};
    std::atomic<int> destroyed{0};
    struct Svc : Service {
      explicit Svc(Reentrant& f) : f_(f) {}
      ~Svc() override {
        f_.pool->stats("cpu");
        ++f_.destroyed;
      }
      void process(TaskContext&) override {}
      bool healthy() const noexcept override {
        f_.pool->has_capacity("cpu");
        ++f_.healthy_calls;
        return true;
      }
      Reentrant& f_;
    };
    std::string kind() const override { return "reentrant"; }
    std::unique_ptr<Service> create(const std::string&) override {
      return std::make_unique<Svc>(*this);
    }
  };
  auto f = std::make_shared<Reentrant>();
  ServicePool pool(f, pools(1), 1);
  f->pool = &pool;
  {
    auto lease = pool.acquire("cpu");
    lease.service();
  }
  CHECK(f->healthy_calls == 1);
  CHECK(pool.stats("cpu").idle == 1);
  {
    auto lease = pool.acquire("cpu");
    lease.service();
    lease.discard();
  }
  CHECK(f->destroyed == 1);
  CHECK(pool.stats("cpu").destroyed == 1);
}
