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

namespace {
int capi_ok_process(void*, void*, taskmgr_task_context*) { return TASKMGR_OK; }
int capi_make(void*, const char*, void** out) {
  static int instance;
  *out = &instance;
  return TASKMGR_OK;
}
}  // namespace

TEST_CASE(
    "taskmgr_register_service refuses kinds that are empty, too long, not UTF-8 or with control "
    "characters") {
  taskmgr_manager* m = nullptr;
  REQUIRE(taskmgr_open_yaml("storage: {path: ':memory:'}\n", &m) == TASKMGR_OK);
  const std::string long_kind(101, 'k');
  for (const char* kind : {"", "tab\there", "bad\xff", long_kind.c_str()}) {
    taskmgr_service s;
    taskmgr_service_init(&s);
    s.kind = kind;
    s.create_instance = capi_make;
    s.process = capi_ok_process;
    CAPTURE(kind);
    CHECK(taskmgr_register_service(m, &s) == TASKMGR_E_INVALID_ARGUMENT);
    CHECK(std::string(taskmgr_last_error()).find("kind") != std::string::npos);
  }
  taskmgr_service ok;
  taskmgr_service_init(&ok);
  ok.kind = "ocr@v2";
  ok.create_instance = capi_make;
  ok.process = capi_ok_process;
  CHECK(taskmgr_register_service(m, &ok) == TASKMGR_OK);
  CHECK(taskmgr_destroy(m) == TASKMGR_OK);
}
