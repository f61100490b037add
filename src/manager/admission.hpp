// Private: what a request must pass before the manager takes it.
//
//  * validate_request / check_options: the checks made before any lock
//    (UTF-8, batch size, input, options JSON and the library's own options).
//  * QueueAdmission: room in the queue (tasks.max_queue_size), exact under
//    concurrency. A create with `start` reserves room under the admission
//    lock alone (it does not take the scheduler lock); start_task checks
//    and queues under the scheduler lock, then the admission lock; a create
//    queues its tasks and gives its reservation back in one admission
//    section (otherwise a check in between would count them twice). So
//    queue size + reserved <= max_queue_size always holds. Retries and
//    recovered tasks were accepted before: they are never refused.
#pragma once

#include <atomic>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "sync.hpp"
#include "taskmgr/task.hpp"
#include "taskmgr/task_queue.hpp"

namespace taskmgr::detail {

// Error(kInvalidArgument) naming the problem.
void validate_request(const TaskCreateRequest& req);
// A service kind, device id or media type from the host: UTF-8 without a
// NUL, else Error(kInvalidArgument) naming `what` and the byte.
void check_name(const char* what, const std::string& value);
void check_options(const std::string& options_json);
// An input path that exists and is not a regular file (a FIFO, a device, a
// socket, a directory, a file of /proc or /sys) is refused, found with
// stat() alone: nothing is opened.
void check_input_path(const std::string& path);
// The task's own deadline in seconds, from its options ("timeout_seconds").
std::optional<double> timeout_from_options(const std::string& options_json);

class QueueAdmission {
 public:
  QueueAdmission(const TaskQueue& queue, std::size_t max) : queue_(queue), max_(max) {}

  // Reserves room for `n` tasks a create will queue. Error(kQueueFull) when
  // they do not fit; `many`: the message speaks of a batch.
  void reserve(std::size_t n, bool many) REQUIRES(!mu_);
  // Gives back room reserved by a create that failed.
  void unreserve(std::size_t n) noexcept { reserved_ -= n; }

  // The admission lock, for the sections that check or queue.
  Mutex& mutex() RETURN_CAPABILITY(mu_) { return mu_; }
  // Room for one more task (start_task, retry_task); Error(kQueueFull)
  // naming `id` and what it stays as else.
  void check_one(const std::string& id,
                 std::string_view stays = "stays pending and can be started later") REQUIRES(mu_);
  // A create's reserved tasks are in the queue now.
  void queued_reserved(std::size_t n) REQUIRES(mu_) { reserved_ -= n; }

  std::uint64_t rejected() const noexcept { return rejected_.load(std::memory_order_relaxed); }

 private:
  const TaskQueue& queue_;
  const std::size_t max_;
  Mutex mu_ ACQUIRED_AFTER(scheduler_lock);
  // Read without mu_ only by unreserve's fetch_sub; every check reads it
  // under mu_.
  std::atomic<std::size_t> reserved_{0};
  std::atomic<std::uint64_t> rejected_{0};
};

}  // namespace taskmgr::detail
