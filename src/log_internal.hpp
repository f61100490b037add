// Private: the logger every component writes through.
#pragma once

#include <string_view>

#include "sync.hpp"
#include "taskmgr/log.hpp"

namespace taskmgr::detail {

class Logger {
 public:
  explicit Logger(LogLevel level = LogLevel::kInfo, LogSink sink = nullptr);
  bool enabled(LogLevel level) const noexcept { return level >= level_ && level != LogLevel::kOff; }
  // Calls the host's sink: never with the scheduler lock held (code that
  // holds it commits log lines to the outbox instead).
  // Never throws, but a forced unwind of the calling thread passes through.
  void write(LogLevel level, std::string_view message) const REQUIRES(!scheduler_lock);

 private:
  LogLevel level_;
  LogSink sink_;
};

}  // namespace taskmgr::detail
