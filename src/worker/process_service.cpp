// The host's side of worker processes: a ServiceFactory whose instances are
// child processes (taskmgr-worker), each driven over a socketpair
// (worker/protocol.hpp).
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "input_requirement.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/worker.hpp"
#include "worker/process_service.hpp"
#include "worker/protocol.hpp"

extern char** environ;

namespace taskmgr {

namespace json = boost::json;
using namespace worker;

namespace {

using SteadyClock = std::chrono::steady_clock;

bool is_executable(const std::string& p) {
  struct stat st {};
  return !p.empty() && ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
         ::access(p.c_str(), X_OK) == 0;
}

std::string signal_text(int sig) {
  const char* d = ::strsignal(sig);
  return fmt::format("signal {}: {}", sig, d != nullptr ? d : "unknown");
}

// A worker killed by a signal before it was ready (from outside, or the
// OOM killer): worth starting again, unlike one that reported a failure.
struct StartKilled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One child process and its socket.
class Worker {
 public:
  Worker() = default;
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker() { stop(); }

  bool running() const { return pid_ > 0; }
  int pid() const { return pid_; }
  int sock() const { return sock_; }

  // Starts the program and waits for kReady. Throws std::runtime_error.
  void start(const std::string& exe, const json::object& init, double timeout_s) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      throw std::runtime_error(fmt::format("worker: socketpair failed: {}", std::strerror(errno)));
    }
    int child_end = sv[1];
    if (child_end == 3) {  // dup2(3, 3) would keep close-on-exec set
      child_end = ::fcntl(sv[1], F_DUPFD_CLOEXEC, 10);
      ::close(sv[1]);
    }
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, child_end, 3);
    // Nothing else of the host's: a pipe, socket or deleted file the host
    // holds without close-on-exec stays the host's alone.
    posix_spawn_file_actions_addclosefrom_np(&fa, 4);
    posix_spawnattr_init(&attr);
    // Its own process group: a ^C at the host's terminal is the host's to
    // handle, not a crash of every worker. Default signal dispositions.
    sigset_t def;
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    sigaddset(&def, SIGINT);
    sigaddset(&def, SIGTERM);
    sigaddset(&def, SIGHUP);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigdefault(&attr, &def);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(
        &attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    std::string arg0 = exe, arg1 = "--socket-fd", arg2 = "3";
    char* argv[] = {arg0.data(), arg1.data(), arg2.data(), nullptr};
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, exe.c_str(), &fa, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    ::close(child_end);
    if (rc != 0) {
      ::close(sv[0]);
      throw std::runtime_error(fmt::format("worker: cannot start {}: {}", exe, std::strerror(rc)));
    }
    pid_ = pid;
    sock_ = sv[0];
    try {
      send_frame(sock_, Msg::kInit, init);
    } catch (const std::exception&) {
      // It died at once: the status below says how.
    }
    const auto deadline = SteadyClock::now() + std::chrono::duration<double>(timeout_s);
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now())
              .count();
      if (left <= 0) {
        stop();
        const auto* k = init.if_contains("kind");
        throw std::runtime_error(fmt::format(
            "worker: {} did not load its engine within {} s (services.{}.start_timeout_seconds)",
            exe, timeout_s, k != nullptr && k->is_string() ? std::string(k->as_string()) : "?"));
      }
      Frame f;
      Read r = Read::kTimeout;
      try {
        r = recv_frame(sock_, static_cast<int>(std::min<long long>(left, 1000)), f);
      } catch (const std::exception& e) {
        stop();
        throw std::runtime_error(std::string("worker: at start: ") + e.what());
      }
      if (r == Read::kTimeout) continue;
      if (r == Read::kClosed) {
        const std::string how = reap();
        const std::string msg = fmt::format("worker: {} ended at start ({})", exe, how);
        if (last_signal_ != 0) throw StartKilled(msg);
        throw std::runtime_error(msg);
      }
      if (f.fd >= 0) ::close(f.fd);
      if (f.type == Msg::kReady) {
        if (const auto* m = f.body.if_contains("memory_limit")) {
          memory_limit_ = std::string(m->as_string());
        }
        return;
      }
      if (f.type == Msg::kInitFailed) {
        std::string msg = "worker: the engine did not start";
        if (const auto* m = f.body.if_contains("message")) msg = std::string(m->as_string());
        stop();
        throw std::runtime_error(msg);
      }
    }
  }

  // Whether the child has ended (looked at, not reaped: its process group
  // stays reserved until reap() kills what is left of it).
  bool exited() const {
    if (pid_ <= 0) return true;
    siginfo_t si{};
    return ::waitid(P_PID, static_cast<id_t>(pid_), &si, WEXITED | WNOHANG | WNOWAIT) == 0 &&
           si.si_pid == pid_;
  }

  // Kills the child (if running) and what it started, and waits for it;
  // how it ended.
  std::string kill_now() {
    if (pid_ > 0) ::kill(pid_, SIGKILL);
    return reap();
  }

  // Closes the socket, gives the child a second to end (it exits when it
  // reads the end of the socket), then kills its process group (the child,
  // and whatever it started that is still in the group) and waits for it:
  // "signal 11: Segmentation fault", "exit status 3". Sets last_signal().
  std::string reap() {
    if (sock_ >= 0) {
      ::close(sock_);
      sock_ = -1;
    }
    if (pid_ <= 0) return "not running";
    const auto give_up = SteadyClock::now() + std::chrono::seconds(1);
    while (!exited() && SteadyClock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    // The group's id is the child's pid, still reserved by the unreaped
    // child: nothing else can have it.
    ::kill(-pid_, SIGKILL);
    int status = 0;
    pid_t r;
    while ((r = ::waitpid(pid_, &status, 0)) < 0 && errno == EINTR) {
    }
    pid_ = -1;
    last_signal_ = 0;
    if (r < 0) return "its status is unknown";
    if (WIFSIGNALED(status)) {
      last_signal_ = WTERMSIG(status);
      return signal_text(last_signal_);
    }
    if (WIFEXITED(status)) {
      const int code = WEXITSTATUS(status);
      if (code == kExitLostSocket) {
        return fmt::format(
            "exit status {}: its socket to the host was closed or broken inside "
            "the worker",
            code);
      }
      if (code == kExitProtocol) {
        return fmt::format("exit status {}: a frame from the host was not the protocol", code);
      }
      return fmt::format("exit status {}", code);
    }
    return "ended";
  }

  // Closes the socket (the worker exits when it reads the end) and waits.
  void stop() noexcept {
    if (pid_ <= 0) {
      if (sock_ >= 0) ::close(sock_);
      sock_ = -1;
      return;
    }
    try {
      reap();
    } catch (...) {
    }
  }

  int last_signal() const { return last_signal_; }
  const std::string& memory_limit() const { return memory_limit_; }

 private:
  int pid_ = -1;
  int sock_ = -1;
  int last_signal_ = 0;
  std::string memory_limit_ = "none";
};

struct Settings {
  std::string kind;
  std::string exe;
  ServiceConfig service;
  std::string config_yaml;
  LogSink log;
  void write(LogLevel level, const std::string& message) const noexcept {
    if (!log) return;
    try {
      log(level, message);
    } catch (...) {  // a host's sink that throws loses its line, nothing else
    }
  }
};

class ProcessService final : public Service {
 public:
  ProcessService(std::shared_ptr<const Settings> s, std::string device)
      : s_(std::move(s)), device_(std::move(device)) {
    start_retrying();
  }

  void process(TaskContext& ctx) override {
    // A worker that died while idle is replaced now: its death is not this
    // task's failure.
    if (worker_.running() && worker_.exited()) idle_death();
    if (!worker_.running()) start_retrying();  // also one that failed to start earlier
    json::object task;
    task["id"] = ctx.task_id();
    task["service"] = ctx.service();
    task["options"] = ctx.options_json();
    task["batch_size"] = ctx.batch_size();
    task["attempt"] = ctx.attempt();
    task["device"] = ctx.device();
    task["instance"] = ctx.service_instance_id();
    task["estimate_mb"] = ctx.estimated_memory_mb();
    const double left = ctx.seconds_left();
    task["seconds_left"] = std::isfinite(left) ? left : -1.0;
    task["temp_dir"] = ctx.temp_dir();
    const TaskInput& in = ctx.input();
    int memfd = -1;
    if (!in.data.empty()) {
      memfd = make_sealed_memfd("taskmgr-input", in.data.data(), in.data.size());
      if (memfd < 0) {
        throw TaskError(TaskFailureReason::kProcessingError,
                        fmt::format("worker: cannot pass {} input bytes in a memfd: {}",
                                    in.data.size(), std::strerror(errno)),
                        /*retryable=*/true);
      }
      task["input_size"] = static_cast<std::int64_t>(in.data.size());
    } else {
      task["input_path"] = in.path;
    }
    // The memfd stays open until the worker has taken the task: a worker
    // that dies before (it was killed while idle, the task came at once)
    // is no fault of the task's: another is started and sent the task once.
    struct Fd {
      int fd;
      ~Fd() {
        if (fd >= 0) ::close(fd);
      }
    } input{memfd};
    bool accepted = false, resent = false;
    auto died_before_accepting = [&]() {
      if (accepted || resent) return false;
      resent = true;
      idle_death();
      start_retrying();  // a TaskError (retryable) when it cannot
      try {
        send_frame(worker_.sock(), Msg::kTask, task, input.fd);
      } catch (const std::exception&) {
        crashed(ctx);
      }
      return true;
    };
    try {
      send_frame(worker_.sock(), Msg::kTask, task, input.fd);
    } catch (const std::exception&) {
      died_before_accepting();
    }
    near_limit_ = false;

    std::optional<SteadyClock::time_point> stop_sent;
    bool stop_for_deadline = false;
    for (;;) {
      Frame f;
      Read r = Read::kTimeout;
      try {
        r = recv_frame(worker_.sock(), 50, f);
      } catch (const std::exception& e) {
        replace();
        throw TaskError(TaskFailureReason::kProcessingError,
                        std::string("worker broke the protocol: ") + e.what(), true);
      }
      if (r == Read::kClosed) {
        if (died_before_accepting()) continue;
        crashed(ctx);
      }
      if (r == Read::kTimeout) {
        // Dead, though its socket is still open: a process it started holds
        // the socket (a fork, system()).
        if (worker_.exited()) {
          if (died_before_accepting()) continue;
          crashed(ctx);
        }
        const bool cancel = ctx.cancelled(), late = ctx.deadline_exceeded();
        if (!stop_sent && (cancel || late)) {
          stop_for_deadline = late && !cancel;
          try {
            json::object c;
            c["id"] = ctx.task_id();
            send_frame(worker_.sock(), Msg::kCancel, c);
          } catch (const std::exception&) {
            crashed(ctx);
          }
          stop_sent = SteadyClock::now();
        } else if (stop_sent && SteadyClock::now() - *stop_sent >
                                    std::chrono::duration<double>(kStopGraceSeconds)) {
          const int pid = worker_.pid();
          const std::string how = worker_.kill_now();
          s_->write(LogLevel::kWarn,
                    fmt::format("worker {} of {} on {} did not stop within {} s of task {}'s {}: "
                                "killed ({}), replaced",
                                pid, s_->kind, device_, kStopGraceSeconds, ctx.task_id(),
                                stop_for_deadline ? "deadline" : "cancel", how));
          replace();
          const std::string msg =
              fmt::format("the worker did not stop within {} s of the {}; killed ({}) and replaced",
                          kStopGraceSeconds, stop_for_deadline ? "deadline" : "cancel", how);
          // Past the deadline the attempt ends TIMEOUT with this message
          // after its own, and the replacement is kept (TIMEOUT from the
          // service: it stopped); a cancelled one ends CANCELLED.
          throw TaskError(
              stop_for_deadline ? TaskFailureReason::kTimeout : TaskFailureReason::kCancelled, msg);
        }
        continue;
      }
      if (f.fd >= 0) ::close(f.fd);
      switch (f.type) {
        case Msg::kStage: {
          report(ctx, f.body, "rss_mb");
          std::string name;
          if (const auto* n = f.body.if_contains("name"); n && n->is_string()) {
            name = std::string(n->as_string());
          }
          try {
            ctx.stage(name);
          } catch (...) {
            // The task ends here while the worker still runs it: a worker
            // left so would answer the next task with this one's end.
            replace();
            throw;
          }
          break;
        }
        case Msg::kAccepted:
          accepted = true;
          if (input.fd >= 0) ::close(input.fd);
          input.fd = -1;
          break;
        case Msg::kMemory: report(ctx, f.body, "rss_mb"); break;
        case Msg::kDone: {
          // The end of this task, not of another: else the worker and the
          // host disagree on which task runs, and it is replaced.
          const auto* id = f.body.if_contains("id");
          if (id == nullptr || !id->is_string() || id->as_string() != ctx.task_id()) {
            replace();
            throw TaskError(
                TaskFailureReason::kProcessingError,
                "worker broke the protocol: the end of another task than " + ctx.task_id(), true);
          }
          finish(ctx, f.body);
          return;
        }
        default:
          replace();
          throw TaskError(TaskFailureReason::kProcessingError,
                          fmt::format("worker broke the protocol: message type {} during a task",
                                      static_cast<int>(f.type)),
                          true);
      }
    }
  }

  bool healthy() const noexcept override { return healthy_; }

 private:
  void start() {
    json::object init;
    init["kind"] = s_->kind;
    init["device"] = device_;
    init["library"] = s_->service.library;
    init["config_yaml"] = s_->config_yaml;
    init["memory_limit_mb"] = s_->service.memory_limit_mb;
    const auto t0 = SteadyClock::now();
    worker_.start(s_->exe, init, s_->service.start_timeout_seconds);
    last_rss_mb_ = 0;
    const std::string limit = worker_.memory_limit() == "rlimit_data"
                                  ? fmt::format("RLIMIT_DATA {} MB", s_->service.memory_limit_mb)
                                  : std::string("none");
    s_->write(
        LogLevel::kInfo,
        fmt::format("worker {} started for {} on {} in {:.0f} ms (memory limit: {})", worker_.pid(),
                    s_->kind, device_,
                    std::chrono::duration<double, std::milli>(SteadyClock::now() - t0).count(),
                    limit));
  }

  // Starts a worker; one killed while it started (from outside, the OOM
  // killer) is started again, three times in all, then the attempt fails
  // retryable. A worker that reports a failure (a library that does not
  // load, an engine that does not start) throws std::runtime_error at once.
  void start_retrying() {
    for (int i = 1;; ++i) {
      try {
        start();
        return;
      } catch (const StartKilled& e) {
        s_->write(LogLevel::kWarn, e.what());
        if (i >= 3) {
          throw TaskError(TaskFailureReason::kProcessingError, std::string(e.what()) + " (3 times)",
                          /*retryable=*/true);
        }
      }
    }
  }

  // The worker ended between tasks: logged, reaped; the caller starts
  // another.
  void idle_death() {
    const int pid = worker_.pid();
    const std::string how = worker_.reap();
    s_->write(LogLevel::kWarn, fmt::format("worker {} of {} on {} ended while idle ({}): replaced",
                                           pid, s_->kind, device_, how));
  }

  // The worker is gone or must go: a fresh one, warm, for the next task. A
  // replacement that cannot start leaves the instance unhealthy (the pool
  // destroys it; the next acquire makes another).
  void replace() noexcept {
    worker_.kill_now();
    try {
      start_retrying();
    } catch (const std::exception& e) {
      healthy_ = false;
      s_->write(LogLevel::kWarn, fmt::format("a new worker for {} on {} did not start: {}",
                                             s_->kind, device_, e.what()));
    } catch (...) {
      healthy_ = false;
    }
  }

  // A measured figure: the worker's resident memory, the task's peak so far.
  // ctx.report_memory throws past tasks.max_task_memory_mb or the device:
  // the worker is mid-task, so it is replaced first.
  void report(TaskContext& ctx, const json::object& body, const char* key) {
    if (const auto* n = body.if_contains("near_limit"); n && n->is_bool() && n->as_bool()) {
      near_limit_ = true;
    }
    const auto* v = body.if_contains(key);
    if (v == nullptr || !v->is_int64() || v->as_int64() < 0) return;
    last_rss_mb_ = v->as_int64();
    try {
      ctx.report_memory(last_rss_mb_);
    } catch (...) {
      replace();
      throw;
    }
  }

  [[noreturn]] void crashed(TaskContext& ctx) {
    const std::int64_t rss = last_rss_mb_;
    const int pid = worker_.pid();
    const std::string how = worker_.reap();
    const int sig = worker_.last_signal();
    s_->write(LogLevel::kWarn,
              fmt::format("worker {} of {} on {} ended during task {} ({}, {}): it is replaced",
                          pid, s_->kind, device_, ctx.task_id(), how,
                          rss > 0 ? fmt::format("{} MB resident when last measured", rss)
                                  : std::string("its memory not measured during the task")));
    replace();
    const std::int64_t limit = s_->service.memory_limit_mb;
    if (limit > 0 && near_limit_) {
      // Its allocations had reached 90% of the limit: an engine that aborts
      // or crashes when one fails (a C library's NULL) ran out of memory.
      throw OutOfMemoryError(
          fmt::format("worker ended ({}) after an allocation failed or its memory reached 90% "
                      "of its limit of {} MB "
                      "(services.{}.memory_limit_mb)",
                      how, limit, s_->kind));
    }
    if (sig == SIGKILL && limit > 0 && rss * 10 >= limit * 9) {
      throw OutOfMemoryError(fmt::format(
          "worker killed ({}) at {} MB resident, within 10% of its memory limit of {} MB "
          "(services.{}.memory_limit_mb)",
          how, rss, limit, s_->kind));
    }
    throw TaskError(TaskFailureReason::kProcessingError, fmt::format("worker crashed ({})", how),
                    /*retryable=*/true);
  }

  void finish(TaskContext& ctx, const json::object& body) {
    bool broken = false;
    if (const auto* h = body.if_contains("healthy"); h && h->is_bool() && !h->as_bool()) {
      broken = true;
    }
    const json::object* err = nullptr;
    if (const auto* e = body.if_contains("error"); e && e->is_object()) err = &e->as_object();
    if (err != nullptr) {
      if (const auto* b = err->if_contains("broken"); b && b->is_bool() && b->as_bool()) {
        broken = true;
      }
    }
    // The peak goes in first: an error below still leaves the measured peak.
    try {
      report(ctx, body, "peak_mb");
    } catch (...) {
      if (broken) replace();
      throw;
    }
    if (broken) replace();  // a fresh process, not a heap after bad_alloc
    if (err == nullptr) {
      if (const auto* r = body.if_contains("result"); r && r->is_string()) {
        ctx.set_result(std::string(r->as_string()));
      }
      return;
    }
    auto text = [&](const char* k) {
      const auto* v = err->if_contains(k);
      return v != nullptr && v->is_string() ? std::string(v->as_string()) : std::string();
    };
    auto flag = [&](const char* k) {
      const auto* v = err->if_contains(k);
      return v != nullptr && v->is_bool() && v->as_bool();
    };
    const std::string message = text("message");
    if (flag("oom")) throw OutOfMemoryError(message);
    const auto reason =
        parse_failure_reason(text("reason")).value_or(TaskFailureReason::kProcessingError);
    // An engine that fails a task in its own words when an allocation
    // fails ("could not recognize the page", "cannot decode the image"):
    // with an allocation refused under the limit, or past 90% of it, that
    // is out of memory (the worker was replaced above if it said so).
    const std::int64_t refused_mb = [&] {
      const auto* v = body.if_contains("refused_mb");
      return v != nullptr && v->is_int64() ? v->as_int64() : 0;
    }();
    if ((reason == TaskFailureReason::kProcessingError ||
         reason == TaskFailureReason::kInvalidInput) &&
        refused_mb > 0 && s_->service.memory_limit_mb > 0) {
      throw OutOfMemoryError(fmt::format(
          "{} (an allocation of {} MB was refused under the worker's memory limit of {} MB, "
          "services.{}.memory_limit_mb)",
          message, refused_mb, s_->service.memory_limit_mb, s_->kind));
    }
    if (reason == TaskFailureReason::kProcessingError && near_limit_ &&
        s_->service.memory_limit_mb > 0) {
      throw OutOfMemoryError(
          fmt::format("{} (the worker's memory had reached 90% of its limit "
                      "of {} MB, services.{}.memory_limit_mb)",
                      message, s_->service.memory_limit_mb, s_->kind));
    }
    if (reason == TaskFailureReason::kInvalidInput) throw InvalidInputError(message);
    throw TaskError(reason, message, flag("retryable"));
  }

  std::shared_ptr<const Settings> s_;
  std::string device_;
  Worker worker_;
  std::int64_t last_rss_mb_ = 0;
  bool near_limit_ = false;  // this task's worker reached 90% of its memory limit
  bool healthy_ = true;
};

class ProcessFactory final : public ServiceFactory,
                             public detail::InputRequirement,
                             public detail::ProcessFactoryTag {
 public:
  ProcessFactory(std::shared_ptr<const Settings> s, std::shared_ptr<ServiceFactory> local)
      : s_(std::move(s)), local_(std::move(local)) {}

  std::string kind() const override { return s_->kind; }
  std::unique_ptr<Service> create(const std::string& device) override {
    return std::make_unique<ProcessService>(s_, device);
  }
  bool supports(const DeviceInfo& device) const override {
    return local_ ? local_->supports(device) : ServiceFactory::supports(device);
  }
  std::shared_ptr<const MemoryModel> memory_model() const override {
    return local_ ? local_->memory_model() : nullptr;
  }
  bool needs_input() const override {
    const auto* r = dynamic_cast<const detail::InputRequirement*>(local_.get());
    return r != nullptr ? r->needs_input() : s_->kind == "ocr";
  }

 private:
  std::shared_ptr<const Settings> s_;
  std::shared_ptr<ServiceFactory> local_;
};

}  // namespace

std::string find_worker_executable(const ServiceConfig& settings) {
  if (!settings.worker_executable.empty()) {
    return is_executable(settings.worker_executable) ? settings.worker_executable : "";
  }
  std::vector<std::string> candidates;
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&find_worker_executable), &info) != 0 &&
      info.dli_fname != nullptr) {
    std::error_code ec;
    const auto lib = std::filesystem::canonical(info.dli_fname, ec);
    if (!ec) {
      candidates.push_back((lib.parent_path() / "taskmgr-worker").string());
      candidates.push_back(
          (lib.parent_path() / TASKMGR_LIBEXEC_FROM_LIBDIR / "taskmgr-worker").string());
    }
  }
  candidates.push_back(std::string(TASKMGR_LIBEXEC_DIR) + "/taskmgr-worker");
  for (const auto& c : candidates) {
    if (is_executable(c)) return c;
  }
  return "";
}

std::shared_ptr<ServiceFactory> make_process_service(const std::string& kind, const Config& config,
                                                     std::shared_ptr<ServiceFactory> local,
                                                     LogSink log) {
  auto s = std::make_shared<Settings>();
  s->kind = kind;
  s->log = std::move(log);
  if (auto it = config.services.find(kind); it != config.services.end()) s->service = it->second;
  s->exe = find_worker_executable(s->service);
  if (s->exe.empty()) {
    throw Error(ErrorCode::kInvalidConfig,
                s->service.worker_executable.empty()
                    ? fmt::format("services.{}.isolation: process: taskmgr-worker is not beside "
                                  "libtaskmgr.so nor in {} (set services.{}.worker_executable)",
                                  kind, TASKMGR_LIBEXEC_DIR, kind)
                    : fmt::format("services.{}.worker_executable: {} is not an executable file",
                                  kind, s->service.worker_executable));
  }
  s->config_yaml = config.to_yaml();
  if (!s->service.library.empty()) {
    // The library is checked now, not at the first task: a worker loads it
    // and makes the kind's factory (no instance, no engine), then exits.
    json::object init;
    init["kind"] = kind;
    init["device"] = "cpu";
    init["library"] = s->service.library;
    init["config_yaml"] = s->config_yaml;
    init["memory_limit_mb"] = 0;
    init["check_only"] = true;
    try {
      Worker check;
      check.start(s->exe, init, s->service.start_timeout_seconds);
      (void)check.reap();
    } catch (const std::exception& e) {
      // Named by its key, whatever went wrong (a crash, a timeout, a throw).
      std::string msg = e.what();
      const std::string key = "services." + kind + ".library";
      if (msg.find(key) == std::string::npos) {
        msg = key + ": checking " + s->service.library + " in a worker failed: " + msg;
      }
      throw Error(ErrorCode::kInvalidConfig, msg);
    }
  }
  return std::make_shared<ProcessFactory>(std::move(s), std::move(local));
}

}  // namespace taskmgr
