// The hand-off of committed changes from the threads that make them to the
// one thread that drains them, three ways, in the same run:
//
//   swap      what the outbox does: producers append to a vector under a
//             mutex, the drainer swaps the whole vector out under it
//   lockfree  boost::lockfree::queue (multi-producer, multi-consumer) of
//             pointers to the items
//   spsc      boost::lockfree::spsc_queue of items; the producers are
//             serialized by a mutex of their own (as the scheduler lock
//             serializes commits), so one producer at a time
//
// Each producer commits items in bursts under its "scheduler lock" (as the
// manager commits a state change with that lock held), so the comparison
// includes what a lock-free queue could save there: nothing, since the
// producer holds a lock anyway. Items/s, median of --runs.
//
//   ./build/release/bench/bench_handoff --items 2000000 --runs 7
#include <algorithm>
#include <atomic>
#include <boost/lockfree/queue.hpp>
#include <boost/lockfree/spsc_queue.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Item {
  const void* rec = nullptr;  // the record (a pointer, as the outbox holds)
  std::uint64_t first = 0, count = 0;
  std::uint32_t status = 0;
};

constexpr int kProducers = 2;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Runs producers (each calls `produce(i)` for its share under its commit
// lock) and one consumer (`consume()` returns items taken, 0 if none) until
// every item is consumed. Items per second.
double run(std::size_t items, const std::function<void(std::mutex&, std::size_t)>& produce,
           const std::function<std::size_t()>& consume) {
  std::mutex scheduler;  // the lock a commit is made under
  std::atomic<bool> go{false};
  std::vector<std::thread> producers;
  const std::size_t share = items / kProducers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      while (!go.load()) std::this_thread::yield();
      for (std::size_t i = 0; i < share; ++i) produce(scheduler, p * share + i);
    });
  }
  const auto t0 = Clock::now();
  go = true;
  std::size_t done = 0;
  while (done < share * kProducers) {
    const std::size_t n = consume();
    if (n == 0) std::this_thread::yield();
    done += n;
  }
  const double s = seconds_since(t0);
  for (auto& t : producers) t.join();
  return static_cast<double>(done) / s;
}

double bench_swap(std::size_t items) {
  std::mutex mu;
  std::vector<Item> outbox, spare;
  outbox.reserve(1024);
  std::uint64_t sink = 0;
  const double rate = run(
      items,
      [&](std::mutex& scheduler, std::size_t i) {
        std::lock_guard<std::mutex> s(scheduler);
        std::lock_guard<std::mutex> g(mu);
        outbox.push_back(Item{&mu, i, 1, 2});
      },
      [&]() -> std::size_t {
        {
          std::lock_guard<std::mutex> g(mu);
          spare.swap(outbox);
        }
        const std::size_t n = spare.size();
        for (const auto& it : spare) sink += it.first;
        spare.clear();
        return n;
      });
  if (sink == 42) std::puts("");
  return rate;
}

double bench_lockfree(std::size_t items) {
  boost::lockfree::queue<Item*> q(1024);
  std::vector<Item> storage(items);
  std::uint64_t sink = 0;
  const double rate = run(
      items,
      [&](std::mutex& scheduler, std::size_t i) {
        std::lock_guard<std::mutex> s(scheduler);
        storage[i] = Item{&q, i, 1, 2};
        while (!q.push(&storage[i])) {
        }
      },
      [&]() -> std::size_t {
        std::size_t n = 0;
        Item* it = nullptr;
        while (q.pop(it)) {
          sink += it->first;
          ++n;
        }
        return n;
      });
  if (sink == 42) std::puts("");
  return rate;
}

double bench_spsc(std::size_t items) {
  boost::lockfree::spsc_queue<Item, boost::lockfree::capacity<65536>> q;
  std::uint64_t sink = 0;
  const double rate = run(
      items,
      [&](std::mutex& scheduler, std::size_t i) {
        std::lock_guard<std::mutex> s(scheduler);  // one producer at a time
        while (!q.push(Item{&q, i, 1, 2})) {
        }
      },
      [&]() -> std::size_t {
        std::size_t n = 0;
        n = q.consume_all([&](const Item& it) { sink += it.first; });
        return n;
      });
  if (sink == 42) std::puts("");
  return rate;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t items = 2'000'000;
  int runs = 7;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--items") && i + 1 < argc)
      items = std::strtoull(argv[++i], nullptr, 10);
    else if (!std::strcmp(argv[i], "--runs") && i + 1 < argc)
      runs = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--items N] [--runs N]\n", argv[0]);
      return 2;
    }
  }
  std::vector<double> swap, lf, spsc;
  // Interleaved, so that the machine's noise falls on all three alike.
  for (int r = 0; r < runs; ++r) {
    swap.push_back(bench_swap(items));
    lf.push_back(bench_lockfree(items));
    spsc.push_back(bench_spsc(items));
    std::printf("run %d: swap %.0f/s  lockfree %.0f/s  spsc %.0f/s\n", r + 1, swap.back(),
                lf.back(), spsc.back());
  }
  const double s = median(swap), l = median(lf), q = median(spsc);
  std::printf("median items/s (%d producers, 1 drainer, %zu items, %d runs):\n", kProducers, items,
              runs);
  std::printf("  swap (the outbox)         %12.0f  1.00x\n", s);
  std::printf("  boost::lockfree::queue    %12.0f  %.2fx\n", l, l / s);
  std::printf("  boost::lockfree::spsc     %12.0f  %.2fx\n", q, q / s);
  return 0;
}
