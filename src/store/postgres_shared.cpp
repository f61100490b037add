// The shared queue of the PostgreSQL store (shared_queue.hpp): claims,
// leases and their fence, heartbeats, rescue, notifications and the
// cluster view, on connections of its own (one for claims and controls,
// one for heartbeats and rescues, one that listens). docs/SCALING.md.
#include "postgres_shared.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <thread>

#include "taskmgr/error.hpp"

namespace taskmgr::detail::postgres {
namespace {

using pg::Conn;
using pg::PgError;
using pg::Result;

std::string text(const PGresult* r, int row, int col) {
  return PQgetisnull(r, row, col) ? std::string() : std::string(PQgetvalue(r, row, col));
}

std::int64_t integer(const PGresult* r, int row, int col) {
  return PQgetisnull(r, row, col) ? 0 : std::strtoll(PQgetvalue(r, row, col), nullptr, 10);
}

Timestamp time_of(const PGresult* r, int row, int col) {
  return pg::parse_timestamp(text(r, row, col)).value_or(Timestamp{});
}

// A PostgreSQL array literal of text values ({"a","b\"c"}).
std::string text_array(const std::vector<std::string>& v) {
  std::string out = "{";
  for (std::size_t i = 0; i < v.size(); ++i) {
    out += i == 0 ? "\"" : ",\"";
    for (char c : pg::storable_text(v[i])) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  }
  return out + "}";
}

std::string hex32(std::uint32_t v) {
  char b[9];
  std::snprintf(b, sizeof b, "%08x", v);
  return b;
}

// FNV-1a: the channel of a schema ("taskmgr_<hash>": a channel name must
// be an identifier of at most 63 bytes, a schema name need not be).
std::uint32_t fnv1a(const std::string& s) {
  std::uint32_t h = 2166136261u;
  for (unsigned char c : s) h = (h ^ c) * 16777619u;
  return h;
}

constexpr const char* kNow = "(now() AT TIME ZONE 'UTC')";

}  // namespace

PostgresShared::PostgresShared(Settings s)
    : s_(std::move(s)),
      channel_("taskmgr_" + hex32(fnv1a(s_.schema))),
      wake_fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (wake_fd_ < 0) throw Error(ErrorCode::kIoError, "eventfd failed");
  char name[256] = {};
  if (s_.cluster.host_name.empty()) {
    if (::gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') {
      std::snprintf(name, sizeof name, "host");
    }
    s_.cluster.host_name = name;
  }
  host_id_ = host_id_name(s_.cluster.host_name) + "/" + std::to_string(::getpid()) + "/" +
             generate_task_id().substr(28, 8);
  MutexLock g(work_mu_);
  work_ = connect();
  pg::Params p;
  p.text(host_id_).text(s_.cluster.host_name).integer(::getpid());
  p.text(std::to_string(s_.cluster.lease_seconds));
  work_->exec(std::string("INSERT INTO task_hosts (id, host_name, pid, started_at, heartbeat_at, "
                          "lease_seconds) VALUES ($1, $2, $3, ") +
                  kNow + ", " + kNow + ", $4::double precision)",
              p);
}

PostgresShared::~PostgresShared() {
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

std::unique_ptr<Conn> PostgresShared::connect() const {
  return std::make_unique<Conn>(s_.url, s_.connect_timeout_seconds, s_.setup);
}

std::string PostgresShared::lease_interval() const {
  return "make_interval(secs => " + std::to_string(s_.cluster.lease_seconds) + ")";
}

template <typename F>
auto PostgresShared::on(std::unique_ptr<Conn>& c, const char* what, F&& f) {
  for (int attempt = 1;; ++attempt) {
    try {
      if (!c || c->broken()) c = connect();
      return f(*c);
    } catch (const PgError& e) {
      const bool retry = e.connection_lost() || e.transaction_conflict();
      if (c && (e.connection_lost() || PQtransactionStatus(c->get()) != PQTRANS_IDLE)) c.reset();
      if (retry && attempt < 3) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20 * attempt));
        continue;
      }
      throw Error(e.code(), std::string(what) + " in " + s_.where + " failed: " + e.what());
    }
  }
}

std::vector<ClaimedTask> PostgresShared::claim(const ClaimRequest& r) {
  if (r.max_tasks == 0 || r.services.empty()) return {};
  const std::string list = s_.layout.select_list(pg::quote_ident, "octet_length", true, false);
  const std::string sql =
      "WITH picked AS (SELECT id AS picked_id FROM tasks WHERE status = 'queued' AND claimed_by "
      "IS NULL AND service = ANY($1::text[]) AND coalesce(estimated_memory_mb, 0) <= $2 AND "
      "(requested_device IS NULL OR requested_device = ANY($3::text[])) AND NOT (id = "
      "ANY($7::text[])) ORDER BY priority DESC, queued_at, id LIMIT $4 FOR UPDATE SKIP LOCKED) "
      "UPDATE tasks SET claimed_by = $5, claim = "
      "nextval('task_claims'), lease_expires_at = " +
      std::string(kNow) + " + " + lease_interval() +
      ", run_host = $6, cancel_requested = FALSE FROM picked WHERE tasks.id = picked.picked_id "
      "RETURNING " +
      list + ", claim";
  // Never a task this host holds or still runs under a claim it lost: a
  // claim's token is the fence of its writes, one per task here.
  std::vector<std::string> exclude = r.exclude;
  {
    MutexLock g(claims_mu_);
    for (const auto& [id, token] : claims_) exclude.push_back(id);
    exclude.insert(exclude.end(), retired_.begin(), retired_.end());
  }
  std::vector<ClaimedTask> out;
  {
    MutexLock g(work_mu_);
    on(work_, "claiming tasks", [&](Conn& c) {
      pg::Params p;
      p.text(text_array(r.services)).integer(r.max_memory_mb).text(text_array(r.devices));
      p.integer(static_cast<std::int64_t>(r.max_tasks)).text(host_id_).text(s_.cluster.host_name);
      p.text(text_array(exclude));
      Result res = c.exec_prepared("taskmgr_claim", sql, p);
      out.clear();
      for (int i = 0; i < PQntuples(res.get()); ++i) {
        out.push_back({read_task(res.get(), i, s_.layout), integer(res.get(), i, kClaimColumn)});
      }
      return 0;
    });
  }
  // The statement returns its rows in no particular order.
  std::sort(out.begin(), out.end(), [](const ClaimedTask& a, const ClaimedTask& b) {
    if (a.task.priority != b.task.priority) return a.task.priority > b.task.priority;
    const Timestamp qa = a.task.queued_at.value_or(a.task.created_at);
    const Timestamp qb = b.task.queued_at.value_or(b.task.created_at);
    return qa != qb ? qa < qb : a.task.id < b.task.id;
  });
  MutexLock g(claims_mu_);
  for (const auto& c : out) {
    claims_[c.task.id] = c.claim;
    refused_.erase(c.task.id);  // a write refused under an earlier claim says nothing of this one
  }
  return out;
}

bool PostgresShared::confirm(const std::string& id) {
  const std::int64_t token = fence_of(id);
  if (token == 0) return false;
  bool held = false;
  {
    MutexLock g(work_mu_);
    held = on(work_, "renewing a lease", [&](Conn& c) {
      pg::Params p;
      p.text(id).text(host_id_).integer(token);
      Result r = c.exec_prepared("taskmgr_confirm",
                                 "UPDATE tasks SET lease_expires_at = " + std::string(kNow) +
                                     " + " + lease_interval() +
                                     " WHERE id = $1 AND claimed_by = $2 AND claim = $3",
                                 p);
      return std::string(PQcmdTuples(r.get())) == "1";
    });
  }
  if (!held) lost(id, token);
  return held;
}

void PostgresShared::release(const std::vector<std::string>& ids) {
  std::vector<std::pair<std::string, std::int64_t>> held;
  {
    MutexLock g(claims_mu_);
    for (const auto& id : ids) {
      auto it = claims_.find(id);
      if (it != claims_.end()) held.emplace_back(id, it->second);
    }
  }
  if (held.empty()) return;
  {
    MutexLock g(work_mu_);
    on(work_, "giving claims back", [&](Conn& c) {
      for (const auto& [id, token] : held) {
        pg::Params p;
        p.text(id).text(host_id_).integer(token);
        c.exec_prepared("taskmgr_release",
                        "UPDATE tasks SET claimed_by = NULL, claim = NULL, lease_expires_at = "
                        "NULL, run_host = NULL, assigned_device = coalesce(requested_device, "
                        "assigned_device) WHERE id = $1 AND claimed_by = $2 AND claim = $3 AND "
                        "status = 'queued'",
                        p);
      }
      return 0;
    });
  }
  {
    MutexLock g(claims_mu_);
    for (const auto& h : held) claims_.erase(h.first);
  }
  notify_work();
}

std::int64_t PostgresShared::fence_of(const std::string& id) const {
  MutexLock g(claims_mu_);
  auto it = claims_.find(id);
  return it == claims_.end() ? 0 : it->second;
}

void PostgresShared::forget(const std::string& id) {
  MutexLock g(claims_mu_);
  claims_.erase(id);
  retired_.erase(id);
}

void PostgresShared::lost(const std::string& id, std::int64_t token) {
  MutexLock g(claims_mu_);
  auto it = claims_.find(id);
  if (it != claims_.end() && it->second == token) {
    claims_.erase(it);
    retired_.insert(id);  // until its record's last write (forget)
  }
  if (token != 0 && counted_lost_.emplace(id, token).second) {
    ++lost_claims_;
    lost_ids_.push_back(id);
  }
}

void PostgresShared::write_refused(const std::string& id, std::int64_t token) {
  {
    MutexLock g(claims_mu_);
    const std::uint64_t n = ++refusals_;
    refused_[id] = n;
    refused_order_.emplace_back(id, n);
    while (refused_order_.size() > kRefusedKept) {
      const auto& [old_id, old_n] = refused_order_.front();
      auto it = refused_.find(old_id);
      if (it != refused_.end() && it->second == old_n) refused_.erase(it);  // not refused since
      refused_order_.pop_front();
    }
  }
  lost(id, token);
}

bool PostgresShared::take_refused(const std::string& id) {
  MutexLock g(claims_mu_);
  // Its entry in refused_order_ stays until it reaches the front (then the
  // number no longer matches, or the id is gone).
  return refused_.erase(id) > 0;
}

std::uint64_t PostgresShared::lost_claims() const {
  MutexLock g(claims_mu_);
  return lost_claims_;
}

std::vector<std::string> PostgresShared::take_lost() {
  MutexLock g(claims_mu_);
  std::vector<std::string> out;
  out.swap(lost_ids_);
  return out;
}

HeartbeatAnswer PostgresShared::heartbeat(const std::string& report_json, const RescueFn& rescue,
                                          std::optional<Timestamp> queued_before) {
  HeartbeatAnswer a;
  std::unordered_map<std::string, std::int64_t> before;
  {
    MutexLock g(claims_mu_);
    before = claims_;
  }
  std::unordered_map<std::string, std::int64_t> found;
  MutexLock g(beat_mu_);
  on(beat_, "the heartbeat", [&](Conn& c) {
    found.clear();
    a.cancel_requested.clear();
    c.exec_script("BEGIN");
    pg::Params h;
    h.text(host_id_).jsonb(report_json);
    c.exec_prepared("taskmgr_beat_host",
                    "UPDATE task_hosts SET heartbeat_at = " + std::string(kNow) +
                        ", report = $2::jsonb, closed_at = NULL WHERE id = $1",
                    h);
    // Rows the host's writer holds locked now are skipped: it is writing
    // them, and every fenced write renews the lease too.
    pg::Params p;
    p.text(host_id_);
    c.exec_prepared("taskmgr_beat_renew",
                    "UPDATE tasks SET lease_expires_at = " + std::string(kNow) + " + " +
                        lease_interval() +
                        " WHERE id IN (SELECT id FROM tasks WHERE claimed_by = $1 FOR UPDATE "
                        "SKIP LOCKED)",
                    p);
    pg::Params q;
    q.text(host_id_);
    Result r =
        c.exec_prepared("taskmgr_beat_held",
                        "SELECT id, claim, cancel_requested FROM tasks WHERE claimed_by = $1", q);
    c.exec_script("COMMIT");
    for (int i = 0; i < PQntuples(r.get()); ++i) {
      found.emplace(text(r.get(), i, 0), integer(r.get(), i, 1));
      if (text(r.get(), i, 2) == "t") a.cancel_requested.push_back(text(r.get(), i, 0));
    }
    return 0;
  });
  // A claim held before the heartbeat read the table, still held here, and
  // not in the table with its token: lost (rescued by another host). Claims
  // made or ended meanwhile are judged at the next heartbeat.
  for (const auto& [id, token] : before) {
    auto f = found.find(id);
    if (f != found.end() && f->second == token) continue;
    if (fence_of(id) == token) {
      lost(id, token);
      a.lost.push_back(id);
    }
  }
  a.rescued = rescue_expired(rescue, queued_before);
  if (a.rescued > 0) notify_work();
  return a;
}

std::size_t PostgresShared::rescue_expired(const RescueFn& rescue,
                                           std::optional<Timestamp> queued_before)
    REQUIRES(beat_mu_) {
  const std::string list = s_.layout.select_list(pg::quote_ident, "octet_length", true, false);
  const std::string update = rescue_statement();
  return on(beat_, "rescuing tasks", [&](Conn& c) -> std::size_t {
    c.exec_script("BEGIN");
    pg::Params l;
    l.text(s_.schema);
    Result got =
        c.exec("SELECT pg_try_advisory_xact_lock(hashtext('taskmgr.rescue'), hashtext($1))", l);
    if (text(got.get(), 0, 0) != "t") {
      c.exec_script("COMMIT");
      return 0;  // another host is rescuing
    }
    pg::Params p;
    p.integer(static_cast<std::int64_t>(s_.cluster.rescue_batch));
    Result r =
        c.exec_prepared("taskmgr_rescue_select",
                        "SELECT " + list +
                            ", claimed_by FROM tasks WHERE claimed_by IS NOT "
                            "NULL AND lease_expires_at < " +
                            kNow + " ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
                        p);
    int n = PQntuples(r.get());
    auto apply = [&](const Result& rows, int i, const std::string& lost_host) {
      Task t = read_task(rows.get(), i, s_.layout);
      std::vector<EventRecord> events = rescue(t, lost_host);
      pg::Params u = update_task_params(s_.layout, t);
      c.exec_prepared("taskmgr_rescue_update", update, u);
      for (const EventRecord& e : events) {
        pg::Params ep = insert_event_params(e);
        c.exec_prepared(insert_event_statement().name, insert_event_statement().sql, ep);
      }
    };
    for (int i = 0; i < n; ++i) apply(r, i, text(r.get(), i, kClaimColumn));
    // Tasks no host claimed within their queue timeout.
    if (queued_before) {
      pg::Params w;
      w.timestamp(*queued_before).integer(static_cast<std::int64_t>(s_.cluster.rescue_batch));
      Result old = c.exec_prepared(
          "taskmgr_expire_select",
          "SELECT " + list +
              ", claimed_by FROM tasks WHERE status = 'queued' AND claimed_by IS NULL AND "
              "queued_at < $1 ORDER BY queued_at LIMIT $2 FOR UPDATE SKIP LOCKED",
          w);
      for (int i = 0; i < PQntuples(old.get()); ++i) apply(old, i, "");
      n += PQntuples(old.get());
    }
    // Hosts gone for a day are forgotten (their tasks were rescued long since).
    if (n == 0) {
      c.exec_script(
          std::string("DELETE FROM task_hosts WHERE coalesce(closed_at, heartbeat_at) < ") + kNow +
          " - interval '1 day'");
    }
    c.exec_script("COMMIT");
    return static_cast<std::size_t>(n);
  });
}

// The rescue's write: the row as the rescue left it, its claim cleared.
std::string PostgresShared::rescue_statement() const {
  Statement s = update_task_statement(s_.layout);
  const auto where = s.sql.rfind(" WHERE ");
  return s.sql.substr(0, where) +
         ", claimed_by = NULL, claim = NULL, lease_expires_at = NULL, cancel_requested = FALSE" +
         s.sql.substr(where);
}

SharedChange PostgresShared::change_unclaimed(const std::string& id, const ChangeFn& change) {
  const std::string list = s_.layout.select_list(pg::quote_ident, "octet_length", true, false);
  const std::string update = update_task_statement(s_.layout).sql;
  SharedChange out;
  bool queued = false;
  {
    MutexLock g(work_mu_);
    on(work_, "changing a task", [&](Conn& c) {
      out = SharedChange{};
      c.exec_script("BEGIN");
      pg::Params p;
      p.text(id);
      Result r =
          c.exec_prepared("taskmgr_change_select",
                          "SELECT " + list + ", claimed_by FROM tasks WHERE id = $1 FOR UPDATE", p);
      if (PQntuples(r.get()) == 0) {
        c.exec_script("COMMIT");
        return 0;
      }
      Task t = read_task(r.get(), 0, s_.layout);
      if (!PQgetisnull(r.get(), 0, kClaimColumn)) {
        c.exec_script("COMMIT");
        out.task = std::move(t);  // a host holds it: not changed here
        return 0;
      }
      std::optional<std::vector<EventRecord>> events = change(t);
      if (events) {
        pg::Params u = update_task_params(s_.layout, t);
        c.exec_prepared("taskmgr_change_update", update, u);
        for (const EventRecord& e : *events) {
          pg::Params ep = insert_event_params(e);
          c.exec_prepared(insert_event_statement().name, insert_event_statement().sql, ep);
        }
        out.applied = true;
        queued = t.status == TaskStatus::kQueued;
      }
      c.exec_script("COMMIT");
      out.task = std::move(t);
      return 0;
    });
  }
  if (queued) notify_work();
  return out;
}

bool PostgresShared::request_cancel(const std::string& id) {
  MutexLock g(work_mu_);
  return on(work_, "asking for a cancel", [&](Conn& c) {
    pg::Params p;
    p.text(id).text(channel_);
    Result r = c.exec_prepared(
        "taskmgr_request_cancel",
        "WITH asked AS (UPDATE tasks SET cancel_requested = TRUE WHERE id = $1 AND claimed_by IS "
        "NOT NULL RETURNING claimed_by) SELECT pg_notify($2, 'cancel ' || claimed_by) FROM asked",
        p);
    return PQntuples(r.get()) > 0;
  });
}

void PostgresShared::notify_work() {
  try {
    MutexLock g(work_mu_);
    on(work_, "notifying the hosts", [&](Conn& c) {
      pg::Params p;
      p.text(channel_);
      c.exec("SELECT pg_notify($1, 'work')", p);
      return 0;
    });
  } catch (const Error&) {
    // A missed notification only delays: the other hosts poll.
  }
}

bool PostgresShared::wait_for_work(double seconds) {
  MutexLock g(listen_mu_);
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(seconds));
  if (!listen_ || listen_->broken()) {
    try {
      listen_ = connect();
      listen_->exec_script("LISTEN " + pg::quote_ident(channel_));
    } catch (const PgError&) {
      listen_.reset();  // polled instead, until the server is back
    }
  }
  for (;;) {
    bool notified = false;
    if (listen_) {
      PQconsumeInput(listen_->get());
      while (PGnotify* n = PQnotifies(listen_->get())) {
        const std::string payload = n->extra != nullptr ? n->extra : "";
        PQfreemem(n);
        // Work for every host; a cancel for the host it names.
        if (payload == "work" || payload == "cancel " + host_id_) notified = true;
      }
    }
    if (notified) return true;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    const int ms = static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1);
    pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {listen_ ? PQsocket(listen_->get()) : -1, POLLIN, 0}};
    const int r = ::poll(fds, listen_ ? 2 : 1, ms);
    if (r < 0 && errno != EINTR) return false;
    if (fds[0].revents & POLLIN) {
      std::uint64_t v;
      while (::read(wake_fd_, &v, sizeof v) > 0) {
      }
      return true;
    }
    if (listen_ && (fds[1].revents & (POLLERR | POLLHUP | POLLNVAL))) {
      listen_.reset();
      return false;
    }
  }
}

void PostgresShared::wake() {
  const std::uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);
}

ClusterStatus PostgresShared::cluster() {
  ClusterStatus out;
  out.host_id = host_id_;
  MutexLock g(work_mu_);
  on(work_, "reading the cluster", [&](Conn& c) {
    out.hosts.clear();
    Result r = c.exec(
        std::string("SELECT h.id, h.host_name, h.pid, h.started_at, h.heartbeat_at, "
                    "h.lease_seconds, h.closed_at, h.report::text, h.closed_at IS NULL AND "
                    "h.heartbeat_at + make_interval(secs => h.lease_seconds) < ") +
        kNow +
        ", (SELECT count(*) FROM tasks t WHERE t.claimed_by = h.id), (SELECT count(*) FROM "
        "tasks t WHERE t.claimed_by = h.id AND t.status = 'running') FROM task_hosts h ORDER BY "
        "h.id");
    for (int i = 0; i < PQntuples(r.get()); ++i) {
      HostStatus h;
      h.id = text(r.get(), i, 0);
      h.host_name = text(r.get(), i, 1);
      h.pid = integer(r.get(), i, 2);
      h.started_at = time_of(r.get(), i, 3);
      h.heartbeat_at = time_of(r.get(), i, 4);
      h.lease_seconds = std::strtod(text(r.get(), i, 5).c_str(), nullptr);
      if (!PQgetisnull(r.get(), i, 6)) h.closed_at = time_of(r.get(), i, 6);
      h.report_json = pg::compact_jsonb(text(r.get(), i, 7));
      h.lost = text(r.get(), i, 8) == "t";
      h.claimed = integer(r.get(), i, 9);
      h.running = integer(r.get(), i, 10);
      out.hosts.push_back(std::move(h));
    }
    Result q = c.exec(
        "SELECT count(*) FILTER (WHERE status = 'queued' AND claimed_by IS NULL), count(*) "
        "FILTER (WHERE status = 'pending') FROM tasks WHERE status IN ('queued', 'pending')");
    out.queued = integer(q.get(), 0, 0);
    out.pending = integer(q.get(), 0, 1);
    return 0;
  });
  return out;
}

void PostgresShared::close_host() {
  try {
    MutexLock g(work_mu_);
    on(work_, "closing the host", [&](Conn& c) {
      pg::Params p;
      p.text(host_id_);
      c.exec(std::string("UPDATE task_hosts SET closed_at = ") + kNow + " WHERE id = $1", p);
      return 0;
    });
  } catch (const Error&) {
    // Shown as lost once its heartbeat is old: the same to the others.
  }
}

}  // namespace taskmgr::detail::postgres
