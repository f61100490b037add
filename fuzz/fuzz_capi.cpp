// libFuzzer harness: the C ABI entry points that parse strings. The input
// is split at NUL bytes into fields fed to taskmgr_config_normalize (YAML),
// taskmgr_create_task (service, path, device, options, media type; then
// the same request inside a taskmgr_create_tasks batch),
// taskmgr_list_tasks (status filter) and taskmgr_start_task (options). Every
// call must return a status (never crash, throw or leak) and leave a
// message on failure. The manager (in memory, host service "svc") is
// replaced every 1,024 runs so its task history stays small (each run
// creates up to four tasks, and listing by status scans them). Everything
// it gets back is held to the standard of inputs: every string valid UTF-8,
// every JSON document strict (tests/strict_json.h), or the run aborts.
#include <taskmgr.h>

#include "../tests/strict_json.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

int noop_create(void*, const char*, void** out) {
  *out = nullptr;
  return TASKMGR_OK;
}
int noop_process(void*, void*, taskmgr_task_context*) { return TASKMGR_OK; }

taskmgr_manager* manager(bool renew) {
  static taskmgr_manager* tm = nullptr;
  if (renew && tm != nullptr) {
    taskmgr_destroy(tm);
    tm = nullptr;
  }
  if (tm == nullptr) {
    taskmgr_open_options o;
    taskmgr_open_options_init(&o);
    o.config_yaml =
        "devices: {probe_cpu: false, probe_nvidia: false, cpu_memory_mb: 1000}\n"
        "executor: {worker_threads: 1}\n"
        "tasks: {max_queue_size: 100000}\n";
    o.database_path = ":memory:";
    o.disable_builtin_ocr = 1;
    if (taskmgr_open(&o, &tm) != TASKMGR_OK) std::abort();
    taskmgr_service s;
    taskmgr_service_init(&s);
    s.kind = "svc";
    s.create_instance = noop_create;
    s.process = noop_process;
    s.input_optional = 1;  // requests without input reach the rest of create
    if (taskmgr_register_service(tm, &s) != TASKMGR_OK) std::abort();
  }
  return tm;
}

void expect_message(int rc) {
  const char* m = taskmgr_last_error();
  if (rc != TASKMGR_OK && m[0] == '\0') std::abort();           // a failure must say why
  if (strict_utf8_error(m, std::strlen(m)) >= 0) std::abort();  // in UTF-8
}

// A string the library returned: UTF-8, and strict JSON when `json`.
void expect_valid(const char* s, bool json) {
  if (s == nullptr) return;
  const std::size_t n = std::strlen(s);
  if (strict_utf8_error(s, n) >= 0) std::abort();
  if (json && strict_json_error(s, n) >= 0) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static unsigned runs = 0;
  taskmgr_manager* tm = manager(++runs % 1024 == 0);
  std::vector<std::string> f;
  std::string cur;
  for (std::size_t i = 0; i < size; ++i) {
    if (data[i] == 0) {
      f.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(static_cast<char>(data[i]));
    }
  }
  f.push_back(cur);
  f.resize(7);
  auto opt = [&](std::size_t i) -> const char* { return f[i].empty() ? nullptr : f[i].c_str(); };

  char* yaml = nullptr;
  int rc = taskmgr_config_normalize(f[0].c_str(), &yaml);
  expect_message(rc);
  if ((rc == TASKMGR_OK) != (yaml != nullptr)) std::abort();
  expect_valid(yaml, false);
  taskmgr_free(yaml);

  taskmgr_task_request r;
  taskmgr_task_request_init(&r);
  r.service = f[1].empty() ? "svc" : f[1].c_str();
  r.input_path = opt(2);
  r.device = opt(3);
  r.options_json = opt(4);
  r.media_type = opt(5);
  char id[TASKMGR_TASK_ID_SIZE];
  rc = taskmgr_create_task(tm, &r, id);
  expect_message(rc);
  if (rc == TASKMGR_OK) {
    if (std::strlen(id) != 36) std::abort();
    char* task = nullptr;
    if (taskmgr_get_task(tm, id, &task) != TASKMGR_OK) std::abort();
    expect_valid(task, true);  // the fuzzed fields, handed back
    taskmgr_free(task);
    taskmgr_start_params p;
    taskmgr_start_params_init(&p);
    p.options_json = opt(6);
    expect_message(taskmgr_start_task(tm, id, &p));
    int cancelled = 0;
    expect_message(taskmgr_cancel_task(tm, id, &cancelled));
  }
  // The same fields as a batch with start: the fuzzed request between two
  // good ones. All or none: on failure no id is written.
  taskmgr_task_request batch[3];
  for (auto& b : batch) {
    taskmgr_task_request_init(&b);
    b.service = "svc";
    b.start = 0;  // pending: nothing to run (the fuzzed one may start)
  }
  batch[1] = r;
  batch[1].start = static_cast<int32_t>(size & 1);
  char ids[3][TASKMGR_TASK_ID_SIZE];
  std::memset(ids, 'x', sizeof ids);
  rc = taskmgr_create_tasks(tm, batch, 3, ids);
  expect_message(rc);
  for (const auto& one : ids) {
    if (rc == TASKMGR_OK ? std::strlen(one) != 36 : one[0] != 'x') std::abort();
    int cancelled = 0;
    if (rc == TASKMGR_OK) expect_message(taskmgr_cancel_task(tm, one, &cancelled));
  }
  char* list = nullptr;
  rc = taskmgr_list_tasks(tm, f[6].c_str(), nullptr, 1, &list);
  expect_message(rc);
  expect_valid(list, true);
  taskmgr_free(list);
  return 0;
}
