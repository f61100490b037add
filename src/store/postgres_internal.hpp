// Private to the PostgreSQL store: what its files share. postgres_schema.cpp
// has the schema and its migrations, the mapping of a task onto a row of
// `tasks` and the queries; postgres_store.cpp has the store itself (the
// writer connection under the shared write queue, the read pool). pg.hpp is
// the libpq layer under both. SQL lives in these files only.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "pg.hpp"
#include "store/task_layout.hpp"
#include "taskmgr/postgres_store.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail::postgres {

// The schema version this build writes (the highest row of taskmgr_schema).
inline constexpr int kSchemaVersion = 4;

// The schema's tables live in: options.schema, or the first schema of the
// connection's search_path. Throws Error(kInvalidConfig) when there is none.
std::string target_schema(pg::Conn& conn, const PostgresStoreOptions& options);

// Session settings every connection of the store runs once connected.
std::string session_setup(const PostgresStoreOptions& options);

// Brings the schema up to kSchemaVersion: every missing step in one
// transaction, under a transaction-level advisory lock on the schema, so
// that stores opening at once (in any process) migrate it once. Throws
// Error(kIncompatible) and changes nothing for a newer schema, a `tasks`
// table taskmgr did not create and cannot adopt (the message says why), or
// (unless options.allow_other_tables) a schema that holds other tables and
// no `tasks`. An unversioned `tasks` table is adopted: the spec's changes
// (ADD COLUMN IF NOT EXISTS, the two new tables), recorded as version 2.
// `where` names the database in messages.
void migrate(pg::Conn& conn, const PostgresStoreOptions& options, const std::string& where);
// How tasks map onto the schema's `tasks` table (after migrate()).
store::TaskLayout task_layout(pg::Conn& conn, const PostgresStoreOptions& options);

// The session-level advisory lock that keeps one store per schema, waited
// for up to `wait_seconds` (a killed store's session holds it until the
// server notices, usually at once): true when taken. `shared`: the shared
// queue's hosts hold it together (a store that is not shared cannot open
// while they do, nor they while it does). holder_of_store_lock()
// names who holds it ("server pid 123, application 'taskmgr pid 456',
// client local"), or "".
bool lock_store(pg::Conn& conn, const std::string& schema, double wait_seconds,
                bool shared = false);
std::string holder_of_store_lock(pg::Conn& conn, const std::string& schema);

// The writes, as prepared statements of the writer connection: names and SQL.
struct Statement {
  const char* name;
  std::string sql;
};
Statement insert_task_statement(const store::TaskLayout& l);
Statement update_task_statement(const store::TaskLayout& l);
Statement insert_event_statement();
Statement insert_metric_statement();
// A shared queue's (docs/SCALING.md): the same writes, fenced by the claim.
// The update takes update_task_params() then the host's id, the claim's
// token and whether this is the claim's last write (ended and cleaned up:
// the claim is cleared); it renews the lease. An event or a sample takes
// its params then the token, and is written only while the row carries it.
Statement fenced_update_statement(const store::TaskLayout& l, double lease_seconds);
Statement fenced_event_statement();
Statement fenced_metric_statement();
// Parameters for them.
pg::Params insert_task_params(const store::TaskLayout& l, const Task& t);
pg::Params update_task_params(const store::TaskLayout& l, const Task& t);
pg::Params insert_event_params(const EventRecord& e);
pg::Params insert_metric_params(const MetricSample& s);

// A task from row `row` of a result whose columns are l.select_list(...)'s.
Task read_task(const PGresult* r, int row, const store::TaskLayout& l);
std::vector<Task> read_tasks(const PGresult* r, const store::TaskLayout& l);

// The reads, as TaskStore's (store.hpp); they throw pg::PgError.
std::optional<Task> select_task(pg::Conn& c, const store::TaskLayout& l, const std::string& id);
std::vector<Task> select_tasks(pg::Conn& c, const store::TaskLayout& l, const TaskFilter& f);
std::vector<EventRecord> select_events(pg::Conn& c, const std::string& task_id);
std::vector<MetricSample> select_metrics(pg::Conn& c, const std::string& task_id);
std::vector<Task> select_unfinished(pg::Conn& c, const store::TaskLayout& l);
// TaskStore::prune_finished's deletes, in one transaction of their own;
// returns how many tasks went. In an adopted table only rows taskmgr ran
// (assigned_device set) are deleted.
std::size_t delete_finished(pg::Conn& c, const store::TaskLayout& l, Timestamp finished_before);
// The pauses table (task_pauses, version 3): its rows, and one written or
// deleted (autocommit).
std::vector<PauseState> load_pauses(pg::Conn& c);
void save_pause(pg::Conn& c, const PauseState& p, bool paused);
// TaskStore::delete_tasks's deletes: the ended ones among `ids`, in one
// transaction of their own (the same rule for an adopted table).
std::size_t delete_tasks(pg::Conn& c, const store::TaskLayout& l,
                         const std::vector<std::string>& ids);

}  // namespace taskmgr::detail::postgres
