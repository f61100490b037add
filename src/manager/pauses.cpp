#include "manager/pauses.hpp"

#include <algorithm>

namespace taskmgr::detail {

const Pauses::Entry* Pauses::find(PauseScope scope, const std::string& name) const {
  auto it = map_.find(Key{scope, name});
  return it == map_.end() ? nullptr : &it->second;
}

void Pauses::add(Entry e) {
  if (e.state.scope == PauseScope::kManager) manager_ = true;
  Key k{e.state.scope, e.state.name};
  map_.insert_or_assign(std::move(k), std::move(e));
}

std::optional<Pauses::Entry> Pauses::remove(PauseScope scope, const std::string& name) {
  auto it = map_.find(Key{scope, name});
  if (it == map_.end()) return std::nullopt;
  Entry e = std::move(it->second);
  map_.erase(it);
  if (scope == PauseScope::kManager) manager_ = false;
  return e;
}

std::vector<PauseState> Pauses::list() const {
  std::vector<PauseState> out;
  out.reserve(map_.size());
  for (const auto& [k, e] : map_) out.push_back(e.state);
  return out;
}

bool Pauses::device(std::string_view id) const {
  if (map_.empty()) return false;
  return map_.count(Key{PauseScope::kDevice, std::string(id)}) != 0;
}

bool Pauses::service(std::string_view kind) const {
  if (map_.empty()) return false;
  return map_.count(Key{PauseScope::kService, std::string(kind)}) != 0;
}

const Pauses::Entry* Pauses::holding(std::string_view device_id, std::string_view kind) const {
  if (map_.empty()) return nullptr;
  if (const Entry* e = find(PauseScope::kManager, "")) return e;
  if (const Entry* e = find(PauseScope::kDevice, std::string(device_id))) return e;
  return find(PauseScope::kService, std::string(kind));
}

Duration Pauses::credit(const Entry& ended, SteadyTime enqueued, std::string_view device_id,
                        std::string_view kind, SteadyTime now) const {
  const SteadyTime from = std::max(enqueued, ended.since_steady);
  // Until another pause that still holds the task began (from then on that
  // one holds it, and credits it when it ends), else until now.
  SteadyTime to = now;
  for (const Entry* o :
       {find(PauseScope::kManager, ""), find(PauseScope::kDevice, std::string(device_id)),
        find(PauseScope::kService, std::string(kind))}) {
    if (o != nullptr) to = std::min(to, std::max(from, o->since_steady));
  }
  return to > from ? to - from : Duration::zero();
}

}  // namespace taskmgr::detail
