// Private: the periodic sweep (every TaskManagerOptions::sweep_interval, on
// the timer thread): queue timeouts, pools stuck past their acquire timeout,
// attempts past their deadline, the cleanup watchdog, device memory
// warnings, the device probes' refresh (about once a second) and the
// retention cadence.
//
// Its file-system work (an overdue cleanup's temp dir) and its probes run
// without the scheduler lock; the transitions run with it. Nothing it does
// can throw out of it: the timer thread must survive any failure (counted
// as an internal error and logged).
#pragma once

#include "log_internal.hpp"
#include "manager/dispatcher.hpp"
#include "manager/outbox.hpp"
#include "manager/recovery.hpp"
#include "manager/scheduler.hpp"
#include "manager/stats.hpp"
#include "sync.hpp"

namespace taskmgr::detail {

class Sweeper {
 public:
  Sweeper(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
          Dispatcher& dispatcher, DeviceRegistry& devices, Recovery& recovery, Stats& stats,
          const Logger& log);

  void sweep() REQUIRES(!scheduler_lock);

 private:
  void sweep_once() REQUIRES(!scheduler_lock);

  const Config& config_;
  std::shared_ptr<const Clock> clock_;
  Scheduler& scheduler_;
  Dispatcher& dispatcher_;
  DeviceRegistry& devices_;
  Recovery& recovery_;
  Stats& stats_;
  const Logger& log_;
  SteadyTime last_refresh_{};  // the timer thread only
};

}  // namespace taskmgr::detail
