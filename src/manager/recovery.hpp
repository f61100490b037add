// Private: what a manager does with the tasks its store already holds.
//
//  * recover(), once at open: tasks the store holds unfinished come back.
//    Pending ones stay pending; queued ones are queued again in their
//    original order; ones that were running when the process died get a
//    `retried` event with reason "interrupted" (the attempt counts) or, out
//    of attempts, end failed INTERRUPTED; ended ones whose cleanup did not
//    finish get it finished. A task whose device is gone is placed again;
//    one whose service is not registered yet waits for it on its device.
//  * prune_retention(): storage.retention_days, at open and then hourly (or
//    four times per retention period when that is shorter) from the sweep.
//  * watch_store_writes(), from the sweep: a warning when writes start to
//    fail (once per episode, with the store's message), a line when the
//    store caught up, and a warning for writes it gave up.
//
// Store reads, placement (host code, image headers) and logging run before
// or after the scheduler lock, never under it.
#pragma once

#include <atomic>
#include <memory>

#include "log_internal.hpp"
#include "manager/dispatcher.hpp"
#include "manager/journal.hpp"
#include "manager/placement.hpp"
#include "manager/scheduler.hpp"
#include "manager/service_registry.hpp"
#include "sync.hpp"

namespace taskmgr::detail {

class Recovery {
 public:
  Recovery(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
           Dispatcher& dispatcher, Journal& journal, Placement& placement,
           ServiceRegistry& registry, DeviceRegistry& devices, const Logger& log);

  void recover() REQUIRES(!scheduler_lock);
  void prune_retention() REQUIRES(!scheduler_lock);
  // From the sweep: prunes when the retention cadence says so.
  void prune_if_due(SteadyTime now) REQUIRES(!scheduler_lock);
  // From the sweep (the timer thread only).
  void watch_store_writes() REQUIRES(!scheduler_lock);

 private:
  const Config& config_;
  std::shared_ptr<const Clock> clock_;
  Scheduler& scheduler_;
  Dispatcher& dispatcher_;
  Journal& journal_;
  Placement& placement_;
  ServiceRegistry& registry_;
  DeviceRegistry& devices_;
  const Logger& log_;
  std::atomic<std::int64_t> last_prune_ns_{0};  // steady clock, at open then the timer thread
  // watch_store_writes' state (the timer thread only).
  bool writes_failing_ = false;  // an episode of failed writes is on
  std::uint64_t failed_at_episode_start_ = 0;
  std::uint64_t dropped_reported_ = 0;
};

}  // namespace taskmgr::detail
