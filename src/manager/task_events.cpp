#include "manager/task_events.hpp"

#include <fmt/format.h>
#include <boost/json.hpp>

namespace taskmgr::detail {

std::vector<EventRecord> EventBatch::take_records(const std::string& id) {
  std::vector<EventRecord> out(events.size());
  for (std::size_t i = 0; i < events.size(); ++i) {
    out[i].task_id = id;
    out[i].event = events[i].event;
    out[i].timestamp = events[i].timestamp;
    events[i].write_details(out[i].details_json);
  }
  clear();
  return out;
}

namespace events {
namespace {

void add(EventBatch& b, TaskEvent e, std::initializer_list<JsonField> details) {
  if (!b.now) b.now = stored_time(*b.clock);
  PendingEvent& ev = b.events.emplace_back();
  ev.event = e;
  ev.timestamp = *b.now;
  ev.captured = ev.fields.capture(details);
  if (!ev.captured) ev.details = json_object(details);  // long text (messages): rare
}

std::string problems_json(const std::vector<std::string>& problems) {
  std::string pj = "[";
  for (const auto& p : problems) {
    if (pj.size() > 1) pj += ',';
    JsonValue::append_string(pj, p);
  }
  pj += ']';
  return pj;
}

}  // namespace

void created(EventBatch& b, const Task& t, const MemoryEstimate* est) {
  add(b, TaskEvent::kCreated,
      {{"service", t.service},
       {"priority", t.priority},
       {"batch_size", t.batch_size},
       {"device", t.assigned_device.value_or("")},
       {"estimated_memory_mb", t.estimated_memory_mb},
       {"estimate_model", est ? JsonValue(est->model) : JsonValue(nullptr)},
       {"estimate_correction", est ? JsonValue(est->correction) : JsonValue(nullptr)}});
}

void queued(EventBatch& b, const Task& t, bool retry, bool recovered, std::string_view moved_from) {
  add(b, TaskEvent::kQueued,
      {{"device", t.assigned_device.value_or("")},
       {"priority", t.priority},
       {"batch_size", t.batch_size},
       {"estimated_memory_mb", t.estimated_memory_mb.value_or(0)},
       {"retry", retry},
       {"recovered", recovered},
       {"moved_from", moved_from.empty() ? JsonValue(nullptr) : JsonValue(moved_from)}});
}

void resource_acquired(EventBatch& b, const std::string& device, const std::string& instance,
                       std::int64_t reserved_mb, std::int64_t estimated_mb) {
  add(b, TaskEvent::kResourceAcquired,
      {{"device", device},
       {"service_instance_id", instance},
       {"reserved_mb", reserved_mb},
       {"estimated_memory_mb", estimated_mb}});
}

void started(EventBatch& b, int attempt, int batch_size, double wait_s) {
  add(b, TaskEvent::kStarted,
      {{"attempt", attempt}, {"batch_size", batch_size}, {"wait_s", JsonValue::seconds(wait_s)}});
}

void completed(EventBatch& b, int attempt, double processing_s,
               std::optional<std::int64_t> actual_mb) {
  add(b, TaskEvent::kCompleted,
      {{"attempt", attempt},
       {"processing_time_s", JsonValue::seconds(processing_s)},
       {"actual_memory_mb", actual_mb}});
}

void failed(EventBatch& b, TaskFailureReason reason, const std::string& message, int attempt) {
  add(b, TaskEvent::kFailed,
      {{"reason", to_string(reason)}, {"message", message}, {"attempt", attempt}});
}

void cancelled(EventBatch& b, TaskStatus was, int attempt, const std::string& message) {
  add(b, TaskEvent::kCancelled,
      {{"while", to_string(was)}, {"attempt", attempt}, {"message", message}});
}

void retried(EventBatch& b, std::string_view reason, const std::string& message, int attempt,
             const std::string& next_device, int next_batch_size, double delay_s, bool counted) {
  add(b, TaskEvent::kRetried,
      {{"reason", reason},
       {"message", message},
       {"attempt", attempt},
       {"next_attempt", counted ? attempt + 1 : attempt},
       {"device", next_device},
       {"batch_size", next_batch_size},
       {"delay_s", JsonValue::seconds(delay_s)}});
}

void device_fallback(EventBatch& b, const std::string& from, const std::string& to,
                     std::string_view reason) {
  add(b, TaskEvent::kDeviceFallback, {{"from", from}, {"to", to}, {"reason", reason}});
}

// memory_warning has nine keys, one more than a capture holds: its details
// are written at once (the event is rare).
void memory_above_estimate(EventBatch& b, const std::string& device, std::int64_t used_mb,
                           std::int64_t estimated_mb) {
  add(b, TaskEvent::kMemoryWarning,
      {{"kind", "above_estimate"},
       {"alert", false},
       {"device", device},
       {"message", fmt::format("uses {} MB, above its estimate of {} MB", used_mb, estimated_mb)},
       {"memory_usage_mb", used_mb},
       {"estimated_memory_mb", estimated_mb},
       {"used_mb", nullptr},
       {"total_mb", nullptr},
       {"memory_state", nullptr}});
}

void memory_out_of_memory(EventBatch& b, const std::string& device, const std::string& message,
                          const std::string& memory_state_json) {
  add(b, TaskEvent::kMemoryWarning,
      {{"kind", "out_of_memory"},
       {"alert", true},
       {"device", device},
       {"message", message},
       {"memory_usage_mb", nullptr},
       {"estimated_memory_mb", nullptr},
       {"used_mb", nullptr},
       {"total_mb", nullptr},
       {"memory_state", JsonValue::raw(memory_state_json)}});
}

void memory_device_nearly_full(EventBatch& b, const std::string& device, std::int64_t used_mb,
                               std::int64_t total_mb) {
  add(b, TaskEvent::kMemoryWarning,
      {{"kind", "device_nearly_full"},
       {"alert", false},
       {"device", device},
       {"message", fmt::format("{} is {} of {} MB full", device, used_mb, total_mb)},
       {"memory_usage_mb", nullptr},
       {"estimated_memory_mb", nullptr},
       {"used_mb", used_mb},
       {"total_mb", total_mb},
       {"memory_state", nullptr}});
}

void cleanup_started(EventBatch& b, int attempt, bool recovered) {
  add(b, TaskEvent::kCleanupStarted, {{"attempt", attempt}, {"recovered", recovered}});
}

void resource_released(EventBatch& b, const std::string& device, const std::string& instance,
                       std::int64_t reserved_mb, bool recovered) {
  add(b, TaskEvent::kResourceReleased,
      {{"device", device},
       {"service_instance_id", instance.empty() ? JsonValue(nullptr) : JsonValue(instance)},
       {"reserved_mb", reserved_mb},
       {"recovered", recovered}});
}

void cleanup_completed(EventBatch& b, int attempt, double duration_s,
                       const std::vector<std::string>& problems, bool recovered) {
  const std::string pj = problems_json(problems);
  add(b, TaskEvent::kCleanupCompleted,
      {{"ok", problems.empty()},
       {"attempt", attempt},
       {"duration_s", JsonValue::seconds(duration_s)},
       {"problems", JsonValue::raw(pj)},
       {"recovered", recovered}});
}

void priority_changed(EventBatch& b, int from, int to, TaskStatus was) {
  add(b, TaskEvent::kPriorityChanged, {{"from", from}, {"to", to}, {"while", to_string(was)}});
}

void deleted(EventBatch& b, TaskStatus status, int attempt) {
  add(b, TaskEvent::kDeleted, {{"status", to_string(status)}, {"attempt", attempt}});
}

void paused(EventBatch& b, std::string_view scope, std::string_view name, Timestamp since) {
  add(b, TaskEvent::kPaused,
      {{"scope", scope}, {"name", name}, {"since", format_timestamp(since)}});
}

void resumed(EventBatch& b, std::string_view scope, std::string_view name, Timestamp since,
             double paused_s) {
  add(b, TaskEvent::kResumed,
      {{"scope", scope},
       {"name", name},
       {"since", format_timestamp(since)},
       {"paused_s", paused_s}});
}

void pool_resized(EventBatch& b, std::string_view service, std::string_view device,
                  const PoolSettings& before, const PoolSettings& now) {
  add(b, TaskEvent::kPoolResized,
      {{"service", service},
       {"device", device},
       {"min_instances", now.min_instances},
       {"max_instances", now.max_instances},
       {"previous_min_instances", before.min_instances},
       {"previous_max_instances", before.max_instances}});
}

// ---- health warnings ---------------------------------------------------------------
std::string memory_warning_text(std::string_view kind, std::string_view message) {
  return fmt::format("memory warning ({}): {}", kind, message);
}

std::string retried_warning_text(std::string_view reason, int attempt, std::string_view message) {
  return fmt::format("retried after {} on attempt {}: {}", reason, attempt, message);
}

std::string waited_warning_text(double wait_s) {
  return fmt::format("waited {:.1f} s in the queue", wait_s);
}

std::string cleanup_warning_text(std::string_view first_problem) {
  return fmt::format("cleanup incomplete: {}", first_problem);
}

std::optional<std::string> warning_of(const EventRecord& e, double long_wait_s) {
  if (e.event != TaskEvent::kMemoryWarning && e.event != TaskEvent::kRetried &&
      e.event != TaskEvent::kStarted && e.event != TaskEvent::kCleanupCompleted) {
    return std::nullopt;
  }
  boost::system::error_code ec;
  const boost::json::value v = boost::json::parse(e.details_json, ec);
  if (ec || !v.is_object()) return std::nullopt;
  const boost::json::object& o = v.as_object();
  auto str = [&o](const char* k) -> std::string_view {
    const boost::json::value* x = o.if_contains(k);
    return x && x->is_string() ? std::string_view(x->as_string()) : std::string_view();
  };
  auto num = [&o](const char* k) -> std::optional<double> {
    const boost::json::value* x = o.if_contains(k);
    if (!x || !x->is_number()) return std::nullopt;
    return x->to_number<double>();
  };
  switch (e.event) {
    case TaskEvent::kMemoryWarning: return memory_warning_text(str("kind"), str("message"));
    case TaskEvent::kRetried:
      return retried_warning_text(str("reason"), static_cast<int>(num("attempt").value_or(0)),
                                  str("message"));
    case TaskEvent::kStarted: {
      const auto w = num("wait_s");
      if (w && *w > long_wait_s) return waited_warning_text(*w);
      return std::nullopt;
    }
    case TaskEvent::kCleanupCompleted: {
      const boost::json::value* ok = o.if_contains("ok");
      if (!ok || !ok->is_bool() || ok->as_bool()) return std::nullopt;
      std::string_view first;
      const boost::json::value* p = o.if_contains("problems");
      if (p && p->is_array() && !p->as_array().empty() && p->as_array()[0].is_string()) {
        first = p->as_array()[0].as_string();
      }
      return cleanup_warning_text(first);
    }
    default: return std::nullopt;
  }
}

const std::vector<std::string_view>& keys_of(TaskEvent event) {
  static const std::vector<std::string_view> kKeys[] = {
      /* created */ {"service", "priority", "batch_size", "device", "estimated_memory_mb",
                     "estimate_model", "estimate_correction"},
      /* queued */
      {"device", "priority", "batch_size", "estimated_memory_mb", "retry", "recovered",
       "moved_from"},
      /* started */ {"attempt", "batch_size", "wait_s"},
      /* completed */ {"attempt", "processing_time_s", "actual_memory_mb"},
      /* failed */ {"reason", "message", "attempt"},
      /* retried */
      {"reason", "message", "attempt", "next_attempt", "device", "batch_size", "delay_s"},
      /* cancelled */ {"while", "attempt", "message"},
      /* device_fallback */ {"from", "to", "reason"},
      /* resource_acquired */
      {"device", "service_instance_id", "reserved_mb", "estimated_memory_mb"},
      /* resource_released */ {"device", "service_instance_id", "reserved_mb", "recovered"},
      /* memory_warning */
      {"kind", "alert", "device", "message", "memory_usage_mb", "estimated_memory_mb", "used_mb",
       "total_mb", "memory_state"},
      /* cleanup_started */ {"attempt", "recovered"},
      /* cleanup_completed */ {"ok", "attempt", "duration_s", "problems", "recovered"},
      /* priority_changed */ {"from", "to", "while"},
      /* deleted */ {"status", "attempt"},
      /* paused */ {"scope", "name", "since"},
      /* resumed */ {"scope", "name", "since", "paused_s"},
      /* pool_resized */
      {"service", "device", "min_instances", "max_instances", "previous_min_instances",
       "previous_max_instances"},
  };
  return kKeys[static_cast<int>(event)];
}

}  // namespace events
}  // namespace taskmgr::detail
