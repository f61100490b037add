// Private: the shared queue of several hosts (docs/SCALING.md), as the
// manager sees it. The PostgreSQL store in shared mode is one
// (postgres_shared.cpp); the manager finds it with shared_queue_of().
//
// A claim is the right to run a task and write its changes: the row
// carries the host's id (claimed_by), a fencing token (claim, new for every
// claim) and a lease's end. The store writes a claimed task's updates,
// events and samples only while the row still carries that claim (the
// fence, in the same statement: UPDATE ... WHERE claimed_by = host AND
// claim = token); a write the fence refuses is a lost claim
// (lost_claims(), taken_lost()). Time is the database's: leases compare
// with the server's clock, so the hosts' clocks need not agree.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "taskmgr/cluster.hpp"
#include "taskmgr/events.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail {

// What a host can take now.
struct ClaimRequest {
  std::size_t max_tasks = 0;
  std::vector<std::string> services;  // kinds it runs (registered, not paused)
  std::vector<std::string> devices;   // its devices (a task that named one must name one of these)
  std::int64_t max_memory_mb = 0;     // the largest estimate it can place now
  // Tasks it still runs after losing their claims (another host took them
  // over, and they were queued again): never claimed here meanwhile.
  std::vector<std::string> exclude;
};

// A claimed task (its input bytes left out, as load_unfinished) and the
// claim's token.
struct ClaimedTask {
  Task task;
  std::int64_t claim = 0;
};

// A rescue's decision for one task whose claim's lease ran out: the
// manager's rules (attempts left, the event vocabulary). `task` is the row
// as found (claimed_by and claim still set); the function sets it to what
// the row becomes and returns the events to store with it.
// The host name as a host id carries it ("<name>/<pid>/<random>"): at most
// 60 bytes, cut at a UTF-8 character's boundary.
inline std::string host_id_name(const std::string& host_name) {
  std::size_t n = std::min<std::size_t>(host_name.size(), 60);
  while (n > 0 && n < host_name.size() &&
         (static_cast<unsigned char>(host_name[n]) & 0xC0) == 0x80) {
    --n;
  }
  return host_name.substr(0, n);
}

using RescueFn = std::function<std::vector<EventRecord>(Task& task, const std::string& lost_host)>;

struct HeartbeatAnswer {
  // Tasks this host held a claim on that the table no longer gives it
  // (rescued by another host after its lease ran out): their claims are
  // forgotten here; their writes are fenced out.
  std::vector<std::string> lost;
  // Its tasks that another host asked to cancel (cancel_requested).
  std::vector<std::string> cancel_requested;
  // Tasks this heartbeat rescued (0 when another host holds the rescue).
  std::size_t rescued = 0;
};

// What became of a host's control on a task it does not hold (cancel,
// start, priority, retry): applied to the row, or not (why), and the row.
struct SharedChange {
  bool applied = false;
  std::optional<Task> task;  // the row after (or as it stands); nullopt: unknown id
};
// Sets the row's new state and returns its events, given the row as it
// stands (locked): nullopt leaves it as it is.
using ChangeFn = std::function<std::optional<std::vector<EventRecord>>(Task& task)>;

class SharedQueue {
 public:
  virtual ~SharedQueue() = default;

  // This open of the store: "<host_name>/<pid>/<random>" (task_hosts.id).
  virtual const std::string& host_id() const = 0;
  virtual const ClusterOptions& cluster_options() const = 0;

  // Claims up to r.max_tasks queued tasks, highest priority first, oldest
  // first among equals, that this host can run, in one statement (READ
  // COMMITTED, FOR UPDATE SKIP LOCKED): marked claimed by this host with a
  // new token and a lease. Throws Error on a database failure.
  virtual std::vector<ClaimedTask> claim(const ClaimRequest& r) = 0;
  // Renews one claim's lease before its result is written: false when the
  // claim is lost (then it is forgotten and counted).
  virtual bool confirm(const std::string& id) = 0;
  // Gives claims of tasks still waiting here back to the queue (close):
  // unclaimed and queued for any host (no event: the task never left the
  // queue as far as its events tell).
  virtual void release(const std::vector<std::string>& ids) = 0;

  // The fence a write of task `id` carries (0: not claimed here), and the
  // end of a claim (the task's last write is queued).
  virtual std::int64_t fence_of(const std::string& id) const = 0;
  virtual void forget(const std::string& id) = 0;

  // Renews every lease this host holds, records its report (a JSON object)
  // and heartbeat, finds lost claims and cancellations, and, when no other
  // host is rescuing, rescues up to rescue_batch tasks whose leases ran out
  // (`rescue` decides each; the events are stored with the row).
  // Under the same rescue lock it also ends the tasks that waited in the
  // shared table, unclaimed, since before `queued_before` (their queue
  // timeout ran out and no host claimed them): `rescue` is called for each
  // with lost_host "" (nullopt: none end so).
  virtual HeartbeatAnswer heartbeat(const std::string& report_json, const RescueFn& rescue,
                                    std::optional<Timestamp> queued_before) = 0;

  // A host's control on a task it does not hold, applied to the row under
  // its lock when `change` returns events (then a notification wakes the
  // hosts); kept as it is otherwise.
  virtual SharedChange change_unclaimed(const std::string& id, const ChangeFn& change) = 0;
  // Asks the host holding `id` to cancel it: true when a host holds it.
  virtual bool request_cancel(const std::string& id) = 0;

  // Waits for a notification (a task queued, a claim given back, a cancel
  // asked of this host) or `seconds`: true when one came. wake() ends a
  // wait at once (close).
  virtual bool wait_for_work(double seconds) = 0;
  virtual void wake() = 0;
  // Tells the other hosts that work is queued (after a change that queued
  // some outside a write that does: release, a rescue).
  virtual void notify_work() = 0;

  virtual ClusterStatus cluster() = 0;

  // Writes the fence refused since the store opened (lost claims found by a
  // write, a confirm or a heartbeat), and the ids found since the last call.
  virtual std::uint64_t lost_claims() const = 0;
  virtual std::vector<std::string> take_lost() = 0;
  // Whether the store's writer found a write of `id` refused by its fence
  // since this host last claimed the task; forgets the answer. (The outbox
  // asks, once the write of a task's outcome is committed, before it tells
  // the subscribers.)
  virtual bool take_refused(const std::string& id) = 0;

  // The host's row says it closed (the last thing a closing host does).
  virtual void close_host() = 0;
};

// A store that has a shared queue (the PostgreSQL store in shared mode).
class SharedQueueHolder {
 public:
  virtual ~SharedQueueHolder() = default;
  virtual SharedQueue* shared_queue() = 0;  // nullptr when not shared
};

// The store's shared queue, or nullptr when it has none.
inline SharedQueue* shared_queue_of(TaskStore& store) {
  auto* h = dynamic_cast<SharedQueueHolder*>(&store);
  return h == nullptr ? nullptr : h->shared_queue();
}

}  // namespace taskmgr::detail
