// Private: the logger every component writes through.
#pragma once

#include <string_view>

#include "taskmgr/log.hpp"

namespace taskmgr::detail {

class Logger {
 public:
  explicit Logger(LogLevel level = LogLevel::kInfo, LogSink sink = nullptr);
  bool enabled(LogLevel level) const noexcept { return level >= level_ && level != LogLevel::kOff; }
  void write(LogLevel level, std::string_view message) const noexcept;

 private:
  LogLevel level_;
  LogSink sink_;
};

}  // namespace taskmgr::detail
