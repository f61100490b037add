// taskmgr-ocr: the main program of the project.
//
// At this stage of the library it loads a configuration (the spec's defaults
// when no file is given), prints it with every value in force, and prints a
// few tasks in their model form. Later stages grow it into batch OCR.
//
//   taskmgr-ocr [--config FILE]
#include <taskmgr/taskmgr.hpp>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

namespace {

void usage() {
  std::cout << "usage: taskmgr-ocr [--config FILE]\n"
               "  --config FILE  YAML configuration (default: built-in defaults)\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--config" && i + 1 < argc) {
      config_path = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      usage();
      return 0;
    } else {
      std::cerr << "taskmgr-ocr: unknown argument '" << arg << "'\n";
      usage();
      return 2;
    }
  }

  taskmgr::Config config;
  try {
    config = config_path.empty() ? taskmgr::Config::defaults()
                                 : taskmgr::Config::from_yaml_file(config_path);
  } catch (const taskmgr::ConfigError& e) {
    std::cerr << "taskmgr-ocr: " << e.what() << "\n";
    return 2;
  }

  std::cout << "taskmgr " << taskmgr::version() << "\n";
  std::cout << "# configuration (" << (config_path.empty() ? "defaults" : config_path)
            << ")\n---\n"
            << config.to_yaml() << "...\n";

  std::cout << "# tasks in their model form\n";
  const char* pages[] = {"samples/page-1.png", "samples/page-2.png", "samples/page-3.png"};
  int priority = 0;
  for (const char* page : pages) {
    taskmgr::Task task;
    task.id = taskmgr::generate_task_id();
    task.service = "ocr";
    task.input.path = page;
    task.priority = priority++;
    task.created_at = std::chrono::system_clock::now();
    std::cout << taskmgr::to_json(task) << "\n";
  }
  return 0;
}
