#include "taskmgr/pause.hpp"

#include <boost/json.hpp>

#include "enum_table.hpp"

namespace taskmgr {
namespace {
constexpr std::pair<PauseScope, std::string_view> kScopeNames[] = {
    {PauseScope::kManager, "manager"},
    {PauseScope::kDevice, "device"},
    {PauseScope::kService, "service"},
};
}  // namespace

std::string_view to_string(PauseScope s) noexcept { return detail::enum_name(kScopeNames, s); }
std::optional<PauseScope> parse_pause_scope(std::string_view s) noexcept {
  return detail::enum_parse(kScopeNames, s);
}

std::string to_json(const PauseState& p) {
  boost::json::object o;
  o["scope"] = to_string(p.scope);
  o["name"] = p.name;
  o["since"] = format_timestamp(p.since);
  return boost::json::serialize(o);
}

}  // namespace taskmgr
