// Helpers shared by the tests.
#pragma once

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "taskmgr/taskmgr.hpp"

namespace taskmgr::test {

// Polls `pred` until it holds or `limit` of real time passes. Tests use it to
// wait for asynchronous effects; it is a safety net against hangs, never an
// assertion about time.
inline bool eventually(const std::function<bool()>& pred,
                       std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}

// A gate a service can wait at until the test opens it.
class Gate {
 public:
  Gate() = default;
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;
  // Opens: a test that fails early must not leave a service thread waiting.
  ~Gate() { open(); }
  void open() {
    std::lock_guard<std::mutex> g(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [this] { return open_; });
  }
  // Counts arrivals; the test can wait for n of them.
  void arrive() {
    std::lock_guard<std::mutex> g(mu_);
    ++arrived_;
    cv_.notify_all();
  }
  int arrived() {
    std::lock_guard<std::mutex> g(mu_);
    return arrived_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
  int arrived_ = 0;
};

// Records every event delivered to a subscriber.
class EventLog {
 public:
  void operator()(const EventRecord& e) {
    std::lock_guard<std::mutex> g(mu_);
    events_.push_back(e);
  }
  std::vector<EventRecord> all() {
    std::lock_guard<std::mutex> g(mu_);
    return events_;
  }
  std::vector<std::string> names_for(const std::string& task_id) {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<std::string> out;
    for (const auto& e : events_) {
      if (e.task_id == task_id) out.emplace_back(to_string(e.event));
    }
    return out;
  }
  // How many events of this name the task got.
  int count(const std::string& task_id, std::string_view name) {
    std::lock_guard<std::mutex> g(mu_);
    int n = 0;
    for (const auto& e : events_) n += e.task_id == task_id && to_string(e.event) == name;
    return n;
  }

 private:
  std::mutex mu_;
  std::vector<EventRecord> events_;
};

inline std::vector<std::string> names(const std::vector<EventRecord>& events) {
  std::vector<std::string> out;
  for (const auto& e : events) out.emplace_back(to_string(e.event));
  return out;
}

// A config with declared devices and no probing, for deterministic placement.
inline Config test_config() {
  Config c;
  c.devices.probe_cpu = false;
  c.devices.probe_nvidia = false;
  c.devices.cpu_memory_mb = 4000;
  c.executor.worker_threads = 2;
  c.tasks.retry.backoff_jitter = 0;
  c.storage.path = ":memory:";
  // The OCR engines in this process (the default runs them in workers):
  // the unit tests' sanitizers see them; tests of the worker path ask for it.
  c.services["ocr"].isolation = "in_process";
  return c;
}

// A fresh folder under the system's temporary directory, removed with
// everything in it when the object goes.
struct TempDir {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() /
      ("taskmgr-test-" + std::to_string(::getpid()) + "-" + generate_task_id().substr(24));
  TempDir() { std::filesystem::create_directories(path); }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string db() const { return (path / "tasks.db").string(); }  // a database file in it
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

// A store that forwards everything to another: test decorators derive from
// it and override only the calls they watch.
class ForwardingStore : public TaskStore {
 public:
  explicit ForwardingStore(std::shared_ptr<TaskStore> inner) : inner_(std::move(inner)) {}
  void insert_tasks(const std::vector<NewTask>& t) override { inner_->insert_tasks(t); }
  void update_task(const Task& t, const std::vector<EventRecord>& e) override {
    inner_->update_task(t, e);
  }
  void append_metrics(const std::vector<MetricSample>& s) override { inner_->append_metrics(s); }
  std::optional<Task> load_task(const std::string& id) override { return inner_->load_task(id); }
  std::vector<Task> list_tasks(const TaskFilter& f) override { return inner_->list_tasks(f); }
  std::vector<EventRecord> load_events(const std::string& id) override {
    return inner_->load_events(id);
  }
  std::vector<MetricSample> load_metrics(const std::string& id) override {
    return inner_->load_metrics(id);
  }
  std::vector<Task> load_unfinished() override { return inner_->load_unfinished(); }
  std::size_t prune_finished(Timestamp before) override { return inner_->prune_finished(before); }
  std::size_t delete_tasks(const std::vector<std::string>& ids) override {
    return inner_->delete_tasks(ids);
  }
  std::vector<PauseState> load_pauses() override { return inner_->load_pauses(); }
  void save_pause(const PauseState& p, bool paused) override { inner_->save_pause(p, paused); }
  void flush() override { inner_->flush(); }
  StoreStats stats() const override { return inner_->stats(); }
  std::string describe() const override { return "forwarding"; }

 private:
  std::shared_ptr<TaskStore> inner_;
};

}  // namespace taskmgr::test
