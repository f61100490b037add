// The timer thread (a private class of src/): exceptions never end it.
#include <doctest/doctest.h>
#include <pthread.h>

#include <atomic>
#include <stdexcept>

#include "test_support.hpp"
#include "timer_queue.hpp"

using namespace taskmgr;
using namespace std::chrono_literals;

TEST_CASE("a timer callback that throws is counted and the next timer still fires") {
  detail::TimerQueue timers(Clock::system());
  std::atomic<bool> threw{false}, next{false};
  timers.schedule_after(0s, [&] {
    threw = true;
    throw std::runtime_error("timer bug");
  });
  timers.schedule_after(1ms, [&] { next = true; });
  REQUIRE(test::eventually([&] { return next.load(); }));
  CHECK(threw.load());
  CHECK(timers.callback_errors() == 1);
  // Not only std::exception: anything thrown is caught.
  timers.schedule_after(0s, [] { throw 42; });
  std::atomic<bool> after{false};
  timers.schedule_after(1ms, [&] { after = true; });
  REQUIRE(test::eventually([&] { return after.load(); }));
  CHECK(timers.callback_errors() == 2);
  CHECK(timers.pending() == 0);
}

TEST_CASE("a timer callback that ends its thread is not caught: the thread unwinds and exits") {
  // pthread_exit unwinds with abi::__forced_unwind; a catch that swallowed
  // it would abort the process ("exception not rethrown").
  detail::TimerQueue timers(Clock::system());
  std::atomic<bool> unwound{false};
  timers.schedule_after(0s, [&] {
    struct Mark {
      std::atomic<bool>& flag;
      ~Mark() { flag = true; }
    } mark{unwound};
    pthread_exit(nullptr);
  });
  REQUIRE(test::eventually([&] { return unwound.load(); }));
  CHECK(timers.callback_errors() == 0);
  timers.stop();  // joins the thread that exited
}
