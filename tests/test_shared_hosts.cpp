// Several host processes share one queue (storage.shared) on the throwaway
// PostgreSQL cluster: taskmgr_shared_host (shared_host.cpp) is each host.
// The checks read the shared tables and every host's execution log:
//
// - every task completed exactly once: one `completed` event, and the
//   result the row keeps is that of an execution of the row's attempt;
// - no attempt of a task ran on two hosts (a claim's attempt is its own);
// - every other execution is accounted for: its host was killed (SIGKILL)
//   before it could write, or it finished and was fenced out (its log says
//   `fenced`: its subscribers were told the lost claim's `cancelled`);
// - a host's subscribers were told `completed` only of the result the row
//   keeps, and once per task.
//
// TASKMGR_SHARED_TASKS sets the number of tasks (default 5000),
// TASKMGR_SHARED_KILLS the kills of the kill test (default 20) and
// TASKMGR_SHARED_LOADED_KILLS how many of them must come while tasks are
// still running (default all: the sanitizer presets, whose hosts start
// slower, run fewer tasks and ask for 5).
#include <doctest/doctest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "pg_test_support.hpp"

using namespace std::chrono_literals;
using taskmgr::test::PgSchema;

namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

struct HostArgs {
  std::string name;
  long create = 0;
  double lease_s = 5;
  double heartbeat_s = 1;
  int ms_min = 1;
  int ms_max = 20;
};

// A running taskmgr_shared_host.
class Host {
 public:
  Host(const PgSchema& s, const std::string& log, const HostArgs& a) : name_(a.name) {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    std::vector<std::string> args = {TASKMGR_SHARED_HOST,
                                     s.url(),
                                     s.name(),
                                     a.name,
                                     log,
                                     std::to_string(a.create),
                                     std::to_string(a.lease_s),
                                     std::to_string(a.heartbeat_s),
                                     std::to_string(a.ms_min),
                                     std::to_string(a.ms_max)};
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::dup2(fds[1], 1);
      ::close(fds[0]);
      ::close(fds[1]);
      std::vector<char*> argv;
      for (auto& x : args) argv.push_back(x.data());
      argv.push_back(nullptr);
      ::execv(TASKMGR_SHARED_HOST, argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_ = fds[0];
  }
  ~Host() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) ::close(out_);
  }
  Host(const Host&) = delete;
  Host& operator=(const Host&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& name() const { return name_; }

  // Reads its lines until one starts with `prefix`; false on a timeout or
  // when it exited.
  bool wait_line(const std::string& prefix, std::chrono::seconds timeout) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      std::size_t nl;
      while ((nl = buf_.find('\n')) != std::string::npos) {
        const std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        if (line.rfind(prefix, 0) == 0) return true;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          end - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
      char chunk[4096];
      const ssize_t n = ::read(out_, chunk, sizeof chunk);
      if (n <= 0) return false;
      buf_.append(chunk, static_cast<std::size_t>(n));
    }
  }

  // SIGTERM: it closes its manager and exits 0.
  void stop() {
    REQUIRE(pid_ > 0);
    ::kill(pid_, SIGTERM);
    CHECK(wait_line("CLOSED", 120s));
    int st = 0;
    REQUIRE(::waitpid(pid_, &st, 0) == pid_);
    CHECK_MESSAGE((WIFEXITED(st) && WEXITSTATUS(st) == 0), name_ << " exited with status " << st);
    pid_ = -1;
  }
  void kill9() {
    REQUIRE(pid_ > 0);
    ::kill(pid_, SIGKILL);
    int st = 0;
    REQUIRE(::waitpid(pid_, &st, 0) == pid_);
    CHECK((WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL));
    pid_ = -1;
  }
  void signal(int sig) { ::kill(pid_, sig); }

 private:
  std::string name_;
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buf_;
};

// A folder for the hosts' logs, removed at the end.
struct LogDir {
  std::string path;
  LogDir() {
    char tmpl[] = "/tmp/taskmgr-hosts.XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~LogDir() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::string log(const std::string& host) const { return path + "/" + host + ".log"; }
};

struct Line {
  std::string kind;  // start, end, fenced, told
  std::string task;
  int attempt = 0;
  long pid = 0;
};

std::vector<Line> read_log(const std::string& file) {
  std::vector<Line> out;
  std::ifstream in(file);
  std::string text;
  while (std::getline(in, text)) {
    std::istringstream ss(text);
    Line l;
    ss >> l.kind >> l.task >> l.attempt >> l.pid;
    REQUIRE_MESSAGE(!ss.fail(), "a broken log line: " << text);
    out.push_back(l);
  }
  return out;
}

std::int64_t terminal(PgSchema& s) {
  return s.scalar(
      "SELECT count(*) FROM tasks WHERE status IN ('completed', 'failed', 'cancelled')");
}

// Waits until `total` tasks ended (`limit` of no progress at all fails).
void wait_all_ended(PgSchema& s, std::int64_t total, std::chrono::seconds limit = 120s) {
  std::int64_t last = -1;
  auto progress = std::chrono::steady_clock::now();
  for (;;) {
    const std::int64_t n = terminal(s);
    if (n >= total) return;
    if (n != last) {
      last = n;
      progress = std::chrono::steady_clock::now();
    }
    REQUIRE_MESSAGE(std::chrono::steady_clock::now() - progress < limit,
                    "no task ended for " << limit.count() << " s: " << n << " of " << total);
    std::this_thread::sleep_for(100ms);
  }
}

struct Accounting {
  std::size_t executions = 0;  // end lines
  std::size_t extra = 0;       // executions whose result is not the one kept
  std::size_t fenced = 0;      // ... of which the host said it was fenced out
  std::size_t killed = 0;      // executions cut short or not written by a SIGKILL
  std::int64_t lost_claims = 0;
};

// The checks the file's comment lists; `killed` are the pids SIGKILLed.
Accounting check_exactly_once(PgSchema& s, const std::vector<std::string>& logs,
                              const std::set<long>& killed, std::int64_t total) {
  Accounting acc;
  CHECK(s.scalar("SELECT count(*) FROM tasks") == total);
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE status = 'completed'") == total);
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'completed'") == total);
  CHECK(s.scalar("SELECT count(*) FROM (SELECT task_id FROM task_events WHERE event_type = "
                 "'completed' GROUP BY task_id HAVING count(*) <> 1) x") == 0);
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE claimed_by IS NOT NULL") == 0);

  std::vector<Line> lines;
  for (const auto& f : logs)
    for (auto& l : read_log(f)) lines.push_back(std::move(l));
  using Key = std::tuple<std::string, int, long>;  // task, attempt, pid
  std::set<Key> started, ended, fenced;
  std::vector<Key> told;
  std::map<std::pair<std::string, int>, std::set<long>> runners;
  for (const auto& l : lines) {
    const Key k{l.task, l.attempt, l.pid};
    if (l.kind == "start") {
      started.insert(k);
      runners[{l.task, l.attempt}].insert(l.pid);
    } else if (l.kind == "end") {
      ended.insert(k);
    } else if (l.kind == "fenced") {
      fenced.insert(k);
    } else if (l.kind == "told") {
      told.push_back(k);
    }
  }
  // No attempt ran on two hosts.
  for (const auto& r : runners)  // not a structured binding: clang 14 cannot capture one
    CHECK_MESSAGE(r.second.size() == 1, "attempt " << r.first.second << " of " << r.first.first
                                                   << " ran in " << r.second.size()
                                                   << " processes");
  // Every started execution ended, unless its process was killed.
  for (const auto& k : started)
    if (!killed.count(std::get<2>(k)))
      CHECK_MESSAGE(ended.count(k) == 1, "an execution of " << std::get<0>(k) << " never ended");

  // The kept result is an execution of the row's attempt.
  std::set<Key> kept;
  taskmgr::detail::pg::Result r = s.conn().exec("SELECT id, attempt, result FROM tasks");
  REQUIRE(PQntuples(r.get()) == total);
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    const std::string id = PQgetvalue(r.get(), i, 0);
    const int attempt = std::atoi(PQgetvalue(r.get(), i, 1));
    long pid = 0;
    int result_attempt = 0;
    const int n = std::sscanf(PQgetvalue(r.get(), i, 2), "{\"pid\": %ld, \"attempt\": %d}", &pid,
                              &result_attempt);
    const int n2 = n == 2 ? 2
                          : std::sscanf(PQgetvalue(r.get(), i, 2), "{\"pid\":%ld,\"attempt\":%d}",
                                        &pid, &result_attempt);
    REQUIRE_MESSAGE(n2 == 2, "task " << id << " result " << PQgetvalue(r.get(), i, 2));
    CHECK_MESSAGE(result_attempt == attempt, "task " << id << " keeps attempt " << result_attempt
                                                     << "'s result, its row is at " << attempt);
    CHECK_MESSAGE(ended.count(Key{id, result_attempt, pid}) == 1,
                  "task " << id << " keeps a result no execution wrote");
    kept.insert(Key{id, result_attempt, pid});
  }

  // A host's subscribers were told `completed` only of the result the store
  // keeps, once per task (an outcome the fence refused is told as a lost
  // claim's `cancelled`: a "fenced" line). A host killed after the commit
  // may not have told it.
  std::map<std::string, int> told_per_task;
  for (const auto& k : told) {
    CHECK_MESSAGE(kept.count(k) == 1, "process " << std::get<2>(k) << " told `completed` of "
                                                 << std::get<0>(k) << " attempt " << std::get<1>(k)
                                                 << ", a result the store does not keep");
    ++told_per_task[std::get<0>(k)];
  }
  for (const auto& t : told_per_task)  // not a structured binding: clang 14 cannot capture one
    CHECK_MESSAGE(t.second == 1, "`completed` of " << t.first << " told " << t.second << " times");
  // With no host killed, every task's completion was told (hosts that close
  // deliver their events first).
  if (killed.empty()) CHECK(static_cast<std::int64_t>(told.size()) == total);

  // The fencing counters: every host's lost claims, from its last report.
  taskmgr::detail::pg::Result h =
      s.conn().exec("SELECT COALESCE(sum((report->>'lost_claims')::bigint), 0) FROM task_hosts");
  acc.lost_claims = std::atoll(PQgetvalue(h.get(), 0, 0));

  acc.executions = ended.size();
  std::size_t unaccounted = 0;
  for (const auto& k : ended) {
    if (kept.count(k)) continue;
    ++acc.extra;
    if (fenced.count(k)) {
      ++acc.fenced;
    } else if (killed.count(std::get<2>(k))) {
      ++acc.killed;
    } else {
      ++unaccounted;
      MESSAGE("an execution not kept and not fenced: " << std::get<0>(k) << " attempt "
                                                       << std::get<1>(k));
    }
  }
  // An execution that finished and was confirmed, and whose write the fence
  // then refused (its lease ran out in between), is a `fenced` line too:
  // its host tells the lost claim once the store refused the write.
  CHECK(unaccounted == 0);
  for (const auto& k : started)
    if (!ended.count(k)) ++acc.killed;
  return acc;
}

}  // namespace

TEST_CASE("shared hosts: three processes run 5000 tasks created from all three, each once") {
  PgSchema s;
  LogDir logs;
  const int total = env_int("TASKMGR_SHARED_TASKS", 5000);
  const char* names[] = {"a", "b", "c"};
  std::vector<std::unique_ptr<Host>> hosts;
  for (int i = 0; i < 3; ++i) {
    HostArgs a;
    a.name = names[i];
    a.create = total / 3 + (i < total % 3 ? 1 : 0);
    hosts.push_back(std::make_unique<Host>(s, logs.log(a.name), a));
  }
  for (auto& h : hosts) REQUIRE(h->wait_line("CREATED", 300s));
  wait_all_ended(s, total);
  for (auto& h : hosts) h->stop();
  const Accounting acc =
      check_exactly_once(s, {logs.log("a"), logs.log("b"), logs.log("c")}, {}, total);
  MESSAGE("executions " << acc.executions << ", extra " << acc.extra << " (fenced " << acc.fenced
                        << "), lost claims " << acc.lost_claims);
  // Every host ran some of them.
  for (const char* n : names)
    CHECK(s.scalar(std::string("SELECT count(*) FROM tasks WHERE run_host = '") + n + "'") > 0);
  CHECK(s.scalar("SELECT count(*) FROM task_hosts WHERE closed_at IS NULL") == 0);
}

TEST_CASE("shared hosts: one of three is killed at random points and restarted, no task is lost") {
  PgSchema s;
  LogDir logs;
  const int total = env_int("TASKMGR_SHARED_TASKS", 5000);
  const int kills = env_int("TASKMGR_SHARED_KILLS", 20);
  std::mt19937 rng(20261204);
  // Longer tasks than the first test (20-100 ms): the work lasts through
  // the kills. Short leases: rescues come within seconds.
  auto args = [&](const std::string& name, long create) {
    HostArgs a;
    a.name = name;
    a.create = create;
    a.lease_s = 2;
    a.heartbeat_s = 0.5;
    a.ms_min = 20;
    a.ms_max = 100;
    return a;
  };
  std::vector<std::string> files = {logs.log("a"), logs.log("b")};
  auto a = std::make_unique<Host>(s, logs.log("a"), args("a", total / 3));
  auto b = std::make_unique<Host>(s, logs.log("b"), args("b", total / 3));
  REQUIRE(a->wait_line("CREATED", 300s));
  REQUIRE(b->wait_line("CREATED", 300s));
  const int loaded_needed = env_int("TASKMGR_SHARED_LOADED_KILLS", kills);
  std::set<long> killed;
  std::int64_t ended_at_last_kill = 0;
  int loaded_kills = 0;  // kills that came while tasks were still running
  {
    // The victim creates its share first, then is killed again and again.
    auto c = std::make_unique<Host>(s, logs.log("c0"), args("c", total - 2 * (total / 3)));
    files.push_back(logs.log("c0"));
    REQUIRE(c->wait_line("CREATED", 300s));
    for (int k = 0; k < kills; ++k) {
      CAPTURE(k);
      std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 1300));
      killed.insert(c->pid());
      c->kill9();
      ended_at_last_kill = terminal(s);
      loaded_kills += ended_at_last_kill < total ? 1 : 0;
      const std::string log = logs.log("c" + std::to_string(k + 1));
      files.push_back(log);
      c = std::make_unique<Host>(s, log, args("c", 0));
      REQUIRE(c->wait_line("READY", 120s));
    }
    MESSAGE(kills << " kills; " << ended_at_last_kill << " of " << total
                  << " tasks had ended at the last one");
    // The kills came while the work ran.
    CHECK(loaded_kills >= loaded_needed);
    wait_all_ended(s, total);
    c->stop();
  }
  a->stop();
  b->stop();
  const Accounting acc = check_exactly_once(s, files, killed, total);
  MESSAGE("executions " << acc.executions << ", extra " << acc.extra << " (fenced " << acc.fenced
                        << ", killed " << acc.killed << "), lost claims " << acc.lost_claims);
  // Rescued tasks show host_lost retries, attempt counted.
  const std::int64_t rescued = s.scalar(
      "SELECT count(*) FROM task_events WHERE event_type = 'retried' AND details->>'reason' = "
      "'host_lost'");
  MESSAGE(rescued << " host_lost retries");
  CHECK(rescued > 0);
  CHECK(s.scalar("SELECT count(*) FROM tasks WHERE attempt > 1") > 0);
  // Each killed process left its host row open (shown lost once its lease
  // ran out); the three that stopped closed theirs.
  CHECK(s.scalar("SELECT count(*) FROM task_hosts WHERE closed_at IS NULL") == kills);
  CHECK(s.scalar("SELECT count(*) FROM task_hosts WHERE closed_at IS NOT NULL") == 3);
}

TEST_CASE(
    "shared hosts: a paused host loses its lease, its task completes elsewhere, and its "
    "late result is fenced out") {
  PgSchema s;
  LogDir logs;
  HostArgs pa;
  pa.name = "paused";
  pa.create = 1;
  pa.lease_s = 2;
  pa.heartbeat_s = 0.5;
  pa.ms_min = pa.ms_max = 4000;
  Host a(s, logs.log("paused"), pa);
  REQUIRE(a.wait_line("CREATED", 120s));
  const std::string id = s.text("SELECT id FROM tasks");
  // Wait until it runs on A, then freeze A.
  for (int i = 0; i < 600 && read_log(logs.log("paused")).empty(); ++i)
    std::this_thread::sleep_for(50ms);
  REQUIRE(read_log(logs.log("paused")).size() == 1);
  a.signal(SIGSTOP);
  HostArgs ba = pa;
  ba.name = "other";
  ba.create = 0;
  Host b(s, logs.log("other"), ba);
  REQUIRE(b.wait_line("READY", 120s));
  wait_all_ended(s, 1);
  CHECK(s.text("SELECT run_host FROM tasks") == "other");
  CHECK(s.scalar("SELECT attempt FROM tasks") == 2);
  CHECK(s.scalar("SELECT count(*) FROM task_events WHERE event_type = 'retried' AND "
                 "details->>'reason' = 'host_lost'") == 1);
  // A resumes: its service finishes, and the manager finds the claim lost.
  a.signal(SIGCONT);
  bool fenced = false;
  for (int i = 0; i < 600 && !fenced; ++i) {
    for (const auto& l : read_log(logs.log("paused"))) fenced = fenced || l.kind == "fenced";
    if (!fenced) std::this_thread::sleep_for(50ms);
  }
  CHECK(fenced);
  const long a_pid = a.pid();
  a.stop();
  b.stop();
  const Accounting acc = check_exactly_once(s, {logs.log("paused"), logs.log("other")}, {}, 1);
  CHECK(acc.executions == 2);
  CHECK(acc.fenced == 1);
  // The row keeps the other host's result, not the paused one's.
  const std::string result = s.text("SELECT result FROM tasks");
  CHECK(result.find(std::to_string(a_pid) + ",") == std::string::npos);
}
