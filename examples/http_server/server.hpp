// taskmgr-http's transport: an asynchronous HTTP/1.1 server (Boost.Beast on
// an io_context run by a few threads) that hands each complete request to a
// handler on a separate pool, so that a slow handler (a create that reads
// its input, a store under load) never holds the threads that read and
// write the sockets.
//
// What it guarantees, whatever the clients do:
//  * the acceptor is re-armed after every error (after a short pause when
//    the process is out of descriptors: EMFILE, ENFILE, ENOBUFS, ENOMEM), so
//    the server accepts again as soon as descriptors are free;
//  * at most `max_connections` connections; one more is answered 503 and
//    closed;
//  * each request's header must arrive within `header_timeout`, its body
//    within `body_timeout`, and an idle keep-alive connection is closed
//    after `idle_timeout`; a connection serves at most
//    `max_requests_per_connection` requests;
//  * a request line with a target longer than `max_target` is 414, headers
//    past `header_limit` 431, a body past `body_limit` 413, anything that is
//    not HTTP/1.x 400: each with a JSON body, then the connection closes;
//  * stop() stops accepting, closes idle connections, lets requests in
//    flight be answered (up to `drain_timeout`), then returns from run().
#pragma once

#include <boost/beast/http.hpp>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace taskmgr_http {

namespace http = boost::beast::http;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

struct ServerOptions {
  std::string address = "127.0.0.1";
  unsigned short port = 0;  // 0: a free port (see HttpServer::port())
  int io_threads = 2;       // threads that read and write sockets
  int handler_threads = 4;  // threads that run the handler
  int max_connections = 1024;
  std::size_t body_limit = 32u << 20;  // bytes
  std::size_t header_limit = 16u << 10;
  std::size_t max_target = 8u << 10;
  std::chrono::milliseconds header_timeout{10'000};
  std::chrono::milliseconds body_timeout{60'000};
  std::chrono::milliseconds idle_timeout{30'000};
  std::chrono::milliseconds drain_timeout{10'000};
  int max_requests_per_connection = 1000;
  // GET and HEAD run on the I/O thread that read them (no hand-off); other
  // methods on the handler pool.
  bool inline_reads = true;
};

// The handler: one complete request in, one response out; it may block. It
// must not throw (an exception is answered 500 with a generic message).
using Handler = std::function<Response(const Request&)>;

// A long-lived answer (Server-Sent Events): after the header, whatever
// send() is given, in order, until the client leaves, its backlog passes
// `max_backlog` bytes (a client that does not read), or the server stops.
class Stream {
 public:
  virtual ~Stream() = default;
  // Queues bytes; false once the stream is closed (drop it then). The
  // bytes are shared, not copied: one message sent to many streams is held
  // once however far behind its clients are.
  virtual bool send(std::shared_ptr<const std::string> bytes) = 0;
  bool send(std::string bytes) {
    return send(std::make_shared<const std::string>(std::move(bytes)));
  }
};

// The route of streams. For a request `matches` takes (cheap: the target
// only), `admit` runs on the handler pool: a Response refuses it (401,
// 405...), nullopt opens the stream: the server writes the header (200,
// text/event-stream) and hands the stream to `on_open`.
struct StreamRoute {
  std::function<bool(const Request&)> matches;
  std::function<std::optional<Response>(const Request&)> admit;
  std::function<void(const Request&, std::shared_ptr<Stream>)> on_open;
  std::size_t max_backlog = 4u << 20;
  // All streams together: past it, each may hold its share of it (at least
  // 64 KiB), and the clients that read least are dropped first.
  std::size_t max_total_backlog = 64u << 20;
  std::chrono::milliseconds heartbeat{15'000};
};

// A JSON error response {"error": code, "message": message}.
Response json_error(http::status status, const std::string& code, const std::string& message,
                    unsigned version = 11, bool keep_alive = false);

class HttpServer {
 public:
  // Binds now (std::system_error when it cannot, e.g. the port is taken).
  HttpServer(ServerOptions options, Handler handler, StreamRoute stream = {});
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  unsigned short port() const;
  // Serves until stop() (from any thread, a signal handler's thread too)
  // has drained the connections.
  void run();
  void stop();

  // Connections open now (for tests and /health).
  int connections() const;

  class Impl;  // server.cpp

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace taskmgr_http
