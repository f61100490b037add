// Checks an event's details against the vocabulary (docs/EVENTS.md): every
// event of a type carries exactly the same keys, in the same order.
#pragma once

#include <boost/json.hpp>
#include <string>

#include "manager/task_events.hpp"

namespace taskmgr::test {

// "" when `details_json` of `event` has exactly the documented keys.
inline std::string event_keys_problem(TaskEvent event, const std::string& details_json) {
  boost::system::error_code ec;
  const boost::json::value v = boost::json::parse(details_json, ec);
  if (ec || !v.is_object()) return "details are not a JSON object: " + details_json;
  const auto& want = detail::events::keys_of(event);
  const auto& o = v.as_object();
  std::string got;
  for (const auto& kv : o) got += std::string(got.empty() ? "" : ",") + std::string(kv.key());
  std::string expected;
  for (const auto& k : want) expected += std::string(expected.empty() ? "" : ",") + std::string(k);
  if (got != expected) {
    return std::string(to_string(event)) + " has keys [" + got + "], the vocabulary says [" +
           expected + "]";
  }
  return "";
}

}  // namespace taskmgr::test
