#include <taskmgr.h>
#include <taskmgr/taskmgr.hpp>

#include <cstdio>
#include <cstring>

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
  std::printf("consumer ok: taskmgr %s, max_queue_size %d, %zu-byte task json\n",
              taskmgr_version_string(), config.tasks.max_queue_size, json.size());
  return 0;
}
