// The cluster view as JSON (cluster.hpp).
#include "taskmgr/cluster.hpp"

#include <boost/json.hpp>

#include "json_check.hpp"
#include "utf8.hpp"

namespace taskmgr {

namespace {
boost::json::string text(const std::string& s) {
  return boost::json::string(detail::to_valid_utf8(s));
}
}  // namespace

std::string to_json(const ClusterStatus& c) {
  boost::json::object o;
  o["host_id"] = text(c.host_id);
  o["queued"] = c.queued;
  o["pending"] = c.pending;
  boost::json::array hosts;
  for (const HostStatus& h : c.hosts) {
    boost::json::object j;
    j["id"] = text(h.id);
    j["host_name"] = text(h.host_name);
    j["pid"] = h.pid;
    j["started_at"] = format_timestamp(h.started_at);
    j["heartbeat_at"] = format_timestamp(h.heartbeat_at);
    j["lease_seconds"] = h.lease_seconds;
    if (h.closed_at) {
      j["closed_at"] = format_timestamp(*h.closed_at);
    } else {
      j["closed_at"] = nullptr;
    }
    j["state"] = h.closed_at ? "closed" : h.lost ? "lost" : "alive";
    j["lost"] = h.lost;
    j["claimed"] = h.claimed;
    j["running"] = h.running;
    // What the host reported (a JSON object it wrote); {} if it does not parse.
    if (!detail::json_document_problem(h.report_json)) {
      j["report"] = boost::json::parse(h.report_json);
    } else {
      j["report"] = boost::json::object();
    }
    hosts.push_back(std::move(j));
  }
  o["hosts"] = std::move(hosts);
  return boost::json::serialize(o);
}

}  // namespace taskmgr
