// taskmgr: several hosts, one queue.
//
// Task managers in different processes or machines share one PostgreSQL
// database (storage.url with storage.shared: true; docs/SCALING.md). Any
// host creates tasks; every host claims the queued tasks it can run, holds
// each under a lease that it renews while the task runs, and writes a
// task's changes only while the row still carries its claim (the fence).
// A host that stops renewing (killed, frozen, cut off) loses its claims
// when their leases run out, and another host rescues its tasks. This
// header has the settings of a host and what the cluster looks like.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/export.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

// A host's settings in a shared queue (storage.cluster.* in the
// configuration).
struct ClusterOptions {
  // How the host is shown (cluster view, a task's `host`); "" = the
  // machine's host name. 1-100 bytes of UTF-8 without control characters.
  std::string host_name;
  // A claim's lease (> 0): renewed every heartbeat_seconds while the host
  // holds the task; once it has run out, another host may rescue the task.
  double lease_seconds = 30;
  // How often the host renews its leases, reports itself, looks for
  // cancellations asked for by other hosts and rescues tasks whose leases
  // ran out (> 0, at most lease_seconds / 2).
  double heartbeat_seconds = 5;
  // The slow poll for work when no notification came (LISTEN/NOTIFY wakes
  // idle hosts at once; a missed notification only delays) (> 0).
  double poll_seconds = 2;
  // Most tasks one rescue takes over (>= 1).
  std::size_t rescue_batch = 500;
};

// One host of the cluster as the shared tables show it.
struct HostStatus {
  std::string id;         // this open of the store: "<host_name>/<pid>/<random>"
  std::string host_name;  // ClusterOptions::host_name
  std::int64_t pid = 0;
  Timestamp started_at{};
  Timestamp heartbeat_at{};  // its last heartbeat (the database's clock)
  double lease_seconds = 0;
  // It closed (closed_at set), or it stopped heartbeating: no heartbeat for
  // longer than its lease (its tasks are rescued).
  std::optional<Timestamp> closed_at;
  bool lost = false;
  // Tasks it holds now (claimed: running, or waiting on it for a slot or a
  // retry's backoff), from the tasks table.
  std::int64_t claimed = 0;
  std::int64_t running = 0;
  // What it reported at its last heartbeat: a JSON object with its devices
  // (free and total memory), its running and queued counts, workers,
  // lost_claims and rescued.
  std::string report_json = "{}";
};

struct ClusterStatus {
  std::vector<HostStatus> hosts;  // by id
  std::int64_t queued = 0;        // waiting for a host to claim them
  std::int64_t pending = 0;       // created, not started
  std::string host_id;            // the host asking
};

// The cluster as JSON: {"host_id":..., "queued":n, "pending":n, "hosts":[{...}]}.
TASKMGR_API std::string to_json(const ClusterStatus& status);

}  // namespace taskmgr
