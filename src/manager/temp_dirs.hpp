// Private: the per-task temp directories (TaskContext::temp_dir()).
//
// Each manager makes one root, "taskmgr-<pid>-<random>" under tasks.temp_dir
// (default: the system's), on first use; an attempt's directory is
// "<root>/<task id>-a<attempt>". Cleanup removes an attempt's directory and
// checks it is gone; the root goes when the manager is destroyed; roots of
// dead processes (kill -9) are removed when a manager opens. All of it is
// file-system work: never with the scheduler lock held.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "sync.hpp"

namespace taskmgr::detail {

class TempDirs {
 public:
  explicit TempDirs(std::string configured_root) : configured_(std::move(configured_root)) {}

  // Creates the attempt's directory; TaskError(kProcessingError) naming it
  // when it cannot be made.
  std::string create(const std::string& task_id, int attempt) REQUIRES(!scheduler_lock);
  // Removes `dir` with its content; what is left is added to `problems`.
  static void remove(const std::string& dir, std::vector<std::string>& problems)
      REQUIRES(!scheduler_lock);
  // Removes the roots of processes that no longer run.
  void remove_dead_runs() REQUIRES(!scheduler_lock);
  // Removes this manager's root (at destruction).
  void remove_root() REQUIRES(!scheduler_lock);

 private:
  std::string base() const;

  const std::string configured_;
  std::once_flag once_;
  std::string root_;  // written once, under once_
};

}  // namespace taskmgr::detail
