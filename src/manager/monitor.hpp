// Private: the spec's get_task_metrics and get_task_health, built on request.
//
// Metrics take the scheduler lock only to copy the per-device gauges
// (running, queued, backing off); counters are atomics; device memory, pool
// statistics, the event bus and the store are read without it. They run no
// host code (the pools listed are those each service supported when it was
// registered), so a host may read them from any callback.
//
// Health is built from typed state: a task in memory (every unfinished task
// and the recent finished ones) gives its status, live memory, times and the
// warnings it collected as they arose, under the lock and without touching
// the store; only a task the manager no longer holds is read from the store,
// its warnings rebuilt from its stored events by the event vocabulary.
#pragma once

#include <string>

#include "manager/cluster.hpp"
#include "manager/dispatcher.hpp"
#include "manager/journal.hpp"
#include "manager/outbox.hpp"
#include "manager/scheduler.hpp"
#include "manager/service_registry.hpp"
#include "manager/stats.hpp"
#include "taskmgr/events.hpp"
#include "taskmgr/metrics.hpp"

namespace taskmgr::detail {

class Monitor {
 public:
  Monitor(const Config& config, std::shared_ptr<const Clock> clock, Scheduler& scheduler,
          Dispatcher& dispatcher, ServiceRegistry& registry, DeviceRegistry& devices, Stats& stats,
          EventBus& bus, Journal& journal)
      : config_(config),
        clock_(std::move(clock)),
        scheduler_(scheduler),
        dispatcher_(dispatcher),
        registry_(registry),
        devices_(devices),
        stats_(stats),
        bus_(bus),
        journal_(journal) {}

  TaskMetrics metrics() REQUIRES(!scheduler_lock);
  // A shared queue: its counters go into the metrics (set before any read).
  void set_cluster(const Cluster* cluster) { cluster_ = cluster; }
  TaskHealth health(const std::string& id) REQUIRES(!scheduler_lock);

 private:
  const Config& config_;
  std::shared_ptr<const Clock> clock_;
  Scheduler& scheduler_;
  Dispatcher& dispatcher_;
  ServiceRegistry& registry_;
  DeviceRegistry& devices_;
  Stats& stats_;
  EventBus& bus_;
  Journal& journal_;
  const Cluster* cluster_ = nullptr;
};

}  // namespace taskmgr::detail
