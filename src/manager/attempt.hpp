// Private: one attempt of a task, on a worker thread, without the scheduler
// lock: the service's process() with the TaskContext it sees, the decision
// on the outcome (TaskErrorHandler), then the first half of the cleanup
// (the service's cache hook, the pool lease, the temp dir). The scheduler
// commits the outcome before the hook runs and the rest of the cleanup
// after it.
//
// The cleanup of attempt n is claimed once: by this worker after the hook
// returns, or by the sweep's watchdog when the hook runs past
// cleanup_timeout_seconds (Record::cleanup_claim). A worker that loses
// discards its instance and leaves the cleanup to the watchdog.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "log_internal.hpp"
#include "manager/journal.hpp"
#include "manager/placement.hpp"
#include "manager/record.hpp"
#include "manager/scheduler.hpp"
#include "manager/service_registry.hpp"
#include "manager/stats.hpp"
#include "manager/temp_dirs.hpp"
#include "sync.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/service_pool.hpp"

namespace taskmgr::detail {

class Attempt {
 public:
  Attempt(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
          Placement& placement, ServiceRegistry& registry, TaskErrorHandler& handler,
          Journal& journal, DeviceRegistry& devices, TempDirs& temp_dirs, Stats& stats,
          const Logger& log);

  // Runs the attempt the dispatcher began (Scheduler::begin_attempt). The
  // cleanup report when this worker claimed the cleanup (the caller then
  // finishes it with the lock held); nullopt when the watchdog did.
  std::optional<CleanupReport> run(const RecordPtr& rec, ServicePool::Lease lease,
                                   const AttemptStart& a) REQUIRES(!scheduler_lock);

  const Config& config() const { return config_; }
  const Clock& clock() const { return *clock_; }

  // A shared queue (Cluster::confirm): before an attempt's outcome is
  // applied, whether this host still holds the task's claim. One it lost
  // (another host took the task over) ends here cancelled, its result
  // discarded (its writes are fenced out of the store anyway).
  // `held` (Cluster::holds): after the attempt's `started` write was
  // committed, whether the claim is still this host's (that write was
  // fenced: refused when the claim was lost while the task waited here).
  void set_claim_check(std::function<bool(const std::string&)> confirm,
                       std::function<bool(const std::string&)> held) {
    claim_check_ = std::move(confirm);
    claim_held_ = std::move(held);
  }

 private:
  class Context;
  // Inside a catch block: logs that host code (`what`) threw.
  void host_failed(const RecordPtr& rec, const char* what, const char* consequence)
      REQUIRES(!scheduler_lock);
  Outcome decide(const RecordPtr& rec, std::exception_ptr err, Context& ctx, const AttemptStart& a)
      REQUIRES(!scheduler_lock);

  std::function<bool(const std::string&)> claim_check_;
  std::function<bool(const std::string&)> claim_held_;
  const Config& config_;
  std::shared_ptr<const Clock> clock_;
  Scheduler& scheduler_;
  Placement& placement_;
  ServiceRegistry& registry_;
  TaskErrorHandler& handler_;
  Journal& journal_;
  DeviceRegistry& devices_;
  TempDirs& temp_dirs_;
  Stats& stats_;
  const Logger& log_;
};

}  // namespace taskmgr::detail
