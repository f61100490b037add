#include "manager/temp_dirs.hpp"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <random>

#include "taskmgr/service.hpp"

namespace taskmgr::detail {

namespace fs = std::filesystem;

std::string TempDirs::base() const {
  std::error_code ec;
  return configured_.empty() ? fs::temp_directory_path(ec).string() : configured_;
}

std::string TempDirs::create(const std::string& task_id, int attempt) {
  std::call_once(once_, [this] {
    std::random_device rd;
    char suffix[16];
    std::snprintf(suffix, sizeof suffix, "%08x", rd());
    root_ = (fs::path(base()) / ("taskmgr-" + std::to_string(::getpid()) + "-" + suffix)).string();
  });
  std::string dir = root_ + "/" + task_id + "-a" + std::to_string(attempt);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw TaskError(TaskFailureReason::kProcessingError,
                    "cannot create temp dir " + dir + ": " + ec.message());
  }
  return dir;
}

void TempDirs::remove(const std::string& dir, std::vector<std::string>& problems) {
  if (dir.empty()) return;
  std::error_code ec;
  fs::remove_all(dir, ec);
  if (fs::exists(dir, ec)) problems.push_back("temp dir " + dir + " still exists");
}

void TempDirs::remove_dead_runs() {
  std::error_code ec;
  const fs::path root = base();
  if (root.empty()) return;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind("taskmgr-", 0) != 0) continue;
    const std::string rest = name.substr(8);
    const auto dash = rest.find('-');
    if (dash == std::string::npos) continue;
    long pid = 0;
    try {
      pid = std::stol(rest.substr(0, dash));
    } catch (const std::exception&) {
      continue;
    }
    if (pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive
    std::error_code rm;
    fs::remove_all(it->path(), rm);
  }
}

void TempDirs::remove_root() {
  // root_ is written once under once_; a manager being destroyed has no
  // attempt left that could be writing it.
  std::call_once(once_, [] {});
  if (root_.empty()) return;
  std::error_code ec;
  fs::remove_all(root_, ec);
}

}  // namespace taskmgr::detail
