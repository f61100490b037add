// taskmgr: the per-device priority queue (the spec's TaskQueue).
//
// One queue per device. Order within a device: higher priority first; among
// equal priorities FIFO (tasks.queue_ordering: fifo) or largest estimated
// memory first (largest_first), then FIFO. With enable_priority_queue false
// the order is strict FIFO and priorities are ignored.
//
// Priority aging (Options::priority_aging > 0, with the priority queue on):
// a waiting task gains one priority level per interval, continuously, so
// that a task that has waited k intervals ranks beside a task k levels
// higher that arrives now (equal ranks: the older first). A low priority
// then cannot starve behind a steady stream of higher ones: a task of
// priority p is ahead of every task of priority p + n that arrives more than
// n intervals after it. The order stays fixed while time passes (both of
// two waiting tasks age alike), so it costs nothing per dispatch.
//
// get_next_task(device) returns the first task in that order whose estimate
// fits the device's free memory now (DeviceRegistry). Smaller tasks may pass
// a task that does not fit, but not forever: once a task has been passed over
// for `starvation_after`, nothing behind it on that device is returned until
// it fits (running tasks drain, memory frees, it starts). Tasks ahead of it in
// order still run.
//
// add_task enforces max_queue_size over all devices with Error(kQueueFull):
// nothing is dropped silently. requeue_task re-adds a task (a retry) one
// priority lower and is never refused, so accepted work is never lost.
//
// Thread-safety: every member is safe to call from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/clock.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

struct QueuedTask {
  std::string task_id;
  std::string device;
  std::string service;
  std::int64_t estimated_memory_mb = 0;
  int priority = 0;
  SteadyTime enqueued_at{};    // set by the queue
  std::uint64_t sequence = 0;  // set by the queue: arrival order
};

class TASKMGR_API TaskQueue {
 public:
  struct Options {
    bool enable_priority_queue = true;
    QueueOrdering ordering = QueueOrdering::kFifo;
    std::size_t max_queue_size = 100;
    Duration starvation_after = std::chrono::seconds(10);
    bool check_memory = true;    // false: ignore free memory (resource tracking off)
    Duration priority_aging{0};  // one priority level per this much waiting; 0 = no aging
  };
  using Eligible = std::function<bool(const QueuedTask&)>;

  TaskQueue(Options options, const DeviceRegistry& devices, std::shared_ptr<const Clock> clock);
  ~TaskQueue();
  TaskQueue(const TaskQueue&) = delete;
  TaskQueue& operator=(const TaskQueue&) = delete;

  // The spec's add_task(task, priority). Throws Error(kQueueFull) when
  // max_queue_size tasks are queued, Error(kInvalidArgument) for a task
  // without id or device, Error(kInvalidState) when the id is queued already.
  // enforce_limit = false: a task the queue must take whatever its size (a
  // task recovered at open; it was accepted before).
  void add_task(QueuedTask task, int priority, bool enforce_limit = true);
  void add_task(const Task& task, int priority);

  // The spec's get_next_task(device): removes and returns the next task that
  // fits the device's free memory (and passes `eligible`, when given). Tasks
  // `hidden` says are held (paused) are passed as if not queued: they are
  // not passed over for memory (starvation_after does not run for them).
  // Both run with the queue's lock held: they must not call the queue.
  std::optional<QueuedTask> get_next_task(const std::string& device,
                                          const Eligible& eligible = nullptr,
                                          const Eligible& hidden = nullptr);
  // The same choice without removing it.
  std::optional<QueuedTask> peek_next_task(const std::string& device,
                                           const Eligible& eligible = nullptr,
                                           const Eligible& hidden = nullptr);

  // The spec's requeue_task(task): re-adds with priority - 1 (the lowest
  // priority stays the lowest); never refused.
  void requeue_task(QueuedTask task);

  // Gives a queued task another priority: it moves to its place in that
  // order, among equals by its original arrival (it keeps its enqueued_at
  // and sequence: the queue timeout still counts from its arrival). False
  // when not queued.
  bool set_priority(const std::string& task_id, int priority);

  // True when `a` goes before `b` in dispatch order by priority (aged, when
  // aging is on) and then arrival: the order of the heads of two devices'
  // queues (queue_ordering's largest_first applies within a device only).
  bool precedes(const QueuedTask& a, const QueuedTask& b) const;

  // Removes a queued task (cancel, device change). False when not queued.
  bool remove(const std::string& task_id);
  // Removes and returns the tasks enqueued at or before `cutoff` (queue
  // timeout), oldest first, but those `exempt` says are not expiring (a
  // paused one). `exempt` runs with the queue's lock held.
  std::vector<QueuedTask> take_expired(SteadyTime cutoff, const Eligible& exempt = nullptr);
  // Counts a queued task as enqueued `by` later (time it was paused does
  // not count toward its queue timeout, nor its aging); it keeps its place
  // among equals (sequence). False when not queued.
  bool delay(const std::string& task_id, Duration by);

  bool contains(const std::string& task_id) const;
  std::size_t size() const;
  std::size_t size(const std::string& device) const;
  std::map<std::string, std::size_t> sizes() const;  // per device with queued tasks
  // The device's queue in dispatch order (priority, then ordering).
  std::vector<QueuedTask> snapshot(const std::string& device) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace taskmgr
