#include "server.hpp"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <vector>

namespace taskmgr_http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;

namespace {
// Text as valid UTF-8: each byte of an invalid sequence becomes U+FFFD (a
// message may quote what a client sent: a request target, a service name).
std::string valid_utf8_text(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t n = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
      n = 0;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      lo = c == 0xE0 ? 0xA0 : 0x80;
      hi = c == 0xED ? 0x9F : 0xBF;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      lo = c == 0xF0 ? 0x90 : 0x80;
      hi = c == 0xF4 ? 0x8F : 0xBF;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    bool ok = s.size() - i > n;
    for (std::size_t k = 1; ok && k <= n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      ok = b >= (k == 1 ? lo : 0x80) && b <= (k == 1 ? hi : 0xBF);
    }
    if (!ok) {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    out.append(s.substr(i, n + 1));
    i += n + 1;
  }
  return out;
}
}  // namespace

Response json_error(http::status status, const std::string& code, const std::string& message,
                    unsigned version, bool keep_alive) {
  Response r{status, version};
  r.set(http::field::server, "taskmgr-http");
  r.set(http::field::content_type, "application/json");
  r.keep_alive(keep_alive);
  r.body() = json::serialize(json::object{{"error", code}, {"message", valid_utf8_text(message)}});
  r.prepare_payload();
  return r;
}

namespace {
class Session;
}

// Handlers of the io_context capture `this`: the io_context is a member,
// destroyed (with what it still holds) before the members it uses.
class HttpServer::Impl {
 public:
  Impl(ServerOptions o, Handler h, StreamRoute sr)
      : opt(std::move(o)),
        handler(std::move(h)),
        stream_route(std::move(sr)),
        pool(static_cast<std::size_t>(std::max(1, opt.handler_threads))),
        acceptor(ioc),
        backoff(ioc) {
    const tcp::endpoint ep(asio::ip::make_address(opt.address), opt.port);
    acceptor.open(ep.protocol());
    acceptor.set_option(asio::socket_base::reuse_address(true));
    acceptor.bind(ep);
    acceptor.listen(asio::socket_base::max_listen_connections);
  }
  ~Impl() {
    pool.join();  // handlers hold sessions, which use the io_context below
  }

  void accept();
  void add(const std::shared_ptr<Session>& s);
  void stop();
  void run();
  void session_ended() {
    std::lock_guard<std::mutex> g(mu);
    --active;
    cv.notify_all();
  }

  const ServerOptions opt;
  const Handler handler;
  const StreamRoute stream_route;
  // Declared before the io_context: a session destroyed with it (a handler
  // still queued when the server stopped) counts itself out here.
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;  // connections open (guarded by mu)
  bool stop_requested = false;
  std::atomic<bool> stopping{false};
  std::vector<std::weak_ptr<Session>> sessions;  // guarded by mu
  // Bytes queued for the streams' clients, all together, and the streams
  // open: past the total budget each stream may hold its share only.
  std::atomic<std::size_t> stream_bytes{0};
  std::atomic<std::size_t> streams_open{0};
  asio::thread_pool pool;
  asio::io_context ioc;
  tcp::acceptor acceptor;
  asio::steady_timer backoff;
};

namespace {

bool out_of_descriptors(const error_code& ec) {
  return ec == asio::error::no_descriptors ||  // EMFILE
         ec == asio::error::no_buffer_space || ec == asio::error::no_memory || ec.value() == ENFILE;
}

class Session : public Stream, public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, HttpServer::Impl& im) : stream_(std::move(socket)), im_(im) {}

  // Stream: from any thread.
  using Stream::send;
  bool send(std::shared_ptr<const std::string> bytes) override {
    if (closed_.load()) return false;
    const std::size_t n = bytes->size();
    const std::size_t mine = backlog_.fetch_add(n) + n;
    const std::size_t total = im_.stream_bytes.fetch_add(n) + n;
    // Each stream may hold max_backlog; once all of them together hold
    // more than max_total_backlog, each may hold its share of that (clients
    // that read keep up and hold little; those that do not are dropped
    // first, and the server's memory stays bounded however many there are).
    std::size_t limit = im_.stream_route.max_backlog;
    if (total > im_.stream_route.max_total_backlog) {
      const std::size_t share =
          im_.stream_route.max_total_backlog / std::max<std::size_t>(1, im_.streams_open.load());
      limit = std::min(limit, std::max<std::size_t>(share, 64 * 1024));
    }
    if (mine > limit) {
      // A client that does not read: dropped, not buffered without bound.
      asio::post(stream_.get_executor(), [self = shared_from_this()] { self->close(); });
      return false;
    }
    asio::post(stream_.get_executor(), [self = shared_from_this(), b = std::move(bytes)]() mutable {
      self->out_.push_back(std::move(b));
      if (!self->writing_) self->write_next();
    });
    return true;
  }
  ~Session() {
    count_out();
    im_.stream_bytes.fetch_sub(backlog_.load());  // never written
    if (stream_counted_) im_.streams_open.fetch_sub(1);
  }

  void start() { read(); }

  // Over the connection limit: one 503, then close.
  void reject_busy() {
    write(json_error(http::status::service_unavailable, "busy",
                     "too many connections (at most " + std::to_string(im_.opt.max_connections) +
                         "); try again later"));
  }

  // stop(): an idle connection closes now; one whose request is being
  // handled closes once its response is written.
  void stop_if_idle() {
    asio::post(stream_.get_executor(), [self = shared_from_this()] {
      if (!self->busy_ || self->streaming_) self->close();
    });
  }

 private:
  void read() {
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(im_.opt.header_limit));
    parser_->body_limit(im_.opt.body_limit);
    // The first request's header within header_timeout; a kept-alive
    // connection may wait idle_timeout for the next one.
    stream_.expires_after(served_ == 0 ? im_.opt.header_timeout : im_.opt.idle_timeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            beast::bind_front_handler(&Session::on_header, shared_from_this()));
  }

  void on_header(error_code ec, std::size_t) {
    if (ec) return read_failed(ec);
    const auto& req = parser_->get();
    if (req.target().size() > im_.opt.max_target) {
      return write(json_error(
          http::status::uri_too_long, "uri_too_long",
          "the request target is longer than " + std::to_string(im_.opt.max_target) + " bytes"));
    }
    if (auto refused = refuse_framing(req)) return write(std::move(*refused));
    if (parser_->is_done()) return on_read({}, 0);
    // A client that asked (Expect: 100-continue) waits for a go-ahead
    // before it sends the body (curl does for bodies over 1 MiB).
    if (expects_continue(req)) {
      stream_.expires_after(im_.opt.body_timeout);
      return asio::async_write(stream_, asio::buffer(kContinue),
                               [self = shared_from_this()](error_code wec, std::size_t) {
                                 if (wec) return self->close();
                                 self->read_body();
                               });
    }
    read_body();
  }

  static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";

  static std::string lower_trimmed(std::string_view v) {
    std::string s;
    for (char c : v) {
      if (c != ' ' && c != '\t')
        s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    return s;
  }

  static bool expects_continue(const Request& req) {
    const auto it = req.find(http::field::expect);
    return it != req.end() && lower_trimmed(it->value()) == "100-continue";
  }

  // A body the server cannot frame or read is refused before it is read,
  // and the connection closed (what follows on it cannot be trusted to be
  // a request): a Transfer-Encoding other than "chunked" alone (RFC 9112,
  // 6.1: a request whose last coding is not chunked has no length, and
  // taking its body for the next request would let one request hide
  // another), a Content-Encoding (the bytes would be stored encoded), an
  // Expect other than 100-continue.
  static std::optional<Response> refuse_framing(const Request& req) {
    std::string te;
    for (auto [it, end] = req.equal_range(http::field::transfer_encoding); it != end; ++it) {
      if (!te.empty()) te += ',';
      te += lower_trimmed(it->value());
    }
    if (!te.empty() && te != "chunked") {
      const bool last_chunked = te.size() >= 7 && te.compare(te.size() - 7, 7, "chunked") == 0;
      return json_error(last_chunked ? http::status::not_implemented : http::status::bad_request,
                        last_chunked ? "not_implemented" : "bad_request",
                        "Transfer-Encoding '" + te + "' is not supported: send the body as it " +
                            "is, with Content-Length or Transfer-Encoding: chunked",
                        req.version(), false);
    }
    for (auto [it, end] = req.equal_range(http::field::content_encoding); it != end; ++it) {
      const std::string ce = lower_trimmed(it->value());
      if (!ce.empty() && ce != "identity") {
        return json_error(
            http::status::unsupported_media_type, "unsupported_media_type",
            "Content-Encoding '" + ce + "' is not supported: send the bytes as " + "they are",
            req.version(), false);
      }
    }
    if (const auto it = req.find(http::field::expect);
        it != req.end() && lower_trimmed(it->value()) != "100-continue") {
      return json_error(http::status::expectation_failed, "expectation_failed",
                        "Expect: only 100-continue is understood", req.version(), false);
    }
    return std::nullopt;
  }

  void read_body() {
    // A body of some size is read in pieces of up to 64 KiB: the buffer
    // has the capacity the header needed, and a read takes no more than
    // that (a 1 MiB upload took ~250 reads, each a trip through the
    // reactor). Given back once the request is read.
    if (const auto n = parser_->content_length(); n && *n > 4096) {
      buffer_.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(*n, 65536)));
    }
    stream_.expires_after(im_.opt.body_timeout);
    http::async_read(stream_, buffer_, *parser_,
                     beast::bind_front_handler(&Session::on_read, shared_from_this()));
  }

  void on_read(error_code ec, std::size_t) {
    if (ec) return read_failed(ec);
    busy_ = true;
    if (buffer_.capacity() > 16384 && buffer_.size() == 0) buffer_.shrink_to_fit();
    stream_.expires_never();  // the handler may take its time; the client waits
    if (im_.stream_route.matches && im_.stream_route.matches(parser_->get())) {
      return asio::post(im_.pool, [self = shared_from_this(), req = parser_->release()] {
        std::optional<Response> refused;
        try {
          refused = self->im_.stream_route.admit(req);
        } catch (...) {
          refused = json_error(http::status::internal_server_error, "internal",
                               "the request could not be handled", req.version(), false);
        }
        asio::post(self->stream_.get_executor(), [self, req, r = std::move(refused)]() mutable {
          if (r && req.method() == http::verb::head && !r->body().empty()) {
            // A HEAD's answer has no body (its length kept): else the
            // next response on the connection would start with it.
            const std::size_t n = r->body().size();
            r->body().clear();
            r->content_length(n);
          }
          if (r) return self->write(std::move(*r));
          self->open_stream(req);
        });
      });
    }
    auto run = [](HttpServer::Impl& im, const Request& req) {
      try {
        return im.handler(req);
      } catch (...) {
        return json_error(http::status::internal_server_error, "internal",
                          "the request could not be handled", req.version(), req.keep_alive());
      }
    };
    // Reads (GET, HEAD) are quick (memory, or one row of the store): run
    // here, on the I/O thread, with no hand-off. The rest (a create reads
    // and stores its input) goes to the handler pool, so that slow ones
    // never hold the threads that serve the sockets.
    if (im_.opt.inline_reads && (parser_->get().method() == http::verb::get ||
                                 parser_->get().method() == http::verb::head)) {
      const Request req = parser_->release();
      return write(run(im_, req));
    }
    asio::post(im_.pool, [self = shared_from_this(), req = parser_->release(), run]() mutable {
      Response res = run(self->im_, req);
      asio::post(self->stream_.get_executor(),
                 [self, r = std::move(res)]() mutable { self->write(std::move(r)); });
    });
  }

  void read_failed(const error_code& ec) {
    if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
        ec == asio::error::operation_aborted || ec == asio::error::eof ||
        ec == asio::error::connection_reset || ec == asio::error::broken_pipe) {
      return close();  // the client left, was too slow, or the server stops
    }
    if (ec == http::error::header_limit) {
      // A request line that did not end within the limit is a target too
      // long (414); else the header fields are too large (431).
      // (The parser has the request line once it is whole; else the bytes
      // read so far do not hold its end.)
      const auto data = buffer_.cdata();
      const std::string_view seen(static_cast<const char*>(data.data()), data.size());
      const auto eol = seen.find("\r\n");
      const bool line_parsed = !parser_->get().target().empty();
      if (!line_parsed && (eol == std::string_view::npos || eol > im_.opt.max_target)) {
        return write(json_error(
            http::status::uri_too_long, "uri_too_long",
            "the request line is longer than " + std::to_string(im_.opt.max_target) + " bytes"));
      }
      return write(json_error(http::status::request_header_fields_too_large,
                              "header_fields_too_large",
                              "the request's header is larger than " +
                                  std::to_string(im_.opt.header_limit) + " bytes"));
    }
    if (ec == http::error::body_limit) {
      return write(json_error(
          http::status::payload_too_large, "payload_too_large",
          "the request body is larger than " + std::to_string(im_.opt.body_limit) + " bytes"));
    }
    return write(json_error(http::status::bad_request, "bad_request",
                            "not an HTTP/1.1 request: " + ec.message()));
  }

  void write(Response res) {
    ++served_;
    const bool keep =
        res.keep_alive() && served_ < im_.opt.max_requests_per_connection && !im_.stopping.load();
    res.keep_alive(keep);
    res_ = std::make_shared<Response>(std::move(res));
    stream_.expires_after(im_.opt.body_timeout);  // a client that does not read is dropped
    http::async_write(stream_, *res_,
                      [self = shared_from_this(), keep](error_code ec, std::size_t) {
                        self->res_.reset();
                        self->busy_ = false;
                        if (ec || !keep || self->im_.stopping.load()) return self->close();
                        self->read();
                      });
  }

  // The stream's header, then its messages as they are sent; a comment
  // line every heartbeat finds a client that is gone.
  void open_stream(const Request& req) {
    streaming_ = true;
    stream_counted_ = true;
    im_.streams_open.fetch_add(1);
    if (im_.stopping.load()) return close();
    out_.push_back(std::make_shared<const std::string>(
        "HTTP/1.1 200 OK\r\nServer: taskmgr-http\r\nContent-Type: text/event-stream\r\n"
        "Cache-Control: no-cache\r\nConnection: close\r\nX-Accel-Buffering: no\r\n\r\n"));
    backlog_.fetch_add(out_.back()->size());
    im_.stream_bytes.fetch_add(out_.back()->size());
    heartbeat_.emplace(stream_.get_executor());
    beat();
    watch_peer();
    // The stream is subscribed before its header goes out: a client that
    // has read the header gets every event sent after it (the header
    // written first let the client's next request's event come before the
    // subscription, now and then, and be missed).
    try {
      im_.stream_route.on_open(req, shared_from_this());
    } catch (...) {
      return close();
    }
    write_next();
  }

  // A stream's client sends nothing more: a read that completes means it
  // left (end of file, a reset), and the connection is closed at once (not
  // at the next heartbeat's failed write); bytes it sends are dropped.
  void watch_peer() {
    stream_.socket().async_read_some(asio::buffer(peer_bytes_),
                                     [self = shared_from_this()](error_code ec, std::size_t) {
                                       if (ec || self->closed_.load()) return self->close();
                                       self->watch_peer();
                                     });
  }

  void beat() {
    heartbeat_->expires_after(im_.stream_route.heartbeat);
    heartbeat_->async_wait([self = shared_from_this()](error_code ec) {
      if (ec || self->closed_.load()) return;
      self->send(": keep-alive\n\n");
      self->beat();
    });
  }

  void write_next() {
    if (out_.empty() || closed_.load()) {
      writing_ = false;
      return;
    }
    writing_ = true;
    stream_.expires_after(im_.opt.body_timeout);  // a client that stops reading is dropped
    // What is queued, up to 64 messages, in one write (one message a write
    // made a trip through the reactor and a system call each, for every
    // stream: under a burst of events the readers fell behind).
    write_bufs_.clear();
    for (const auto& m : out_) {
      if (write_bufs_.size() == kGather) break;
      write_bufs_.emplace_back(m->data(), m->size());
    }
    asio::async_write(stream_, write_bufs_,
                      [self = shared_from_this()](error_code ec, std::size_t) {
                        std::size_t bytes = 0;
                        for (std::size_t i = 0; i < self->write_bufs_.size(); ++i) {
                          bytes += self->out_.front()->size();
                          self->out_.pop_front();
                        }
                        self->backlog_.fetch_sub(bytes);
                        self->im_.stream_bytes.fetch_sub(bytes);
                        if (ec) return self->close();
                        self->write_next();
                      });
  }

  // The connection no longer counts as open (against max_connections, and
  // for stop()'s drain) once it is closed, not when the session object goes:
  // an event stream's session lives on in the fan-out's list until its next
  // send finds it closed (a client that had left held every stop for the
  // whole drain timeout).
  void count_out() {
    if (!counted_out_.exchange(true)) im_.session_ended();
  }

  void close() {
    closed_.store(true);
    count_out();
    if (heartbeat_) heartbeat_->cancel();
    error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.close();
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<Response> res_;
  HttpServer::Impl& im_;
  int served_ = 0;
  bool busy_ = false;  // a request is with the handler or being written
  bool streaming_ = false;
  bool writing_ = false;
  // A stream's messages to write (the strand's), shared with the other
  // streams they were sent to.
  std::deque<std::shared_ptr<const std::string>> out_;
  static constexpr std::size_t kGather = 64;
  std::vector<asio::const_buffer> write_bufs_;  // the write in flight (the strand's)
  std::atomic<std::size_t> backlog_{0};
  std::atomic<bool> closed_{false};
  bool stream_counted_ = false;  // in streams_open (the strand's; read by the destructor)
  std::atomic<bool> counted_out_{false};
  std::optional<asio::steady_timer> heartbeat_;
  std::array<char, 256> peer_bytes_{};  // what a stream's client sends: dropped
};

}  // namespace

void HttpServer::Impl::add(const std::shared_ptr<Session>& s) {
  std::lock_guard<std::mutex> g(mu);
  if (sessions.size() >= 64 && sessions.size() >= 2 * static_cast<std::size_t>(active)) {
    sessions.erase(std::remove_if(sessions.begin(), sessions.end(),
                                  [](const std::weak_ptr<Session>& w) { return w.expired(); }),
                   sessions.end());
  }
  sessions.push_back(s);
}

void HttpServer::Impl::accept() {
  acceptor.async_accept(asio::make_strand(ioc), [self = this](error_code ec, tcp::socket socket) {
    if (self->stopping.load() || !self->acceptor.is_open()) return;
    if (ec) {
      // Re-armed on every error; out of descriptors, after a pause (the
      // connection stays in the backlog until one is free).
      if (out_of_descriptors(ec)) {
        self->backoff.expires_after(std::chrono::milliseconds(50));
        self->backoff.async_wait([self](error_code e) {
          if (!e && !self->stopping.load()) self->accept();
        });
        return;
      }
      return self->accept();
    }
    bool over = false;
    {
      std::lock_guard<std::mutex> g(self->mu);
      over = ++self->active > self->opt.max_connections;
    }
    auto s = std::make_shared<Session>(std::move(socket), *self);
    if (over) {
      s->reject_busy();
    } else {
      self->add(s);
      s->start();
    }
    self->accept();
  });
}

void HttpServer::Impl::stop() {
  std::vector<std::weak_ptr<Session>> now;
  {
    std::lock_guard<std::mutex> g(mu);
    if (stop_requested) return;
    stop_requested = true;
    stopping.store(true);
    now = sessions;
    cv.notify_all();
  }
  asio::post(ioc, [self = this] {
    error_code ec;
    self->acceptor.close(ec);
    self->backoff.cancel();
  });
  for (auto& w : now) {
    if (auto s = w.lock()) s->stop_if_idle();
  }
}

void HttpServer::Impl::run() {
  auto guard = asio::make_work_guard(ioc);
  accept();
  std::vector<std::thread> threads;
  for (int i = 0; i < std::max(1, opt.io_threads); ++i) threads.emplace_back([this] { ioc.run(); });
  {
    std::unique_lock<std::mutex> g(mu);
    cv.wait(g, [this] { return stop_requested; });
    // Requests in flight are answered; then the connections close.
    cv.wait_for(g, opt.drain_timeout, [this] { return active == 0; });
  }
  guard.reset();
  ioc.stop();
  for (auto& t : threads) t.join();
  pool.join();
}

HttpServer::HttpServer(ServerOptions options, Handler handler, StreamRoute stream)
    : impl_(std::make_shared<Impl>(std::move(options), std::move(handler), std::move(stream))) {}

HttpServer::~HttpServer() { impl_->stop(); }

unsigned short HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

void HttpServer::run() { impl_->run(); }

void HttpServer::stop() { impl_->stop(); }

int HttpServer::connections() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  return impl_->active;
}

}  // namespace taskmgr_http
