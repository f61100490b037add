// Private to the SQLite store: what its two files share. sqlite_schema.cpp
// has the schema and its migrations, the mapping of a task onto a row of
// `tasks`, the queries and the lock file; sqlite_store.cpp has the store
// itself (the group-commit writer with its statements, and the readers).
// SQL lives in these files only.
#pragma once

#include <SQLiteCpp/SQLiteCpp.h>

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail::sqlite {

// The schema version this build writes (PRAGMA user_version).
inline constexpr int kSchemaVersion = 2;

// The columns every state change rewrites, bound from `first` on, in the
// order of kMutableColumns.
inline constexpr const char* kMutableColumns =
    "options, priority, status, attempt, batch_size, failure_reason, failure_message, result, "
    "queued_at, started_at, finished_at, estimated_memory_mb, actual_memory_mb, "
    "assigned_device, service_instance_id, resource_cleanup_completed";
inline constexpr int kMutableCount = 16;

// Binds `v`, or NULL when it is empty.
void bind_opt_text(SQLite::Statement& st, int i, const std::string& v);
// Binds the task's kMutableColumns to parameters first, first + 1, ...
void bind_mutable(SQLite::Statement& st, int first, const Task& t);
// "options=?, priority=?, ...": kMutableColumns for an UPDATE.
std::string mutable_assignments();
// Our code for a SQLite failure: kBusy, kOutOfMemory or kIoError.
ErrorCode code_of(const SQLite::Exception& e);

// The reads, as TaskStore's (store.hpp); they throw SQLite::Exception.
std::optional<Task> select_task(SQLite::Database& db, const std::string& id);
std::vector<Task> select_tasks(SQLite::Database& db, const TaskFilter& f);
std::vector<EventRecord> select_events(SQLite::Database& db, const std::string& task_id);
std::vector<MetricSample> select_metrics(SQLite::Database& db, const std::string& task_id);
std::vector<Task> select_unfinished(SQLite::Database& db);
// TaskStore::prune_finished's deletes, in one transaction of their own;
// returns how many tasks went.
std::size_t delete_finished(SQLite::Database& db, Timestamp finished_before);

// Brings the database up to kSchemaVersion, each step in its own
// transaction, forward only. Throws Error(kIncompatible) and changes nothing
// for a newer schema, or an unversioned file that has tables (a tasks table,
// or any other: taskmgr does not create its tables among data it does not
// know).
void migrate(SQLite::Database& db, const std::string& path);

// An exclusive lock on "<db>.lock": one store per database at a time, in this
// process or any other. flock locks belong to the open file, so a second open
// in the same process conflicts too. Throws Error(kBusy) when another store
// holds it (naming its pid), Error(kIoError) when the file cannot be opened.
class LockFile {
 public:
  explicit LockFile(const std::string& db_path);
  ~LockFile();
  LockFile(const LockFile&) = delete;
  LockFile& operator=(const LockFile&) = delete;

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace taskmgr::detail::sqlite
