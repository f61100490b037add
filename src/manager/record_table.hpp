// Private: the manager's index of live task records (leveldb's VersionSet
// role: externally synchronized by the scheduler lock).
//
// It holds every unfinished task and the kFinishedKept most recently
// finished ones; older finished records are evicted (the store has them)
// and handed back to the caller, which drops them outside the lock. Keys
// are views of the record's own id (no copy of the id per task), and nodes
// of erased entries are reused by the next inserts, so a record put by a
// host thread and evicted by a worker allocates nothing in the steady state.
#pragma once

#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "manager/record.hpp"

namespace taskmgr::detail {

class RecordTable {
 public:
  static constexpr std::size_t kFinishedKept = 256;

  void put(const RecordPtr& rec) REQUIRES(scheduler_lock);
  RecordPtr find(std::string_view id) const REQUIRES(scheduler_lock);
  // The record has finished: kept among the recent ones; returns the
  // records this evicts (to be dropped outside the lock).
  void finished(const RecordPtr& rec, std::vector<RecordPtr>& evicted) REQUIRES(scheduler_lock);
  // Drops the finished records that ended before `cutoff` (retention).
  void prune_finished(Timestamp cutoff) REQUIRES(scheduler_lock);
  // A finished record runs again (the host retried its task): put (when the
  // table does not hold it) and out of the finished ones, never evicted
  // while it is live.
  void revive(const RecordPtr& rec) REQUIRES(scheduler_lock);
  // Drops a finished record (the host deleted its task); returns it (to be
  // dropped outside the lock), or nullptr when the table does not hold it.
  RecordPtr erase_finished(std::string_view id) REQUIRES(scheduler_lock);
  std::size_t size() const REQUIRES(scheduler_lock) { return records_.size(); }

  template <typename F>
  void for_each(F&& f) const REQUIRES(scheduler_lock) {
    for (const auto& [id, rec] : records_) f(rec);
  }

 private:
  using Map = std::unordered_map<std::string_view, RecordPtr>;
  Map records_ GUARDED_BY(scheduler_lock);
  std::vector<Map::node_type> free_nodes_ GUARDED_BY(scheduler_lock);  // at most kFinishedKept
  std::deque<RecordPtr> finished_ GUARDED_BY(scheduler_lock);          // the recent finished ones
};

}  // namespace taskmgr::detail
