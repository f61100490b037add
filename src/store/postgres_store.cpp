// The PostgreSQL store: the shared write queue with group commit
// (write_queue.hpp) over one writer connection, which sends each group as
// one pipelined transaction, and a small pool of read connections. The
// schema, its migrations and the queries are in postgres_schema.cpp
// (postgres_internal.hpp); libpq is wrapped in pg.hpp.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <thread>
#include <type_traits>

#include "../sync.hpp"
#include "postgres_internal.hpp"
#include "postgres_shared.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/postgres_store.hpp"
#include "write_queue.hpp"

namespace taskmgr {
namespace detail::postgres {
namespace {

using pg::Conn;
using pg::PgError;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

// "postgresql://host:port/db" from a connection string, before any
// connection (for messages); throws kInvalidArgument when it is not one.
std::string describe_url(const std::string& url) {
  if (auto problem = pg::conninfo_problem(url)) {
    throw Error(
        ErrorCode::kInvalidArgument,
        "not a PostgreSQL connection string (a postgresql:// URL or key=value pairs): " + *problem);
  }
  PQconninfoOption* opts = PQconninfoParse(url.c_str(), nullptr);
  if (opts == nullptr) throw Error(ErrorCode::kOutOfMemory, "out of memory");
  std::string host, port, db;
  for (PQconninfoOption* o = opts; o->keyword != nullptr; ++o) {
    const std::string k = o->keyword;
    const std::string v = o->val != nullptr ? o->val : "";
    if (k == "host" || (k == "hostaddr" && host.empty())) host = v;
    if (k == "port") port = v;
    if (k == "dbname") db = v;
  }
  PQconninfoFree(opts);
  if (!host.empty() && host[0] == '/') {
    return "postgresql:///" + db + "?host=" + host + (port.empty() ? "" : "&port=" + port);
  }
  return "postgresql://" + host + (port.empty() ? "" : ":" + port) + "/" + db;
}

// What became of one try of a transaction (for a connection lost in it).
struct Attempt {
  bool commit_sent = false;
  std::string xid;  // the transaction's id, once the server gave it
  // Shared mode: the updates whose fence refused them (their claim lost).
  std::vector<const UpdateOp*> refused;
};

class PostgresStore final : public TaskStore, public SharedQueueHolder, private WriteBackend {
 public:
  PostgresStore(const std::string& url, PostgresStoreOptions options)
      : url_(url),
        options_(std::move(options)),
        setup_(session_setup(options_)),
        where_(describe_url(url_)) {
    std::unique_ptr<Conn> w;
    try {
      w = connect_once();
      where_ = w->describe();
      schema_ = target_schema(*w, options_);
      // The store lock first (as the SQLite store's lock file): a schema
      // another store uses is not migrated under it. The hosts of a shared
      // queue hold it together.
      take_store_lock(*w);
      migrate(*w, options_, where_);
      layout_ = task_layout(*w, options_);
      if (options_.shared && layout_.adopted()) {
        throw Error(ErrorCode::kIncompatible,
                    "database " + where_ + " (schema " + schema_ +
                        "): a shared queue (storage.shared) needs taskmgr's own tasks table; "
                        "this one was adopted from an earlier application");
      }
      writes_ = {insert_task_statement(layout_), update_task_statement(layout_),
                 insert_event_statement(), insert_metric_statement()};
      if (options_.shared) {
        writes_.push_back(fenced_update_statement(layout_, options_.cluster.lease_seconds));
        writes_.push_back(fenced_event_statement());
        writes_.push_back(fenced_metric_statement());
      }
      prepare_writes(*w);
      release(connect_once());  // the first read connection: reads work too
      if (options_.shared) {
        shared_ = std::make_unique<PostgresShared>(PostgresShared::Settings{
            url_, setup_, static_cast<int>(options_.connect_timeout_seconds + 0.999), where_,
            schema_, layout_, options_.cluster});
      }
    } catch (const PgError& e) {
      throw Error(e.code(), "cannot open the PostgreSQL store on " + where_ + ": " + e.what());
    }
    {
      MutexLock g(writer_mu_);
      writer_ = std::move(w);
    }
    WriteBackend& backend = *this;
    queue_ = std::make_unique<WriteQueue>(
        backend, WriteQueue::Options{options_.max_batch, where_,
                                     options_.max_backlog});  // starts the writer thread
  }

  ~PostgresStore() override {
    queue_->stop();
    if (shared_) shared_->close_host();
  }

  SharedQueue* shared_queue() override { return shared_.get(); }

  void insert_tasks(const std::vector<NewTask>& tasks) override { queue_->insert(tasks); }

  void update_task(const Task& task, const std::vector<EventRecord>& events) override {
    if (!shared_) return queue_->update(task, events);
    // Fenced by the claim the host holds the task by; its last write (ended,
    // cleaned up) ends the claim.
    const std::int64_t fence = shared_->fence_of(task.id);
    if (is_terminal(task.status) && task.resource_cleanup_completed) shared_->forget(task.id);
    queue_->update(task, events, fence);
  }

  void append_metrics(const std::vector<MetricSample>& samples) override {
    if (!shared_) return queue_->append(samples);
    std::vector<std::int64_t> fences;
    fences.reserve(samples.size());
    for (const auto& s : samples) fences.push_back(shared_->fence_of(s.task_id));
    queue_->append(samples, std::move(fences));
  }

  // Rows as their latest update left them, persisted or not (store.hpp).
  std::optional<Task> load_task(const std::string& id) override REQUIRES(!pool_mu_) {
    return read([&](Conn& c) { return queue_->overlay_task(select_task(c, layout_, id)); });
  }

  std::vector<Task> list_tasks(const TaskFilter& f) override REQUIRES(!pool_mu_) {
    return read([&](Conn& c) {
      return queue_->list_tasks(
          f,
          [&](const TaskFilter& g) {
            // An adopted table's times may not sort as the database sees
            // them: ordered and paged on their parsed values.
            if (!layout_.adopted()) return select_tasks(c, layout_, g);
            return detail::store::list_in_creation_order(
                g, [&](const TaskFilter& h) { return select_tasks(c, layout_, h); },
                [&](const std::string& id) { return select_task(c, layout_, id); });
          },
          [&](const std::string& id) { return select_task(c, layout_, id); });
    });
  }

  std::vector<EventRecord> load_events(const std::string& task_id) override REQUIRES(!pool_mu_) {
    return read([&](Conn& c) { return select_events(c, task_id); });
  }

  std::vector<MetricSample> load_metrics(const std::string& task_id) override REQUIRES(!pool_mu_) {
    return read([&](Conn& c) { return select_metrics(c, task_id); });
  }

  std::vector<Task> load_unfinished() override REQUIRES(!pool_mu_) {
    return read([&](Conn& c) { return select_unfinished(c, layout_); });
  }

  std::size_t prune_finished(Timestamp finished_before) override REQUIRES(!writer_mu_) {
    queue_->flush();  // every write queued before is in, so a task's last update is not lost
    MutexLock g(writer_mu_);
    for (int attempt = 1;; ++attempt) {
      try {
        ensure_writer();
        return delete_finished(*writer_, layout_, finished_before);
      } catch (const PgError& e) {
        if (e.connection_lost()) writer_.reset();
        if ((e.connection_lost() || e.transaction_conflict()) && attempt < kMaxAttempts) continue;
        throw Error(e.code(), "pruning finished tasks in " + where_ + " failed: " + e.what());
      }
    }
  }
  std::size_t delete_tasks(const std::vector<std::string>& ids) override REQUIRES(!writer_mu_) {
    queue_->flush();  // every write queued before is in, so a task's last update is not lost
    MutexLock g(writer_mu_);
    for (int attempt = 1;; ++attempt) {
      try {
        ensure_writer();
        return detail::postgres::delete_tasks(*writer_, layout_, ids);
      } catch (const PgError& e) {
        if (e.connection_lost()) writer_.reset();
        if ((e.connection_lost() || e.transaction_conflict()) && attempt < kMaxAttempts) continue;
        throw Error(e.code(), "deleting tasks in " + where_ + " failed: " + e.what());
      }
    }
  }

  std::vector<PauseState> load_pauses() override REQUIRES(!pool_mu_) {
    return read([&](Conn& c) { return detail::postgres::load_pauses(c); });
  }

  void save_pause(const PauseState& p, bool paused) override REQUIRES(!writer_mu_) {
    MutexLock g(writer_mu_);
    for (int attempt = 1;; ++attempt) {
      try {
        ensure_writer();
        detail::postgres::save_pause(*writer_, p, paused);
        return;
      } catch (const PgError& e) {
        if (e.connection_lost()) writer_.reset();
        if ((e.connection_lost() || e.transaction_conflict()) && attempt < kMaxAttempts) continue;
        throw Error(e.code(), std::string(paused ? "recording" : "removing") + " the pause of " +
                                  std::string(to_string(p.scope)) +
                                  (p.name.empty() ? std::string() : " '" + p.name + "'") + " in " +
                                  where_ + " failed: " + e.what());
      }
    }
  }

  void flush() override { queue_->flush(/*retry_backlog=*/true); }

  std::string describe() const override { return where_; }

  std::vector<std::string> notices() const override {
    const std::string n = layout_.notice(where_);
    return n.empty() ? std::vector<std::string>{} : std::vector<std::string>{n};
  }

  StoreStats stats() const override { return queue_->stats(); }

 private:
  // Tries of one transaction (a connection lost in it, a conflict), and of
  // a read whose connection broke.
  static constexpr int kMaxAttempts = 5;
  static constexpr milliseconds kReconnectPause{1000};

  std::unique_ptr<Conn> connect_once() {
    return std::make_unique<Conn>(url_, static_cast<int>(options_.connect_timeout_seconds + 0.999),
                                  setup_);
  }

  // A new connection, tried with backoff for connect_timeout_seconds.
  // Throws Error(kIoError) (not PgError: nothing to try again) when none
  // came.
  std::unique_ptr<Conn> connect_with_backoff() {
    const auto deadline =
        steady_clock::now() + std::chrono::duration_cast<steady_clock::duration>(
                                  std::chrono::duration<double>(options_.connect_timeout_seconds));
    milliseconds delay(50);
    for (;;) {
      try {
        return connect_once();
      } catch (const PgError& e) {
        if (steady_clock::now() + delay >= deadline) {
          char tried[32];
          std::snprintf(tried, sizeof tried, "%g", options_.connect_timeout_seconds);
          throw Error(ErrorCode::kIoError,
                      "cannot connect to " + where_ + " (tried for " + tried + " s): " + e.what());
        }
      }
      std::this_thread::sleep_for(delay);
      delay = std::min(delay * 2, milliseconds(2000));
    }
  }

  void take_store_lock(Conn& c) {
    if (lock_store(c, schema_, options_.connect_timeout_seconds, options_.shared)) return;
    const std::string holder = holder_of_store_lock(c, schema_);
    if (options_.shared) {
      throw Error(ErrorCode::kBusy, "database " + where_ + " (schema " + schema_ +
                                        ") is in use by a task manager that does not share it" +
                                        (holder.empty() ? "" : " (" + holder + ")") +
                                        "; hosts share a schema only when all set storage.shared");
    }
    throw Error(ErrorCode::kBusy, "database " + where_ + " (schema " + schema_ +
                                      ") is in use by another task manager" +
                                      (holder.empty() ? "" : " (" + holder + ")") +
                                      "; only one may use a schema at a time (several hosts "
                                      "share one with storage.shared)");
  }

  void prepare_writes(Conn& c) const {
    for (const Statement& s : writes_) c.prepare(s.name, s.sql);
    if (options_.shared) c.prepare("taskmgr_notify_work", "SELECT pg_notify($1, 'work')");
  }

  // The writer connection, connected again (with its store lock and
  // statements) when it broke. After a reconnection that failed, writes fail
  // at once for kReconnectPause: the callers of a group that failed, and the
  // backlog's retries, need not each wait connect_timeout_seconds.
  void ensure_writer() REQUIRES(writer_mu_) {
    if (writer_ && !writer_->broken()) return;
    writer_.reset();
    if (steady_clock::now() < writer_down_until_)
      throw Error(ErrorCode::kIoError, writer_down_why_);
    try {
      std::unique_ptr<Conn> c = connect_with_backoff();
      try {
        take_store_lock(*c);
        prepare_writes(*c);
      } catch (const PgError& e) {
        throw Error(e.code(), "cannot set up the connection to " + where_ + ": " + e.what());
      }
      writer_ = std::move(c);
    } catch (const Error& e) {
      writer_down_until_ = steady_clock::now() + kReconnectPause;
      writer_down_why_ = e.what();
      throw;
    }
  }

  // ---- reads -----------------------------------------------------------------

  // A read connection from the pool, or a free slot for one (null).
  std::unique_ptr<Conn> acquire() REQUIRES(!pool_mu_) {
    MutexLock l(pool_mu_);
    pool_cv_.wait(l.native(), [this]() REQUIRES(pool_mu_) {
      return !idle_.empty() || leased_ + idle_.size() < options_.read_connections;
    });
    ++leased_;
    if (idle_.empty()) return nullptr;
    std::unique_ptr<Conn> c = std::move(idle_.back());
    idle_.pop_back();
    return c;
  }

  // Gives a slot back (with its connection, when it still works).
  void release(std::unique_ptr<Conn> c, bool leased = false) REQUIRES(!pool_mu_) {
    {
      MutexLock l(pool_mu_);
      if (leased) --leased_;
      if (c && !c->broken()) idle_.push_back(std::move(c));
    }
    pool_cv_.notify_one();
  }

  template <typename F, typename R = std::invoke_result_t<F, Conn&>>
  R read(F&& f) REQUIRES(!pool_mu_) {
    queue_->flush();  // readers see every write queued before the read
    struct Lease {
      PostgresStore& store;
      std::unique_ptr<Conn> conn;
      ~Lease() { store.release(std::move(conn), /*leased=*/true); }
    } lease{*this, acquire()};
    for (int attempt = 1;; ++attempt) {
      if (!lease.conn) lease.conn = connect_with_backoff();
      try {
        return f(*lease.conn);
      } catch (const PgError& e) {
        if (e.connection_lost()) {
          lease.conn.reset();
          if (attempt < kMaxAttempts) continue;  // reads can be run again
        }
        throw Error(e.code(), "reading " + where_ + " failed: " + e.what());
      }
    }
  }

  // ---- writes ----------------------------------------------------------------

  // A statement sent in a transaction; for a fenced update, whose claim it
  // carries (a result of no row: the fence refused it).
  struct Sent {
    const UpdateOp* fenced = nullptr;
  };

  // Sends one op's statements (appended to `sent`). In shared mode an
  // update, its events and samples are fenced by the claim (UpdateOp::fence),
  // and an insert of queued tasks notifies the hosts (on commit).
  void send_op(pg::Pipeline& p, WriteOp& op, bool events_only, std::vector<Sent>& sent) const {
    const bool shared = shared_ != nullptr;
    auto event = [&](const EventRecord& e, std::int64_t fence) {
      pg::Params ps = insert_event_params(e);
      if (shared && fence >= 0) {
        ps.integer(fence);
        p.send_prepared(writes_[5].name, ps);
      } else {
        p.send_prepared(writes_[2].name, ps);
      }
      sent.push_back({});
    };
    if (auto* ins = std::get_if<InsertOp>(&op)) {
      bool queued = false;
      for (const NewTask& t : *ins->tasks) {
        pg::Params ps = insert_task_params(layout_, t.task);
        p.send_prepared(writes_[0].name, ps);
        sent.push_back({});
        for (const auto& e : t.events) event(e, -1);
        queued = queued || t.task.status == TaskStatus::kQueued;
      }
      if (shared && queued) {
        pg::Params ps;
        ps.text(shared_->channel());
        p.send_prepared("taskmgr_notify_work", ps);
        sent.push_back({});
      }
    } else if (auto* up = std::get_if<UpdateOp>(&op)) {
      if (!events_only) {
        pg::Params ps = update_task_params(layout_, up->task);
        if (shared) {
          ps.text(shared_->host_id()).integer(up->fence);
          ps.boolean(is_terminal(up->task.status) && up->task.resource_cleanup_completed);
          p.send_prepared(writes_[4].name, ps);
          sent.push_back({up});
        } else {
          p.send_prepared(writes_[1].name, ps);
          sent.push_back({});
        }
      }
      for (const auto& e : up->events) event(e, up->fence);
    } else if (auto* m = std::get_if<MetricsOp>(&op)) {
      for (std::size_t i = 0; i < m->samples.size(); ++i) {
        pg::Params ps = insert_metric_params(m->samples[i]);
        if (shared) {
          ps.integer(i < m->fences.size() ? m->fences[i] : 0);
          p.send_prepared(writes_[6].name, ps);
        } else {
          p.send_prepared(writes_[3].name, ps);
        }
        sent.push_back({});
      }
    }
  }

  // One try of the transaction, in one pipeline: BEGIN, the transaction's
  // id, every statement; COMMIT goes once the id is known, so that a
  // connection lost after it can be settled (committed or not) by asking
  // the server about that id. No sync point before COMMIT: after a failed
  // statement the server skips everything up to the sync point, so nothing
  // of a transaction that failed can commit.
  void transact(WriteOp* ops, std::size_t n, const std::vector<bool>& superseded, Attempt& a)
      REQUIRES(writer_mu_) {
    Conn& c = *writer_;
    pg::Pipeline p(c);
    p.send("BEGIN ISOLATION LEVEL READ COMMITTED");
    p.send("SELECT pg_current_xact_id()::text");
    p.flush_request();
    std::vector<Sent> sent;
    for (std::size_t i = 0; i < n; ++i) send_op(p, ops[i], superseded[i], sent);
    p.flush();
    std::optional<PgError> failed;
    auto check = [&](const pg::Result& r) {
      const auto st = PQresultStatus(r.get());
      if (!failed && st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        failed = st == PGRES_PIPELINE_ABORTED
                     ? PgError(ErrorCode::kIoError, "", false, "a statement was skipped")
                     : pg::error_of(c.get(), r.get());
      }
    };
    check(p.result());  // BEGIN
    {
      pg::Result id = p.result();
      check(id);
      if (PQresultStatus(id.get()) == PGRES_TUPLES_OK && PQntuples(id.get()) == 1) {
        a.xid = PQgetvalue(id.get(), 0, 0);
      }
    }
    if (!failed && !a.xid.empty()) {
      p.send("COMMIT");
      a.commit_sent = true;
    }
    p.sync();
    p.flush();
    a.refused.clear();
    for (const Sent& s : sent) {
      pg::Result r = p.result();
      check(r);
      if (s.fenced != nullptr && PQresultStatus(r.get()) == PGRES_COMMAND_OK &&
          std::string(PQcmdTuples(r.get())) == "0") {
        a.refused.push_back(s.fenced);
      }
    }
    if (a.commit_sent) check(p.result());
    p.expect_sync();
    p.end();
    if (failed) {
      if (PQtransactionStatus(c.get()) != PQTRANS_IDLE) c.exec_script("ROLLBACK");
      throw *failed;
    }
  }

  // Whether the transaction `xid`, whose COMMIT was sent on a connection
  // that then broke, committed. Asks on a new connection; waits while the
  // server still runs it.
  bool committed(const std::string& xid) REQUIRES(writer_mu_) {
    const auto deadline =
        steady_clock::now() + std::chrono::duration_cast<steady_clock::duration>(
                                  std::chrono::duration<double>(options_.connect_timeout_seconds));
    for (;;) {
      ensure_writer();
      pg::Params p;
      p.text(xid);
      pg::Result r = writer_->exec("SELECT pg_xact_status($1::xid8)", p);
      const std::string status = PQgetisnull(r.get(), 0, 0) ? "" : PQgetvalue(r.get(), 0, 0);
      if (status != "in progress") return status == "committed";
      if (steady_clock::now() >= deadline) {
        throw Error(ErrorCode::kIoError, "the connection to " + where_ +
                                             " broke during a commit, and the transaction " + xid +
                                             " is still in progress: its outcome is unknown");
      }
      std::this_thread::sleep_for(milliseconds(10));
    }
  }

  // WriteBackend: one transaction, tried again when its connection broke
  // (after reconnecting) or it lost to a serialization failure or deadlock.
  void write(WriteOp* ops, std::size_t n, const std::vector<bool>& superseded) override
      REQUIRES(!writer_mu_) {
    MutexLock g(writer_mu_);
    for (int attempt = 1;; ++attempt) {
      ensure_writer();
      Attempt a;
      try {
        transact(ops, n, superseded, a);
        for (const UpdateOp* u : a.refused) shared_->write_refused(u->task.id, u->fence);
        return;
      } catch (const PgError& e) {
        // A connection left in the middle of the protocol (or of a
        // transaction) is not used again.
        if (writer_ && !e.connection_lost() &&
            (PQpipelineStatus(writer_->get()) != PQ_PIPELINE_OFF ||
             PQtransactionStatus(writer_->get()) != PQTRANS_IDLE)) {
          writer_.reset();
        }
        if (e.connection_lost()) {
          writer_.reset();
          if (a.commit_sent && committed(a.xid)) return;
          if (attempt < kMaxAttempts) continue;
        } else if (e.transaction_conflict() && attempt < kMaxAttempts) {
          std::this_thread::sleep_for(milliseconds(5 << attempt));
          continue;
        } else if (e.data_refused()) {
          throw RejectedWrite(e.code(), e.what());
        }
        throw;
      }
    }
  }

  const std::string url_;  // may hold a password: never shown
  const PostgresStoreOptions options_;
  const std::string setup_;  // session_setup(options_)
  std::string where_;        // describe(); set in the constructor
  std::string schema_;       // set in the constructor
  // Set in the constructor, before any other thread runs: how tasks map
  // onto the table, and the writes prepared on the writer connection
  // (insert task, update task, insert event, insert metric).
  store::TaskLayout layout_;
  std::vector<Statement> writes_;

  // The writer connection: a commit of the queue, or a prune. It holds the
  // store lock.
  Mutex writer_mu_;
  std::unique_ptr<Conn> writer_ GUARDED_BY(writer_mu_);
  steady_clock::time_point writer_down_until_ GUARDED_BY(writer_mu_){};  // see ensure_writer
  std::string writer_down_why_ GUARDED_BY(writer_mu_);

  // The read pool: idle connections, and how many are lent out.
  Mutex pool_mu_;
  std::condition_variable pool_cv_;
  std::vector<std::unique_ptr<Conn>> idle_ GUARDED_BY(pool_mu_);
  std::size_t leased_ GUARDED_BY(pool_mu_) = 0;

  // Shared mode: the shared queue (claims, fences, heartbeats).
  std::unique_ptr<PostgresShared> shared_;

  // Last: its writer thread uses the members above.
  std::unique_ptr<WriteQueue> queue_;
};

}  // namespace
}  // namespace detail::postgres

std::shared_ptr<TaskStore> open_postgres_store(const std::string& url,
                                               PostgresStoreOptions options) {
  if (url.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "open_postgres_store needs a connection string");
  }
  if (options.read_connections < 1) {
    throw Error(ErrorCode::kInvalidArgument, "PostgresStoreOptions::read_connections must be >= 1");
  }
  if (!(options.statement_timeout_seconds >= 0) || !(options.connect_timeout_seconds > 0) ||
      options.max_batch < 1 || options.max_backlog < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "PostgresStoreOptions: statement_timeout_seconds must be >= 0, "
                "connect_timeout_seconds > 0, max_batch >= 1 and max_backlog >= 1");
  }
  if (auto problem = detail::store::status_map_problem(options.adopt.status_map)) {
    throw Error(ErrorCode::kInvalidArgument, "PostgresStoreOptions::adopt.status_map: " + *problem);
  }
  return std::make_shared<detail::postgres::PostgresStore>(url, std::move(options));
}

}  // namespace taskmgr
