// taskmgr-http's routes: the spec's task routes and the metrics, as one
// handler from a complete HTTP request to its response, around one
// TaskManager. It may block (a create reads its input; the store writes).
#pragma once

#include <taskmgr/taskmgr.hpp>

#include "server.hpp"

namespace taskmgr_http {

// The request's answer; never throws (errors are JSON bodies with the
// status a client can act on: docs/CLI.md, "taskmgr-http").
Response handle(taskmgr::TaskManager& tm, const Request& req);

}  // namespace taskmgr_http
