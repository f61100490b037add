// Durability under kill -9: a real child process creates, starts and
// completes tasks on a database file and is killed at random points, many
// times. After every kill the file must hold every acknowledged task, pass
// PRAGMA integrity_check, have no task in two terminal states, and each
// task's events must replay to its status; after recovery every task ends in
// exactly one terminal state.
#include <doctest/doctest.h>

#include <SQLiteCpp/SQLiteCpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>

#include "crash_support.hpp"
#include "event_keys.hpp"
#include "test_support.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// Checks the file as the killed process left it. Returns the number of tasks.
std::size_t check_file(const std::string& db, const std::set<std::string>& acked) {
  SQLite::Database d(db, SQLite::OPEN_READONLY);
  CHECK(d.execAndGet("PRAGMA integrity_check").getString() == "ok");
  std::map<std::string, std::string> status;
  SQLite::Statement q(d, "SELECT id, status FROM tasks");
  while (q.executeStep()) status[q.getColumn(0).getString()] = q.getColumn(1).getString();
  for (const auto& id : acked) {
    CAPTURE(id);
    CHECK(status.count(id) == 1);  // every acknowledged task survived
  }
  std::map<std::string, std::string> replay;
  std::map<std::string, int> terminal;
  SQLite::Statement e(d, "SELECT task_id, event_type FROM task_events ORDER BY id");
  while (e.executeStep()) {
    const std::string id = e.getColumn(0).getString();
    const std::string ev = e.getColumn(1).getString();
    replay[id] = status_after(ev, replay[id]);
    if (is_terminal_event(ev)) ++terminal[id];
  }
  // Every event in the file, written by runs that were killed and runs that
  // recovered them, has its documented keys (docs/EVENTS.md).
  SQLite::Statement k(d, "SELECT event_type, details FROM task_events ORDER BY id");
  while (k.executeStep()) {
    const auto ev = parse_task_event(k.getColumn(0).getString());
    REQUIRE(ev.has_value());
    const std::string problem = test::event_keys_problem(*ev, k.getColumn(1).getString());
    CHECK_MESSAGE(problem.empty(), problem);
  }
  for (const auto& entry : status) {
    const std::string& id = entry.first;
    const std::string& st = entry.second;
    CAPTURE(id);
    CHECK(terminal[id] <= 1);  // never two terminal states
    CHECK(replay[id] == st);   // the history gives the current status
  }
  return status.size();
}

}  // namespace

TEST_CASE("kill -9 at random points loses no acknowledged task and corrupts nothing") {
  const int kills = crash_kills();
  const fs::path dir = fs::temp_directory_path() / ("taskmgr-crash-" + std::to_string(::getpid()) +
                                                    "-" + generate_task_id().substr(24));
  fs::create_directories(dir);
  const std::string db = (dir / "crash.db").string();
  const KillLoop loop = kill_loop(
      kills, 12345, {db}, [&](const std::set<std::string>& acked) { check_file(db, acked); });
  const std::set<std::string>& acked = loop.acked;

  // Recovery: every task reaches exactly one terminal state.
  Config c = test::test_config();
  c.storage.path = db;
  recover_after_kills(c);
  SQLite::Database d(db, SQLite::OPEN_READONLY);
  CHECK(d.execAndGet("SELECT count(*) FROM (SELECT task_id FROM task_events WHERE event_type IN "
                     "('completed','failed','cancelled') GROUP BY task_id HAVING count(*) != 1)")
            .getInt() == 0);
  CHECK(d.execAndGet(
             "SELECT count(*) FROM tasks WHERE status NOT IN ('completed','failed','cancelled')")
            .getInt() == 0);
  MESSAGE("kill -9 test: " << loop.killed << " kills, " << acked.size()
                           << " acknowledged tasks, all present");
  std::error_code ec;
  fs::remove_all(dir, ec);
}

TEST_CASE("kill -9: a task that kills its process at once runs out of attempts, not forever") {
  // Once it is found unfinished at an open, its `started` is in the file
  // before the service runs: each death is an interrupted attempt, counted,
  // and after tasks.retry.max_interrupted_attempts (5) the next start fails
  // it `interrupted`. Its first run (not yet recovered) may die before its
  // start is stored: at most 5 + 1 runs in all.
  const fs::path dir =
      fs::temp_directory_path() /
      ("taskmgr-selfkill-" + std::to_string(::getpid()) + "-" + generate_task_id().substr(24));
  fs::create_directories(dir);
  const std::string db = (dir / "selfkill.db").string();
  ::setenv("TASKMGR_CRASH_SELFKILL", "1", 1);
  int deaths = 0, clean_exits = 0;
  for (int run = 0; run < 10 && clean_exits == 0; ++run) {
    Child c = spawn_crash_child({db});
    int st = 0;
    ::waitpid(c.pid, &st, 0);
    ::close(c.out);
    if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) ++deaths;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) ++clean_exits;
  }
  ::unsetenv("TASKMGR_CRASH_SELFKILL");
  CHECK(deaths >= 5);
  CHECK(deaths <= 6);
  CHECK(clean_exits == 1);
  SQLite::Database d(db, SQLite::OPEN_READONLY);
  CHECK(d.execAndGet("SELECT status || ' ' || failure_reason || ' ' || attempt FROM tasks")
            .getString() == "failed interrupted 5");
  std::error_code ec;
  fs::remove_all(dir, ec);
}

TEST_CASE("kill -9 right after retry_task and set_task_priority return: both are kept") {
  // They returned before their changes were stored: a kill 1-2 ms later
  // lost the retry (the task read failed, attempt 1) and the priority.
  const fs::path dir =
      fs::temp_directory_path() /
      ("taskmgr-control-" + std::to_string(::getpid()) + "-" + generate_task_id().substr(24));
  fs::create_directories(dir);
  ::setenv("TASKMGR_CRASH_CONTROL", "1", 1);
  for (int run = 0; run < 10; ++run) {
    CAPTURE(run);
    const std::string db = (dir / ("control" + std::to_string(run) + ".db")).string();
    Child c = spawn_crash_child({db});
    std::string out;
    char buf[256];
    for (ssize_t n; (n = ::read(c.out, buf, sizeof buf)) > 0;)
      out.append(buf, static_cast<std::size_t>(n));
    ::close(c.out);
    int st = 0;
    ::waitpid(c.pid, &st, 0);
    REQUIRE(WIFSIGNALED(st));
    REQUIRE(out.rfind("IDS ", 0) == 0);
    const std::string failed = out.substr(4, 36), pending = out.substr(41, 36);
    SQLite::Database d(db, SQLite::OPEN_READONLY);
    // The retry: its events stored, the task queued again (or started).
    CHECK(d.execAndGet("SELECT count(*) FROM task_events WHERE task_id = '" + failed +
                       "' AND event_type = 'retried' AND details LIKE '%\"reason\":\"host\"%'")
              .getInt() == 1);
    const std::string status =
        d.execAndGet("SELECT status FROM tasks WHERE id = '" + failed + "'").getString();
    CHECK((status == "queued" || status == "running"));
    CHECK(d.execAndGet("SELECT priority FROM tasks WHERE id = '" + pending + "'").getInt() == 7);
  }
  ::unsetenv("TASKMGR_CRASH_CONTROL");
  std::error_code ec;
  fs::remove_all(dir, ec);
}
