// A worker library for the worker-process tests (services.<kind>.library):
// kind "probe" does what its task's options say, inside taskmgr-worker.
// (Kind "throws": the entry point throws; "wrong": a factory of "probe".)
//
//   {"do":"ok"}                     result {"pid", "batch", "attempt"}
//   {"do":"segv"} / {"do":"abort"}  the worker dies by that signal
//   {"do":"exit","status":N}        the worker exits
//   {"do":"hang"}                   sleeps forever, ignoring cancel
//   {"do":"wait"}                   writes its pid to options.pid_file, then
//                                   sleeps until cancelled (a kill from outside)
//   {"do":"hog","mb_per_page":M,"pages":P}
//                                   allocates and touches min(batch, P) x M MB
//   {"do":"touch","mb":M}           touches M MB, reports a stage, holds it
//                                   until the task ends; result {"pid"}
//   {"do":"crash_first"}            segfaults on attempt 1, ok after
//   {"do":"bad_message"}            throws a message that is not UTF-8
//   {"do":"forksegv","pid_file":F}  forks a child that sleeps (its pid to F),
//                                   then segfaults
//   {"do":"c_alloc"}                mallocs until NULL, then throws in its own
//                                   words; "c_alloc_abort": aborts instead
//   {"do":"bad_result"}             sets a result that is not UTF-8
//   {"do":"bad_stage"}              a stage name that is not UTF-8 (refused:
//                                   caught, then "ok"; "uncaught": not caught)
//   {"do":"big_result","mb":M}      a result of M MB of JSON text
//   {"do":"close_socket"}           closes descriptor 3 (the worker's socket),
//                                   then returns
//   {"do":"wait_first","pid_file":F,"mark":M}
//                                   the first run (M not there: made) is
//                                   "wait"; later ones "ok"
//   {"do":"hang_first","mark":M}    the same with "hang"
#include <signal.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "taskmgr/service.hpp"
#include "taskmgr/worker.hpp"

namespace {

namespace json = boost::json;
using namespace taskmgr;

std::vector<char> touched(std::size_t mb) {
  std::vector<char> v(mb << 20);
  for (std::size_t i = 0; i < v.size(); i += 4096) v[i] = static_cast<char>(i);
  return v;
}

class Probe final : public Service {
 public:
  void process(TaskContext& ctx) override {
    const json::object o = json::parse(ctx.options_json()).as_object();
    std::string what(o.at("do").as_string());
    if (what == "wait_first" || what == "hang_first") {
      // The first run (no mark file yet) waits or hangs; later ones are ok.
      const std::string mark(o.at("mark").as_string());
      const bool first = ::access(mark.c_str(), F_OK) != 0;
      if (first) std::ofstream(mark) << "ran\n";
      what = !first ? "ok" : what == "wait_first" ? "wait" : "hang";
    }
    json::object r;
    r["pid"] = static_cast<std::int64_t>(::getpid());
    r["batch"] = ctx.batch_size();
    r["attempt"] = ctx.attempt();
    r["id"] = ctx.task_id();
    if (what == "segv") ::raise(SIGSEGV);
    if (what == "forksegv") {
      // A helper process that outlives the worker and keeps its socket.
      const pid_t child = ::fork();
      if (child == 0) {
        for (;;) ::pause();
      }
      std::ofstream(std::string(o.at("pid_file").as_string())) << child << "\n";
      ::raise(SIGSEGV);
    }
    if (what == "big_alloc") {
      // One large buffer, as an engine copies a page: NULL from malloc is
      // met in the engine's own words.
      void* p = std::malloc(static_cast<std::size_t>(o.at("mb").as_int64()) << 20);
      if (p == nullptr) throw std::runtime_error("engine failed: no buffer for the page");
      std::free(p);
    }
    if (what == "c_alloc" || what == "c_alloc_abort") {
      // A C library's way: malloc until it returns NULL, then fail in its
      // own words (or abort).
      std::vector<void*> held;
      for (;;) {
        void* p = std::malloc(8 << 20);
        if (p == nullptr) break;
        std::memset(p, 1, 4096);
        held.push_back(p);
      }
      if (what == "c_alloc_abort") std::abort();
      std::this_thread::sleep_for(std::chrono::milliseconds(60));  // working with what it got
      for (void* p : held) std::free(p);
      throw std::runtime_error("engine failed: the page could not be processed");
    }
    if (what == "bad_message") throw std::runtime_error("bad \xff\xfe bytes");
    if (what == "bad_result") {
      ctx.set_result("{\"text\":\"\xff\"}");
      return;
    }
    if (what == "abort") std::abort();
    if (what == "crash_first" && ctx.attempt() == 1) ::raise(SIGSEGV);
    if (what == "exit") std::_Exit(static_cast<int>(o.at("status").as_int64()));
    if (what == "hang") {
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    if (what == "bad_stage") {
      try {
        ctx.stage("page \xff");
      } catch (const std::exception&) {
        // Refused in the worker as in process; a service that goes on
        // after it must not confuse the host about which task ends.
      }
      if (o.contains("uncaught")) ctx.stage("page \xff");
    }
    if (what == "big_result") {
      // A result of about `mb` MB of JSON text.
      const std::size_t n = static_cast<std::size_t>(o.at("mb").as_int64()) << 20;
      std::string text;
      text.reserve(n + 16);  // one buffer of the result's size, no more
      text += "{\"pad\":\"";
      text.append(n, 'x');
      text += "\"}";
      ctx.set_result(std::move(text));
      return;
    }
    if (what == "close_socket") {
      ::close(3);
      return;
    }
    if (what == "wait") {
      std::ofstream(std::string(o.at("pid_file").as_string())) << ::getpid() << "\n";
      while (!ctx.cancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      ctx.throw_if_cancelled();
    }
    if (what == "hog") {
      const auto pages = o.at("pages").as_int64();
      const auto held = std::min<std::int64_t>(ctx.batch_size(), pages);
      auto mb = static_cast<std::size_t>(held * o.at("mb_per_page").as_int64());
      if (o.contains("only_on") && o.at("only_on").as_string() != ctx.device()) mb = 0;
      ctx.stage("hog");
      const auto v = touched(mb);  // std::bad_alloc past the worker's limit
      ctx.report_memory(static_cast<std::int64_t>(mb));
      r["held_mb"] = static_cast<std::int64_t>(mb);
      r["check"] = v.empty() ? 0 : static_cast<int>(v[v.size() / 2]);
    }
    if (what == "touch") {
      const auto v = touched(static_cast<std::size_t>(o.at("mb").as_int64()));
      ctx.stage("touched");
      r["check"] = static_cast<int>(v[v.size() / 3]);
    }
    ctx.set_result(json::serialize(r));
  }
};

class ProbeFactory final : public ServiceFactory {
 public:
  std::string kind() const override { return "probe"; }
  std::unique_ptr<Service> create(const std::string&) override { return std::make_unique<Probe>(); }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) taskmgr::ServiceFactory* taskmgr_worker_factory(
    const char* kind) {
  // "throws" and "wrong" are the open-time check's cases: a factory that
  // cannot be made, and one of another kind.
  if (std::strcmp(kind, "throws") == 0) throw std::runtime_error("no such engine here");
  if (std::strcmp(kind, "wrong") == 0) return new ProbeFactory();
  if (std::strcmp(kind, "probe") != 0) return nullptr;
  return new ProbeFactory();
}
