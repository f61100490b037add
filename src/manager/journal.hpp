// Private: the manager's only way to its TaskStore.
//
// A store may block (the SQLite store's reads wait for the writer's group
// commit, a write may wait for the disk), and a host may bring its own
// store: every call here requires that the scheduler lock is not held, and
// the analysis checks it at every caller (REQUIRES(!scheduler_lock) propagates).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sync.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr::detail {

class Journal {
 public:
  explicit Journal(std::shared_ptr<TaskStore> store) : store_(std::move(store)) {}

  void insert_tasks(const std::vector<NewTask>& tasks) REQUIRES(!scheduler_lock) {
    store_->insert_tasks(tasks);
  }
  void update_task(const Task& task, const std::vector<EventRecord>& events)
      REQUIRES(!scheduler_lock) {
    store_->update_task(task, events);
  }
  void append_metrics(const std::vector<MetricSample>& samples) REQUIRES(!scheduler_lock) {
    store_->append_metrics(samples);
  }
  std::optional<Task> load_task(const std::string& id) REQUIRES(!scheduler_lock) {
    return store_->load_task(id);
  }
  std::vector<Task> list_tasks(const TaskFilter& f) REQUIRES(!scheduler_lock) {
    return store_->list_tasks(f);
  }
  std::vector<EventRecord> load_events(const std::string& id) REQUIRES(!scheduler_lock) {
    return store_->load_events(id);
  }
  std::vector<MetricSample> load_metrics(const std::string& id) REQUIRES(!scheduler_lock) {
    return store_->load_metrics(id);
  }
  std::vector<Task> load_unfinished() REQUIRES(!scheduler_lock) {
    return store_->load_unfinished();
  }
  std::size_t prune_finished(Timestamp before) REQUIRES(!scheduler_lock) {
    return store_->prune_finished(before);
  }
  std::size_t delete_tasks(const std::vector<std::string>& ids) REQUIRES(!scheduler_lock) {
    return store_->delete_tasks(ids);
  }
  std::vector<PauseState> load_pauses() REQUIRES(!scheduler_lock) { return store_->load_pauses(); }
  void save_pause(const PauseState& p, bool paused) REQUIRES(!scheduler_lock) {
    store_->save_pause(p, paused);
  }
  void flush() REQUIRES(!scheduler_lock) { store_->flush(); }
  StoreStats stats() const REQUIRES(!scheduler_lock) { return store_->stats(); }
  std::string describe() const REQUIRES(!scheduler_lock) { return store_->describe(); }
  std::vector<std::string> notices() const REQUIRES(!scheduler_lock) { return store_->notices(); }

 private:
 public:
  TaskStore& store() { return *store_; }

 private:
  std::shared_ptr<TaskStore> store_;
};

}  // namespace taskmgr::detail
