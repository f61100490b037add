// Private: the vocabulary of task events, in one place.
//
// Each event type has one builder here and always carries the same keys
// (null where a key does not apply), whatever path emits it; docs/EVENTS.md
// lists them and a test checks every emitted event against that list. The
// builders capture the details by value (no JSON is written under the
// scheduler lock); the outbox writes them when it drains.
//
// The health warnings some events imply are worded here too, both for a
// live task (from the builder's arguments) and for a task that is only in
// the store (from its stored event), so the two always agree.
#pragma once

#include <boost/container/small_vector.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "json_writer.hpp"
#include "taskmgr/clock.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/estimator.hpp"
#include "taskmgr/events.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail {

// The wall-clock time of a record or event, to the millisecond: what the
// stores keep, so a task read from memory and the same task read from the
// store show the same times.
inline Timestamp stored_time(const Clock& c) {
  return std::chrono::floor<std::chrono::milliseconds>(c.now());
}

// An event as committed under the scheduler lock: its details captured by
// value and written as JSON when drained (or written at once when they do
// not fit the capture).
struct PendingEvent {
  TaskEvent event = TaskEvent::kCreated;
  Timestamp timestamp{};
  bool captured = false;
  CapturedObject fields;  // when captured
  std::string details;    // otherwise

  void write_details(std::string& out) const {
    if (captured) {
      fields.assign_to(out);
    } else {
      out.assign(details);
    }
  }
};
// The outbox relies on it: events move into reserved room without throwing.
static_assert(std::is_nothrow_move_constructible_v<PendingEvent>);

// The events of one state change. They share one timestamp, read once.
// Held inline: a batch of up to four events allocates nothing.
struct EventBatch {
  explicit EventBatch(const Clock& c) : clock(&c) {}
  const Clock* clock;
  boost::container::small_vector<PendingEvent, 4> events;
  std::optional<Timestamp> now;

  bool empty() const noexcept { return events.empty(); }
  void clear() noexcept {
    events.clear();
    now.reset();
  }
  // The events as records of task `id`, details written now; clears the batch.
  std::vector<EventRecord> take_records(const std::string& id);
};

namespace events {

void created(EventBatch& b, const Task& t, const MemoryEstimate* estimate);
// retry: a further attempt; recovered: found queued or running at open;
// moved_from: the device it left (its device became unavailable).
void queued(EventBatch& b, const Task& t, bool retry, bool recovered,
            std::string_view moved_from = {});
void resource_acquired(EventBatch& b, const std::string& device, const std::string& instance,
                       std::int64_t reserved_mb, std::int64_t estimated_mb);
void started(EventBatch& b, int attempt, int batch_size, double wait_s);
void completed(EventBatch& b, int attempt, double processing_s,
               std::optional<std::int64_t> actual_mb);
void failed(EventBatch& b, TaskFailureReason reason, const std::string& message, int attempt);
void cancelled(EventBatch& b, TaskStatus was, int attempt, const std::string& message);
// `counted`: the attempt that ended counts (next_attempt = attempt + 1);
// not for one close() interrupted (the next run has its number again).
void retried(EventBatch& b, std::string_view reason, const std::string& message, int attempt,
             const std::string& next_device, int next_batch_size, double delay_s,
             bool counted = true);
void device_fallback(EventBatch& b, const std::string& from, const std::string& to,
                     std::string_view reason);

// memory_warning, by kind.
void memory_above_estimate(EventBatch& b, const std::string& device, std::int64_t used_mb,
                           std::int64_t estimated_mb);
void memory_out_of_memory(EventBatch& b, const std::string& device, const std::string& message,
                          const std::string& memory_state_json);
void memory_device_nearly_full(EventBatch& b, const std::string& device, std::int64_t used_mb,
                               std::int64_t total_mb);

void cleanup_started(EventBatch& b, int attempt, bool recovered);
void resource_released(EventBatch& b, const std::string& device, const std::string& instance,
                       std::int64_t reserved_mb, bool recovered);
void cleanup_completed(EventBatch& b, int attempt, double duration_s,
                       const std::vector<std::string>& problems, bool recovered);
// The host changed the priority of a waiting task (`was`: pending or queued).
void priority_changed(EventBatch& b, int from, int to, TaskStatus was);
// The host deleted the ended task (published, not stored: its events went
// with it). `status`: the one it ended with.
void deleted(EventBatch& b, TaskStatus status, int attempt);
// Manager-level (task_id ""; published, not stored): a pause began (`since`)
// or ended (`paused_s` after `since`). `scope`: manager, device or service.
void paused(EventBatch& b, std::string_view scope, std::string_view name, Timestamp since);
void resumed(EventBatch& b, std::string_view scope, std::string_view name, Timestamp since,
             double paused_s);
// The host resized a service's pool on a device (manager-level, like the
// pauses): the sizes in force now and before.
void pool_resized(EventBatch& b, std::string_view service, std::string_view device,
                  const PoolSettings& before, const PoolSettings& now);

// ---- health warnings ----------------------------------------------------------
std::string memory_warning_text(std::string_view kind, std::string_view message);
std::string retried_warning_text(std::string_view reason, int attempt, std::string_view message);
std::string waited_warning_text(double wait_s);
std::string cleanup_warning_text(std::string_view first_problem);
// The warning a stored event implies, if any (`long_wait_s`: a wait longer
// than this is worth a warning).
std::optional<std::string> warning_of(const EventRecord& e, double long_wait_s);

// The keys every event of `event` carries, in order (docs/EVENTS.md).
const std::vector<std::string_view>& keys_of(TaskEvent event);

}  // namespace events
}  // namespace taskmgr::detail
