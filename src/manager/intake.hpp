// Private: the host's write paths, from request to scheduler transition, in
// the one direction data flows (docs/ARCHITECTURE.md):
//
//   create  validate -> service lookup -> queue room (admission) ->
//           estimate and placement -> durable insert -> Scheduler::add_created
//   start   the pending task's snapshot -> placement again when the device or
//           batch size changes -> Scheduler::start (admission, queue)
//   retry   a failed or cancelled task's record (rebuilt from the store when
//           the manager no longer holds it) -> placement again when the
//           device or batch size changes or its device is gone ->
//           Scheduler::retry (admission, queue)
//   device  a device became unavailable: its queued tasks placed again, then
//           Scheduler::move_queued
//   service register_service: pool, memory model, dispatcher, then visible
//
// Placement and the store run here, before the scheduler lock is taken;
// the lock is taken once at the end of each path.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "log_internal.hpp"
#include "manager/cluster.hpp"
#include "manager/dispatcher.hpp"
#include "manager/journal.hpp"
#include "manager/placement.hpp"
#include "manager/scheduler.hpp"
#include "manager/service_registry.hpp"
#include "sync.hpp"
#include "taskmgr/task_manager.hpp"

namespace taskmgr::detail {

// What worker processes log (a start, a crash, a kill), through the
// manager's logger: a copy, so that a worker outliving this room logs to
// the same sink.
inline LogSink worker_log_sink(const Logger& log) {
  return [log](LogLevel level, std::string_view message)
             REQUIRES(!scheduler_lock) { log.write(level, message); };
}

class Intake {
 public:
  Intake(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
         Dispatcher& dispatcher, ServiceRegistry& registry, Placement& placement, Journal& journal,
         DeviceRegistry& devices, MemoryEstimator& estimator, int workers, const Logger& log)
      : config_(config),
        clock_(std::move(clock)),
        scheduler_(scheduler),
        dispatcher_(dispatcher),
        registry_(registry),
        placement_(placement),
        journal_(journal),
        devices_(devices),
        estimator_(estimator),
        workers_(workers),
        log_(log) {}

  std::vector<Task> create(const TaskCreateRequest* reqs, std::size_t n) REQUIRES(!scheduler_lock);
  Task start(const std::string& id, const TaskStartRequest& params) REQUIRES(!scheduler_lock);
  Task retry(const std::string& id, const TaskStartRequest& params) REQUIRES(!scheduler_lock);
  void set_device_available(const std::string& device, bool available) REQUIRES(!scheduler_lock);
  void register_service(std::shared_ptr<ServiceFactory> factory) REQUIRES(!scheduler_lock)
      REQUIRES(!register_mu_);

  // Several hosts share the queue (Cluster): created tasks go to the shared
  // table only (queued for any host to claim; the cluster is woken to claim
  // at once); start and retry of a task this host does not hold change its
  // row there.
  void set_shared(Cluster* cluster) { cluster_ = cluster; }
  bool shared() const { return cluster_ != nullptr; }

 private:
  Cluster* cluster_ = nullptr;
  const Config& config_;
  std::shared_ptr<const Clock> clock_;
  Scheduler& scheduler_;
  Dispatcher& dispatcher_;
  ServiceRegistry& registry_;
  Placement& placement_;
  Journal& journal_;
  DeviceRegistry& devices_;
  MemoryEstimator& estimator_;
  const int workers_;
  const Logger& log_;
  Mutex register_mu_;  // registrations one at a time (check, then add)
};

}  // namespace taskmgr::detail
