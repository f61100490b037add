#include "manager/record_table.hpp"

#include <algorithm>

namespace taskmgr::detail {

void RecordTable::put(const RecordPtr& rec) {
  records_.erase(rec->id());  // a key must view the id of the record it maps to
  if (free_nodes_.empty()) {
    records_.emplace(std::string_view(rec->id()), rec);
    return;
  }
  auto node = std::move(free_nodes_.back());
  free_nodes_.pop_back();
  node.key() = std::string_view(rec->id());
  node.mapped() = rec;
  records_.insert(std::move(node));
}

RecordPtr RecordTable::find(std::string_view id) const {
  auto it = records_.find(id);
  return it == records_.end() ? nullptr : it->second;
}

void RecordTable::finished(const RecordPtr& rec, std::vector<RecordPtr>& evicted) {
  finished_.push_back(rec);
  while (finished_.size() > kFinishedKept) {
    RecordPtr old = std::move(finished_.front());
    finished_.pop_front();
    if (auto node = records_.extract(old->id())) {
      node.mapped().reset();  // not the last reference: `old` holds one
      if (free_nodes_.size() < kFinishedKept) free_nodes_.push_back(std::move(node));
    }
    evicted.push_back(std::move(old));
  }
}

void RecordTable::revive(const RecordPtr& rec) {
  if (find(rec->id()) != rec) put(rec);
  finished_.erase(std::remove(finished_.begin(), finished_.end(), rec), finished_.end());
}

RecordPtr RecordTable::erase_finished(std::string_view id) {
  auto it = records_.find(id);
  if (it == records_.end()) return nullptr;
  RecordPtr rec = it->second;
  records_.erase(it);
  finished_.erase(std::remove(finished_.begin(), finished_.end(), rec), finished_.end());
  return rec;
}

void RecordTable::prune_finished(Timestamp cutoff) {
  std::deque<RecordPtr> kept;
  for (auto& rec : finished_) {
    if (rec->task.finished_at && *rec->task.finished_at < cutoff &&
        rec->task.resource_cleanup_completed) {
      records_.erase(rec->id());
    } else {
      kept.push_back(std::move(rec));
    }
  }
  finished_.swap(kept);
}

}  // namespace taskmgr::detail
