// taskmgr: where tasks, their events and their metric samples are kept.
//
// TaskStore is the interface the manager writes through; SQL or any other
// backend detail stays behind it (the embedded SQLite store below, the
// PostgreSQL store of postgres_store.hpp). make_memory_store() keeps
// everything in memory: for tests, benchmarks and hosts that need no
// durability.
//
// Contract of every store:
//  * insert_tasks() stores new tasks with their first events, all of them or
//    none, and returns only when they are durable (for a durable store); it
//    throws Error (kIoError, kBusy, ...) when they cannot be, and then
//    nothing of them is kept;
//  * update_task() stores the task's mutable fields (everything but id,
//    service, input and created_at) together with the events of that change,
//    atomically, in call order; it may return before they are durable;
//  * flush() returns when everything written before it is durable, or was
//    tried and failed (then it is in the backlog: StoreStats::backlog);
//  * readers see their own writes: a task's row as its latest update_task
//    left it, persisted or not (while an update waits in the backlog of
//    failed writes, load_task and list_tasks answer with the state it
//    carries, filters and limits applied to that state); events and metric
//    samples as persisted.
//
// Thread-safety: every member is safe to call from any thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "taskmgr/config.hpp"
#include "taskmgr/events.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/pause.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

// A row of the spec's task_metrics table.
struct MetricSample {
  std::string task_id;
  Timestamp timestamp{};
  std::int64_t memory_usage_mb = 0;
  std::string device;
  std::string processing_stage;
};

// A place in creation order (created_at, then id): where a page of
// list_tasks ends, for the next page to go on from.
struct TaskCursor {
  Timestamp created_at;
  std::string id;
};

// A cursor as text, for a page's link: the creation time in microseconds
// since 1970, '_', the id ("1764771234567000_3f2a..."); and back
// (std::nullopt when `s` is not one: no '_', or no digits before it (an
// optional '-', then at most 9e15 microseconds: 285 years either side of
// 1970); what follows the '_' is the id, empty or not).
TASKMGR_API std::string to_string(const TaskCursor& c);
TASKMGR_API std::optional<TaskCursor> parse_task_cursor(std::string_view s);

// True when `t` comes before `c` in creation order.
inline bool before_cursor(const Task& t, const TaskCursor& c) {
  return t.created_at != c.created_at ? t.created_at < c.created_at : t.id < c.id;
}

struct TaskFilter {
  std::optional<TaskStatus> status;
  std::string service;    // "" = any
  std::size_t limit = 0;  // 0 = no limit; otherwise the newest `limit` tasks
  // false: each task's result and input bytes are left empty (a listing of
  // many tasks reads only what says how they stand; get_task reads one whole).
  bool with_payloads = true;
  // With with_payloads: false leaves the input bytes out (their length in
  // TaskInput::left_out_bytes) and keeps the results.
  bool with_input_bytes = true;
  // Paging back in time: only tasks created before this place (the first,
  // oldest, task of the previous page; see page_cursor). With `limit`, the
  // newest `limit` of those.
  std::optional<TaskCursor> before;
};

// The cursor of the page after `page` (a list_tasks answer, oldest first):
// its first task's place; std::nullopt for an empty page.
inline std::optional<TaskCursor> page_cursor(const std::vector<Task>& page) {
  if (page.empty()) return std::nullopt;
  return TaskCursor{page.front().created_at, page.front().id};
}

// What a store has done since it opened (TaskMetrics::store).
struct StoreStats {
  std::uint64_t commits = 0;        // transactions committed
  std::uint64_t writes = 0;         // writes committed: task inserts, updates, sample batches
  std::uint64_t failed_writes = 0;  // asynchronous writes that failed at least once (kept, retried)
  // Asynchronous writes the database refused for their data (a value it
  // cannot hold, a constraint they break): they can never be stored and
  // were given up. Should stay 0; a manager logs each and reports them from
  // close() (kUnpersisted).
  std::uint64_t dropped_writes = 0;
  std::uint64_t backlog = 0;  // failed writes waiting for a retry now (unpersisted)
  std::uint64_t queued = 0;   // writes waiting for their commit now (or in one)
  // Writes accepted but not in the database now: backlog + dropped_writes.
  std::uint64_t unpersisted() const { return backlog + dropped_writes; }
  // The store's message for the most recent write that failed (e.g. "database
  // or disk is full"); "" when none has failed since the store opened. It
  // stays set after a retry succeeds: a host checks failed_writes and backlog.
  std::string last_error;
};

// A task to insert with the events of its creation (created, and queued
// when it is started in the same step), in order.
struct NewTask {
  Task task;
  std::vector<EventRecord> events;
};

class TASKMGR_API TaskStore {
 public:
  virtual ~TaskStore();

  virtual void insert_tasks(const std::vector<NewTask>& tasks) = 0;
  // One task with its created event: insert_tasks of one.
  void insert_task(const Task& task, const EventRecord& created);
  virtual void update_task(const Task& task, const std::vector<EventRecord>& events) = 0;
  virtual void append_metrics(const std::vector<MetricSample>& samples) = 0;

  virtual std::optional<Task> load_task(const std::string& id) = 0;
  // Oldest first (creation order).
  virtual std::vector<Task> list_tasks(const TaskFilter& filter) = 0;
  virtual std::vector<EventRecord> load_events(const std::string& task_id) = 0;
  virtual std::vector<MetricSample> load_metrics(const std::string& task_id) = 0;
  // What a manager recovers when it opens, oldest first: tasks not in a
  // terminal state (pending, queued, running), and ended tasks whose cleanup
  // did not complete (resource_cleanup_completed false). Input bytes are
  // left out (input.data empty; load_task reads one task's), so that a
  // queue of large inputs is not read into memory at once.
  virtual std::vector<Task> load_unfinished() = 0;
  // Deletes the tasks that ended (completed, failed or cancelled, cleanup
  // done) before `finished_before`, with their events and metric samples
  // (storage.retention_days). Never touches an unfinished task. Returns how
  // many tasks were deleted. The default keeps everything and returns 0.
  virtual std::size_t prune_finished(Timestamp finished_before);
  // Deletes those of the tasks `ids` that ended (completed, failed or
  // cancelled, cleanup done) with their events, metric samples and input
  // bytes, all in one transaction, after every write queued before the call
  // is in; the others (unknown, unfinished, or rows of an adopted table that
  // taskmgr did not run) are left as they are. Returns how many were
  // deleted. The default deletes nothing: it throws Error(kUnsupported)
  // naming the store (describe()).
  virtual std::size_t delete_tasks(const std::vector<std::string>& ids);

  // The pauses in force (TaskManager::pause), as save_pause left them. The
  // default: none.
  virtual std::vector<PauseState> load_pauses();
  // Records a pause (`paused` true: it begins, with its `since`) or its end
  // (false), durably before it returns: a manager opened on this store
  // after a crash finds it. Throws Error(kIoError) (or another code) when
  // it cannot write: then nothing changed. The default throws
  // Error(kUnsupported) naming the store.
  virtual void save_pause(const PauseState& pause, bool paused);

  virtual void flush() = 0;
  // Counters for monitoring. The default: all zero.
  virtual StoreStats stats() const;
  // "memory", "sqlite:/path/to.db", ...
  virtual std::string describe() const = 0;
  // What the host should know about how this store keeps tasks, found when
  // it opened (an adopted table with no column for some fields, say); a
  // manager logs each at warn level when it opens. The default: none.
  virtual std::vector<std::string> notices() const;
};

TASKMGR_API std::shared_ptr<TaskStore> make_memory_store();

// How a store reads a `tasks` table it adopted from an earlier application
// (docs/STORAGE.md, "Adopting an existing database"; storage.adopt).
struct AdoptOptions {
  // Old status words and what each means, e.g. {"done", kCompleted}. A word
  // neither taskmgr's own nor in the map is read as kUnrecognized (the word
  // in Task::stored_status) and left as it is. Keys must not be taskmgr's
  // own words; values must not be kUnrecognized.
  std::map<std::string, TaskStatus> status_map;
  // The service of rows that name none (no service column, or NULL in it).
  std::string default_service = "ocr";
};

struct SqliteStoreOptions {
  bool synchronous_full = false;    // FULL survives power loss; NORMAL (default) a process kill
  double busy_timeout_seconds = 5;  // wait for a lock held by another connection
  std::size_t max_batch = 1000;     // most writes committed in one transaction
  // Most failed writes kept for a retry (>= 1). While this many wait, new
  // tasks are refused (insert_tasks throws kIoError with the store's
  // message) instead of holding more in memory; updates of tasks accepted
  // before are still kept (never dropped).
  std::size_t max_backlog = 100000;
  // The WAL file is kept to about this many MiB (storage.wal_max_mb; >= 1):
  // a checkpoint runs when the WAL reaches half of it, a blocking one when
  // it passes it, and journal_size_limit truncates it back to it.
  std::int64_t wal_max_mb = 64;
  // The database may grow to about this many MiB (0 = no limit); past it
  // writes fail as on a full disk: an insert is refused to its caller, other
  // writes are kept and retried (StoreStats::failed_writes, last_error).
  std::int64_t max_size_mb = 0;
  // What deletes (prune_finished, delete_tasks) give back: storage.vacuum
  // (config.hpp, VacuumMode).
  VacuumMode vacuum = VacuumMode::kIncremental;
  // An unversioned database that holds tables but no `tasks` table is
  // refused: taskmgr does not create its tables among data it does not
  // know. true: it does, beside them (storage.allow_other_tables).
  bool allow_other_tables = false;
  AdoptOptions adopt;
  // Fault injection (tests): when set, the database may grow to this many
  // pages (0 = no limit), re-read before every commit; past it writes fail
  // as on a full disk.
  std::shared_ptr<std::atomic<std::int64_t>> page_limit;
  // Fault injection (tests): while it holds true, the writer connection is
  // read-only (PRAGMA query_only, re-read before every commit): writes fail
  // with SQLite's own "attempt to write a readonly database", as on a file
  // that became read-only. (chmod cannot stand in: the store's connection
  // has the file open already, and root ignores the mode.)
  std::shared_ptr<std::atomic<bool>> read_only;
  // Fault injection (tests): called before each commit of queued writes,
  // just before its COMMIT (the transaction open), on the thread that makes
  // it: the writer thread, or a caller of insert_tasks leading a group
  // commit. No lock of the store's readers is held, nor the one that
  // insert_tasks, update_task and append_metrics take to queue a write. A
  // hook that blocks (on a test's gate) holds the commit there:
  //  * update_task and append_metrics still return at once (their writes go
  //    into a later commit);
  //  * insert_tasks waits: its insert goes into the next commit;
  //  * reads, flush() and prune_finished wait: a read first waits until every
  //    write queued before it is committed (read-your-writes), the held
  //    commit's included.
  // Never called twice at a time. It must not read, flush, prune or insert
  // (they would wait for the commit it holds). An exception it throws, of
  // any type, fails the commit as a failed COMMIT would: rolled back, a
  // group's writes are tried again one by one (the hook is called before
  // each), an insert that still fails is refused to its caller, other writes
  // are kept and retried (StoreStats::failed_writes).
  std::function<void()> before_commit;
};

// The embedded durable store: a SQLite database file in WAL mode, written by
// one writer thread that commits queued writes in groups (many callers share
// one commit), read through its own connection. Reads wait for a pending
// commit: a read first waits until every write queued before it is
// committed, so that it sees them. Opening runs the schema migrations
// (docs/STORAGE.md); an unversioned database with a `tasks` table of an
// earlier application is adopted in place (the spec's ALTER TABLEs and new
// tables). Refused with Error(kIncompatible) and left byte-identical: a
// database from a newer taskmgr; an unversioned one with tables but no
// `tasks` (unless allow_other_tables); a `tasks` table that cannot be
// adopted (the message says why); a file that is not a SQLite database; a
// non-empty file that reads as empty or loses tables through a `-wal` file
// beside it (one of another database). A database another store holds open
// (this process or another) is refused with Error(kBusy); bad options with
// Error(kInvalidArgument).
TASKMGR_API std::shared_ptr<TaskStore> open_sqlite_store(const std::string& path,
                                                         SqliteStoreOptions options = {});

// The schema version this build writes (PRAGMA user_version).
TASKMGR_API int sqlite_schema_version() noexcept;

}  // namespace taskmgr
