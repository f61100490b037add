// Private: the pauses in force (TaskManager::pause), held by the Scheduler
// under its lock: which queued tasks may not start, and by how much a
// resumed task's queue time is credited.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "taskmgr/clock.hpp"
#include "taskmgr/pause.hpp"

namespace taskmgr::detail {

class Pauses {
 public:
  struct Entry {
    PauseState state;
    SteadyTime since_steady{};  // the pause's start on the steady clock
  };

  bool empty() const noexcept { return map_.empty(); }
  const Entry* find(PauseScope scope, const std::string& name) const;
  void add(Entry e);
  std::optional<Entry> remove(PauseScope scope, const std::string& name);
  std::vector<PauseState> list() const;

  bool manager() const noexcept { return manager_; }
  bool device(std::string_view id) const;
  bool service(std::string_view kind) const;
  // Whether a task of `service` queued on `device` is held by a pause.
  bool holds(std::string_view device_id, std::string_view kind) const {
    return manager_ || (!map_.empty() && (device(device_id) || service(kind)));
  }
  // The pause that holds such a task (the manager's first, then the
  // device's, then the service's); nullptr when none.
  const Entry* holding(std::string_view device_id, std::string_view kind) const;

  // How much of [max(enqueued, ended.since), now] the pause `ended` (just
  // removed) held a task of `service` on `device` while no other pause
  // still in force did: the time its queue timeout is credited.
  Duration credit(const Entry& ended, SteadyTime enqueued, std::string_view device_id,
                  std::string_view kind, SteadyTime now) const;

 private:
  using Key = std::pair<PauseScope, std::string>;
  std::map<Key, Entry> map_;
  bool manager_ = false;
};

}  // namespace taskmgr::detail
