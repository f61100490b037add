#include "log_internal.hpp"

#include <cstdio>

#include "enum_table.hpp"
#include "forced_unwind.hpp"
#include "host_call.hpp"

namespace taskmgr {
namespace {
constexpr std::pair<LogLevel, std::string_view> kLevelNames[] = {
    {LogLevel::kTrace, "trace"}, {LogLevel::kDebug, "debug"}, {LogLevel::kInfo, "info"},
    {LogLevel::kWarn, "warn"},   {LogLevel::kError, "error"}, {LogLevel::kOff, "off"},
};
}  // namespace

std::string_view to_string(LogLevel l) noexcept { return detail::enum_name(kLevelNames, l); }
std::optional<LogLevel> parse_log_level(std::string_view s) noexcept {
  return detail::enum_parse(kLevelNames, s);
}

namespace detail {

Logger::Logger(LogLevel level, LogSink sink) : level_(level), sink_(std::move(sink)) {}

void Logger::write(LogLevel level, std::string_view message) const {
  if (level < level_ || level == LogLevel::kOff) return;
  try {
    if (sink_) {
      HostCallScope host;
      sink_(level, message);
    } else if (level >= LogLevel::kWarn) {
      std::fprintf(stderr, "taskmgr %s: %.*s\n", to_string(level).data(),
                   static_cast<int>(message.size()), message.data());
    }
  } catch (...) {
    // A forced unwind (the thread is ending: e.g. Python's finalization
    // exits a thread in a callback) goes on; anything else a sink throws
    // loses the message, not the host.
    ::taskmgr::detail::rethrow_if_forced_unwind();
  }
}

}  // namespace detail
}  // namespace taskmgr
