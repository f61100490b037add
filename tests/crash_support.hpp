// Helpers of the kill -9 tests (test_crash.cpp on SQLite, and
// test_postgres_store.cpp on PostgreSQL): the child process they kill, its
// acknowledgements, and the replay of a task's events to its status.
#pragma once

#include <doctest/doctest.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <vector>

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

}  // namespace taskmgr::test
