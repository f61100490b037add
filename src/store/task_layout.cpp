#include "store/task_layout.hpp"

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace taskmgr::detail::store {
namespace {

// The names each field is read from, first match wins: taskmgr's own name
// first, then the names earlier applications gave it.
struct Names {
  Field field;
  std::vector<std::string_view> names;
};

const std::vector<Names>& field_names() {
  static const std::vector<Names> names = {
      {kId, {"id"}},
      {kService, {"service", "service_type", "task_type", "type", "kind"}},
      {kInputPath, {"input_path", "file_path", "input_file", "path", "filename", "input"}},
      {kInputData, {"input_data", "input", "payload", "data"}},
      {kMediaType, {"input_media_type", "media_type", "mime_type", "content_type"}},
      {kOptions, {"options", "params", "parameters"}},
      {kPriority, {"priority"}},
      {kStatus, {"status", "state"}},
      {kAttempt, {"attempt", "attempts"}},
      {kBatchSize, {"batch_size"}},
      {kFailureReason, {"failure_reason"}},
      {kFailureMessage, {"failure_message", "error", "error_message"}},
      {kResult, {"result"}},
      {kCreatedAt, {"created_at", "created", "submitted_at"}},
      {kQueuedAt, {"queued_at"}},
      {kStartedAt, {"started_at"}},
      {kFinishedAt, {"finished_at", "completed_at", "ended_at"}},
      {kEstimatedMemory, {"estimated_memory_mb"}},
      {kActualMemory, {"actual_memory_mb"}},
      {kAssignedDevice, {"assigned_device"}},
      {kServiceInstance, {"service_instance_id"}},
      {kCleanupCompleted, {"resource_cleanup_completed"}},
      {kRequestedDevice, {"requested_device"}},
      {kHost, {"run_host"}},
  };
  return names;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

bool contains(const std::string& s, std::string_view part) {
  return s.find(part) != std::string::npos;
}

bool is_binary(const std::string& t) { return contains(t, "blob") || contains(t, "bytea"); }
bool is_integer(const std::string& t) { return contains(t, "int") && !contains(t, "interval"); }
bool is_number(const std::string& t) {
  return is_integer(t) || contains(t, "real") || contains(t, "floa") || contains(t, "doub") ||
         contains(t, "numeric") || contains(t, "decimal");
}
bool is_time_field(Field f) {
  return f == kCreatedAt || f == kQueuedAt || f == kStartedAt || f == kFinishedAt;
}
bool is_integer_field(Field f) {
  return f == kPriority || f == kAttempt || f == kBatchSize || f == kEstimatedMemory ||
         f == kActualMemory;
}

// The kind a column of type `t` holds field `f` as, or nullopt when it
// cannot hold it (it stays an extra column).
std::optional<Kind> kind_for(Field f, const std::string& t) {
  // A generated column cannot be written, an array holds no one value:
  // both stay extra columns, read only.
  if (t == "generated" || t == "array") return std::nullopt;
  if (f == kInputData) return is_binary(t) ? std::optional(Kind::kBinary) : std::nullopt;
  if (is_binary(t)) return std::nullopt;
  if (is_time_field(f)) {
    if (!is_number(t)) return Kind::kText;
    return is_integer(t) ? Kind::kEpoch : Kind::kEpochReal;
  }
  if (is_integer_field(f)) {
    // SQLite's own columns are INTEGER; a column of another type (a priority
    // of 'high') is not read as a number.
    return is_integer(t) ? std::optional(Kind::kInteger) : std::nullopt;
  }
  if (f == kCleanupCompleted) return Kind::kBoolean;
  return Kind::kText;
}

std::int64_t to_integer(std::string_view v) {
  return std::strtoll(std::string(v).c_str(), nullptr, 10);
}

// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
std::int64_t days_from_civil(std::int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

Timestamp from_micros(std::int64_t us) {
  return Timestamp(std::chrono::duration_cast<Timestamp::duration>(std::chrono::microseconds(us)));
}

}  // namespace

TaskLayout TaskLayout::of(const std::vector<Column>& columns, StatusMap status_map,
                          std::string default_service) {
  TaskLayout l;
  l.status_map_ = std::move(status_map);
  l.default_service_ = std::move(default_service);
  std::vector<bool> used(columns.size(), false);
  for (const Names& n : field_names()) {
    for (std::string_view name : n.names) {
      bool found = false;
      for (std::size_t i = 0; i < columns.size(); ++i) {
        if (used[i] || lower(columns[i].name) != name) continue;
        const auto k = kind_for(n.field, lower(columns[i].type));
        if (!k) continue;
        l.columns_[n.field] = columns[i].name;
        l.kinds_[n.field] = *k;
        l.user_defined_[n.field] = lower(columns[i].type) == "user-defined";
        l.max_length_[n.field] = columns[i].max_length;
        l.padded_[n.field] = lower(columns[i].type) == "character";
        if (columns[i].not_null) l.null_default_[n.field] = columns[i].default_expr;
        used[i] = true;
        found = true;
        if (name != n.names.front()) l.adopted_ = true;
        break;
      }
      if (found) break;
    }
    // A table without the shared queue's fields is taskmgr's own still
    // (SQLite's, and PostgreSQL's before schema 4).
    if (!l.has(n.field) && n.field != kRequestedDevice && n.field != kHost) l.adopted_ = true;
  }
  for (std::size_t i = 0; i < columns.size(); ++i) {
    // The shared queue's claim columns (PostgreSQL schema 4) are taskmgr's:
    // read and written by the claim and its fence, not extra columns.
    static const char* const kClaimColumns[] = {"claimed_by", "claim", "lease_expires_at",
                                                "cancel_requested"};
    const std::string name = lower(columns[i].name);
    if (std::find(std::begin(kClaimColumns), std::end(kClaimColumns), name) !=
        std::end(kClaimColumns))
      continue;
    if (!used[i]) l.extra_.push_back(columns[i].name);
  }
  if (!l.extra_.empty()) l.adopted_ = true;
  return l;
}

std::vector<std::string> TaskLayout::unkept_fields() const {
  std::vector<std::string> out;
  for (const Names& n : field_names()) {
    switch (n.field) {
      case kOptions:
      case kAttempt:
      case kBatchSize:
      case kFailureReason:
      case kFailureMessage:
      case kResult:
      case kQueuedAt:
      case kStartedAt:
      case kFinishedAt:
        if (!has(n.field) && derived_[n.field].empty()) out.emplace_back(n.names.front());
        break;
      default: break;
    }
  }
  return out;
}

std::string TaskLayout::notice(const std::string& where) const {
  const auto unkept = unkept_fields();
  if (unkept.empty()) return "";
  std::string names;
  for (const auto& f : unkept) names += (names.empty() ? "" : ", ") + f;
  return "the adopted tasks table in " + where + " has no column for: " + names +
         ". These fields of a task are kept in memory only and are lost when the process "
         "stops (a task started again after a restart runs without its options). To keep one, "
         "add a column of that name to tasks (docs/STORAGE.md, \"How the columns are read\")";
}

TaskStatus TaskLayout::status_of(const char* word) const {
  if (word == nullptr) return TaskStatus::kUnrecognized;
  const auto own = parse_task_status(word);
  if (own && *own != TaskStatus::kUnrecognized) return *own;
  const auto it = status_map_.find(word);
  return it == status_map_.end() ? TaskStatus::kUnrecognized : it->second;
}

std::vector<std::string> TaskLayout::words_for(TaskStatus s) const {
  std::vector<std::string> out{std::string(to_string(s))};
  for (const auto& [word, status] : status_map_) {
    if (status == s) out.push_back(word);
  }
  return out;
}

std::string TaskLayout::use_status_words(const std::vector<std::string>& allowed) {
  const auto ok = [&](const std::string& w) {
    return std::find(allowed.begin(), allowed.end(), w) != allowed.end();
  };
  std::string missing;
  for (TaskStatus s : all_task_statuses()) {
    if (s == TaskStatus::kUnrecognized) continue;
    std::string chosen;
    for (const auto& w : words_for(s)) {  // its own word first
      if (ok(w)) {
        chosen = w;
        break;
      }
    }
    if (chosen.empty()) {
      missing += std::string(missing.empty() ? "" : ", ") + "'" + std::string(to_string(s)) + "'";
    } else {
      write_words_[s] = chosen;
    }
  }
  return missing;
}

std::string TaskLayout::word_to_write(TaskStatus s) const {
  const auto it = write_words_.find(s);
  return it != write_words_.end() ? it->second : std::string(to_string(s));
}

std::vector<std::string> TaskLayout::known_words() const {
  std::vector<std::string> out;
  for (TaskStatus s : all_task_statuses()) {
    if (s != TaskStatus::kUnrecognized) out.emplace_back(to_string(s));
  }
  for (const auto& [word, status] : status_map_) out.push_back(word);
  return out;
}

void TaskLayout::set_field(Task& t, Field f, std::string_view v) const {
  // PostgreSQL's CHAR(n) pads what it holds with spaces (and compares
  // without them): read without the padding.
  if (padded_[f]) {
    while (!v.empty() && v.back() == ' ') v.remove_suffix(1);
  }
  switch (f) {
    case kId: t.id = v; break;
    case kService: t.service = v; break;
    case kInputPath: t.input.path = v; break;
    case kInputData: t.input.data.assign(v.begin(), v.end()); break;
    case kMediaType: t.input.media_type = v; break;
    case kOptions: t.options_json = v; break;
    case kPriority: t.priority = static_cast<int>(to_integer(v)); break;
    case kStatus: {
      const std::string word(v);
      t.status = status_of(word.c_str());
      if (t.status == TaskStatus::kUnrecognized) t.stored_status = word;
      break;
    }
    case kAttempt: t.attempt = static_cast<int>(to_integer(v)); break;
    case kBatchSize: t.batch_size = std::max(1, static_cast<int>(to_integer(v))); break;
    case kFailureReason:
      // An empty word is no reason (a NOT NULL DEFAULT '' column).
      t.failure_reason =
          v.empty() ? TaskFailureReason::kNone
                    : parse_failure_reason(v).value_or(TaskFailureReason::kProcessingError);
      break;
    case kFailureMessage: t.failure_message = v; break;
    case kResult: t.result = v; break;
    case kCreatedAt:
    case kQueuedAt:
    case kStartedAt:
    case kFinishedAt: {
      const auto when = parse_stored_time(v);
      if (!when) {
        t.extra[columns_[f]] = std::string(v);  // kept for the host, as stored
        break;
      }
      if (f == kCreatedAt) t.created_at = *when;
      if (f == kQueuedAt) t.queued_at = *when;
      if (f == kStartedAt) t.started_at = *when;
      if (f == kFinishedAt) t.finished_at = *when;
      break;
    }
    case kEstimatedMemory: t.estimated_memory_mb = to_integer(v); break;
    case kActualMemory: t.actual_memory_mb = to_integer(v); break;
    case kAssignedDevice: t.assigned_device = std::string(v); break;
    case kServiceInstance: t.service_instance_id = std::string(v); break;
    case kRequestedDevice: t.requested_device = std::string(v); break;
    case kHost: t.host = std::string(v); break;
    case kCleanupCompleted:
      t.resource_cleanup_completed = v == "t" || v == "1" || v == "true" || v == "TRUE";
      break;
    case kFieldCount: break;
  }
}

void TaskLayout::finish(Task& t, bool service_seen) const {
  if (!service_seen) t.service = default_service_;
}

std::optional<Timestamp> parse_stored_time(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  if (s.empty()) return std::nullopt;
  std::size_t pos = 0;
  // Up to `max` digits at pos (at least `min`); their value.
  auto digits = [&](std::size_t min, std::size_t max, std::int64_t& out, std::size_t* n = nullptr) {
    std::size_t i = 0;
    out = 0;
    while (pos + i < s.size() && i < max && s[pos + i] >= '0' && s[pos + i] <= '9') {
      out = out * 10 + (s[pos + i] - '0');
      ++i;
    }
    if (i < min) return false;
    pos += i;
    if (n != nullptr) *n = i;
    return true;
  };
  // A fraction after '.' (or ','), to the microsecond.
  auto fraction = [&](std::int64_t& us) {
    us = 0;
    if (pos >= s.size() || (s[pos] != '.' && s[pos] != ',')) return true;
    ++pos;
    std::int64_t f = 0;
    std::size_t n = 0;
    if (!digits(1, 18, f, &n)) return false;
    // The first six digits; the rest are below a microsecond.
    std::string_view all = s.substr(pos - n, n);
    us = 0;
    for (std::size_t i = 0; i < 6; ++i) us = us * 10 + (i < all.size() ? all[i] - '0' : 0);
    return true;
  };
  // Seconds since 1970: digits (an optional sign), an optional fraction.
  {
    std::size_t p = 0;
    if (s[p] == '-' || s[p] == '+') ++p;
    bool all_digits = p < s.size();
    bool dot = false;
    for (std::size_t i = p; i < s.size(); ++i) {
      if (s[i] == '.' && !dot) {
        dot = true;
        continue;
      }
      if (s[i] < '0' || s[i] > '9') all_digits = false;
    }
    if (all_digits && s.size() - p <= std::size_t{dot ? 29u : 19u}) {
      const bool negative = s[0] == '-';
      pos = p;
      std::int64_t secs = 0, us = 0;
      if (!digits(1, 12, secs)) return std::nullopt;  // beyond year 33658: not a time
      if (!fraction(us) || pos != s.size()) return std::nullopt;
      const std::int64_t total = secs * 1'000'000 + us;
      return from_micros(negative ? -total : total);
    }
  }
  std::int64_t y, mo, d, h = 0, mi = 0, sec = 0, us = 0;
  if (!digits(4, 4, y) || pos >= s.size() || s[pos++] != '-' || !digits(2, 2, mo) ||
      pos >= s.size() || s[pos++] != '-' || !digits(2, 2, d)) {
    return std::nullopt;
  }
  if (pos < s.size() && (s[pos] == ' ' || s[pos] == 'T' || s[pos] == 't')) {
    ++pos;
    if (!digits(2, 2, h) || pos >= s.size() || s[pos++] != ':' || !digits(2, 2, mi)) {
      return std::nullopt;
    }
    if (pos < s.size() && s[pos] == ':') {
      ++pos;
      if (!digits(2, 2, sec) || !fraction(us)) return std::nullopt;
    }
  }
  std::int64_t offset_min = 0;
  while (pos < s.size() && s[pos] == ' ') ++pos;
  if (pos < s.size()) {
    if (s[pos] == 'Z' || s[pos] == 'z') {
      ++pos;
    } else if (s.substr(pos) == "UTC" || s.substr(pos) == "GMT") {
      pos = s.size();
    } else if (s[pos] == '+' || s[pos] == '-') {
      const int sign = s[pos] == '-' ? -1 : 1;
      ++pos;
      std::int64_t oh = 0, om = 0;
      if (!digits(2, 2, oh)) return std::nullopt;
      if (pos < s.size() && s[pos] == ':') ++pos;
      if (pos < s.size() && !digits(2, 2, om)) return std::nullopt;
      if (oh > 23 || om > 59) return std::nullopt;
      offset_min = sign * (oh * 60 + om);
    }
  }
  if (pos != s.size()) return std::nullopt;
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60) return std::nullopt;
  const std::int64_t days = days_from_civil(y, static_cast<unsigned>(mo), static_cast<unsigned>(d));
  const std::int64_t local = ((days * 24 + h) * 60 + mi) * 60 + sec;
  return from_micros((local - offset_min * 60) * 1'000'000 + us);
}

std::optional<std::string> status_map_problem(const StatusMap& map) {
  for (const auto& [word, status] : map) {
    if (word.empty()) return std::string("an old status word is empty");
    const auto own = parse_task_status(word);
    if (own) {
      return "'" + word + "' is taskmgr's own status word; only other words can be mapped";
    }
    if (status == TaskStatus::kUnrecognized) {
      return "'" + word + "' is mapped to 'unrecognized'; map it to pending, queued, running, " +
             "completed, failed or cancelled, or leave it out";
    }
  }
  return std::nullopt;
}

std::vector<Task> list_in_creation_order(
    const TaskFilter& filter, const std::function<std::vector<Task>(const TaskFilter&)>& query,
    const std::function<std::optional<Task>(const std::string&)>& load) {
  TaskFilter light = filter;
  light.before.reset();
  light.limit = 0;
  light.with_payloads = false;
  std::vector<Task> rows = query(light);
  std::stable_sort(rows.begin(), rows.end(), [](const Task& a, const Task& b) {
    return a.created_at != b.created_at ? a.created_at < b.created_at : a.id < b.id;
  });
  if (filter.before) {
    const TaskCursor& c = *filter.before;
    rows.erase(std::partition_point(rows.begin(), rows.end(),
                                    [&](const Task& t) { return before_cursor(t, c); }),
               rows.end());
  }
  if (filter.limit != 0 && rows.size() > filter.limit) {
    rows.erase(rows.begin(), rows.end() - static_cast<std::ptrdiff_t>(filter.limit));
  }
  if (!filter.with_payloads) return rows;
  std::vector<Task> out;
  out.reserve(rows.size());
  for (const Task& t : rows) {
    std::optional<Task> whole = load(t.id);
    if (!whole) continue;  // deleted meanwhile
    if (!filter.with_input_bytes) whole->input.leave_out_data();
    out.push_back(std::move(*whole));
  }
  return out;
}

}  // namespace taskmgr::detail::store
