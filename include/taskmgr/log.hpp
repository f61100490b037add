// taskmgr: log messages to the host.
//
// The library never writes to stdout. Messages at or above logging.level go
// to the sink the host sets (TaskManagerOptions::log_sink); without one,
// warnings and errors go to stderr. A sink may be called from any library
// thread, with no library lock held, and must not throw (what it throws is
// swallowed).
#pragma once

#include <functional>
#include <optional>
#include <string_view>

#include "taskmgr/export.hpp"

namespace taskmgr {

enum class LogLevel { kTrace = 0, kDebug = 1, kInfo = 2, kWarn = 3, kError = 4, kOff = 5 };

TASKMGR_API std::string_view to_string(LogLevel level) noexcept;
TASKMGR_API std::optional<LogLevel> parse_log_level(std::string_view s) noexcept;

using LogSink = std::function<void(LogLevel level, std::string_view message)>;

}  // namespace taskmgr
