// taskmgr-http's routes: the spec's task routes and the metrics, as one
// handler from a complete HTTP request to its response, around one
// TaskManager. It may block (a create reads its input; the store writes).
#pragma once

#include <taskmgr/taskmgr.hpp>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "server.hpp"

namespace taskmgr_http {

struct ApiOptions {
  // When not empty, every route but GET /health needs the header
  // "Authorization: Bearer <token>" (compared in constant time): 401 else.
  std::string token;
  // Directories under which input.path may name a file (each resolved with
  // realpath at start). Empty: input.path is refused (403); inputs come as
  // bytes.
  std::vector<std::string> input_roots;
  // A file named by input.path is read by the server, at most this many
  // bytes (larger: 413).
  std::size_t max_input_bytes = 32u << 20;
  // The server's open connections, for GET /health (unset: 0).
  std::function<int()> connections;
};

// The request's answer; never throws (errors are JSON bodies with the
// status a client can act on: docs/CLI.md, "taskmgr-http").
Response handle(taskmgr::TaskManager& tm, const ApiOptions& options, const Request& req);

// The directory's canonical path (realpath), or "" when it is not a
// directory.
std::string canonical_directory(const std::string& dir);

// GET /events: the manager's events as Server-Sent Events, one message per
// event ("id: <sequence>", "event: <event_type>", "data: <the event's
// JSON>"); ?task_id=ID keeps one task's. Needs the token as every route.
class EventFanout {
 public:
  explicit EventFanout(taskmgr::TaskManager& tm);
  ~EventFanout();
  EventFanout(const EventFanout&) = delete;
  EventFanout& operator=(const EventFanout&) = delete;

  // The server's stream route for /events.
  StreamRoute route(const ApiOptions& options);
  int streams() const;
  // Drops every stream and takes no new one: called once the server has
  // stopped, while it still exists (a stream is a connection of its).
  void close();

 private:
  struct Sub {
    std::shared_ptr<Stream> stream;
    std::string task_id;  // "" = every task
  };
  void publish(const taskmgr::EventRecord& e);

  taskmgr::TaskManager& tm_;
  taskmgr::SubscriptionId id_ = 0;
  mutable std::mutex mu_;
  std::vector<Sub> subs_;
  bool closed_ = false;
};

}  // namespace taskmgr_http
