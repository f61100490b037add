#include "taskmgr/metrics.hpp"

#include <boost/json.hpp>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace taskmgr {
namespace {

boost::json::object latency_json(const LatencySummary& l) {
  return {{"count", l.count}, {"mean_s", l.mean_s}, {"p50_s", l.p50_s},
          {"p90_s", l.p90_s}, {"p99_s", l.p99_s},   {"max_s", l.max_s}};
}

// The shortest text that reads back as v (a byte count or counter past 1e9
// exactly, not rounded to 9 digits); Prometheus spells the specials NaN,
// +Inf and -Inf.
std::string num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

// Prometheus label values escape backslash, quote and newline.
std::string esc(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

class Prom {
 public:
  void family(const std::string& name, const char* type, const char* help) {
    os_ << "# HELP taskmgr_" << name << " " << help << "\n# TYPE taskmgr_" << name << " " << type
        << "\n";
  }
  void sample(const std::string& name, double v, const std::string& labels = "") {
    os_ << "taskmgr_" << name;
    if (!labels.empty()) os_ << "{" << labels << "}";
    os_ << " " << num(v) << "\n";
  }
  std::string str() const { return os_.str(); }

 private:
  std::ostringstream os_;
};

}  // namespace

std::string TaskMetrics::to_json() const {
  boost::json::object o;
  boost::json::object active, queued, memory, pools, failed;
  for (const auto& [k, v] : active_tasks) active[k] = v;
  for (const auto& [k, v] : queued_tasks) queued[k] = v;
  for (const auto& [k, m] : memory_by_device) {
    memory[k] = {{"total_mb", m.total_mb},         {"reserved_mb", m.reserved_mb},
                 {"observed_mb", m.observed_mb},   {"free_mb", m.total_mb - m.reserved_mb},
                 {"peak_task_mb", m.peak_task_mb}, {"available", m.available}};
  }
  for (const auto& [k, p] : pool_utilization) {
    pools[k] = {{"service", p.service},
                {"device", p.device},
                {"in_use", p.in_use},
                {"size", p.size},
                {"max", p.max},
                {"min", p.min},
                {"utilization", p.utilization},
                {"created", p.created},
                {"destroyed", p.destroyed}};
  }
  for (const auto& [k, v] : failed_by_reason) failed[k] = v;
  o["active_tasks"] = std::move(active);
  o["queued_tasks"] = std::move(queued);
  o["memory_by_device"] = std::move(memory);
  o["pool_utilization"] = std::move(pools);
  o["average_wait_time"] = average_wait_time;
  boost::json::array paused_json;
  for (const PauseState& ps : paused) {
    paused_json.push_back(boost::json::object{
        {"scope", to_string(ps.scope)}, {"name", ps.name}, {"since", format_timestamp(ps.since)}});
  }
  o["paused"] = std::move(paused_json);
  o["counters"] = {{"tasks_created", tasks_created},
                   {"tasks_started", tasks_started},
                   {"tasks_completed", tasks_completed},
                   {"tasks_failed", tasks_failed},
                   {"tasks_cancelled", tasks_cancelled},
                   {"failed_by_reason", std::move(failed)},
                   {"retries", retries},
                   {"oom_errors", oom_errors},
                   {"cpu_fallbacks", cpu_fallbacks},
                   {"memory_warnings", memory_warnings},
                   {"queue_full_rejections", queue_full_rejections},
                   {"cleanup_failures", cleanup_failures},
                   {"internal_errors", internal_errors},
                   {"events_published", events_published},
                   {"events_dropped", events_dropped},
                   {"callback_errors", callback_errors},
                   {"lost_claims", lost_claims},
                   {"tasks_rescued", tasks_rescued}};
  o["store"] = {{"commits", store.commits},
                {"writes", store.writes},
                {"failed_writes", store.failed_writes},
                {"dropped_writes", store.dropped_writes},
                {"backlog", store.backlog},
                {"queued", store.queued},
                {"last_error", store.last_error}};
  o["latency"] = {{"wait_time", latency_json(wait_time)},
                  {"processing_time", latency_json(processing_time)}};
  return boost::json::serialize(o);
}

// Prometheus names are in base units (bytes, seconds); the spec's JSON
// keeps its MB.
constexpr double kBytesPerMb = 1024.0 * 1024.0;

std::string TaskMetrics::to_prometheus() const {
  Prom p;
  p.family("active_tasks", "gauge", "Tasks running now, by device.");
  for (const auto& [d, v] : active_tasks) {
    if (d != "total") p.sample("active_tasks", static_cast<double>(v), "device=\"" + esc(d) + "\"");
  }
  p.family("queued_tasks", "gauge", "Tasks waiting in a device queue, by device.");
  for (const auto& [d, v] : queued_tasks) {
    if (d != "total") p.sample("queued_tasks", static_cast<double>(v), "device=\"" + esc(d) + "\"");
  }
  p.family("device_memory_total_bytes", "gauge", "Memory tasks may be placed into, bytes.");
  for (const auto& [d, m] : memory_by_device) {
    p.sample("device_memory_total_bytes", static_cast<double>(m.total_mb) * kBytesPerMb,
             "device=\"" + esc(d) + "\"");
  }
  p.family("device_memory_reserved_bytes", "gauge", "Sum of estimates of running tasks, bytes.");
  for (const auto& [d, m] : memory_by_device) {
    p.sample("device_memory_reserved_bytes", static_cast<double>(m.reserved_mb) * kBytesPerMb,
             "device=\"" + esc(d) + "\"");
  }
  p.family("device_memory_observed_bytes", "gauge",
           "Memory in use as the device probe saw it, bytes.");
  for (const auto& [d, m] : memory_by_device) {
    p.sample("device_memory_observed_bytes", static_cast<double>(m.observed_mb) * kBytesPerMb,
             "device=\"" + esc(d) + "\"");
  }
  p.family("device_available", "gauge", "1 when the device accepts tasks.");
  for (const auto& [d, m] : memory_by_device) {
    p.sample("device_available", m.available ? 1 : 0, "device=\"" + esc(d) + "\"");
  }
  p.family("pool_instances_in_use", "gauge",
           "Service instances leased now (to a task, or being made by warming).");
  for (const auto& [k, m] : pool_utilization) {
    p.sample("pool_instances_in_use", m.in_use,
             "service=\"" + esc(m.service) + "\",device=\"" + esc(m.device) + "\"");
  }
  p.family("pool_instances_max", "gauge", "Most service instances a pool may hold.");
  for (const auto& [k, m] : pool_utilization) {
    p.sample("pool_instances_max", m.max,
             "service=\"" + esc(m.service) + "\",device=\"" + esc(m.device) + "\"");
  }
  p.family("pool_instances_min", "gauge", "Service instances a pool keeps warm.");
  for (const auto& [k, m] : pool_utilization) {
    p.sample("pool_instances_min", m.min,
             "service=\"" + esc(m.service) + "\",device=\"" + esc(m.device) + "\"");
  }
  p.family("paused", "gauge", "1 for each pause in force (scope manager, device or service).");
  for (const PauseState& ps : paused) {
    p.sample(
        "paused", 1,
        "scope=\"" + esc(std::string(to_string(ps.scope))) + "\",name=\"" + esc(ps.name) + "\"");
  }
  p.family("average_wait_time_seconds", "gauge", "Mean time from queued to started.");
  p.sample("average_wait_time_seconds", average_wait_time);

  const std::pair<const char*, std::uint64_t> counters[] = {
      {"tasks_created_total", tasks_created},
      {"tasks_started_total", tasks_started},
      {"tasks_completed_total", tasks_completed},
      {"tasks_cancelled_total", tasks_cancelled},
      {"retries_total", retries},
      {"oom_errors_total", oom_errors},
      {"cpu_fallbacks_total", cpu_fallbacks},
      {"memory_warnings_total", memory_warnings},
      {"queue_full_rejections_total", queue_full_rejections},
      {"cleanup_failures_total", cleanup_failures},
      {"internal_errors_total", internal_errors},
      {"events_published_total", events_published},
      {"events_dropped_total", events_dropped},
      {"callback_errors_total", callback_errors},
      {"lost_claims_total", lost_claims},
      {"tasks_rescued_total", tasks_rescued},
      {"store_commits_total", store.commits},
      {"store_writes_total", store.writes},
      {"store_failed_writes_total", store.failed_writes},
      {"store_dropped_writes_total", store.dropped_writes},
  };
  for (const auto& [name, v] : counters) {
    p.family(name, "counter", "See docs/OPERATIONS.md.");
    p.sample(name, static_cast<double>(v));
  }
  p.family("store_backlog", "gauge", "Failed store writes waiting for a retry.");
  p.sample("store_backlog", static_cast<double>(store.backlog));
  p.family("store_queued_writes", "gauge", "Store writes waiting for their commit.");
  p.sample("store_queued_writes", static_cast<double>(store.queued));
  p.family("tasks_failed_total", "counter", "Tasks that ended failed, by reason.");
  for (const auto& [reason, v] : failed_by_reason) {
    p.sample("tasks_failed_total", static_cast<double>(v), "reason=\"" + esc(reason) + "\"");
  }
  auto summary = [&p](const std::string& name, const LatencySummary& l, const char* help) {
    p.family(name, "summary", help);
    p.sample(name, l.p50_s, "quantile=\"0.5\"");
    p.sample(name, l.p90_s, "quantile=\"0.9\"");
    p.sample(name, l.p99_s, "quantile=\"0.99\"");
    p.sample(name + "_sum", l.mean_s * static_cast<double>(l.count));
    p.sample(name + "_count", static_cast<double>(l.count));
  };
  summary("wait_time_seconds", wait_time, "Time from queued to started.");
  summary("processing_time_seconds", processing_time, "Time from started to finished.");
  return p.str();
}

std::string TaskHealth::to_json() const {
  boost::json::object o;
  o["task_id"] = task_id;
  o["status"] = to_string(status);
  if (memory_usage_mb) {
    o["memory_usage_mb"] = *memory_usage_mb;
  } else {
    o["memory_usage_mb"] = nullptr;
  }
  o["processing_time_s"] = processing_time_s;
  if (device) {
    o["device"] = *device;
  } else {
    o["device"] = nullptr;
  }
  boost::json::array w;
  for (const auto& s : warnings) w.emplace_back(s);
  o["warnings"] = std::move(w);
  return boost::json::serialize(o);
}

}  // namespace taskmgr
