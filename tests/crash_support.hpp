// Helpers of the kill -9 tests (test_crash.cpp on SQLite, and
// test_postgres_store.cpp on PostgreSQL): the child process they kill, its
// acknowledgements, the replay of a task's events to its status, the kill
// loop and the recovery after it.
#pragma once

#include <doctest/doctest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "taskmgr/taskmgr.hpp"

namespace taskmgr::test {

struct Child {
  pid_t pid = -1;
  int out = -1;
};

// Starts taskmgr_crash_child with `args`, its stdout to a pipe.
inline Child spawn_crash_child(const std::vector<std::string>& args) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(TASKMGR_CRASH_CHILD));
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(TASKMGR_CRASH_CHILD, argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  return {pid, fds[0]};
}

// Reads the child's lines for `run` of real time (from now), and at least
// until it is READY and acknowledged `min_acks` tasks (however slow it is:
// under a sanitizer on a loaded machine `run` may end before any); returns
// the acknowledged ids.
inline std::vector<std::string> read_acks(const Child& c, std::chrono::milliseconds run,
                                          bool* ready, std::size_t min_acks = 0) {
  std::vector<std::string> acks;
  std::string buf;
  const auto end = std::chrono::steady_clock::now() + run;
  bool started = false;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    const bool enough = acks.size() >= min_acks;
    // Until READY and the acks wanted, wait for the child (slow under
    // sanitizers).
    const int timeout =
        started && enough ? static_cast<int>(std::max<long>(0, left.count())) : 30000;
    if (started && enough && left.count() <= 0) break;
    pollfd p{c.out, POLLIN, 0};
    if (::poll(&p, 1, timeout) <= 0) break;
    char chunk[4096];
    const ssize_t n = ::read(c.out, chunk, sizeof chunk);
    if (n <= 0) break;
    buf.append(chunk, static_cast<std::size_t>(n));
    std::size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      const std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      if (line == "READY") started = true;
      if (line.rfind("ACK ", 0) == 0) acks.push_back(line.substr(4));
    }
  }
  *ready = started;
  return acks;
}

// The status a task has after `event`, from `current`.
inline std::string status_after(const std::string& event, const std::string& current) {
  static const std::map<std::string, std::string> changes = {
      {"created", "pending"},    {"queued", "queued"},       {"started", "running"},
      {"retried", "queued"},     {"completed", "completed"}, {"failed", "failed"},
      {"cancelled", "cancelled"}};
  auto it = changes.find(event);
  return it == changes.end() ? current : it->second;
}

inline bool is_terminal_event(const std::string& event) {
  return event == "completed" || event == "failed" || event == "cancelled";
}

// How many kills a kill -9 test makes: TASKMGR_CRASH_KILLS, else 50.
inline int crash_kills() {
  const char* k = std::getenv("TASKMGR_CRASH_KILLS");
  return k ? std::atoi(k) : 50;
}

struct KillLoop {
  std::set<std::string> acked;  // every task a child acknowledged
  int killed = 0;               // children that died of the SIGKILL
};

// Starts taskmgr_crash_child with `args` `kills` times, each killed with
// SIGKILL at a random point (seeded by `seed`) after it is up, and calls
// `check(acked)` on the store after each kill. Half the kills come at a
// random time after the child is up (its recovered tasks running), half
// also after it acknowledged a few tasks: enough work between kills
// whatever the machine's speed.
template <typename Check>
KillLoop kill_loop(int kills, unsigned seed, const std::vector<std::string>& args, Check&& check) {
  KillLoop out;
  std::mt19937 rng(seed);
  for (int k = 0; k < kills; ++k) {
    CAPTURE(k);
    Child c = spawn_crash_child(args);
    bool ready = false;
    const auto run = std::chrono::milliseconds(10 + rng() % 150);
    const std::size_t min_acks = k % 2 == 0 ? 0 : 3;
    for (auto& id : read_acks(c, run, &ready, min_acks)) out.acked.insert(std::move(id));
    REQUIRE(ready);
    ::kill(c.pid, SIGKILL);
    int st = 0;
    ::waitpid(c.pid, &st, 0);
    ::close(c.out);
    out.killed += WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL;
    check(out.acked);
  }
  CHECK(out.killed == kills);
  CHECK(out.acked.size() > static_cast<std::size_t>(kills));
  return out;
}

// After the kills: a manager on the store `c` names recovers every task,
// the pending ones are started, and each reaches a terminal state with its
// cleanup done.
inline void recover_after_kills(Config c) {
  c.tasks.max_queue_size = 1000000;
  c.tasks.retry.backoff_base_seconds = 0.001;
  TaskManagerOptions o;
  o.log_sink = [](LogLevel, std::string_view) {};
  o.services.push_back(make_function_service("svc", [](TaskContext&) {}));
  TaskManager tm(c, o);
  TaskFilter pending;
  pending.status = TaskStatus::kPending;
  for (const Task& t : tm.list_tasks(pending)) tm.start_task(t.id);
  REQUIRE(tm.wait_idle(std::chrono::seconds(120)));
  for (const Task& t : tm.list_tasks()) {
    CAPTURE(t.id);
    CHECK(is_terminal(t.status));
    CHECK(t.resource_cleanup_completed);
  }
}

}  // namespace taskmgr::test
