// taskmgr: pausing queues (TaskManager::pause).
//
// A pause covers the whole manager, one device's queue or one service
// kind. While a queued task is covered by a pause it does not start:
// running tasks finish, new tasks are accepted and queued, and its queue
// timeout does not run (on resume its time in the queue is counted without
// the paused time). A pause is recorded in the store and is in force again
// when the manager is opened on that store.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "taskmgr/export.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

enum class PauseScope {
  kManager,  // "manager": every queue (name "")
  kDevice,   // "device": one device's queue (name: its id, e.g. "cuda:0")
  kService,  // "service": one service kind's tasks on every device (name: the kind)
};

TASKMGR_API std::string_view to_string(PauseScope scope) noexcept;
TASKMGR_API std::optional<PauseScope> parse_pause_scope(std::string_view s) noexcept;

// A pause in force: what it covers and since when.
struct PauseState {
  PauseScope scope = PauseScope::kManager;
  std::string name;  // "" for the manager
  Timestamp since{};
};

// {"scope":"device","name":"cpu","since":"2026-12-03T10:00:00.000Z"}
TASKMGR_API std::string to_json(const PauseState& pause);

}  // namespace taskmgr
