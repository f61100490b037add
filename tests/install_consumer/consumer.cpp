#include <taskmgr.h>
#include <taskmgr/taskmgr.hpp>

#include <cstdio>
#include <cstring>
#include <string>

int main() {
  if (taskmgr::version_number() != TASKMGR_VERSION_NUMBER) return 2;
  taskmgr::Config config = taskmgr::Config::defaults();
  taskmgr::Task task;
  task.id = taskmgr::generate_task_id();
  task.service = "ocr";
  const std::string json = taskmgr::to_json(task);
  try {
    taskmgr::Config::from_yaml_string("tasks: {max_queue_size: 0}");
    return 3;
  } catch (const taskmgr::ConfigError& e) {
    if (e.key_path() != "tasks.max_queue_size") return 4;
  }
  char* yaml = nullptr;
  if (taskmgr_config_normalize(nullptr, &yaml) != TASKMGR_OK) return 5;
  taskmgr_free(yaml);
  // The installed library finds its installed worker program, which starts
  // (its own RUNPATH finds the library) and loads the OCR engine.
  const std::string worker = taskmgr::find_worker_executable(taskmgr::ServiceConfig{});
  const std::string tail = "/libexec/taskmgr/taskmgr-worker";
  if (worker.size() < tail.size() ||
      worker.compare(worker.size() - tail.size(), tail.size(), tail)) {
    std::printf("the installed library found no installed worker: '%s'\n", worker.c_str());
    return 6;
  }
  try {
    auto svc = taskmgr::make_process_service("ocr", config)->create("cpu");
    if (!svc || !svc->healthy()) return 7;
  } catch (const std::exception& e) {
    std::printf("the installed worker did not start: %s\n", e.what());
    return 8;
  }
  std::printf("consumer ok: taskmgr %s, max_queue_size %d, %zu-byte task json\n",
              taskmgr_version_string(), config.tasks.max_queue_size, json.size());
  return 0;
}
