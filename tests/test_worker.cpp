// Worker processes (services.<kind>.isolation: process): crashes, aborts,
// kills from outside and hangs end one attempt and never the host; a memory
// limit turns a memory hog into OUT_OF_MEMORY and the handler's policy;
// actual_memory_mb is the worker's measured peak.
//
// The instances come from tests/worker_test_services.cpp (kind "probe"),
// loaded by taskmgr-worker; the host registers a function service of the
// same kind for its memory model only (its function never runs here).
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <numeric>
#include <set>

#include "test_support.hpp"
#include "utf8.hpp"
#include "worker/protocol.hpp"

using namespace taskmgr;
using namespace taskmgr::test;
namespace json = boost::json;
namespace fs = std::filesystem;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TASKMGR_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TASKMGR_TEST_SANITIZED 1
#endif
#endif

namespace {

#ifdef TASKMGR_TEST_SANITIZED
// The workers (sanitized as this program is) die of a fault by its own
// signal, as they would unsanitized, not by the sanitizer's report and
// abort: set for the children this program starts.
[[maybe_unused]] const bool kSanitizerSignals = [] {
  for (const char* var : {"ASAN_OPTIONS", "TSAN_OPTIONS"}) {
    const char* old = std::getenv(var);
    std::string v = old != nullptr ? old : "";
    v += std::string(v.empty() ? "" : ":") +
         "handle_segv=0:handle_sigbus=0:handle_sigfpe=0:handle_sigill=0:handle_abort=0";
    ::setenv(var, v.c_str(), 1);
  }
  return true;
}();
// RLIMIT_DATA counts a sanitizer's shadow memory (terabytes of address
// space): a sanitized worker cannot run under a memory limit, and refuses
// one at start. The memory-limit tests run in the dev and release builds.
#define SKIP_UNDER_SANITIZERS()                                          \
  do {                                                                   \
    MESSAGE("skipped: a sanitized worker cannot run under RLIMIT_DATA"); \
    return;                                                              \
  } while (0)
#else
#define SKIP_UNDER_SANITIZERS() \
  do {                          \
  } while (0)
#endif

// {"do":"hog","mb_per_page":M,"pages":P}: M x min(batch, P) MB, plus a
// small base; anything else: the base.
struct ProbeModel : MemoryModel {
  std::string name() const override { return "probe"; }
  RequestFeatures features(const TaskCreateRequest& r) const override {
    RequestFeatures f;
    f.batch_size = r.batch_size;
    const auto o = json::parse(r.options_json).as_object();
    if (o.contains("pages")) f.pages = o.at("pages").to_number<std::int64_t>();
    if (o.contains("mb_per_page")) f.pixels = o.at("mb_per_page").to_number<std::int64_t>();
    return f;
  }
  double estimate_mb(const RequestFeatures& f) const override {
    const std::int64_t held = std::max<std::int64_t>(1, std::min(f.batch_size, f.pages));
    return 20.0 + static_cast<double>(f.pixels * held);
  }
};

struct Workers {
  Config config = test_config();
  EventLog log;
  std::unique_ptr<TaskManager> tm;
  fs::path dir =
      fs::temp_directory_path() / ("taskmgr_worker_test_" + std::to_string(::getpid()) + "_" +
                                   std::to_string(reinterpret_cast<std::uintptr_t>(this)));

  explicit Workers(std::int64_t memory_limit_mb = 0, int instances = 1) {
    fs::create_directories(dir);
    ServiceConfig sc;
    sc.isolation = "process";
    sc.library = TASKMGR_TEST_WORKER_LIBRARY;
    sc.worker_executable = TASKMGR_WORKER_EXECUTABLE;
    sc.memory_limit_mb = memory_limit_mb;
    config.services["probe"] = sc;
    config.pools.defaults.max_instances = instances;
    config.tasks.retry.backoff_base_seconds = 0.01;
    config.tasks.retry.backoff_max_seconds = 0.05;
    config.tasks.temp_dir = (dir / "tmp").string();
  }
  ~Workers() {
    if (tm) tm->close();
    std::error_code ec;
    fs::remove_all(dir, ec);
  }

  std::mutex log_mu;
  std::vector<std::string> lines;  // what the manager logged
  int count_logged(const std::string& part) {
    std::lock_guard<std::mutex> g(log_mu);
    int n = 0;
    for (const auto& l : lines) n += l.find(part) != std::string::npos;
    return n;
  }
  bool logged(const std::string& part) {
    std::lock_guard<std::mutex> g(log_mu);
    for (const auto& l : lines) {
      if (l.find(part) != std::string::npos) return true;
    }
    return false;
  }

  void open() {
    TaskManagerOptions o;
    o.log_sink = [this](LogLevel, std::string_view text) {
      std::lock_guard<std::mutex> g(log_mu);
      lines.emplace_back(text);
    };
    o.builtin_ocr = false;
    o.services.push_back(make_function_service(
        "probe", [](TaskContext&) { FAIL("the host's own function ran"); },
        std::make_shared<ProbeModel>()));
    tm = std::make_unique<TaskManager>(config, o);
    tm->subscribe([this](const EventRecord& e) { log(e); });
  }

  Task run(const std::string& options, const std::string& device = "", int batch = 1) {
    TaskCreateRequest r;
    r.service = "probe";
    r.options_json = options;
    r.device = device;
    r.batch_size = batch;
    const Task t = tm->create_task(r);
    tm->start_task(t.id);
    return t;
  }

  Task finished(const std::string& id) {
    REQUIRE(eventually(
        [&] {
          const Task t = tm->get_task(id);
          int started = 0, cleaned = 0;
          for (const auto& e : tm->get_task_events(id)) {
            started += e.event == TaskEvent::kStarted;
            cleaned += e.event == TaskEvent::kCleanupCompleted;
          }
          return is_terminal(t.status) && cleaned >= std::max(1, started);
        },
        std::chrono::seconds(60)));
    return tm->get_task(id);
  }

  json::object result(const Task& t) {
    REQUIRE_MESSAGE(t.status == TaskStatus::kCompleted,
                    "status " << to_string(t.status) << ": " << t.failure_message);
    return json::parse(t.result.empty() ? "{}" : t.result).as_object();
  }

  std::vector<json::object> details(const std::string& id, TaskEvent ev) {
    std::vector<json::object> out;
    for (const auto& e : tm->get_task_events(id)) {
      if (e.event == ev) out.push_back(json::parse(e.details_json).as_object());
    }
    return out;
  }
};

std::int64_t pid_of(const json::object& r) { return r.at("pid").as_int64(); }

bool alive(std::int64_t pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0; }

}  // namespace

TEST_CASE("worker processes: tasks run in a warm child, one process reused task after task") {
  Workers w;
  w.open();
  const auto a = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  const auto b = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  CHECK(pid_of(a) != ::getpid());
  CHECK(pid_of(a) == pid_of(b));
  CHECK(alive(pid_of(a)));
  // The instance id is the pool's; the task records it as in process.
  CHECK(w.tm->get_task(w.run(R"({"do":"ok"})").id).service == "probe");
}

TEST_CASE(
    "a worker that segfaults or aborts fails its attempt with the signal, is replaced warm, "
    "and the host's other task completes") {
  for (const auto& wt : std::vector<std::pair<std::string, std::string>>{
           {"segv", "processing_error: worker crashed (signal 11: Segmentation fault)"},
           {"abort", "processing_error: worker crashed (signal 6: Aborted)"}}) {
    const std::string& what = wt.first;  // not a structured binding: CAPTURE is a lambda
    const std::string& text = wt.second;
    CAPTURE(what);
    Workers w(0, 2);
    w.config.tasks.retry.max_attempts = 1;
    w.open();
    // Another task runs on the other worker the whole time.
    const fs::path pid_file = w.dir / "other.pid";
    const Task other =
        w.run(json::serialize(json::object{{"do", "wait"}, {"pid_file", pid_file.string()}}));
    REQUIRE(eventually([&] { return fs::exists(pid_file) && fs::file_size(pid_file) > 0; }));
    const Task bad = w.run(R"({"do":")" + what + R"("})");
    const Task t = w.finished(bad.id);
    // Retryable, and out of attempts (max_attempts 1).
    CHECK(t.status == TaskStatus::kFailed);
    CHECK(t.failure_reason == TaskFailureReason::kMaxAttemptsExceeded);
    CHECK(t.failure_message.rfind(text + " (gave up after 1 attempt", 0) == 0);
    // The other task was never disturbed: it is still running, and ends as
    // its host asks.
    CHECK(w.tm->get_task(other.id).status == TaskStatus::kRunning);
    w.tm->cancel_task(other.id);
    CHECK(w.finished(other.id).status == TaskStatus::kCancelled);
    // The crashed worker's replacement (or the other) runs the next tasks.
    const auto n1 = w.result(w.finished(w.run(R"({"do":"ok"})").id));
    const auto n2 = w.result(w.finished(w.run(R"({"do":"ok"})").id));
    CHECK(alive(pid_of(n1)));
    CHECK(alive(pid_of(n2)));
  }
}

TEST_CASE("a worker crash is retried per tasks.retry: the next attempt succeeds on a new worker") {
  Workers w;
  w.config.tasks.retry.max_attempts = 3;
  w.open();
  const auto first = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  const Task t = w.finished(w.run(R"({"do":"crash_first"})").id);
  const auto r = w.result(t);
  CHECK(r.at("attempt").as_int64() == 2);
  CHECK(t.attempt == 2);
  CHECK(pid_of(r) != pid_of(first));  // the first worker died with attempt 1
  CHECK_FALSE(alive(pid_of(first)));
  const auto retried = w.details(t.id, TaskEvent::kRetried);
  REQUIRE(retried.size() == 1);
  CHECK(retried[0].at("reason").as_string() == "processing_error");
  CHECK(std::string(retried[0].at("message").as_string()) ==
        "worker crashed (signal 11: Segmentation fault)");
  // The log names both workers: the one that died, during which task and
  // how, and its replacement's start with the memory limit in force.
  const std::string first_pid = std::to_string(pid_of(first));
  CHECK(w.logged("worker " + first_pid + " started for probe on cpu in "));
  CHECK(w.logged("(memory limit: none)"));
  CHECK(w.logged("worker " + first_pid + " of probe on cpu ended during task " + t.id +
                 " (signal 11: Segmentation fault, "));
  CHECK(w.logged("worker " + std::to_string(pid_of(r)) + " started for probe on cpu in "));
}

TEST_CASE("a worker killed from outside (SIGKILL) fails its attempt, and the next task succeeds") {
  Workers w;
  w.config.tasks.retry.max_attempts = 1;
  w.open();
  const fs::path pid_file = w.dir / "victim.pid";
  const Task t =
      w.run(json::serialize(json::object{{"do", "wait"}, {"pid_file", pid_file.string()}}));
  REQUIRE(eventually([&] { return fs::exists(pid_file) && fs::file_size(pid_file) > 0; }));
  pid_t pid = 0;
  std::ifstream(pid_file) >> pid;
  REQUIRE(pid > 0);
  REQUIRE(pid != ::getpid());
  REQUIRE(::kill(pid, SIGKILL) == 0);
  const Task f = w.finished(t.id);
  CHECK(f.status == TaskStatus::kFailed);
  CHECK(f.failure_reason == TaskFailureReason::kMaxAttemptsExceeded);
  CHECK(f.failure_message.rfind("processing_error: worker crashed (signal 9: Killed) (gave up",
                                0) == 0);
  const auto next = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  CHECK(pid_of(next) != pid);
}

TEST_CASE(
    "a worker that crashes while a process it started holds its socket: the crash is "
    "seen (not a hang), and that process is killed with the worker") {
  Workers w;
  w.config.tasks.retry.max_attempts = 1;
  w.open();
  const fs::path pid_file = w.dir / "helper.pid";
  const Task t = w.finished(
      w.run(json::serialize(json::object{{"do", "forksegv"}, {"pid_file", pid_file.string()}})).id);
  CHECK(t.failure_message.rfind("processing_error: worker crashed (signal 11: Segmentation fault)",
                                0) == 0);
  pid_t helper = 0;
  std::ifstream(pid_file) >> helper;
  REQUIRE(helper > 0);
  // Killed with the worker's process group (a zombie until init reaps it).
  CHECK(eventually([&] {
    std::ifstream st("/proc/" + std::to_string(helper) + "/stat");
    std::string line;
    if (!std::getline(st, line)) return true;
    const auto close = line.rfind(')');
    return close != std::string::npos && line.size() > close + 2 && line[close + 2] == 'Z';
  }));
  CHECK(w.result(w.finished(w.run(R"({"do":"ok"})").id)).at("batch").as_int64() == 1);
}

TEST_CASE(
    "a worker that dies while idle is replaced before the next task, which does not pay "
    "for it") {
  Workers w;
  w.config.tasks.retry.max_attempts = 1;
  w.open();
  const auto first = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  REQUIRE(::kill(static_cast<pid_t>(pid_of(first)), SIGKILL) == 0);
  REQUIRE(eventually([&] {
    return !alive(pid_of(first)) || [&] {
      std::ifstream st("/proc/" + std::to_string(pid_of(first)) + "/stat");
      std::string line;
      std::getline(st, line);
      return line.find(") Z") != std::string::npos;
    }();
  }));
  const Task t = w.finished(w.run(R"({"do":"ok"})").id);
  const auto next = w.result(t);
  CHECK(t.attempt == 1);
  CHECK(pid_of(next) != pid_of(first));
  CHECK(w.logged("worker " + std::to_string(pid_of(first)) +
                 " of probe on cpu ended while idle (signal 9: Killed): replaced"));
}

TEST_CASE("a worker inherits no descriptor of the host's but its socket") {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);  // no close-on-exec, as a careless host makes them
  struct stat st {};
  REQUIRE(::fstat(fds[1], &st) == 0);
  const std::string mine = "pipe:[" + std::to_string(st.st_ino) + "]";
  Workers w;
  w.open();
  const auto r = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  int seen = 0;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(pid_of(r)) + "/fd")) {
    std::error_code ec;
    const auto target = fs::read_symlink(e.path(), ec).string();
    CHECK_MESSAGE(target != mine, "the worker holds the host's pipe as fd " << e.path());
    ++seen;
  }
  CHECK(seen > 0);
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST_CASE(
    "an engine that fails in its own words, or aborts, when malloc returns NULL under the "
    "worker's limit: OUT_OF_MEMORY") {
  SKIP_UNDER_SANITIZERS();
  for (const std::string what : {"c_alloc", "c_alloc_abort"}) {
    CAPTURE(what);
    Workers w(/*memory_limit_mb=*/200);
    w.config.tasks.retry.max_attempts = 2;
    w.config.tasks.retry.cpu_fallback = false;
    w.open();
    const Task t = w.finished(w.run(R"({"do":")" + what + R"("})").id);
    CHECK(t.status == TaskStatus::kFailed);
    CHECK(t.failure_reason == TaskFailureReason::kOutOfMemory);
    // The engine's words, with the refused allocation; an abort: the crash,
    // after an allocation failed.
    CHECK(t.failure_message.find(what == "c_alloc"
                                     ? "was refused under the worker's memory limit of 200 MB"
                                     : "after an allocation failed or its memory reached 90% of "
                                       "its limit of 200 MB") != std::string::npos);
    const auto retried = w.details(t.id, TaskEvent::kRetried);
    REQUIRE(retried.size() == 1);
    CHECK(retried[0].at("reason").as_string() == "out_of_memory");
  }
}

TEST_CASE("a worker that hangs past its deadline is killed and replaced: TIMEOUT") {
  Workers w;
  w.open();
  const auto before = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  const Task t = w.finished(w.run(R"({"do":"hang","timeout_seconds":0.5})").id);
  CHECK(t.status == TaskStatus::kFailed);
  CHECK(t.failure_reason == TaskFailureReason::kTimeout);
  CHECK(t.failure_message ==
        "task " + t.id +
            " ran past its deadline of 0.5 s (options.timeout_seconds): the worker did not stop "
            "within 2 s of the deadline; killed (signal 9: Killed) and replaced");
  CHECK_FALSE(alive(pid_of(before)));
  // The replacement started before the attempt ended is the one kept: the
  // next task starts no worker.
  const int starts = w.count_logged("started for probe on cpu in ");
  CHECK(starts == 2);
  const auto after = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  CHECK(pid_of(after) != pid_of(before));
  CHECK(w.count_logged("started for probe on cpu in ") == starts);
}

TEST_CASE(
    "a worker that ignores a cancel is killed after 2 s, the task says so, and its replacement "
    "is kept") {
  Workers w;
  w.open();
  const auto before = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  // Cancelled once the worker runs it (the mark file is written by the
  // worker as it starts to hang): a cancel seen before the task reaches the
  // worker ends it without a kill, which is not what this test is about.
  const fs::path mark = w.dir / "hang.mark";
  const Task t =
      w.run(json::serialize(json::object{{"do", "hang_first"}, {"mark", mark.string()}}));
  REQUIRE(eventually([&] { return fs::exists(mark); }));
  w.tm->cancel_task(t.id);
  const Task c = w.finished(t.id);
  CHECK(c.status == TaskStatus::kCancelled);
  CHECK(c.failure_message ==
        "cancelled by the host while running: the worker did not stop within 2 s of the cancel; "
        "killed (signal 9: Killed) and replaced");
  CHECK_FALSE(alive(pid_of(before)));
  const int starts = w.count_logged("started for probe on cpu in ");
  const auto after = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  CHECK(alive(pid_of(after)));
  CHECK(w.count_logged("started for probe on cpu in ") == starts);
}

TEST_CASE(
    "a stage name that is not UTF-8 is refused in the worker as in process, and every later "
    "task gets its own result") {
  Workers w;
  w.config.tasks.retry.max_attempts = 1;
  w.open();
  const auto first = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  // Caught by the service: it goes on, and completes.
  const Task caught = w.finished(w.run(R"({"do":"bad_stage"})").id);
  CHECK(w.result(caught).at("id").as_string() == caught.id);
  // Not caught: the task fails as in process (INVALID_ARGUMENT's message).
  const Task failed = w.finished(w.run(R"({"do":"bad_stage","uncaught":1})").id);
  CHECK(failed.status == TaskStatus::kFailed);
  CHECK(failed.failure_message.find("stage: the name is not valid UTF-8 (byte 5)") !=
        std::string::npos);
  for (int i = 0; i < 3; ++i) {
    const Task t = w.finished(w.run(R"({"do":"ok"})").id);
    CHECK(w.result(t).at("id").as_string() == t.id);
  }
  CHECK(w.count_logged("started for probe on cpu in ") == 1);  // the worker was kept
  (void)first;
}

TEST_CASE(
    "a result too large to be sent within the worker's memory limit: OUT_OF_MEMORY saying so, "
    "and the next task gets its own result") {
  SKIP_UNDER_SANITIZERS();
  Workers w(/*memory_limit_mb=*/200);
  w.config.tasks.retry.max_attempts = 1;
  w.open();
  // 80 MB of text, its copy in the frame and the frame's JSON: past 200 MB.
  const Task t = w.finished(w.run(R"({"do":"big_result","mb":80})").id);
  CHECK(t.status == TaskStatus::kFailed);
  CHECK(t.failure_reason == TaskFailureReason::kOutOfMemory);
  CHECK(t.failure_message.find("worker: the task's result (") != std::string::npos);
  CHECK(t.failure_message.find(" bytes) did not fit in the worker's memory limit to be sent to "
                               "the host (services.probe.memory_limit_mb)") != std::string::npos);
  // One that fits is sent.
  const Task small = w.finished(w.run(R"({"do":"big_result","mb":2})").id);
  CHECK(small.status == TaskStatus::kCompleted);
  CHECK(small.result.size() > (2u << 20));
  const Task next = w.finished(w.run(R"({"do":"ok"})").id);
  CHECK(w.result(next).at("id").as_string() == next.id);
}

TEST_CASE("a service that closes its worker's socket: the worker's exit status names it") {
  Workers w;
  w.config.tasks.retry.max_attempts = 1;
  w.open();
  const Task t = w.finished(w.run(R"({"do":"close_socket"})").id);
  CHECK(t.status == TaskStatus::kFailed);
  CHECK(t.failure_reason == TaskFailureReason::kMaxAttemptsExceeded);
  CHECK(t.failure_message.find("worker crashed (exit status 71: its socket to the host was "
                               "closed or broken inside the worker)") != std::string::npos);
  // Replaced: the next task runs.
  w.result(w.finished(w.run(R"({"do":"ok"})").id));
}

TEST_CASE(
    "close() interrupts worker tasks still running after tasks.close_grace_seconds: a "
    "cooperating one stops, one that ignores it is killed, both stay queued and run at the next "
    "open") {
  Workers w(0, 2);
  w.config.storage.path = (w.dir / "tasks.db").string();
  w.config.tasks.close_grace_seconds = 0.2;
  w.open();
  const fs::path pid_file = w.dir / "c.pid";
  const Task coop = w.run(json::serialize(json::object{{"do", "wait_first"},
                                                       {"pid_file", pid_file.string()},
                                                       {"mark", (w.dir / "coop.mark").string()}}));
  const Task hung = w.run(json::serialize(
      json::object{{"do", "hang_first"}, {"mark", (w.dir / "hung.mark").string()}}));
  REQUIRE(eventually([&] {
    return fs::exists(pid_file) && fs::file_size(pid_file) > 0 &&
           fs::exists(w.dir / "hung.mark");  // written by the worker as it starts to hang
  }));
  w.tm->close();  // returns: the hung worker was killed 2 s after the grace
  for (const Task* t : {&coop, &hung}) {
    CAPTURE(t->id);
    const Task q = w.tm->get_task(t->id);
    CHECK(q.status == TaskStatus::kQueued);
    CHECK(q.attempt == 0);             // not charged
    CHECK(q.priority == t->priority);  // not lowered: not a failure
    const auto retried = w.details(t->id, TaskEvent::kRetried);
    REQUIRE(retried.size() == 1);
    CHECK(retried[0].at("reason").as_string() == "interrupted");
    const std::string msg(retried[0].at("message").as_string());
    CHECK(msg.rfind("interrupted by close() after tasks.close_grace_seconds (0.2 s); queued for "
                    "the next open",
                    0) == 0);
    if (t == &hung) CHECK(msg.find("killed (signal 9: Killed)") != std::string::npos);
  }
  CHECK(
      w.logged("close(): 2 task(s) still running after tasks.close_grace_seconds (0.2 s) "
               "asked to stop; one whose service stops goes back to the queue for the next "
               "open: "));
  // The next open runs them again, at once (no attempt was charged: no
  // retry backoff), as attempt 1.
  w.tm.reset();
  w.open();
  for (const Task* t : {&coop, &hung}) {
    const Task done = w.finished(t->id);
    CHECK(done.status == TaskStatus::kCompleted);
    CHECK(done.attempt == 1);
  }
}

TEST_CASE(
    "a worker's message or result that is not UTF-8 is judged as in process, and the worker "
    "is kept") {
  Workers w;
  w.open();
  const auto before = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  // Any other exception: PROCESSING_ERROR, its bytes made valid (U+FFFD).
  const Task m = w.finished(w.run(R"({"do":"bad_message"})").id);
  CHECK(m.status == TaskStatus::kFailed);
  CHECK(m.failure_reason == TaskFailureReason::kProcessingError);
  CHECK(m.failure_message.find("bad ") != std::string::npos);
  CHECK(m.failure_message.find("bytes") != std::string::npos);
  CHECK(m.failure_message.find("worker") == std::string::npos);  // not a crash, not the protocol
  CHECK_FALSE(detail::invalid_utf8_at(m.failure_message).has_value());
  // A result that is not strict JSON in UTF-8: INVALID_INPUT, as set_result
  // refuses it in process.
  const Task r = w.finished(w.run(R"({"do":"bad_result"})").id);
  CHECK(r.status == TaskStatus::kFailed);
  CHECK(r.failure_reason == TaskFailureReason::kInvalidInput);
  CHECK(r.failure_message.find("UTF-8") != std::string::npos);
  // The worker's service was broken by the first (an unknown exception):
  // replaced; the result error left it as it was.
  const auto after = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  CHECK(pid_of(after) != pid_of(before));
}

TEST_CASE("a worker that cooperates stops at cancel and is kept") {
  Workers w;
  w.open();
  const fs::path pid_file = w.dir / "c.pid";
  const Task t =
      w.run(json::serialize(json::object{{"do", "wait"}, {"pid_file", pid_file.string()}}));
  REQUIRE(eventually([&] { return fs::exists(pid_file) && fs::file_size(pid_file) > 0; }));
  pid_t pid = 0;
  std::ifstream(pid_file) >> pid;
  w.tm->cancel_task(t.id);
  CHECK(w.finished(t.id).status == TaskStatus::kCancelled);
  const auto next = w.result(w.finished(w.run(R"({"do":"ok"})").id));
  CHECK(pid_of(next) == pid);
}

TEST_CASE(
    "one allocation the limit refuses, met by the engine in its own words: OUT_OF_MEMORY "
    "(malloc's NULL is seen in the worker)") {
  SKIP_UNDER_SANITIZERS();
  Workers w(/*memory_limit_mb=*/200);
  w.config.tasks.retry.max_attempts = 1;
  w.open();
  const Task t = w.finished(w.run(R"({"do":"big_alloc","mb":190})").id);
  CHECK(t.status == TaskStatus::kFailed);
  CHECK(t.failure_reason == TaskFailureReason::kOutOfMemory);
  CHECK(t.failure_message.find("engine failed: no buffer for the page") != std::string::npos);
  CHECK(t.failure_message.find("(an allocation of 190 MB was refused under the worker's memory "
                               "limit of 200 MB, services.probe.memory_limit_mb)") !=
        std::string::npos);
  // A request larger than the whole limit: the task needs more than the
  // limit gives, out of memory too (a 14000 x 14000 page under 300 MB).
  const Task huge = w.finished(w.run(R"({"do":"big_alloc","mb":4096})").id);
  CHECK(huge.failure_reason == TaskFailureReason::kOutOfMemory);
  CHECK(huge.failure_message.find("(an allocation of 4096 MB was refused") != std::string::npos);
  // One past any machine's memory (2 TiB) is a size computed wrongly: the
  // engine's own failure stands.
  const Task absurd = w.finished(w.run(R"({"do":"big_alloc","mb":2097152})").id);
  CHECK(absurd.failure_reason == TaskFailureReason::kProcessingError);
  CHECK(absurd.failure_message == "engine failed: no buffer for the page");
  // …and one the limit holds goes through.
  CHECK(w.result(w.finished(w.run(R"({"do":"big_alloc","mb":20})").id)).at("batch") == 1);
}

TEST_CASE(
    "a memory hog under the worker's limit: OUT_OF_MEMORY, then half the batch and a lower "
    "estimate, which succeeds") {
  SKIP_UNDER_SANITIZERS();
  Workers w(/*memory_limit_mb=*/300);
  w.config.tasks.retry.cpu_fallback = false;
  w.open();
  const Task t =
      w.finished(w.run(R"({"do":"hog","mb_per_page":100,"pages":4})", "", /*batch=*/4).id);
  const auto r = w.result(t);
  CHECK(t.batch_size == 2);
  CHECK(r.at("batch").as_int64() == 2);
  CHECK(r.at("held_mb").as_int64() == 200);
  CHECK(t.attempt == 2);
  const auto retried = w.details(t.id, TaskEvent::kRetried);
  REQUIRE(retried.size() == 1);
  CHECK(retried[0].at("reason").as_string() == "out_of_memory");
  const auto queued = w.details(t.id, TaskEvent::kQueued);
  REQUIRE(queued.size() == 2);
  const auto e1 = queued[0].at("estimated_memory_mb").to_number<std::int64_t>();
  const auto e2 = queued[1].at("estimated_memory_mb").to_number<std::int64_t>();
  CHECK(e1 == 420);
  CHECK(e2 == 220);
  CHECK(t.estimated_memory_mb.value_or(0) < e1);
  CHECK(w.logged("(memory limit: RLIMIT_DATA 300 MB)"));
}

TEST_CASE(
    "a worker library's kind gets a memory model and its device kinds from the configuration, "
    "as a C or Python host (no factory of its own) needs") {
  Workers w;
  w.config.devices.declared.push_back({"cuda:0", "gpu", 8000});
  // YAML, as taskmgr_open and Python's Manager take it.
  const Config extra = Config::from_yaml_string(
      "services:\n"
      "  probe:\n"
      "    memory_model: {base_mb: 50, per_page_mb: 10, per_mpixel_mb: 0, per_input_mb: 0}\n"
      "    device_kinds: [cpu]\n");
  w.config.services["probe"].memory_model = extra.services.at("probe").memory_model;
  w.config.services["probe"].device_kinds = extra.services.at("probe").device_kinds;
  TaskManagerOptions o;
  o.builtin_ocr = false;  // and no host factory for "probe": made from the library alone
  o.log_sink = [](LogLevel, std::string_view) {};
  w.tm = std::make_unique<TaskManager>(w.config, o);
  TaskCreateRequest r;
  r.service = "probe";
  r.options_json = R"({"do":"ok"})";
  r.batch_size = 4;
  const MemoryEstimate e = w.tm->explain_estimate(r);
  CHECK(e.model == "services.probe.memory_model");
  CHECK(e.mb == 60);  // 50 + min(batch 4, pages 1) x 10
  // The GPU is not among its device kinds: it runs on the CPU, also when
  // the GPU is asked for (a request is a preference, as for any device the
  // service does not support).
  const Task t = w.tm->create_task(r);
  CHECK(t.assigned_device.value_or("") == "cpu");
  CHECK(t.estimated_memory_mb.value_or(0) == 60);
  r.device = "cuda:0";
  CHECK(w.tm->create_task(r).assigned_device.value_or("") == "cpu");
  r.device.clear();
  w.tm->start_task(t.id);
  CHECK(w.result(w.finished(t.id)).at("id").as_string() == t.id);
  // Without device_kinds, a library's kind runs anywhere (it has no
  // supports() of its own).
  Workers any;
  any.config.devices.declared.push_back({"cuda:0", "gpu", 8000});
  any.open();
  CHECK(any.tm->create_task(r).assigned_device.value_or("") == "cuda:0");
}

TEST_CASE("a memory hog on a GPU under the worker's limit falls back to the CPU") {
  SKIP_UNDER_SANITIZERS();
  Workers w(/*memory_limit_mb=*/300);
  w.config.devices.declared.push_back({"cuda:0", "gpu", 8000});
  w.config.tasks.retry.cpu_fallback = true;
  w.open();
  const Task t = w.finished(
      w.run(R"({"do":"hog","mb_per_page":100,"pages":4,"only_on":"cuda:0"})", "cuda:0", 4).id);
  const auto r = w.result(t);
  CHECK(t.assigned_device.value_or("") == "cpu");
  const auto fb = w.details(t.id, TaskEvent::kDeviceFallback);
  REQUIRE(fb.size() == 1);
  CHECK(fb[0].at("from").as_string() == "cuda:0");
  CHECK(fb[0].at("to").as_string() == "cpu");
  CHECK(r.at("held_mb").as_int64() == 0);
}

TEST_CASE("actual_memory_mb is the worker's measured peak during the task") {
  Workers w;
  w.open();
  std::vector<std::int64_t> actual;
  for (const int mb : {40, 160}) {
    const Task t = w.finished(w.run(R"({"do":"touch","mb":)" + std::to_string(mb) + "}").id);
    const auto r = w.result(t);
    // Read independently of the library: the worker's VmHWM, reset at the
    // start of the task and untouched since its end.
    const std::int64_t hwm_kb = worker::proc_status_kb(static_cast<int>(pid_of(r)), "VmHWM");
    REQUIRE(hwm_kb > 0);
    const double hwm_mb = static_cast<double>(hwm_kb) / 1024.0;
    REQUIRE(t.actual_memory_mb.has_value());
    MESSAGE("touched " << mb << " MB: actual_memory_mb " << *t.actual_memory_mb << ", VmHWM "
                       << hwm_mb << " MB");
    CHECK(static_cast<double>(*t.actual_memory_mb) >= hwm_mb * 0.9);
    CHECK(static_cast<double>(*t.actual_memory_mb) <= hwm_mb * 1.1);
    CHECK(static_cast<double>(*t.actual_memory_mb) >= mb);
    actual.push_back(*t.actual_memory_mb);
    // The stage's sample carries the measured resident set too.
    bool sampled = false;
    for (const auto& s : w.tm->get_task_samples(t.id)) {
      if (s.processing_stage == "touched") {
        sampled = true;
        CHECK(s.memory_usage_mb >= mb);
      }
    }
    CHECK(sampled);
  }
  CHECK(actual[1] - actual[0] >= 100);
}

TEST_CASE("the estimator learns from the measured peaks: the estimate converges toward them") {
  Workers w;
  w.open();
  TaskCreateRequest r;
  r.service = "probe";
  // ProbeModel: 20 + 80 = 100 MB, below what the worker measures (124 MB;
  // about 540 MB under ThreadSanitizer: the correction, capped at x20, can
  // still reach it).
  r.options_json = R"({"do":"touch","mb":100,"mb_per_page":80})";
  const MemoryEstimate before = w.tm->explain_estimate(r);
  CHECK(before.samples == 0);
  CHECK(before.mb == 100);
  std::vector<double> peaks;
  for (int i = 0; i < 8; ++i) {
    const Task t = w.finished(w.run(r.options_json).id);
    REQUIRE(t.actual_memory_mb.has_value());
    peaks.push_back(static_cast<double>(*t.actual_memory_mb));
  }
  const double mean = std::accumulate(peaks.begin(), peaks.end(), 0.0) / peaks.size();
  const MemoryEstimate after = w.tm->explain_estimate(r);
  MESSAGE("measured peaks ~" << mean << " MB; estimate " << before.mb << " -> " << after.mb
                             << " MB: " << after.explanation());
  CHECK(after.samples == 8);
  CHECK(after.explanation().find("learned correction") != std::string::npos);
  CHECK(std::abs(static_cast<double>(after.mb) - mean) <
        std::abs(static_cast<double>(before.mb) - mean));
  // The header's rule, replayed on the measured peaks: the model's figure
  // times the running mean + 2 * spread of actual / model, each new ratio
  // weighing 0.2. The peaks vary from run to run (much more under the
  // sanitizers), so the bound follows their spread, not a fixed margin.
  double m = 0;
  double var = 0;
  for (std::size_t i = 0; i < peaks.size(); ++i) {
    const double ratio = peaks[i] / 100.0;
    if (i == 0) {
      m = ratio;
    } else {
      const double diff = ratio - m;
      m += 0.2 * diff;
      var = 0.8 * (var + 0.2 * diff * diff);
    }
  }
  const double expected = std::ceil(100.0 * std::min(20.0, m + 2 * std::sqrt(var)));
  CAPTURE(expected);
  CHECK(std::abs(static_cast<double>(after.mb) - expected) <= 1.0);
  // On the high side: above the smallest peak measured.
  CHECK(static_cast<double>(after.mb) >= *std::min_element(peaks.begin(), peaks.end()));
}

TEST_CASE(
    "services.<kind> isolation settings are checked: unknown values, a missing library, "
    "a worker that cannot start") {
  {
    Config c = test_config();
    c.services["probe"].isolation = "thread";
    CHECK_THROWS_WITH_AS(c.validate(),
                         "services.probe.isolation: must be one of auto, in_process, process, got "
                         "'thread'",
                         ConfigError);
  }
  {
    Config c = test_config();
    c.services["probe"].isolation = "process";
    CHECK_THROWS_WITH_AS(c.validate(),
                         doctest::Contains("services.probe.library: must name the shared object"),
                         ConfigError);
  }
  {
    Config c = Config::from_yaml_string(
        "services:\n  ocr:\n    isolation: process\n    memory_limit_mb: 2048\n");
    CHECK(c.services.at("ocr").isolation == "process");
    CHECK(c.services.at("ocr").memory_limit_mb == 2048);
    const Config back = Config::from_yaml_string(c.to_yaml());
    CHECK(back.services.at("ocr").memory_limit_mb == 2048);
  }
  // A worker library is checked at open (a worker loads it and makes the
  // kind's factory, no engine): one that does not do so is refused then,
  // kInvalidConfig naming the key, not found by the first task.
  struct Case {
    std::string kind, library, message;
  };
  const std::string probe_lib = TASKMGR_TEST_WORKER_LIBRARY;
  for (const Case& k : std::vector<Case>{
           {"probe", "/nonexistent/missing.so",
            "worker: services.probe.library: cannot load /nonexistent/missing.so: "},
           {"probe", TASKMGR_FAKE_NVML,
            "worker: services.probe.library: " + std::string(TASKMGR_FAKE_NVML) +
                " does not export taskmgr_worker_factory"},
           {"other", probe_lib,
            "worker: services.other.library: " + probe_lib + " has no factory for 'other'"},
           {"throws", probe_lib,
            "services.throws.library: checking " + probe_lib +
                " in a worker failed: worker: starting throws on cpu: no such engine here"},
           {"wrong", probe_lib,
            "worker: services.wrong.library: " + probe_lib +
                " made a factory of kind 'probe' for 'wrong'"}}) {
    CAPTURE(k.kind);
    CAPTURE(k.library);
    Workers w;
    ServiceConfig sc = w.config.services.at("probe");
    sc.library = k.library;
    w.config.services[k.kind] = sc;
    try {
      w.open();
      FAIL("opened");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::kInvalidConfig);
      CHECK_MESSAGE(std::string(e.what()).rfind(k.message, 0) == 0, e.what());
    }
  }
}
