#include "manager/outbox.hpp"
#include "forced_unwind.hpp"

#include <algorithm>
#include <memory>

#include "taskmgr/clock.hpp"

namespace taskmgr::detail {

Outbox::Outbox(Journal& journal, EventBus& bus, const Logger& log)
    : journal_(journal), bus_(bus), log_(log) {}

Outbox::Item& Outbox::next_item() {
  if (used_ == items_.size()) items_.emplace_back();
  return items_[used_++];
}

void Outbox::commit(const RecordPtr& rec, EventBatch& b) {
  if (b.empty()) return;
  const Task& t = rec->task;
  const std::size_t n = b.events.size();
  MutexLock g(mu_, MutexLock::Spin{});
  // What can run out of memory comes first, before anything is claimed:
  // room for the events (grown geometrically: an exact reserve per commit
  // would copy the whole outbox each time), a free item, the row's strings.
  if (events_.capacity() - events_.size() < n) {
    events_.reserve(std::max(2 * events_.capacity(), events_.size() + n));
  }
  // The task's previous change still waits: one item (the later row
  // supersedes the earlier one; the events, contiguous at the end of
  // events_, stay in order).
  const bool same =
      used_ > 0 && items_[used_ - 1].kind == Item::Kind::kRow && items_[used_ - 1].rec == rec;
  if (!same && used_ == items_.size()) items_.emplace_back();
  Item& item = same ? items_[used_ - 1] : items_[used_];
  // The row, into the item's strings (a reused item's capacity: no
  // allocation in the steady state).
  Task& row = item.task;
  row.service = t.service;
  row.options_json = t.options_json;
  row.priority = t.priority;
  row.status = t.status;
  row.attempt = t.attempt;
  row.batch_size = t.batch_size;
  row.failure_reason = t.failure_reason;
  row.failure_message = t.failure_message;
  row.created_at = t.created_at;
  row.queued_at = t.queued_at;
  row.started_at = t.started_at;
  row.finished_at = t.finished_at;
  row.result = t.result;
  row.estimated_memory_mb = t.estimated_memory_mb;
  row.actual_memory_mb = t.actual_memory_mb;
  row.assigned_device = t.assigned_device;
  row.service_instance_id = t.service_instance_id;
  row.resource_cleanup_completed = t.resource_cleanup_completed;
  row.requested_device = t.requested_device;
  row.host = t.host;
  // Nothing below throws (room reserved; events move without allocating).
  for (auto& e : b.events) events_.push_back(std::move(e));
  b.clear();
  if (same) {
    item.count += n;
  } else {
    ++used_;
    item.kind = Item::Kind::kRow;
    item.rec = rec;
    item.first = events_.size() - n;
    item.count = n;
  }
  pending_.store(true, std::memory_order_release);
}

void Outbox::commit_log(LogLevel level, std::string message) {
  if (!log_.enabled(level)) return;
  MutexLock g(mu_, MutexLock::Spin{});
  Item& item = next_item();
  item.kind = Item::Kind::kLog;
  item.rec.reset();
  item.level = level;
  item.message = std::move(message);
  pending_.store(true, std::memory_order_release);
}

void Outbox::publish_stored(std::vector<NewTask>& rows) {
  MutexLock g(mu_, MutexLock::Spin{});
  for (auto& row : rows) {
    Item& item = next_item();
    item.kind = Item::Kind::kStored;
    item.rec.reset();
    item.count = 0;
    item.ready = std::move(row.events);
  }
  pending_.store(true, std::memory_order_release);
}

void Outbox::publish_unstored(std::vector<EventRecord>&& events) {
  MutexLock g(mu_, MutexLock::Spin{});
  Item& item = next_item();
  item.kind = Item::Kind::kStored;
  item.rec.reset();
  item.count = 0;
  item.ready = std::move(events);
  pending_.store(true, std::memory_order_release);
}

void Outbox::retire(std::vector<RecordPtr>& evicted) {
  if (evicted.empty()) return;
  MutexLock g(mu_, MutexLock::Spin{});
  for (auto& r : evicted) retired_.push_back(std::move(r));
  evicted.clear();
  if (retired_.size() > kRetiredMax) pending_.store(true, std::memory_order_release);
}

void Outbox::take_retired(std::vector<RecordPtr>& out) {
  MutexLock g(mu_, MutexLock::Spin{});
  out.swap(retired_);
}

void Outbox::set_refused_check(std::function<bool(const std::string&)> refused) {
  MutexLock g(drain_mu_);
  refused_ = std::move(refused);
}

namespace {
bool is_outcome(TaskEvent e) {
  return e == TaskEvent::kCompleted || e == TaskEvent::kFailed || e == TaskEvent::kCancelled;
}
// Told once the store took them: an attempt's start and its outcome.
bool is_fenced_told(TaskEvent e) { return e == TaskEvent::kStarted || is_outcome(e); }
}  // namespace

void Outbox::check_fences(const std::vector<Item>& items, std::vector<EventRecord>& records,
                          std::vector<std::pair<LogLevel, std::string>>& lines) {
  try {
    journal_.flush();  // every write queued before: committed, or refused by its fence
  } catch (const std::exception& e) {
    // Not known whether the fence took them: told as applied (the store
    // tries the writes again; a refusal then is counted as a lost claim).
    lines.emplace_back(LogLevel::kError,
                       std::string("waiting for the store to commit tasks' outcomes failed: ") +
                           e.what() + "; their events are published as this host applied them");
    return;
  } catch (...) {
    ::taskmgr::detail::rethrow_if_forced_unwind();
    lines.emplace_back(LogLevel::kError,
                       "waiting for the store to commit tasks' outcomes failed: unknown exception");
    return;
  }
  std::vector<std::size_t> dropped;  // refused starts: the attempt does not run
  for (const Fenced& f : fenced_) {
    const Task& t = items[f.item].task;
    if (!refused_(t.id)) continue;
    for (std::size_t i = f.first; i < f.first + f.count; ++i) {
      EventRecord& e = records[i];
      if (e.event == TaskEvent::kStarted) {
        dropped.push_back(i);
        continue;
      }
      if (!is_outcome(e.event)) continue;
      if (e.event == TaskEvent::kCancelled && (t.failure_message == kLostClaimMessage ||
                                               t.failure_message == kLostClaimBeforeRunMessage))
        continue;
      lines.emplace_back(
          LogLevel::kWarn,
          "task " + t.id + ": the store refused its " + std::string(to_string(e.event)) +
              " (lost claim: another host took the task over while this host stood still past "
              "its lease); told as cancelled, the row keeps the other host's outcome");
      static const std::shared_ptr<Clock> unused = Clock::system();  // the time is the event's
      EventBatch b(*unused);
      b.now = e.timestamp;
      events::cancelled(b, TaskStatus::kRunning, t.attempt, kLostClaimMessage);
      std::vector<EventRecord> told = b.take_records(t.id);
      e.event = told[0].event;
      e.details_json.swap(told[0].details_json);
    }
  }
  // Left out, the rest kept in order (rare: a claim lost while its task
  // waited here).
  for (auto it = dropped.rbegin(); it != dropped.rend(); ++it) {
    records.erase(records.begin() + static_cast<std::ptrdiff_t>(*it));
  }
}

void Outbox::drain(bool wait) {
  // Nothing committed since the last drain took the outbox: nothing to do
  // (a drain in progress re-checks the outbox when it ends).
  if (!wait && !pending_.load(std::memory_order_acquire)) return;
  for (;;) {
    if (!enter_drain(wait)) return;  // the drainer re-checks the outbox after it finishes
    bool none = false;
    std::vector<std::pair<LogLevel, std::string>> lines;
    try {
      none = drain_once(lines);
    } catch (...) {
      drain_mu_.unlock();  // a later drain retries what is left (forced unwinds too)
      throw;
    }
    drain_mu_.unlock();
    // After the drain lock: a log sink that blocks holds up only this
    // thread, never the store writes and events of others (nor readers).
    for (const auto& [level, message] : lines) log_.write(level, message);
    if (none) {
      MutexLock g(mu_, MutexLock::Spin{});
      if (used_ == 0) return;
    }
  }
}

bool Outbox::enter_drain(bool wait) NO_THREAD_SAFETY_ANALYSIS {
  if (wait) {
    drain_mu_.lock();
    return true;
  }
  return drain_mu_.try_lock();
}

bool Outbox::drain_once(std::vector<std::pair<LogLevel, std::string>>& lines) {
  {
    // The outbox and the spare swap buffers: neither is reallocated in the
    // steady state.
    std::vector<Item> items = std::move(spare_items_);
    std::vector<PendingEvent> pending = std::move(spare_events_);
    std::vector<RecordPtr> retired = std::move(spare_retired_);
    std::size_t n_items = 0;
    {
      MutexLock g(mu_, MutexLock::Spin{});
      items.swap(items_);
      n_items = used_;
      used_ = 0;  // the spare's items are all processed: reusable
      pending.swap(events_);
      if (retired_.size() > kRetiredMax) retired.swap(retired_);  // no create_task took them
      pending_.store(false, std::memory_order_relaxed);
    }
    retired.clear();  // the last references, mostly
    spare_retired_ = std::move(retired);
    // Records the dispatcher has delivered are filled in again: their
    // strings keep their capacity, so writing ids and details here
    // allocates nothing in the steady state.
    std::vector<EventRecord> records = bus_.take_recycled();
    if (records.empty()) records = std::move(spare_records_);
    std::size_t used = 0;
    auto next_record = [&]() -> EventRecord& {
      return used < records.size() ? records[used++] : (++used, records.emplace_back());
    };
    for (std::size_t k = 0; k < n_items; ++k) {
      Item& it = items[k];
      if (it.kind == Item::Kind::kLog) {
        // Written once this pass is stored and published (drain()).
        lines.emplace_back(it.level, std::move(it.message));
        continue;
      }
      if (it.kind == Item::Kind::kStored) {
        for (auto& e : it.ready) next_record() = std::move(e);
        it.ready.clear();
        continue;
      }
      // The ids and the JSON details, written here, outside the scheduler lock.
      it.task.id = it.rec->id();
      item_records_.resize(it.count);
      for (std::size_t i = 0; i < it.count; ++i) {
        const PendingEvent& p = pending[it.first + i];
        EventRecord& e = item_records_[i];
        e.sequence = 0;
        e.task_id.assign(it.task.id);
        e.event = p.event;
        e.timestamp = p.timestamp;
        p.write_details(e.details_json);
      }
      if (refused_) {
        for (std::size_t i = 0; i < it.count; ++i) {
          if (is_fenced_told(item_records_[i].event)) {
            fenced_.push_back({k, used, it.count});
            break;
          }
        }
      }
      try {
        journal_.update_task(it.task, item_records_);
      } catch (const std::exception& e) {
        log_.write(LogLevel::kError, "storing task " + it.task.id + " failed: " + e.what());
      } catch (...) {
        ::taskmgr::detail::rethrow_if_forced_unwind();
        log_.write(LogLevel::kError, "storing task " + it.task.id + " failed: unknown exception");
      }
      // Published as they are: swapped with recycled records, whose
      // strings then serve the next item (no copy, no allocation).
      for (auto& e : item_records_) std::swap(next_record(), e);
      it.rec.reset();
      if (it.task.result.capacity() > kResultKept) std::string().swap(it.task.result);
    }
    records.resize(used);
    if (!fenced_.empty()) {
      check_fences(items, records, lines);
      fenced_.clear();
    }
    if (items.size() > kItemsKept) items.resize(kItemsKept);  // after a burst
    bus_.publish(std::move(records));  // leaves `records` empty, capacity kept
    const bool none = n_items == 0;
    pending.clear();
    spare_items_ = std::move(items);
    spare_events_ = std::move(pending);
    spare_records_ = std::move(records);
    return none;
  }
}

}  // namespace taskmgr::detail
