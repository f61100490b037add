// Checks an event's details against the vocabulary (docs/EVENTS.md): every
// event of a type carries exactly the same keys, in the same order (as
// written; a PostgreSQL store gives them back in JSONB's order).
#pragma once

#include <algorithm>
#include <boost/json.hpp>
#include <string>
#include <vector>

#include "manager/task_events.hpp"

namespace taskmgr::test {

// "" when `details_json` of `event` has exactly the documented keys (in
// their order unless `any_order`: PostgreSQL's JSONB keeps an object's keys
// in an order of its own).
inline std::string event_keys_problem(TaskEvent event, const std::string& details_json,
                                      bool any_order = false) {
  boost::system::error_code ec;
  const boost::json::value v = boost::json::parse(details_json, ec);
  if (ec || !v.is_object()) return "details are not a JSON object: " + details_json;
  const auto& want = detail::events::keys_of(event);
  const auto& o = v.as_object();
  std::vector<std::string> got_keys, want_keys;
  for (const auto& kv : o) got_keys.emplace_back(kv.key());
  for (const auto& k : want) want_keys.emplace_back(k);
  if (any_order) {
    std::sort(got_keys.begin(), got_keys.end());
    std::sort(want_keys.begin(), want_keys.end());
  }
  std::string got;
  for (const auto& k : got_keys) got += (got.empty() ? "" : ",") + k;
  std::string expected;
  for (const auto& k : want_keys) expected += (expected.empty() ? "" : ",") + k;
  if (got != expected) {
    return std::string(to_string(event)) + " has keys [" + got + "], the vocabulary says [" +
           expected + "]";
  }
  return "";
}

}  // namespace taskmgr::test
