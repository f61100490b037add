// taskmgr: task events and the bus that delivers them to the host.
//
// Every state change and resource event of a task is an EventRecord. The
// manager persists each one in the store (task_events) and publishes it on
// the EventBus, which delivers it to every subscriber:
//
//  * on one dispatcher thread owned by the bus, never on the caller's thread
//    and never with a library lock held;
//  * in publication order, so the events of one task arrive in the order they
//    happened;
//  * a callback that throws is caught and counted (callback_errors) and the
//    next subscriber still gets the event; a callback that blocks delays only
//    later deliveries, never the scheduler. When more than `max_pending`
//    events wait for delivery, new ones are dropped for subscribers and
//    counted (events_dropped); the store still has them.
//
// From inside a callback a subscriber may call any TaskManager function,
// including subscribe() and unsubscribe() (even its own), but not flush()
// (it returns at once) nor close the manager (Error(kInvalidState)); a
// manager destroyed from a callback is leaked rather than waited for (its
// destructor would wait for the callback's own thread: task_manager.hpp).
//
// Thread-safety: every member is safe to call from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "taskmgr/export.hpp"
#include "taskmgr/log.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

struct EventRecord {
  // Delivered: the bus's publication order, from 1. Read from the store: the
  // store's order. Both order one task's events the same way (their order
  // across tasks may differ when tasks are created from several threads).
  std::uint64_t sequence = 0;
  std::string task_id;
  TaskEvent event = TaskEvent::kCreated;
  Timestamp timestamp{};
  std::string details_json = "{}";  // a JSON object; keys depend on the event
};

// {"sequence":..,"task_id":..,"event_type":..,"timestamp":..,"details":{..}}
TASKMGR_API std::string to_json(const EventRecord& event);

using EventCallback = std::function<void(const EventRecord& event)>;
using SubscriptionId = std::uint64_t;

class TASKMGR_API EventBus {
 public:
  explicit EventBus(LogSink log = nullptr, std::size_t max_pending = 1u << 20);
  // Delivers what is pending, then stops the dispatcher thread.
  ~EventBus();
  EventBus(const EventBus&) = delete;
  EventBus& operator=(const EventBus&) = delete;

  SubscriptionId subscribe(EventCallback callback);
  // After it returns (outside a callback), the callback is not running and
  // will not be called again. From inside any callback it returns at once
  // and the callback gets no further events. False for an unknown id.
  bool unsubscribe(SubscriptionId id);

  // Assigns the sequence number and queues the event. Never blocks.
  void publish(EventRecord event);
  // The same for several events at once, in order (one lock for all).
  // Leaves `events` empty.
  void publish(std::vector<EventRecord>&& events);

  // Records already delivered, handed back for a publisher to overwrite and
  // publish again: their strings keep their capacity, so filling them in
  // allocates nothing (and the dispatcher thread frees nothing). Their
  // contents are stale; may be empty.
  std::vector<EventRecord> take_recycled();

  // Waits until every event published before the call has been delivered.
  // Returns at once when called from a callback.
  void flush();

  bool on_dispatcher_thread() const noexcept;

  std::uint64_t published() const noexcept;
  std::uint64_t delivered() const noexcept;
  std::uint64_t dropped() const noexcept;
  std::uint64_t callback_errors() const noexcept;
  // Failures of the dispatcher itself, outside any callback (e.g. memory
  // exhausted while taking a batch). The dispatcher keeps running; a batch
  // it could not hand out is tried again.
  std::uint64_t dispatch_errors() const noexcept;
  std::size_t subscriber_count() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace taskmgr
