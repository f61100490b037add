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

#include "store/task_layout.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail::sqlite {

// The schema version this build writes (PRAGMA user_version).
inline constexpr int kSchemaVersion = 4;

// The `tasks` table's columns as PRAGMA table_info gives them.
std::vector<store::Column> task_columns(SQLite::Database& db);
// How the `tasks` table holds a task: its columns read with the adoption
// options (a field an adopted table has no column for derived from the
// task's events where they hold it).
store::TaskLayout task_layout(SQLite::Database& db, const AdoptOptions& adopt);
// The writes of a task row: an INSERT of every field the table has, an
// UPDATE of its mutable ones (store::kMutableFields) by id, and their
// parameters.
std::string insert_task_sql(const store::TaskLayout& l);
std::string update_task_sql(const store::TaskLayout& l);
void bind_insert(SQLite::Statement& st, const store::TaskLayout& l, const Task& t);
void bind_update(SQLite::Statement& st, const store::TaskLayout& l, const Task& t);
// The write of a task's input bytes where the layout keeps them apart
// (TaskLayout::inputs_apart): the task's id, then the bytes.
inline constexpr const char* kInsertInputSql =
    "INSERT INTO task_inputs (task_id, data) VALUES (?, ?)";
// Our code for a SQLite failure: kBusy, kOutOfMemory or kIoError.
ErrorCode code_of(const SQLite::Exception& e);

// The reads, as TaskStore's (store.hpp); they throw SQLite::Exception.
std::optional<Task> select_task(SQLite::Database& db, const store::TaskLayout& l,
                                const std::string& id);
std::vector<Task> select_tasks(SQLite::Database& db, const store::TaskLayout& l,
                               const TaskFilter& f);
std::vector<EventRecord> select_events(SQLite::Database& db, const std::string& task_id);
std::vector<MetricSample> select_metrics(SQLite::Database& db, const std::string& task_id);
std::vector<Task> select_unfinished(SQLite::Database& db, const store::TaskLayout& l);
// TaskStore::prune_finished's deletes, in one transaction of their own;
// returns how many tasks went. In an adopted table only rows taskmgr ran
// (assigned_device set) are deleted.
std::size_t delete_finished(SQLite::Database& db, const store::TaskLayout& l,
                            Timestamp finished_before);
// TaskStore::delete_tasks's deletes: the ended ones among `ids`, in one
// transaction of their own (the same rule for an adopted table).
std::size_t delete_tasks(SQLite::Database& db, const store::TaskLayout& l,
                         const std::vector<std::string>& ids);

// The pauses table (task_pauses, version 4): its rows, and one written or
// deleted (in a transaction of its own: autocommit).
std::vector<PauseState> load_pauses(SQLite::Database& db);
void save_pause(SQLite::Database& db, const PauseState& p, bool paused);

// Throws Error(kIncompatible), naming what it found, when migrate() would
// refuse the database: a newer schema; an unversioned database with tables
// but no `tasks` (unless allow_other_tables); a `tasks` table that cannot be
// adopted. Reads only: run on a read-only connection before any write.
void check_migratable(SQLite::Database& db, const std::string& path, bool allow_other_tables);

// Brings the database up to kSchemaVersion, each step in its own
// transaction, forward only; adopts an unversioned `tasks` table (the
// spec's ALTER TABLEs for the columns it lacks, the two new tables, in one
// transaction). Refuses as check_migratable() does, changing nothing.
void migrate(SQLite::Database& db, const std::string& path, bool allow_other_tables);

// Refuses, with Error(kIncompatible) and nothing changed, a file at `path`
// that is not a SQLite database, or that reads as empty or loses tables
// through a `-wal` file beside it (one of another database, left there by
// hand): SQLite would read that file's pages over the database's. Run
// before the store opens the file for writing.
void check_file(const std::string& path);

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
