// taskmgr: the metrics payload (the spec's get_task_metrics) and per-task
// health (the spec's get_task_health).
//
// Both are snapshots, built on request from counters the manager keeps with
// relaxed atomics on the hot path. JSON keys are the spec's:
//
//   metrics: active_tasks, queued_tasks, memory_by_device, pool_utilization,
//            average_wait_time, plus the pauses in force, counters and
//            latency percentiles;
//   health:  status, memory_usage_mb, processing_time_s, device, warnings.
//
// to_prometheus() renders the metrics in the Prometheus text exposition
// format (version 0.0.4), names prefixed "taskmgr_".
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/export.hpp"
#include "taskmgr/pause.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

struct DeviceMemoryMetrics {
  std::int64_t total_mb = 0;
  std::int64_t reserved_mb = 0;   // sum of estimates of running tasks
  std::int64_t observed_mb = 0;   // in use as the device's probe saw it
  std::int64_t peak_task_mb = 0;  // largest actual_memory_mb measured on it
  bool available = true;
};

struct PoolMetrics {
  std::string service;
  std::string device;
  int in_use = 0;          // leased now: to a task, or to warming making an instance
  int size = 0;            // created instances (in use + idle)
  int max = 0;             // max_instances in force (the configuration's, or resize_pool's)
  int min = 0;             // min_instances in force
  double utilization = 0;  // in_use / max
  std::uint64_t created = 0;
  std::uint64_t destroyed = 0;
};

struct LatencySummary {
  std::uint64_t count = 0;
  double mean_s = 0;
  double p50_s = 0;
  double p90_s = 0;
  double p99_s = 0;
  double max_s = 0;
};

struct TASKMGR_API TaskMetrics {
  // The spec's keys. Per device, plus "total".
  std::map<std::string, std::int64_t> active_tasks;
  std::map<std::string, std::int64_t> queued_tasks;
  std::map<std::string, DeviceMemoryMetrics> memory_by_device;
  std::map<std::string, PoolMetrics> pool_utilization;  // key "<service>@<device>"
  double average_wait_time = 0;    // seconds from queued to started, all attempts so far
  std::vector<PauseState> paused;  // the pauses in force (TaskManager::pause)

  // Counters since the manager opened.
  std::uint64_t tasks_created = 0;
  std::uint64_t tasks_started = 0;  // attempts started
  std::uint64_t tasks_completed = 0;
  std::uint64_t tasks_failed = 0;
  std::uint64_t tasks_cancelled = 0;
  std::map<std::string, std::uint64_t> failed_by_reason;
  std::uint64_t retries = 0;
  std::uint64_t oom_errors = 0;
  std::uint64_t cpu_fallbacks = 0;
  std::uint64_t memory_warnings = 0;
  std::uint64_t queue_full_rejections = 0;
  std::uint64_t cleanup_failures = 0;  // cleanups that timed out or left something behind
  // Failures the library caught on its own threads (a sweep, a worker loop,
  // a timer) and state changes its state machine refused: a bug when not 0.
  std::uint64_t internal_errors = 0;
  std::uint64_t events_published = 0;
  std::uint64_t events_dropped = 0;
  std::uint64_t callback_errors = 0;
  // A shared queue (storage.shared; 0 otherwise): claims this host lost
  // (another host took the task over once its lease ran out; this host's
  // writes of it were refused), and tasks it rescued from hosts whose
  // leases ran out.
  std::uint64_t lost_claims = 0;
  std::uint64_t tasks_rescued = 0;
  StoreStats store;  // the store's commits, writes and failed writes

  LatencySummary wait_time;        // queued -> started
  LatencySummary processing_time;  // started -> finished (one attempt)

  std::string to_json() const;
  std::string to_prometheus() const;
};

struct TASKMGR_API TaskHealth {
  std::string task_id;
  TaskStatus status = TaskStatus::kPending;
  std::optional<std::int64_t> memory_usage_mb;  // last observed while running, else the peak
  double processing_time_s = 0;                 // so far when running
  std::optional<std::string> device;
  std::vector<std::string> warnings;

  std::string to_json() const;
};

}  // namespace taskmgr
