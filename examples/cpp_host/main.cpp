// The smallest complete embedding of taskmgr in C++: register a service,
// create and start tasks, receive events, read metrics and health.
//
// Built by the project's build (examples/) and usable as a template for a
// find_package(taskmgr) project.
#include <taskmgr/taskmgr.hpp>

#include <chrono>
#include <iostream>

int main() {
  taskmgr::Config config;  // the spec's defaults
  config.storage.path = ":memory:";
  taskmgr::TaskManager tm(config);

  // A host-provided service: here it only reports memory and a result.
  tm.register_service(taskmgr::make_function_service("echo", [](taskmgr::TaskContext& ctx) {
    ctx.stage("work");
    ctx.report_memory(12);
    ctx.set_result("{\"echo\":" + std::to_string(ctx.attempt()) + "}");
  }));

  // Events arrive on the manager's dispatcher thread, in order per task.
  tm.subscribe([](const taskmgr::EventRecord& e) {
    std::cout << "event " << taskmgr::to_string(e.event) << " " << e.details_json << "\n";
  });

  taskmgr::TaskCreateRequest request;
  request.service = "echo";
  request.priority = 5;
  const taskmgr::Task task = tm.create_task(request);
  tm.start_task(task.id);

  const auto done = tm.wait_task(task.id, std::chrono::seconds(30));
  if (!done || done->status != taskmgr::TaskStatus::kCompleted) return 1;
  tm.flush_events();
  std::cout << "task " << taskmgr::to_json(*done) << "\n";
  std::cout << "health " << tm.get_task_health(task.id).to_json() << "\n";
  std::cout << "metrics " << tm.get_task_metrics().to_json() << "\n";
  return 0;
}
