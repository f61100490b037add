// Private to the durable stores: how a task maps onto the columns of a
// `tasks` table, either taskmgr's own or one it adopted from an earlier
// application (docs/STORAGE.md, "Adopting an existing database"), and how
// the status words of such a table are read. Both stores build their task
// queries from a TaskLayout, read once when they open.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail::store {

// The fields of a task a column can hold, in the order of every SELECT a
// store builds (extra columns follow them).
enum Field : int {
  kId,
  kService,
  kInputPath,
  kInputData,
  kMediaType,
  kOptions,
  kPriority,
  kStatus,
  kAttempt,
  kBatchSize,
  kFailureReason,
  kFailureMessage,
  kResult,
  kCreatedAt,
  kQueuedAt,
  kStartedAt,
  kFinishedAt,
  kEstimatedMemory,
  kActualMemory,
  kAssignedDevice,
  kServiceInstance,
  kCleanupCompleted,
  kRequestedDevice,  // a shared queue's (PostgreSQL, schema 4); optional
  kHost,             // the same
  kFieldCount
};

// What every state change rewrites (TaskStore::update_task), in this order.
inline constexpr Field kMutableFields[] = {
    kOptions,          kPriority,        kStatus,       kAttempt,        kBatchSize,
    kFailureReason,    kFailureMessage,  kResult,       kQueuedAt,       kStartedAt,
    kFinishedAt,       kEstimatedMemory, kActualMemory, kAssignedDevice, kServiceInstance,
    kCleanupCompleted, kRequestedDevice, kHost};
// What an insert writes before them.
inline constexpr Field kInsertOnlyFields[] = {kId,        kService,   kInputPath,
                                              kInputData, kMediaType, kCreatedAt};

// How a column's values are written and read.
enum class Kind {
  kText,       // text (a timestamp field: RFC 3339 text, or the backend's TIMESTAMP)
  kInteger,    // a whole number
  kBinary,     // BLOB / BYTEA
  kBoolean,    // BOOLEAN (SQLite: 0/1)
  kEpoch,      // a timestamp field in an integer column: whole seconds since 1970
  kEpochReal,  // ... in a REAL / DOUBLE / NUMERIC column: seconds with their fraction
};

// A column of the table as the database describes it.
struct Column {
  Column(std::string n, std::string t, int len = 0, bool nn = false, std::string dflt = "")
      : name(std::move(n)),
        type(std::move(t)),
        max_length(len),
        not_null(nn),
        default_expr(std::move(dflt)) {}
  std::string name;
  std::string type;    // declared (SQLite) or data type (PostgreSQL), any case
  int max_length = 0;  // PostgreSQL: character_maximum_length (VARCHAR(n)); 0: none
  bool not_null = false;
  std::string default_expr;  // the column's DEFAULT as SQL ("" when none)
};

// Old status words and the status each means (storage.adopt.status_map).
using StatusMap = std::map<std::string, TaskStatus>;

class TaskLayout {
 public:
  // The table with these columns: each field from the first column whose
  // name (and kind) fits (docs/STORAGE.md lists the names), every other
  // column an extra one. `default_service` is the service of rows that name
  // none (no service column, or NULL in it).
  static TaskLayout of(const std::vector<Column>& columns, StatusMap status_map,
                       std::string default_service);

  // The column holding `f`, "" when the table has none.
  const std::string& column(Field f) const { return columns_[f]; }
  bool has(Field f) const { return !columns_[f].empty(); }
  Kind kind(Field f) const { return kinds_[f]; }
  const std::vector<std::string>& extra() const { return extra_; }
  // Not taskmgr's own table: a field in a column of another name or none,
  // or columns of its own.
  bool adopted() const { return adopted_; }
  const std::string& default_service() const { return default_service_; }
  // The fields a task needs across a restart that this table has no column
  // for (nor a derived expression): their names as in taskmgr's own table.
  std::vector<std::string> unkept_fields() const;
  // What a host should know of this table ("" when nothing): the unkept
  // fields and how to keep them, for TaskStore::notices().
  std::string notice(const std::string& where) const;

  // The status a stored word means: taskmgr's own words, then the map;
  // kUnrecognized when neither knows it (also for NULL: nullptr).
  TaskStatus status_of(const char* word) const;
  // The words stored for `s`: its own and the map's.
  std::vector<std::string> words_for(TaskStatus s) const;
  // Every word status_of() knows.
  std::vector<std::string> known_words() const;

  // A column of a type of its own (PostgreSQL: an enum, a domain), not
  // text: compared as text, written as one of its values.
  bool is_user_defined(Field f) const { return user_defined_[f]; }
  // A field's value as written: `param` (a placeholder), or, for a NOT NULL
  // column with a DEFAULT, COALESCE(param, default): a field taskmgr has
  // no value for (a result, a start time) gets the column's default
  // instead of a NULL the column refuses.
  std::string written(Field f, const std::string& param) const {
    return null_default_[f].empty() ? param : "COALESCE(" + param + ", " + null_default_[f] + ")";
  }
  // The longest text a field's column holds (VARCHAR(n)); 0: no limit.
  int max_length(Field f) const { return max_length_[f]; }
  // The status column holds only these words (an enum's labels): each
  // status is written as its own word when that is one of them, else as a
  // word of storage.adopt.status_map that means it and is one. The
  // statuses with neither, as a message naming them, or "" when none.
  std::string use_status_words(const std::vector<std::string>& allowed);
  // The word written for `s` (its own unless use_status_words chose another).
  std::string word_to_write(TaskStatus s) const;

  // A field the table has no column for, read from an expression instead
  // (a subquery on task_events, say); `expression` may refer to the row as
  // `tasks`. Without one such a field is NULL.
  void derive(Field f, std::string expression) { derived_[f] = std::move(expression); }

  // Input bytes kept in a table of their own (SQLite, taskmgr's own
  // schema): kInputData is no column of tasks (inserts and updates leave it
  // out; the store writes the bytes apart) but read through `data` (an
  // expression on `tasks`, a subquery), its length through `length`.
  void keep_inputs_apart(std::string data, std::string length) {
    columns_[kInputData].clear();
    derived_[kInputData] = std::move(data);
    input_length_ = std::move(length);
    inputs_apart_ = true;
  }
  bool inputs_apart() const { return inputs_apart_; }

  // "SELECT" list: every field's column (quoted by `quote`), its derived
  // expression, or NULL (also the result when !with_payloads), then the
  // extra columns. Input data left out (!with_payloads or !with_input) is
  // selected as its length, `length_fn(column)`: an integer, which the
  // reader tells from the bytes by its type (TaskInput::left_out_bytes).
  template <typename Quote>
  std::string select_list(Quote&& quote, const char* length_fn, bool with_payloads,
                          bool with_input = true) const {
    std::string out;
    for (int f = 0; f < kFieldCount; ++f) {
      const bool bulky = f == kInputData || f == kResult;
      std::string c = "NULL";
      const bool left_out = f == kInputData && !(with_payloads && with_input);
      if (has(Field(f)) && left_out) {
        c = std::string(length_fn) + "(" + quote(columns_[f]) + ")";
      } else if (has(Field(f)) && (with_payloads || !bulky)) {
        c = quote(columns_[f]);
      } else if (left_out && inputs_apart_) {
        c = "(" + input_length_ + ")";
      } else if (!has(Field(f)) && !derived_[f].empty()) {
        c = "(" + derived_[f] + ")";
      }
      out += (f == 0 ? "" : ", ") + c;
    }
    for (const auto& e : extra_) out += ", " + quote(e);
    return out;
  }

  // Sets field `f` of `t` from its stored text (never for kInputData, whose
  // bytes the backend reads). A time that cannot be read leaves the field
  // unset and keeps the text in t.extra under the column's name.
  void set_field(Task& t, Field f, std::string_view value) const;
  // Fields absent from the row (NULL or no column): the defaults an adopted
  // row needs (its service).
  void finish(Task& t, bool service_seen) const;

 private:
  std::array<std::string, kFieldCount> columns_;
  std::string input_length_;
  bool inputs_apart_ = false;
  std::array<std::string, kFieldCount> derived_;
  std::array<bool, kFieldCount> user_defined_{};
  std::array<int, kFieldCount> max_length_{};
  std::array<bool, kFieldCount> padded_{};             // CHAR(n): values read with their padding
  std::array<std::string, kFieldCount> null_default_;  // NOT NULL DEFAULT x: x
  std::map<TaskStatus, std::string> write_words_;
  std::array<Kind, kFieldCount> kinds_{};
  std::vector<std::string> extra_;
  StatusMap status_map_;
  std::string default_service_;
  bool adopted_ = false;
};

// A stored time in any of the usual forms: RFC 3339 / ISO 8601 with or
// without a zone (none = UTC; "Z", "+HH", "+HH:MM", "+HHMM"), SQL's
// "YYYY-MM-DD HH:MM:SS[.fraction]", a date alone, or seconds since 1970
// (with a fraction or not). Fractions are kept to the microsecond.
std::optional<Timestamp> parse_stored_time(std::string_view s);

// TaskStore::list_tasks on an adopted table, whose created_at column may
// hold times in several forms (parse_stored_time) that neither sort nor
// compare as the database sees them (text: a space before 'T'; numbers
// before text): the filter's rows, their times parsed, ordered and paged
// here by (created_at, id), as every store orders tasks. `query` runs the
// filter's status and service on the database (no order, no limit, no
// payloads); `load` reads one task whole, for the payloads of a page's.
std::vector<Task> list_in_creation_order(
    const TaskFilter& filter, const std::function<std::vector<Task>(const TaskFilter&)>& query,
    const std::function<std::optional<Task>(const std::string&)>& load);

// A problem with `map` as storage.adopt.status_map, or nullopt.
std::optional<std::string> status_map_problem(const StatusMap& map);

}  // namespace taskmgr::detail::store
