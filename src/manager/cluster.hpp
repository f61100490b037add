// Private: the manager's side of a shared queue (storage.shared,
// docs/SCALING.md). The Cluster room runs one thread that claims queued
// tasks from the shared table as this host has room for them (woken by a
// notification, a slot that frees, or the slow poll) and hands them to the
// scheduler as queued records; and that heartbeats: renews this host's
// leases, reports the host, cancels what other hosts asked to cancel, drops
// the claims it lost, and rescues the tasks of hosts whose leases ran out.
// The dispatcher's source of work is then this: a single host's queues hold
// only what it claimed.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "manager/dispatcher.hpp"
#include "manager/journal.hpp"
#include "manager/placement.hpp"
#include "manager/scheduler.hpp"
#include "manager/service_registry.hpp"
#include "manager/stats.hpp"
#include "manager/temp_dirs.hpp"
#include "store/shared_queue.hpp"
#include "taskmgr/cluster.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/log.hpp"
#include "taskmgr/task_manager.hpp"

namespace taskmgr::detail {

class Cluster {
 public:
  Cluster(const Config& config, std::shared_ptr<const Clock> clock, SharedQueue& queue,
          Scheduler& scheduler, Dispatcher& dispatcher, Placement& placement,
          ServiceRegistry& registry, DeviceRegistry& devices, TempDirs& temp_dirs,
          const Logger& log);
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // Starts the claim and heartbeat thread.
  void start() REQUIRES(!scheduler_lock);
  // close(): no more claims; the tasks claimed and not started go back to
  // the queue for the other hosts; the thread ends. Idempotent.
  void stop() REQUIRES(!scheduler_lock);
  // Something changed here (a task created or started, a slot freed): claim
  // again now.
  void wake() { queue_.wake(); }

  // Before an attempt's result is applied: renews the claim's lease; false
  // when the claim was lost (another host rescued the task): the result is
  // discarded.
  bool confirm(const std::string& id) REQUIRES(!scheduler_lock);
  // Whether this host holds the task's claim as far as it knows (no round
  // trip): false once a fenced write of it was refused, or a heartbeat
  // found it lost.
  bool holds(const std::string& id) const { return queue_.fence_of(id) != 0; }

  ClusterStatus status() REQUIRES(!scheduler_lock) { return queue_.cluster(); }

  // cancel_task of a task this host does not hold: one waiting in the
  // shared table ends cancelled there (true); one another host runs is
  // asked to stop (true: that host cancels it at its next heartbeat);
  // false when it has ended. Error(kNotFound) for an
  // unknown id.
  bool cancel(const std::string& id) REQUIRES(!scheduler_lock);
  // The controls on a task in the shared table that no host holds (a
  // pending task, a queued one not claimed, an ended one), applied to its
  // row under the row's lock; each returns the task as it is now (without
  // its input bytes). start: a pending task is queued for any host (or the
  // device p.device names). retry: a failed or cancelled task whose cleanup
  // is done is queued again, its attempts counted on. set_priority: a
  // pending or queued task. Error(kInvalidState) when the task is not in
  // that state, or a host holds it now (claimed: ask again once it is
  // back); Error(kNotFound) for an unknown id.
  Task start(const std::string& id, const TaskStartRequest& p) REQUIRES(!scheduler_lock);
  Task retry(const std::string& id, const TaskStartRequest& p) REQUIRES(!scheduler_lock);
  Task set_priority(const std::string& id, int priority) REQUIRES(!scheduler_lock);
  std::uint64_t lost_claims() const { return queue_.lost_claims(); }
  std::uint64_t rescued() const { return rescued_.load(); }
  const std::string& host_id() const { return queue_.host_id(); }

  // What a rescue makes of a task whose claim's lease ran out (the rules of
  // recovery at open, reason host_lost), or, with lost_host "", of one no
  // host claimed within tasks.queue_timeout_seconds (failed QUEUE_TIMEOUT):
  // public for its unit test.
  static std::vector<EventRecord> rescue(const Config& config, const Clock& clock, Task& t,
                                         const std::string& lost_host,
                                         const std::string& this_host_name);

 private:
  void run() REQUIRES(!scheduler_lock);
  void claim_round() REQUIRES(!scheduler_lock);
  void heartbeat() REQUIRES(!scheduler_lock);
  std::string report() REQUIRES(!scheduler_lock);
  // Claims lost: their records stop (cancelled cooperatively) and leave
  // the table once ended, so that reads go to the store, which has the
  // task as the host that took it over left it.
  void drop_lost(const std::vector<std::string>& ids) REQUIRES(!scheduler_lock);

  const Config& config_;
  std::shared_ptr<const Clock> clock_;
  SharedQueue& queue_;
  Scheduler& scheduler_;
  Dispatcher& dispatcher_;
  Placement& placement_;
  ServiceRegistry& registry_;
  DeviceRegistry& devices_;
  TempDirs& temp_dirs_;
  const Logger& log_;

  std::atomic<bool> stopping_{false};
  std::atomic<std::uint64_t> rescued_{0};
  std::thread thread_;
  std::set<std::string> lost_waiting_;  // the thread's: lost, record not ended yet
  std::set<std::string> held_;          // the thread's: see ClaimRequest::exclude
};

}  // namespace taskmgr::detail
