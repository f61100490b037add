// taskmgr: the facade a host creates (the spec's TaskManager).
//
//   taskmgr::TaskManager tm(taskmgr::Config::from_yaml_file("taskmgr.yaml"));
//   tm.register_service(my_factory);                       // or the built-in OCR
//   taskmgr::TaskCreateRequest req;
//   req.service = "ocr";
//   req.input.path = "page.png";
//   auto task = tm.create_task(req);
//   tm.start_task(task.id);                                // queued on its device
//   auto done = tm.wait_task(task.id, std::chrono::seconds(30));
//
// Life of a task (docs/ARCHITECTURE.md has the full picture and the exact
// event sequences):
//   create_task  estimate memory, select a device, store it      -> pending
//   start_task   queue it on its device (priority, batch size)   -> queued
//   scheduler    when the device has free memory for the estimate, a worker
//                thread and a pool slot: reserve, lease an instance -> running
//   service      process(ctx) on a worker thread
//   outcome      completed | failed (reason) | cancelled | retried (OOM:
//                CPU fallback or smaller batch, after a backoff)
//   cleanup      after every attempt, exactly once: the service's cache
//                hook, the task's temp dir, the pool lease, the memory
//                reservation; then resource_cleanup_completed = true.
//
// Errors a caller can cause are thrown as taskmgr::Error with their code:
// kNotFound (unknown task id, service or device), kInvalidArgument (bad
// request), kInvalidState (e.g. starting a task twice, or any call that
// changes something after close()), kQueueFull (tasks.max_queue_size; the task stays pending and
// can be started later), kDeviceUnavailable / kMemoryLimitExceeded (no device can hold the task). A
// failure *inside* a task never throws here: it is the task's failure_reason.
//
// Threads: the manager owns `executor.worker_threads` worker threads (the
// services run there), one timer thread and the event bus's dispatcher
// thread; a durable store has its writer thread, and a shared queue
// (storage.shared) its cluster thread (docs/ARCHITECTURE.md, "Threads").
// Every public member is safe to call from any thread, including
// from inside any host code the library calls (event callbacks, log sinks,
// a service and its factory, supports(), a memory model), except close()
// and the destructor: from there close() throws Error(kInvalidState) and
// the destructor leaks the manager rather than wait for itself. The
// library never calls host code with a lock of its own held
// (docs/ARCHITECTURE.md, "Locks"), so such calls never deadlock.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/clock.hpp"
#include "taskmgr/cluster.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/estimator.hpp"
#include "taskmgr/events.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/log.hpp"
#include "taskmgr/metrics.hpp"
#include "taskmgr/pause.hpp"
#include "taskmgr/service.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

// The spec's TaskStartRequest: what may change when a task is started.
struct TaskStartRequest {
  std::string device;             // "" = keep the device chosen at creation
  std::optional<int> priority;    // default: the priority given at creation
  std::optional<int> batch_size;  // default: the batch size given at creation
  std::string options_json;       // "" = keep the options given at creation
};

struct TaskManagerOptions {
  std::shared_ptr<Clock> clock;  // default: Clock::system()
  // Default: the one the configuration names: storage.url (PostgreSQL), else
  // the SQLite file storage.path (default "taskmgr.db" in the working
  // directory; ":memory:" for the in-memory store, which keeps nothing).
  std::shared_ptr<TaskStore> store;
  std::shared_ptr<DeviceRegistry> devices;  // default: probed/declared per config.devices
  LogSink log_sink;                         // default: warnings and errors to stderr
  std::vector<std::shared_ptr<ServiceFactory>> services;  // registered at open
  // Subscribed before the store is recovered, so they also receive the
  // events of recovery (tasks queued again, interrupted attempts retried).
  std::vector<EventCallback> subscribers;
  bool builtin_ocr = true;   // register the OCR service ("ocr", per config.ocr) unless given above
  unsigned random_seed = 0;  // backoff jitter; 0 = random
  Duration sweep_interval = std::chrono::milliseconds(100);  // timeouts are checked this often
};

class TASKMGR_API TaskManager {
 public:
  // Validates the config (ConfigError) and starts the threads.
  explicit TaskManager(Config config, TaskManagerOptions options = {});
  // close(), then stops the threads.
  ~TaskManager();
  TaskManager(const TaskManager&) = delete;
  TaskManager& operator=(const TaskManager&) = delete;

  // Adds a service kind, warming pools.defaults/devices min_instances.
  // Error(kInvalidState) if the kind is registered already.
  void register_service(std::shared_ptr<ServiceFactory> factory);

  // The spec's create_task: estimate, select the device, store durably.
  // Error(kInvalidArgument) for a malformed request, among others an input
  // path that exists and is not a regular file (a FIFO, a device, a socket,
  // a directory, a file of /proc or /sys: found with stat(), never opened).
  Task create_task(const TaskCreateRequest& request);
  // Many tasks in one step (bulk submission): each as create_task would
  // make it, all stored in one commit, all or none; the error of the first
  // request that fails names it by index ("request 3: ..."). Requests with
  // `start` are queued; if the queue cannot take all of them, none is
  // created (QUEUE_FULL). Returns the tasks in request order.
  std::vector<Task> create_tasks(const std::vector<TaskCreateRequest>& requests);
  // The spec's start route: queue a pending task (one taskmgr never placed,
  // from an adopted table, is estimated and placed now). Error(kQueueFull)
  // leaves it pending; Error(kInvalidState) for a task that is not pending
  // (naming an unrecognized status word). Returns the task as queued.
  Task start_task(const std::string& task_id, const TaskStartRequest& params = {});
  // Cancels a pending, queued or running task (running: cooperatively, via
  // TaskContext::cancelled()); a task this cancels ends cancelled, even if
  // its service then finishes the work (the result is dropped). False when
  // it had already ended.
  bool cancel_task(const std::string& task_id);

  // Runs a failed or cancelled task again: a new attempt of the same task
  // (its id, events and samples kept; the attempt counter goes on), queued
  // with the request's priority, device, batch size and options where it
  // gives them (else the task's own; placed again when the device or batch
  // size changes or its device can take nothing now). Its failure, result
  // and finish time are cleared; events `retried` (reason "host") and
  // `queued` record it. This attempt always runs; the automatic retries it
  // may get after (out of memory) are those tasks.retry.max_attempts still
  // allows. Returns the task as queued. Error(kNotFound) for an unknown id;
  // Error(kInvalidState) for a task that is not failed or cancelled
  // (completed: create a new one), one whose cleanup is not done, one
  // delete_task is deleting, and after close(); Error(kQueueFull) when the
  // queue has no room (it stays as it was); the errors of start_task for
  // the request. The retry is in the store when it returns (durable
  // stores: a kill right after keeps it). A retry and a delete of one task
  // at once: exactly one of them succeeds.
  Task retry_task(const std::string& task_id, const TaskStartRequest& params = {});

  // Changes the priority of a waiting task: a pending one starts with it, a
  // queued one moves to its place in its device's queue at once (among
  // tasks of equal priority by when it was queued: the queue timeout still
  // counts from then), one waiting for a retry's backoff is queued with it
  // (not one lower). A `priority_changed` event records a change (stored;
  // none when the priority is the one it has).
  // Returns the task as it is now, the change in the store (durable stores:
  // a kill right after keeps it). Error(kNotFound) for an unknown id,
  // Error(kInvalidState) for a task that runs, is finishing an attempt, or
  // has ended, and after close().
  Task set_task_priority(const std::string& task_id, int priority);

  // Deletes an ended task (completed, failed or cancelled, its cleanup
  // done) with its events, metric samples and input bytes, from the store
  // and from memory, in one transaction: afterwards get_task throws
  // kNotFound and list_tasks leaves it out. Subscribers get a `deleted`
  // event (delivered, not stored: the task's events went with it).
  // Error(kNotFound) for an unknown id (or one deleted already);
  // Error(kInvalidState) for a task that has not ended (cancel it and wait
  // for it first), one whose cleanup did not complete (it is redone at the
  // next open), one whose final state is not in the store yet (its writes
  // fail: the message says why), and a row of an adopted table that taskmgr
  // did not run (it never deletes those); Error(kIoError) when the store
  // cannot write the delete now (a full disk, a read-only file: nothing is
  // deleted, and a later call can); Error(kUnsupported) from a host's store
  // that does not implement TaskStore::delete_tasks. Two deletes of one
  // task at once: the second waits for the first (then kNotFound); one from
  // the thread that is deleting it (a log sink) gets kInvalidState.
  void delete_task(const std::string& task_id);

  // Pauses the whole manager (PauseScope::kManager, name ""), one device's
  // queue (kDevice, its id) or one service kind's tasks on every device
  // (kService, the kind; it need not be registered yet). While a queued
  // task is held by a pause it does not start: running tasks finish, new
  // tasks are accepted and queued (create_task, start_task), retries are
  // queued when their backoff ends, and tasks not held start as before.
  // A held task's queue timeout does not run: when the pause ends, the time
  // it held the task is not counted (nor toward priority aging). The pause
  // is recorded in the store before this returns and holds again when a
  // manager opens on that store (pause.hpp). Subscribers get a manager-
  // level `paused` event (task_id "": delivered, not stored). Returns false,
  // changing nothing, when that pause is in force already.
  // Error(kInvalidArgument) for a manager pause with a name or a service
  // kind that is not 1..100 bytes of UTF-8 without control characters;
  // Error(kNotFound) for a device the manager does not have;
  // Error(kInvalidState) after close(); Error(kIoError) when the store
  // cannot record it, Error(kBusy) when another process holds the store
  // locked past its busy timeout (in both cases nothing changed; one pause
  // or resume records at a time, so others wait for it, while calls that
  // change nothing answer at once); Error(kUnsupported) from a host's
  // store that does not implement TaskStore::save_pause.
  bool pause(PauseScope scope, const std::string& name = "");
  // Ends a pause: the tasks it held start again in queue order (unless
  // another pause holds them). A `resumed` event (its `paused_s`). Returns
  // false, changing nothing, when that pause is not in force. The same
  // errors as pause() (a device that is gone may be resumed).
  bool resume(PauseScope scope, const std::string& name = "");
  // The pauses in force, in (scope, name) order.
  std::vector<PauseState> paused() const;

  // Sizes one service kind's pool on one device while the manager runs,
  // until it closes (the configuration's pools and services.<kind>.pool
  // size it at open): at most `max_instances` of its tasks run there at
  // once, and `min_instances` instances are kept warm. A larger max lets
  // waiting tasks start at once; a larger min creates the instances in the
  // background (this call does not wait for them; a factory that fails
  // then is logged, and the instance is made when a task needs it). A
  // smaller max destroys idle instances beyond it before this returns and
  // retires running ones as their tasks finish: no running task is
  // stopped, and no task starts there while max or more run. The acquire
  // timeout is kept. Subscribers get a manager-level `pool_resized` event
  // (task_id "": delivered, not stored); a resize to the sizes in force
  // changes nothing and sends none. The idle instances it retires are
  // destroyed on the calling thread with no lock of the manager held (an
  // instance's destructor may call the manager). Returns the settings it
  // replaced.
  // Error(kNotFound) for a service kind not registered or a device the
  // manager does not have; Error(kInvalidArgument) for a name that is not
  // UTF-8 or has a NUL, a device the kind
  // does not run on, or sizes outside 0 <= min_instances <= max_instances,
  // 1 <= max_instances <= 4096; Error(kInvalidState) after close().
  PoolSettings resize_pool(const std::string& service, const std::string& device, int min_instances,
                           int max_instances);

  // Reads. get_task answers from memory for a task the manager holds (not
  // ended, or ended recently), from the store otherwise; list_tasks asks
  // the store, which answers with each task's latest state also while its
  // writes fail (store.hpp): the two never disagree about a task.
  // get_task_events and get_task_samples read the store: while writes fail
  // they show what is persisted (the rest follows when the store catches
  // up).
  // Input bytes are kept in the store, not in memory: a task waiting in the
  // queue costs no memory for its input, and its attempt reads the bytes
  // when it runs (TaskContext::input()). The Task that create_task,
  // create_tasks, get_task and wait_task return has its input's path and
  // media type but empty input.data; list_tasks with with_payloads = true
  // returns the bytes.
  Task get_task(const std::string& task_id) const;
  std::vector<Task> list_tasks(const TaskFilter& filter = {}) const;
  std::vector<EventRecord> get_task_events(const std::string& task_id) const;
  std::vector<MetricSample> get_task_samples(const std::string& task_id) const;

  // Waits until the task has ended and its cleanup is done; std::nullopt on
  // timeout. Error(kInvalidState) for a task whose stored status taskmgr
  // does not know (TaskStatus::kUnrecognized: it never ends here).
  std::optional<Task> wait_task(const std::string& task_id, Duration timeout) const;
  // Waits until no task is queued, backing off or running; false on timeout.
  bool wait_idle(Duration timeout) const;

  // The spec's get_task_metrics and get_task_health.
  TaskMetrics get_task_metrics() const;

  // Several hosts sharing one queue (storage.shared, docs/SCALING.md): every
  // host as the shared tables show it (its heartbeat, what it holds, what it
  // reported; lost once it stopped heartbeating), and the tasks waiting for
  // a host. Error(kUnsupported) when this manager does not share its queue.
  ClusterStatus cluster() const;
  TaskHealth get_task_health(const std::string& task_id) const;

  // Events (events.hpp says on which thread and what a callback may do).
  SubscriptionId subscribe(EventCallback callback);
  bool unsubscribe(SubscriptionId id);
  // Waits until every event so far was delivered to the subscribers.
  void flush_events();

  // Host call: an unavailable device gets no new task; its queued tasks move
  // to another device that can hold them (device_fallback) or fail
  // DEVICE_UNAVAILABLE. Running tasks finish where they are.
  void set_device_available(const std::string& device, bool available);
  std::vector<DeviceInfo> devices() const;

  // How create_task would estimate this request.
  MemoryEstimate explain_estimate(const TaskCreateRequest& request) const;

  // Stops accepting work, lets running tasks finish, leaves queued tasks
  // queued in the store (a durable store resumes them at the next open),
  // then destroys the pools' instances. Attempts still running after
  // tasks.close_grace_seconds (30 s) are interrupted: their service sees
  // cancelled() (a worker process still running 2 s later is killed), and
  // one that stops goes back to the queue with its priority, the attempt not
  // counted, and stays queued in the store (event retried, reason
  // interrupted); one that
  // finishes its work completes. An in-process service that never looks at
  // cancelled() is waited for. Then the instances go (a host's instance destructor may
  // still read the manager). Idempotent. Error(kInvalidState) from inside
  // host code the library called. After it, calls that change something
  // (register_service, create_task(s), start_task, cancel_task,
  // set_device_available, subscribe, retry_task, set_task_priority,
  // delete_task) throw Error(kInvalidState); reads work;
  // wait_task returns an ended task and throws Error(kInvalidState) for one
  // that stays queued or pending, and wait_idle throws it too (waiters
  // already waiting wake up).
  // Then it flushes the store, which tries its failed writes once more; if
  // writes accepted earlier are still not in the store (a full disk, a
  // read-only file, a database that refused them), it throws
  // Error(kUnpersisted) naming how many and the store's message (logged as
  // an error too): the manager is closed all the same, and a later close()
  // (after making room) tries them again and returns normally once they are
  // in.
  void close();

  const Config& config() const noexcept;

  class Impl;  // the implementation (src/task_manager.cpp); opaque to hosts

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace taskmgr
