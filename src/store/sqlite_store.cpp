// The SQLite store: the shared write queue with group commit
// (write_queue.hpp) over a writer connection, and a read connection. The
// schema, its migrations, the queries and the lock file are in
// sqlite_schema.cpp (sqlite_internal.hpp).
#include <SQLiteCpp/SQLiteCpp.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <memory>
#include <type_traits>

#include "../sync.hpp"
#include "sqlite_internal.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/store.hpp"
#include "write_queue.hpp"

namespace taskmgr {
namespace detail::sqlite {
namespace {

class SqliteStore final : public TaskStore, private WriteBackend {
 public:
  SqliteStore(const std::string& path, SqliteStoreOptions options)
      : path_(path), options_(options), lock_(path) {
    try {
      // Everything that could refuse the file, read-only first: a refusal
      // leaves it byte-identical (a connection that wrote would checkpoint a
      // -wal file into it when it closes).
      check_file(path);
      std::error_code ec;
      if (std::filesystem::file_size(path, ec) > 0 && !ec) {
        SQLite::Database probe(path, SQLite::OPEN_READONLY);
        check_migratable(probe, path, options_.allow_other_tables);
      }
      writer_db_ = std::make_unique<SQLite::Database>(
          path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE | SQLite::OPEN_FULLMUTEX);
      writer_db_->setBusyTimeout(busy_ms());
      // A new file gets auto_vacuum before its first table (later, only a
      // VACUUM can change it): deletes can then give pages back.
      if (options_.vacuum == VacuumMode::kIncremental &&
          writer_db_->execAndGet("SELECT count(*) FROM sqlite_master").getInt() == 0) {
        writer_db_->exec("PRAGMA auto_vacuum = INCREMENTAL");
      }
      migrate(*writer_db_, path, options_.allow_other_tables);
      layout_ = task_layout(*writer_db_, options_.adopt);
      writer_db_->exec("PRAGMA journal_mode=WAL");
      writer_db_->exec(options.synchronous_full ? "PRAGMA synchronous=FULL"
                                                : "PRAGMA synchronous=NORMAL");
      writer_db_->exec("PRAGMA foreign_keys=ON");
      // The WAL stays near wal_max_mb: a checkpoint (our WAL hook, in place
      // of wal_autocheckpoint's) when it reaches half of it (commits rewrite the same few hot
      // pages, and a checkpoint copies each distinct page once: the larger, the fewer copies), a
      // blocking one after a commit that left it past the bound (a reader kept the passive one from
      // resetting it), and journal_size_limit truncates the file back to the bound when the WAL
      // restarts.
      {
        const std::int64_t page = writer_db_->execAndGet("PRAGMA page_size").getInt64();
        const std::int64_t bytes = options_.wal_max_mb * 1024 * 1024;
        wal_max_pages_ = std::max<std::int64_t>(2, bytes / std::max<std::int64_t>(page, 512));
        writer_db_->exec("PRAGMA journal_size_limit=" + std::to_string(bytes));
        sqlite3_wal_hook(writer_db_->getHandle(), &SqliteStore::on_wal_commit, this);
      }
      if (options_.max_size_mb > 0 && !options_.page_limit) {
        // Through the page limit the commits already apply (SQLite keeps
        // max_page_count per connection, so it is set again on each).
        const std::int64_t page = writer_db_->execAndGet("PRAGMA page_size").getInt64();
        options_.page_limit = std::make_shared<std::atomic<std::int64_t>>(std::max<std::int64_t>(
            1, options_.max_size_mb * 1024 * 1024 / std::max<std::int64_t>(page, 512)));
      }
      reader_db_ =
          std::make_unique<SQLite::Database>(path, SQLite::OPEN_READONLY | SQLite::OPEN_FULLMUTEX);
      reader_db_->setBusyTimeout(busy_ms());
      insert_task_ = std::make_unique<SQLite::Statement>(*writer_db_, insert_task_sql(layout_));
      update_task_ = std::make_unique<SQLite::Statement>(*writer_db_, update_task_sql(layout_));
      if (layout_.inputs_apart()) {
        insert_input_ = std::make_unique<SQLite::Statement>(*writer_db_, kInsertInputSql);
      }
      insert_event_ = std::make_unique<SQLite::Statement>(
          *writer_db_,
          "INSERT INTO task_events (task_id, event_type, timestamp, details) VALUES (?,?,?,?)");
      insert_metric_ = std::make_unique<SQLite::Statement>(
          *writer_db_,
          "INSERT INTO task_metrics (task_id, timestamp, memory_usage_mb, device, "
          "processing_stage) VALUES (?,?,?,?,?)");
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), "cannot open database " + path + ": " + e.what());
    }
    WriteBackend& backend = *this;
    queue_ = std::make_unique<WriteQueue>(
        backend, WriteQueue::Options{options_.max_batch, path_,
                                     options_.max_backlog});  // starts the writer thread
  }

  ~SqliteStore() override { queue_->stop(); }

  void insert_tasks(const std::vector<NewTask>& tasks) override { queue_->insert(tasks); }

  void update_task(const Task& task, const std::vector<EventRecord>& events) override {
    queue_->update(task, events);
  }

  void append_metrics(const std::vector<MetricSample>& samples) override {
    queue_->append(samples);
  }

  // Rows as their latest update left them, persisted or not (store.hpp).
  std::optional<Task> load_task(const std::string& id) override REQUIRES(!read_mu_) {
    return read(
        [&](SQLite::Database& db) { return queue_->overlay_task(select_task(db, layout_, id)); });
  }

  std::vector<Task> list_tasks(const TaskFilter& f) override REQUIRES(!read_mu_) {
    return read([&](SQLite::Database& db) {
      return queue_->list_tasks(
          f,
          [&](const TaskFilter& g) {
            // An adopted table's times may not sort as the database sees
            // them: ordered and paged on their parsed values.
            if (!layout_.adopted()) return select_tasks(db, layout_, g);
            return detail::store::list_in_creation_order(
                g, [&](const TaskFilter& h) { return select_tasks(db, layout_, h); },
                [&](const std::string& id) { return select_task(db, layout_, id); });
          },
          [&](const std::string& id) { return select_task(db, layout_, id); });
    });
  }

  std::vector<EventRecord> load_events(const std::string& task_id) override REQUIRES(!read_mu_) {
    return read([&](SQLite::Database& db) { return select_events(db, task_id); });
  }

  std::vector<MetricSample> load_metrics(const std::string& task_id) override REQUIRES(!read_mu_) {
    return read([&](SQLite::Database& db) { return select_metrics(db, task_id); });
  }

  std::vector<Task> load_unfinished() override REQUIRES(!read_mu_) {
    return read([&](SQLite::Database& db) { return select_unfinished(db, layout_); });
  }

  std::size_t prune_finished(Timestamp finished_before) override REQUIRES(!db_mu_) {
    queue_->flush();  // every write queued before is in, so a task's last update is not lost
    MutexLock c(db_mu_);
    std::size_t n = 0;
    try {
      n = delete_finished(*writer_db_, layout_, finished_before);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), "pruning finished tasks in " + path_ + " failed: " + e.what());
    }
    if (n > 0) reclaim();
    return n;
  }

  std::vector<PauseState> load_pauses() override REQUIRES(!db_mu_) {
    MutexLock c(db_mu_);
    try {
      return detail::sqlite::load_pauses(*writer_db_);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), "reading the pauses in " + path_ + " failed: " + e.what());
    }
  }

  void save_pause(const PauseState& p, bool paused) override REQUIRES(!db_mu_) {
    MutexLock c(db_mu_);
    try {
      detail::sqlite::save_pause(*writer_db_, p, paused);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), std::string(paused ? "recording" : "removing") + " the pause of " +
                                  std::string(to_string(p.scope)) +
                                  (p.name.empty() ? std::string() : " '" + p.name + "'") + " in " +
                                  path_ + " failed: " + e.what());
    }
  }

  std::size_t delete_tasks(const std::vector<std::string>& ids) override REQUIRES(!db_mu_) {
    queue_->flush();  // every write queued before is in: a task's last update is not lost
    MutexLock c(db_mu_);
    std::size_t n = 0;
    try {
      n = detail::sqlite::delete_tasks(*writer_db_, layout_, ids);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), "deleting tasks in " + path_ + " failed: " + e.what());
    }
    if (n > 0) reclaim();
    return n;
  }

  void flush() override { queue_->flush(/*retry_backlog=*/true); }

  std::string describe() const override { return "sqlite:" + path_; }

  std::vector<std::string> notices() const override REQUIRES(!db_mu_) {
    std::vector<std::string> out;
    if (std::string n = layout_.notice(path_); !n.empty()) out.push_back(std::move(n));
    MutexLock c(db_mu_);
    if (!vacuum_problem_.empty()) out.push_back(vacuum_problem_);
    return out;
  }

  StoreStats stats() const override { return queue_->stats(); }

 private:
  // After a delete that removed rows, per storage.vacuum (VacuumMode): the
  // free pages go back to the file system. The delete is committed
  // already: a vacuum that fails (another connection reading, no room for
  // VACUUM's copy) leaves the pages free for reuse, and notices() says why.
  void reclaim() REQUIRES(db_mu_) {
    SQLite::Database& db = *writer_db_;
    try {
      const bool incremental = db.execAndGet("PRAGMA auto_vacuum").getInt() == 2;
      if (options_.vacuum == VacuumMode::kNone) {
        // Nothing given back; the WAL the delete wrote is emptied below.
      } else if (options_.vacuum == VacuumMode::kIncremental && incremental) {
        db.exec("PRAGMA incremental_vacuum");
      } else {
        const std::int64_t pages = db.execAndGet("PRAGMA page_count").getInt64();
        const std::int64_t free = db.execAndGet("PRAGMA freelist_count").getInt64();
        // Less than a quarter free: not worth a rewrite.
        if (free > 0 && free * 4 >= pages) {
          // incremental: the one VACUUM that converts a file made without it.
          if (options_.vacuum == VacuumMode::kIncremental)
            db.exec("PRAGMA auto_vacuum = INCREMENTAL");
          db.exec("VACUUM");
        }
      }
      // The file shrinks when the WAL's pages are copied back into it, and
      // the WAL (which the delete filled) goes back to empty: what is on
      // disk shrinks at once, not at the next checkpoint. TRUNCATE waits
      // (busy_timeout_seconds) for readers that still need the WAL.
      db.exec("PRAGMA wal_checkpoint(TRUNCATE)");
      vacuum_problem_.clear();
    } catch (const SQLite::Exception& e) {
      vacuum_problem_ = "storage.vacuum (" + std::string(to_string(options_.vacuum)) + ") in " +
                        path_ + " failed after a delete; the free pages are reused: " + e.what();
    }
  }

  int busy_ms() const { return static_cast<int>(options_.busy_timeout_seconds * 1000); }

  template <typename F, typename R = std::invoke_result_t<F, SQLite::Database&>>
  R read(F&& f) REQUIRES(!read_mu_) {
    queue_->flush();  // readers see every write queued before the read
    MutexLock g(read_mu_);
    try {
      return f(*reader_db_);
    } catch (const SQLite::Exception& e) {
      throw Error(code_of(e), std::string("reading ") + path_ + " failed: " + e.what());
    }
  }

  void apply(WriteOp& op, bool events_only) REQUIRES(db_mu_) {
    if (auto* ins = std::get_if<InsertOp>(&op)) {
      for (const NewTask& n : *ins->tasks) {
        SQLite::Statement& st = *insert_task_;
        st.reset();
        st.clearBindings();
        bind_insert(st, layout_, n.task);
        st.exec();
        if (insert_input_ && !n.task.input.data.empty()) {
          SQLite::Statement& in = *insert_input_;
          in.reset();
          in.clearBindings();
          in.bind(1, n.task.id);
          in.bindNoCopy(2, n.task.input.data.data(), static_cast<int>(n.task.input.data.size()));
          in.exec();
        }
        for (const auto& e : n.events) insert_event(e);
      }
    } else if (auto* up = std::get_if<UpdateOp>(&op)) {
      if (events_only) {
        for (const auto& e : up->events) insert_event(e);
        return;
      }
      const Task& t = up->task;
      SQLite::Statement& st = *update_task_;
      st.reset();
      st.clearBindings();
      bind_update(st, layout_, t);
      st.exec();
      for (const auto& e : up->events) insert_event(e);
    } else if (auto* m = std::get_if<MetricsOp>(&op)) {
      for (const auto& s : m->samples) {
        SQLite::Statement& st = *insert_metric_;
        st.reset();
        st.bind(1, s.task_id);
        st.bind(2, format_timestamp(s.timestamp));
        st.bind(3, static_cast<std::int64_t>(s.memory_usage_mb));
        st.bind(4, s.device);
        st.bind(5, s.processing_stage);
        st.exec();
      }
    }
  }

  // The test hook (SqliteStoreOptions::before_commit), with the transaction
  // open. Host code: no lock a reader or a caller queueing a write needs is
  // held.
  void before_commit() {
    if (!options_.before_commit) return;
    detail::assert_scheduler_not_held("sqlite store: before_commit");
    options_.before_commit();
  }

  void insert_event(const EventRecord& e) REQUIRES(db_mu_) {
    SQLite::Statement& st = *insert_event_;
    st.reset();
    st.bind(1, e.task_id);
    st.bind(2, std::string(to_string(e.event)));
    st.bind(3, format_timestamp(e.timestamp));
    st.bind(4, e.details_json);
    st.exec();
  }

  // WriteBackend: one IMMEDIATE transaction. Called by the queue, one commit
  // at a time.
  void write(WriteOp* ops, std::size_t n, const std::vector<bool>& superseded) override
      REQUIRES(!db_mu_) {
    MutexLock c(db_mu_);
    try {
      if (options_.read_only) {
        const bool ro = options_.read_only->load();
        if (ro != applied_read_only_) {
          writer_db_->exec(ro ? "PRAGMA query_only=ON" : "PRAGMA query_only=OFF");
          applied_read_only_ = ro;
        }
      }
      if (options_.page_limit) {
        const std::int64_t limit = options_.page_limit->load();
        if (limit != applied_page_limit_) {
          // 0 restores SQLite's own maximum.
          writer_db_->exec("PRAGMA max_page_count = " +
                           std::to_string(limit > 0 ? limit : 1073741823));
          applied_page_limit_ = limit;
        }
      }
      SQLite::Transaction tx(*writer_db_, SQLite::TransactionBehavior::IMMEDIATE);
      for (std::size_t i = 0; i < n; ++i) apply(ops[i], superseded[i]);
      before_commit();
      tx.commit();
      if (wal_pages_ > wal_max_pages_) {
        // The passive checkpoint could not reset the WAL (a reader was in
        // it): wait for readers (busy timeout), copy it all and truncate it.
        // A failure here loses nothing: the commit is in the WAL.
        wal_pages_ = 0;
        sqlite3_wal_checkpoint_v2(writer_db_->getHandle(), nullptr, SQLITE_CHECKPOINT_TRUNCATE,
                                  nullptr, nullptr);
      }
    } catch (const SQLite::Exception& e) {
      // The database refused the data (a CHECK, NOT NULL or UNIQUE
      // constraint of an adopted table, a value too big): the same write
      // can never succeed, and retrying it would hold up every write behind
      // it. The queue gives it up (dropped_writes, logged).
      const int rc = e.getErrorCode();
      if (rc == SQLITE_CONSTRAINT || rc == SQLITE_MISMATCH || rc == SQLITE_TOOBIG) {
        throw RejectedWrite(code_of(e), e.what());
      }
      throw Error(code_of(e), e.what());
    }
  }

  // sqlite3_wal_hook: after each commit, with the WAL's size in pages (it
  // replaces the auto-checkpoint's own hook, so it checkpoints as that did).
  static int on_wal_commit(void* self, sqlite3* db, const char* name, int pages)
      NO_THREAD_SAFETY_ANALYSIS {  // called inside write(), db_mu_ held
    auto* s = static_cast<SqliteStore*>(self);
    s->wal_pages_ = pages;
    if (pages >= s->wal_max_pages_ / 2) {
      int log = 0, done = 0;
      if (sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, &log, &done) ==
              SQLITE_OK &&
          log == done) {
        s->wal_pages_ = 0;  // all copied: the next commit restarts the WAL
      }
    }
    return SQLITE_OK;
  }

  std::string path_;
  SqliteStoreOptions options_;
  LockFile lock_;
  store::TaskLayout layout_;  // set once, before any other thread runs

  // The writer connection: a commit of the queue, or a prune.
  mutable Mutex db_mu_;
  std::unique_ptr<SQLite::Database> writer_db_ GUARDED_BY(db_mu_);
  std::unique_ptr<SQLite::Statement> insert_task_ GUARDED_BY(db_mu_);
  std::unique_ptr<SQLite::Statement> update_task_ GUARDED_BY(db_mu_);
  std::unique_ptr<SQLite::Statement> insert_input_ GUARDED_BY(db_mu_);  // inputs apart only
  std::unique_ptr<SQLite::Statement> insert_event_ GUARDED_BY(db_mu_);
  std::unique_ptr<SQLite::Statement> insert_metric_ GUARDED_BY(db_mu_);
  std::int64_t applied_page_limit_ GUARDED_BY(db_mu_) = 0;
  bool applied_read_only_ GUARDED_BY(db_mu_) = false;
  std::int64_t wal_max_pages_ = 0;                 // set in the constructor
  std::int64_t wal_pages_ GUARDED_BY(db_mu_) = 0;  // the WAL's size after the last commit
  std::string vacuum_problem_ GUARDED_BY(db_mu_);  // the last reclaim() that failed

  Mutex read_mu_;  // one reader at a time on the read connection
  std::unique_ptr<SQLite::Database> reader_db_ GUARDED_BY(read_mu_);

  // Last: its writer thread uses the members above.
  std::unique_ptr<WriteQueue> queue_;
};

}  // namespace
}  // namespace detail::sqlite

std::shared_ptr<TaskStore> open_sqlite_store(const std::string& path, SqliteStoreOptions options) {
  if (path.empty() || path == ":memory:") {
    throw Error(ErrorCode::kInvalidArgument,
                "open_sqlite_store needs a file path (use make_memory_store for ':memory:')");
  }
  if (options.max_backlog < 1 || options.wal_max_mb < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "SqliteStoreOptions: max_backlog and wal_max_mb must be >= 1");
  }
  if (auto problem = detail::store::status_map_problem(options.adopt.status_map)) {
    throw Error(ErrorCode::kInvalidArgument, "SqliteStoreOptions::adopt.status_map: " + *problem);
  }
  return std::make_shared<detail::sqlite::SqliteStore>(path, options);
}

}  // namespace taskmgr
