// Private: the ordered hand-off of committed state changes to the store, the
// event bus and the log (leveldb's WriteBatch + log::Writer role).
//
// Every state change is committed here with the scheduler lock held, in the
// order the changes happen: the task row (without its id, which the drain
// takes from the record) and its events with their details captured by
// value. Log lines written under the lock are committed too, in order. The
// drain then, without the scheduler lock and one drainer at a time (so
// commit order is kept), writes the ids and JSON details, stores each row
// with its events and publishes the events; then, after it lets the next
// drainer in, it writes the log lines to the host's sink (a sink that
// blocks holds up only the thread that drains). Readers drain first, so
// they see every committed change.
//
// Consecutive changes of one task still waiting here are one item: one
// store write. Outbox items, their strings and the bus's delivered event
// records are reused, so the steady state allocates nothing here.
//
// A shared queue (several hosts, docs/SCALING.md) fences a claimed task's
// writes: the store refuses them once another host took the task over. The
// drain then holds back what it publishes of an attempt's start and outcome
// (started; completed, failed, cancelled) until the store has committed the
// write. When the fence refused it, a start is left out (the attempt does
// not run: its claim was lost while it waited here), and an outcome is told
// as `cancelled` with the lost-claim message: this host's subscribers never
// hear a start or an outcome the store does not keep (set_refused_check).
// It costs a commit's wait per drain that carries one, in the thread that
// drains.
//
// Locks: commit takes outbox_mu_ inside the scheduler lock; the drain takes
// drain_mu_, then outbox_mu_ briefly to swap the pending items out, then
// neither while it writes. A drain that finds another drainer busy returns
// (wait == false): that drainer looks at the outbox again when it finishes.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "log_internal.hpp"
#include "manager/journal.hpp"
#include "manager/record.hpp"
#include "manager/task_events.hpp"
#include "sync.hpp"
#include "taskmgr/events.hpp"

namespace taskmgr::detail {

class Outbox {
 public:
  Outbox(Journal& journal, EventBus& bus, const Logger& log);
  Outbox(const Outbox&) = delete;
  Outbox& operator=(const Outbox&) = delete;

  // The batch's events and the task's row as it is now. Allocates first,
  // then claims: a bad_alloc leaves nothing half-committed. Clears `b`.
  void commit(const RecordPtr& rec, EventBatch& b) REQUIRES(scheduler_lock) REQUIRES(!mu_);
  // A log line, written by the drain after the events committed before it.
  void commit_log(LogLevel level, std::string message) REQUIRES(scheduler_lock) REQUIRES(!mu_);
  bool logs(LogLevel level) const noexcept { return log_.enabled(level); }
  // Events the store has already (insert_tasks stored them): only published.
  void publish_stored(std::vector<NewTask>& rows) REQUIRES(scheduler_lock) REQUIRES(!mu_);
  // Events the store does not keep (a deleted task's `deleted`): only
  // published, in commit order.
  void publish_unstored(std::vector<EventRecord>&& events) REQUIRES(scheduler_lock) REQUIRES(!mu_);

  // Records evicted from the record table: the next create_task drops them
  // (the thread that allocated them, usually: its allocator's fast path);
  // a drain does when they pile up past kRetiredMax.
  void retire(std::vector<RecordPtr>& evicted) REQUIRES(!mu_);
  void take_retired(std::vector<RecordPtr>& out) REQUIRES(!mu_);

  // Writes what was committed, in commit order. `wait`: also when another
  // thread is draining (then after it).
  void drain(bool wait = false) REQUIRES(!scheduler_lock, !mu_, !drain_mu_);
  // A shared queue: `refused(id)` says whether the store refused a write of
  // task `id` by its fence (SharedQueue::take_refused). Set once, at open.
  void set_refused_check(std::function<bool(const std::string&)> refused) REQUIRES(!drain_mu_);
  bool pending() const noexcept { return pending_.load(std::memory_order_acquire); }

 private:
  struct Item {
    enum class Kind { kRow, kStored, kLog } kind = Kind::kRow;
    RecordPtr rec;                     // kRow: the task (its id)
    Task task;                         // kRow: the row to store, without its id and input
    std::size_t first = 0, count = 0;  // kRow: its events in events_
    std::vector<EventRecord> ready;    // kStored: events stored already, to publish
    LogLevel level = LogLevel::kInfo;  // kLog
    std::string message;               // kLog
  };
  Item& next_item() REQUIRES(mu_);
  // Takes drain_mu_ (waiting for it, or not): false when another drains.
  bool enter_drain(bool wait) TRY_ACQUIRE(true, drain_mu_);
  // One pass over what is committed; true when there was nothing. The log
  // lines it found are left in `lines`, to be written after drain_mu_.
  bool drain_once(std::vector<std::pair<LogLevel, std::string>>& lines)
      REQUIRES(!scheduler_lock, drain_mu_, !mu_);
  // An item with an attempt's start or outcome, to publish once its write is
  // committed: the item and where its events are in the records to publish.
  struct Fenced {
    std::size_t item = 0, first = 0, count = 0;
  };
  // Waits for the store's commit; for each item the fence refused, a start is
  // left out and an outcome becomes `cancelled` (lost claim). Log lines to
  // `lines`.
  void check_fences(const std::vector<Item>& items, std::vector<EventRecord>& records,
                    std::vector<std::pair<LogLevel, std::string>>& lines)
      REQUIRES(!scheduler_lock, drain_mu_);

  static constexpr std::size_t kRetiredMax = 256;
  // Items kept for reuse after a drain (a burst may have made more), and the
  // string capacity an item keeps for a task's result.
  static constexpr std::size_t kItemsKept = 1024;
  static constexpr std::size_t kResultKept = 4096;

  Journal& journal_;
  EventBus& bus_;
  const Logger& log_;

  Mutex mu_ ACQUIRED_AFTER(scheduler_lock);
  // Items are reused: the first used_ are pending, the rest keep their
  // strings' capacity for the next commits.
  std::vector<Item> items_ GUARDED_BY(mu_);
  std::size_t used_ GUARDED_BY(mu_) = 0;
  std::vector<PendingEvent> events_ GUARDED_BY(mu_);
  std::vector<RecordPtr> retired_ GUARDED_BY(mu_);
  std::atomic<bool> pending_{false};  // items_ not empty (set and cleared under mu_)

  Mutex drain_mu_;                                       // one drainer at a time keeps commit order
  std::vector<Item> spare_items_ GUARDED_BY(drain_mu_);  // swapped with items_
  std::vector<PendingEvent> spare_events_ GUARDED_BY(drain_mu_);  // swapped with events_
  std::vector<EventRecord> spare_records_ GUARDED_BY(drain_mu_);
  std::vector<EventRecord> item_records_ GUARDED_BY(drain_mu_);  // one item's events
  std::vector<RecordPtr> spare_retired_ GUARDED_BY(drain_mu_);
  std::function<bool(const std::string&)> refused_ GUARDED_BY(drain_mu_);  // shared queue only
  std::vector<Fenced> fenced_ GUARDED_BY(drain_mu_);  // this pass's starts, outcomes
};

}  // namespace taskmgr::detail
