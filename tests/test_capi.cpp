// The C ABI's conventions, checked from C++ where threads are easy to make.
#include <doctest/doctest.h>

#include <string>
#include <thread>

#include "taskmgr.h"

TEST_CASE("the last error message is kept per thread") {
  char* out = nullptr;
  REQUIRE(taskmgr_config_normalize("tasks: {max_queue_size: -1}", &out) ==
          TASKMGR_E_INVALID_CONFIG);
  const std::string mine = taskmgr_last_error();
  CHECK(mine.find("tasks.max_queue_size") != std::string::npos);

  std::string other_before, other_after;
  std::thread t([&] {
    other_before = taskmgr_last_error();  // a fresh thread has no error
    char* o = nullptr;
    taskmgr_config_normalize("nope: 1", &o);
    other_after = taskmgr_last_error();
  });
  t.join();
  CHECK(other_before.empty());
  CHECK(other_after.find("nope") != std::string::npos);
  // The other thread's failure did not overwrite this thread's message.
  CHECK(std::string(taskmgr_last_error()) == mine);
}
