// taskmgr-worker: one pooled service instance in a process of its own.
//
// Started by the host (worker/process_service.cpp) with one end of a
// socketpair on the fd named by --socket-fd. It reads kInit, sets its memory
// limit, makes the service's factory (the built-in OCR, or a worker
// library's taskmgr_worker_factory) and one warm instance, answers kReady,
// then runs one task at a time. A reader thread takes the host's frames: a
// cancel sets the running task's flag; the host closing the socket (it
// exited, or replaced this worker) ends the process at once.
//
// Uses libtaskmgr's public API only; the protocol is compiled in.
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>

#include "taskmgr/config.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/ocr.hpp"
#include "taskmgr/service.hpp"
#include "taskmgr/worker.hpp"
#include "utf8.hpp"
#include "worker/protocol.hpp"

namespace json = boost::json;
using namespace taskmgr;
using namespace taskmgr::worker;

namespace {

int g_sock = -1;
std::mutex g_send_mu;  // frames from the main thread and the sampler, whole
std::atomic<bool> g_cancel{false};
std::atomic<bool> g_running{false};         // a task is running
std::atomic<bool> g_near_limit{false};      // this task's memory reached 90% of the limit
std::atomic<bool> g_near_sent{false};       // ... and the host was told so
std::atomic<std::int64_t> g_refused_mb{0};  // the largest allocation refused in this task
std::int64_t g_limit_kb = 0;                // 0 = no limit (set once, before any thread)

// A frame to the host; a worker that cannot write it exits (the host closed
// the socket, or the service closed or broke it: the host names the status).
// A frame that does not fit in memory (std::bad_alloc: under the limit,
// the JSON text of a large frame) is the caller's to handle.
void send_or_exit(Msg type, const json::object& body) {
  try {
    send_frame(g_sock, type, body);
  } catch (const std::bad_alloc&) {
    throw;
  } catch (...) {
    ::_exit(kExitLostSocket);
  }
}

void send(Msg type, const json::object& body) {
  std::lock_guard<std::mutex> g(g_send_mu);
  send_or_exit(type, body);
}

// A field of /proc/self/status in kB, read with system calls into the
// stack only (no allocation: the heap may be exhausted; also called from a
// signal handler); -1 when unreadable.
std::int64_t status_field_kb(const char* key) {
  char buf[8192];
  const int fd = ::open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = 0, r;
  while (n < static_cast<ssize_t>(sizeof buf) - 1 &&
         (r = ::read(fd, buf + n, sizeof buf - 1 - static_cast<std::size_t>(n))) > 0) {
    n += r;
  }
  ::close(fd);
  buf[n < 0 ? 0 : n] = '\0';
  const char* p = std::strstr(buf, key);
  if (p == nullptr) return -1;
  p += std::strlen(key);
  while (*p == ' ' || *p == '\t') ++p;
  std::int64_t v = 0;
  while (*p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
  return v;
}

// VmData: what RLIMIT_DATA counts.
std::int64_t data_kb() { return status_field_kb("VmData:"); }

bool past_90_percent(std::int64_t kb) { return g_limit_kb > 0 && kb * 10 >= g_limit_kb * 9; }

// The frame {"near_limit":true} (kMemory), made before any signal arrives.
char g_near_frame[64];
std::size_t g_near_frame_size = 0;

void make_near_frame() {
  const char payload[] = "{\"near_limit\":true}";
  const auto n = static_cast<std::uint32_t>(sizeof payload - 1 + 1);
  for (int i = 0; i < 4; ++i) g_near_frame[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  g_near_frame[4] = static_cast<char>(Msg::kMemory);
  std::memcpy(g_near_frame + 5, payload, sizeof payload - 1);
  g_near_frame_size = 5 + sizeof payload - 1;
}

// A crash (an engine that aborts or dereferences NULL when an allocation
// fails) with the memory past 90% of the limit: the host hears it before
// the worker dies, and reports OUT_OF_MEMORY instead of a crash.
extern "C" void on_fatal_signal(int sig) {
  if ((g_near_limit.load() || past_90_percent(data_kb())) && !g_near_sent.exchange(true)) {
    (void)!::write(g_sock, g_near_frame, g_near_frame_size);
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

// While a task runs under a limit, every 10 ms: the resident set, sent when
// it moved by 2% of the limit (at least 4 MB) since last sent, so that the
// host knows it within 10 ms when the worker is killed (SIGKILL near the
// limit: the OOM killer); and VmData: past 90% of the limit the host is
// told (once per task).
void sampler() {
  std::int64_t sent_rss = -1;
  const std::int64_t step = std::max<std::int64_t>(4, g_limit_kb / 1024 / 50);
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (!g_running.load()) {
      sent_rss = -1;
      continue;
    }
    const std::int64_t kb = data_kb();
    const bool near = !g_near_sent.load() && (g_near_limit.load() || past_90_percent(kb));
    const std::int64_t rss_kb = status_field_kb("VmRSS:");
    const std::int64_t rss = rss_kb < 0 ? -1 : (rss_kb + 1023) / 1024;
    const bool moved = rss >= 0 && (sent_rss < 0 || std::abs(rss - sent_rss) >= step);
    if (!near && !moved) continue;
    if (near) {
      g_near_limit.store(true);
      if (g_near_sent.exchange(true)) continue;
    }
    try {
      json::object o;
      if (near) {
        o["near_limit"] = true;
        o["data_mb"] = (kb + 1023) / 1024;
      }
      if (rss >= 0) o["rss_mb"] = rss;
      std::lock_guard<std::mutex> g(g_send_mu);
      // Never after the task's kDone (the main thread clears g_running
      // under this lock first).
      if (g_running.load()) send_frame(g_sock, Msg::kMemory, o);
      if (rss >= 0) sent_rss = rss;
    } catch (const std::bad_alloc&) {
      // The heap is exhausted now; the next sample tries again (a near
      // frame not sent is sent by the crash handler if the worker dies).
      if (near) g_near_sent.store(false);
    } catch (...) {
      ::_exit(kExitLostSocket);
    }
  }
}
std::mutex g_mu;
std::condition_variable g_cv;
std::deque<Frame> g_tasks;
std::string g_current;  // id of the running task (guarded by g_mu)

std::string text_of(const json::object& o, const char* key) {
  const auto* v = o.if_contains(key);
  return v != nullptr && v->is_string() ? std::string(v->as_string()) : std::string();
}
std::int64_t int_of(const json::object& o, const char* key, std::int64_t def) {
  const auto* v = o.if_contains(key);
  return v != nullptr && v->is_int64() ? v->as_int64() : def;
}

void reader() {
  for (;;) {
    Frame f;
    Read r = Read::kClosed;
    try {
      r = recv_frame(g_sock, -1, f);
    } catch (const std::system_error&) {
      ::_exit(kExitLostSocket);  // poll failed: the socket is broken here
    } catch (const std::exception& e) {
      std::fprintf(stderr, "taskmgr-worker: %s\n", e.what());
      ::_exit(kExitProtocol);
    }
    // The host is gone or replaced this worker: nothing is left to do. (Or
    // the service closed the socket: the host is told by the status.)
    if (r != Read::kFrame) ::_exit(::fcntl(g_sock, F_GETFD) < 0 ? kExitLostSocket : 0);
    if (f.type == Msg::kCancel) {
      if (f.fd >= 0) ::close(f.fd);
      std::lock_guard<std::mutex> g(g_mu);
      if (text_of(f.body, "id") == g_current) g_cancel.store(true);
      continue;
    }
    std::lock_guard<std::mutex> g(g_mu);
    g_tasks.push_back(std::move(f));
    g_cv.notify_one();
  }
}

class WorkerContext final : public TaskContext {
 public:
  WorkerContext(const json::object& t, TaskInput input)
      : id_(text_of(t, "id")),
        service_(text_of(t, "service")),
        options_(text_of(t, "options")),
        device_(text_of(t, "device")),
        instance_(text_of(t, "instance")),
        temp_(text_of(t, "temp_dir")),
        batch_(static_cast<int>(int_of(t, "batch_size", 1))),
        attempt_(static_cast<int>(int_of(t, "attempt", 1))),
        estimate_(int_of(t, "estimate_mb", 0)),
        input_(std::move(input)) {
    const auto* s = t.if_contains("seconds_left");
    const double left = s != nullptr && s->is_number() ? s->to_number<double>() : -1;
    if (left >= 0) {
      deadline_ = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(left));
      has_deadline_ = true;
    }
  }
  const std::string& task_id() const override { return id_; }
  const std::string& service() const override { return service_; }
  const TaskInput& input() const override { return input_; }
  const std::string& options_json() const override { return options_; }
  int batch_size() const override { return batch_; }
  int attempt() const override { return attempt_; }
  const std::string& device() const override { return device_; }
  const std::string& service_instance_id() const override { return instance_; }
  std::int64_t estimated_memory_mb() const override { return estimate_; }
  bool cancelled() const override { return g_cancel.load(); }
  bool deadline_exceeded() const override {
    return has_deadline_ && std::chrono::steady_clock::now() >= deadline_;
  }
  double seconds_left() const override {
    if (!has_deadline_) return std::numeric_limits<double>::infinity();
    return std::max(
        0.0, std::chrono::duration<double>(deadline_ - std::chrono::steady_clock::now()).count());
  }
  const std::string& temp_dir() override { return temp_; }
  // The sample's memory is measured here (the resident set now); the host
  // records the sample.
  void stage(std::string_view name) override {
    // Refused here, as in process (the host would refuse it too, with the
    // task still running here).
    if (auto at = detail::invalid_utf8_at(name)) {
      throw Error(ErrorCode::kInvalidArgument,
                  "stage: the name is not valid UTF-8 (byte " + std::to_string(*at) + ")");
    }
    json::object o;
    o["name"] = name;
    o["rss_mb"] = self_rss_mb();
    send(Msg::kStage, o);
  }
  // A service's own figure is kept for the record; what the host tracks and
  // checks is the resident set measured now.
  void report_memory(std::int64_t mb) override {
    json::object o;
    o["rss_mb"] = self_rss_mb();
    o["reported_mb"] = mb;
    send(Msg::kMemory, o);
  }
  void set_result(std::string result_json) override { result_ = std::move(result_json); }
  std::string& result() { return result_; }

 private:
  std::string id_, service_, options_, device_, instance_, temp_;
  int batch_, attempt_;
  std::int64_t estimate_;
  TaskInput input_;
  std::string result_;
  std::chrono::steady_clock::time_point deadline_{};
  bool has_deadline_ = false;
};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TASKMGR_WORKER_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TASKMGR_WORKER_SANITIZED 1
#endif
#endif

std::string limit_memory(std::int64_t mb) {
  if (mb <= 0) return "none";
#ifdef TASKMGR_WORKER_SANITIZED
  throw std::runtime_error(
      "worker: this taskmgr-worker is built with a sanitizer, whose shadow memory RLIMIT_DATA "
      "counts: it cannot run under memory_limit_mb (" +
      std::to_string(mb) + " MB); use a build without sanitizers, or memory_limit_mb: 0");
#endif
  rlimit rl{};
  rl.rlim_cur = rl.rlim_max = static_cast<rlim_t>(mb) * 1024 * 1024;
  if (::setrlimit(RLIMIT_DATA, &rl) != 0) {
    throw std::runtime_error(std::string("worker: setrlimit(RLIMIT_DATA) failed: ") +
                             std::strerror(errno));
  }
  g_limit_kb = mb * 1024;
  make_near_frame();
  for (const int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) ::signal(sig, on_fatal_signal);
  return "rlimit_data";
}

std::shared_ptr<ServiceFactory> make_factory(const std::string& kind, const std::string& library,
                                             const Config& config) {
  if (library.empty()) {
    if (kind != "ocr") {
      throw std::runtime_error("worker: no services." + kind +
                               ".library to make its instances (only ocr is built in)");
    }
    return make_ocr_service(config.ocr);
  }
  void* h = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* e = ::dlerror();
    throw std::runtime_error("worker: services." + kind + ".library: cannot load " + library +
                             ": " + (e != nullptr ? e : "unknown error"));
  }
  auto fn = reinterpret_cast<taskmgr_worker_factory_fn>(::dlsym(h, TASKMGR_WORKER_FACTORY_SYMBOL));
  if (fn == nullptr) {
    throw std::runtime_error("worker: services." + kind + ".library: " + library +
                             " does not export " TASKMGR_WORKER_FACTORY_SYMBOL);
  }
  std::shared_ptr<ServiceFactory> f(fn(kind.c_str()));
  if (!f) {
    throw std::runtime_error("worker: services." + kind + ".library: " + library +
                             " has no factory for '" + kind + "'");
  }
  return f;
}

TaskInput input_of(const Frame& f) {
  TaskInput in;
  if (f.fd < 0) {
    in.path = text_of(f.body, "input_path");
    return in;
  }
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw std::runtime_error("worker: the input memfd is unreadable");
  const auto n = static_cast<std::size_t>(st.st_size);
  if (n > 0) {
    void* p = ::mmap(nullptr, n, PROT_READ, MAP_PRIVATE, f.fd, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    const auto* b = static_cast<const std::uint8_t*>(p);
    try {
      in.data.assign(b, b + n);
    } catch (...) {
      ::munmap(p, n);
      throw;
    }
    ::munmap(p, n);
  }
  return in;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--socket-fd") == 0) g_sock = std::atoi(argv[i + 1]);
  }
  if (g_sock < 0) {
    std::fprintf(stderr,
                 "taskmgr-worker: started by libtaskmgr (services.<kind>.isolation: process), "
                 "not by hand\n");
    return 2;
  }
  ::signal(SIGPIPE, SIG_IGN);
  // A program a service runs (system(), popen) does not get the socket.
  ::fcntl(g_sock, F_SETFD, FD_CLOEXEC);
  Frame init;
  if (recv_frame(g_sock, -1, init) != Read::kFrame || init.type != Msg::kInit) return 3;
  const std::string kind = text_of(init.body, "kind");
  std::unique_ptr<Service> instance;
  std::shared_ptr<ServiceFactory> factory;
  const std::string device = text_of(init.body, "device");
  std::string limit;
  try {
    const Config config = Config::from_yaml_string(text_of(init.body, "config_yaml"), "host");
    limit = limit_memory(int_of(init.body, "memory_limit_mb", 0));
    factory = make_factory(kind, text_of(init.body, "library"), config);
    if (const auto* c = init.body.if_contains("check_only"); c && c->is_bool() && c->as_bool()) {
      // The host's check at open: the library loads and makes a factory of
      // the kind; no instance (no engine) is made.
      if (factory->kind() != kind) {
        throw std::runtime_error(
            "worker: services." + kind + ".library: " + text_of(init.body, "library") +
            " made a factory of kind '" + factory->kind() + "' for '" + kind + "'");
      }
      json::object o;
      o["pid"] = static_cast<std::int64_t>(::getpid());
      o["memory_limit"] = limit;
      send_or_exit(Msg::kReady, o);
      return 0;
    }
    instance = factory->create(device);
    if (!instance) throw std::runtime_error("worker: the factory made no instance");
  } catch (const std::bad_alloc&) {
    json::object o;
    o["message"] = "worker: the " + kind + " engine did not load within services." + kind +
                   ".memory_limit_mb (" + std::to_string(int_of(init.body, "memory_limit_mb", 0)) +
                   " MB)";
    send_or_exit(Msg::kInitFailed, o);
    return 4;
  } catch (const std::exception& e) {
    // The worker's own messages say "worker: ..."; a factory's or an
    // engine's words are said to come from starting the worker.
    const std::string what = e.what();
    json::object o;
    o["message"] = what.rfind("worker:", 0) == 0
                       ? what
                       : "worker: starting " + kind + " on " + device + ": " + what;
    send_or_exit(Msg::kInitFailed, o);
    return 4;
  } catch (...) {
    json::object o;
    o["message"] = "worker: starting " + kind + " on " + device + ": an unknown exception";
    send_or_exit(Msg::kInitFailed, o);
    return 4;
  }
  {
    json::object o;
    o["pid"] = static_cast<std::int64_t>(::getpid());
    o["memory_limit"] = limit;
    send_or_exit(Msg::kReady, o);
  }
  std::thread(reader).detach();
  if (g_limit_kb > 0) std::thread(sampler).detach();

  for (;;) {
    Frame f;
    {
      std::unique_lock<std::mutex> g(g_mu);
      g_cv.wait(g, [] { return !g_tasks.empty(); });
      f = std::move(g_tasks.front());
      g_tasks.pop_front();
      g_current = text_of(f.body, "id");
      g_cancel.store(false);
      g_near_limit.store(false);
      g_near_sent.store(false);
      g_refused_mb.store(0);
    }
    if (f.type != Msg::kTask) return 5;
    {
      json::object a;
      a["id"] = text_of(f.body, "id");
      send(Msg::kAccepted, a);
    }
    reset_peak_rss();
    g_running.store(true);
    std::exception_ptr err;
    std::string result;
    {
      std::unique_ptr<WorkerContext> ctx;
      try {
        ctx = std::make_unique<WorkerContext>(f.body, input_of(f));
        if (f.fd >= 0) ::close(f.fd);
        f.fd = -1;
        if (!instance) instance = factory->create(device);
        instance->process(*ctx);
        result = std::move(ctx->result());
      } catch (...) {
        err = std::current_exception();
      }
      if (f.fd >= 0) ::close(f.fd);
    }
    bool healthy = true;
    FailureInfo fi;
    if (err) {
      fi = TaskErrorHandler::classify(err);
      healthy = !fi.instance_broken;
    }
    const std::string id = text_of(f.body, "id");
    if (instance) {
      instance->cleanup_task(id);
      healthy = healthy && instance->healthy();
    }
    {
      std::lock_guard<std::mutex> g(g_send_mu);
      g_running.store(false);
    }
    {
      std::lock_guard<std::mutex> g(g_mu);
      g_current.clear();
    }
    auto base = [&](json::object& done) {
      done["id"] = id;
      done["peak_mb"] = self_peak_rss_mb();
      done["healthy"] = healthy;
      done["near_limit"] = g_near_limit.load();
      done["refused_mb"] = g_refused_mb.load();
    };
    const std::size_t result_bytes = result.size();
    bool sent = false;
    try {
      json::object done;
      if (err) {
        json::object e;
        e["reason"] = std::string(to_string(fi.reason));
        e["message"] = fi.message;
        e["retryable"] = fi.retryable;
        e["oom"] = fi.out_of_memory;
        e["broken"] = fi.instance_broken;
        done["error"] = std::move(e);
      } else {
        done["result"] = result;
      }
      base(done);
      std::lock_guard<std::mutex> g(g_send_mu);
      send_frame(g_sock, Msg::kDone, done);
      sent = true;
    } catch (const std::bad_alloc&) {
      // The end does not fit in what the memory limit leaves (a large
      // result copied into its frame): said so, in a small frame.
    } catch (...) {
      ::_exit(kExitLostSocket);
    }
    if (!sent) {
      std::string().swap(result);
      json::object e;
      e["reason"] = "out_of_memory";
      e["message"] = "worker: the task's " + std::string(err ? "error" : "result") + " (" +
                     std::to_string(result_bytes) +
                     " bytes) did not fit in the worker's memory limit to be sent to the host "
                     "(services." +
                     kind + ".memory_limit_mb)";
      e["retryable"] = true;
      e["oom"] = true;
      e["broken"] = true;
      json::object done;
      done["error"] = std::move(e);
      healthy = false;
      base(done);
      send(Msg::kDone, done);
    }
  }
}

// An allocation that fails under the worker's memory limit (malloc and its
// kin returning NULL) marks the task as out of memory, whatever the engine
// then does with the NULL: fail in its own words ("could not recognize
// page", "cannot decode the image"), abort, crash. Also one larger than the
// whole limit: the task needs more than the limit gives. Not one past any
// machine's memory (1 TiB): a size computed wrongly is the engine's bug. Defined in
// the executable, these come before libc's for every library the worker
// loads; they allocate with libc's own allocator (free stays libc's). Not in
// sanitized builds, whose runtime owns malloc.
#ifndef TASKMGR_WORKER_SANITIZED
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {
void note_failed(std::size_t bytes) {
  constexpr std::size_t kImplausible = std::size_t{1} << 40;
  if (g_limit_kb > 0 && bytes < kImplausible) {
    g_near_limit.store(true, std::memory_order_relaxed);
    const auto mb = static_cast<std::int64_t>((bytes + (1u << 20) - 1) >> 20);
    std::int64_t prev = g_refused_mb.load(std::memory_order_relaxed);
    while (mb > prev && !g_refused_mb.compare_exchange_weak(prev, mb, std::memory_order_relaxed)) {
    }
  }
}
}  // namespace

extern "C" {
__attribute__((visibility("default"))) void* malloc(std::size_t n) {
  void* p = __libc_malloc(n);
  if (p == nullptr && n != 0) note_failed(n);
  return p;
}
__attribute__((visibility("default"))) void* calloc(std::size_t n, std::size_t size) {
  void* p = __libc_calloc(n, size);
  if (p == nullptr && n != 0 && size != 0) {
    note_failed(size != 0 && n > SIZE_MAX / size ? SIZE_MAX : n * size);
  }
  return p;
}
__attribute__((visibility("default"))) void* realloc(void* old, std::size_t n) {
  void* p = __libc_realloc(old, n);
  if (p == nullptr && n != 0) note_failed(n);
  return p;
}
__attribute__((visibility("default"))) void* memalign(std::size_t align, std::size_t n) {
  void* p = __libc_memalign(align, n);
  if (p == nullptr && n != 0) note_failed(n);
  return p;
}
__attribute__((visibility("default"))) void* aligned_alloc(std::size_t align, std::size_t n) {
  void* p = __libc_memalign(align, n);
  if (p == nullptr && n != 0) note_failed(n);
  return p;
}
__attribute__((visibility("default"))) int posix_memalign(void** out, std::size_t align,
                                                          std::size_t n) {
  if (align < sizeof(void*) || (align & (align - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(align, n);
  if (p == nullptr && n != 0) {
    note_failed(n);
    return ENOMEM;
  }
  *out = p;
  return 0;
}
}
#endif
