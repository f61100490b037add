// taskmgr-http: the spec's routes over HTTP on the loopback interface,
// around one TaskManager: an asynchronous server (server.hpp: Boost.Beast,
// a few I/O threads, bounded connections, timeouts and sizes) and the routes
// (api.hpp).
//
//   taskmgr-http [--port N] [--config FILE] [--db PATH] [--port-file PATH]
//                [--max-connections N] [--body-limit-mb N]
//                [--header-timeout S] [--idle-timeout S]
//
//   POST /tasks                  create   {"service","input":{"path"|"data_base64","media_type"},
//                                          "priority","batch_size","device","options"}  -> 201 task
//   POST /tasks/{id}/start       start    {"device","priority","batch_size","options"}  -> 202 task
//   POST /tasks/{id}/cancel      cancel                                                 -> 200 task
//   GET  /tasks/{id}             the task (every spec field)                            -> 200
//   GET  /tasks/{id}/health      the spec's task health                                 -> 200
//   GET  /tasks/metrics          the spec's metrics (JSON)                              -> 200
//   GET  /tasks?status=&service=&limit=   list                                          -> 200
//   GET  /metrics                Prometheus text                                        -> 200
//
// Errors are JSON {"error": "<code name>", "message": "..."} with the status
// a client can act on: 400 bad input (malformed JSON, bad field, bad
// options), 404 unknown task or route, 405 wrong method, 409 not allowed in
// the task's state, 413 over the per-task memory limit, 429 queue full (the
// task stays pending: start it later), 503 no device can hold the task or
// the database cannot store it now (disk full), 500 otherwise. Port 0 (the default) picks a free
// port; the port is printed
// ("listening on http://127.0.0.1:PORT") and written to --port-file.
// Transport errors: 414 (a target past 8 KiB), 431 (headers past 16 KiB),
// 413 (a body past --body-limit-mb, 32 by default), 400 (not HTTP/1.x), 503
// (past --max-connections, 1024): JSON bodies too. SIGINT/SIGTERM stop it:
// it stops accepting, answers the requests in flight, then closes the
// manager (running tasks finish within tasks.close_grace_seconds, queued
// ones stay in the database); it exits 3 when writes it accepted could not be stored (close()
// reports them), 0 otherwise.
#include <taskmgr/taskmgr.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/signal_set.hpp>

#include <charconv>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "api.hpp"
#include "server.hpp"

namespace {

// A whole number in [lo, hi] written in digits only, or exit 2 naming the
// option.
long long number_arg(const std::string& option, const std::string& text, long long lo,
                     long long hi) {
  long long v = 0;
  const char* end = text.data() + text.size();
  const auto r = std::from_chars(text.data(), end, v);
  if (text.empty() || r.ec != std::errc() || r.ptr != end || v < lo || v > hi) {
    std::cerr << "taskmgr-http: " << option << " must be a whole number from " << lo << " to " << hi
              << ", got '" << text << "'\n";
    std::exit(2);
  }
  return v;
}

// Seconds: a number in (0, 86400], or exit 2 naming the option.
std::chrono::milliseconds seconds_arg(const std::string& option, const std::string& text) {
  double v = 0;
  const char* end = text.data() + text.size();
  const auto r = std::from_chars(text.data(), end, v);
  if (text.empty() || r.ec != std::errc() || r.ptr != end || !(v > 0) || v > 86400) {
    std::cerr << "taskmgr-http: " << option << " must be a number of seconds in (0, 86400], got '"
              << text << "'\n";
    std::exit(2);
  }
  return std::chrono::milliseconds(static_cast<long long>(v * 1000 + 0.5));
}

constexpr const char* kUsage =
    "usage: taskmgr-http [--address A] [--port N] [--config FILE] [--db PATH] [--port-file PATH]\n"
    "                    [--token-file FILE] [--input-root DIR]...\n"
    "                    [--max-connections N] [--body-limit-mb N]\n"
    "                    [--header-timeout S] [--idle-timeout S] [--help] [--version]\n";

// The token: the file's first line, without its line end; exit 2 when the
// file cannot be read or the token is empty or shorter than 16 bytes.
std::string read_token(const std::string& path) {
  std::ifstream in(path);
  std::string token;
  if (!in || !std::getline(in, token)) {
    std::cerr << "taskmgr-http: --token-file " << path << ": cannot read it\n";
    std::exit(2);
  }
  while (!token.empty() && (token.back() == '\r' || token.back() == ' ')) token.pop_back();
  if (token.size() < 16) {
    std::cerr << "taskmgr-http: --token-file " << path
              << ": the token must be at least 16 characters on its first line\n";
    std::exit(2);
  }
  return token;
}

bool loopback(const std::string& address) {
  boost::system::error_code ec;
  const auto a = boost::asio::ip::make_address(address, ec);
  return !ec && a.is_loopback();
}

}  // namespace

int main(int argc, char** argv) {
  taskmgr_http::ServerOptions so;
  taskmgr_http::ApiOptions api;
  std::string config_path, db, port_file;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "taskmgr-http: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--address") {
      so.address = value();
      boost::system::error_code ec;
      boost::asio::ip::make_address(so.address, ec);
      if (ec) {
        std::cerr << "taskmgr-http: --address must be an IP address, got '" << so.address << "'\n";
        return 2;
      }
    } else if (a == "--token-file") {
      api.token = read_token(value());
    } else if (a == "--input-root") {
      const std::string dir = value();
      const std::string real = taskmgr_http::canonical_directory(dir);
      if (real.empty()) {
        std::cerr << "taskmgr-http: --input-root " << dir << " is not a directory\n";
        return 2;
      }
      api.input_roots.push_back(real);
    } else if (a == "--port") {
      so.port = static_cast<unsigned short>(number_arg(a, value(), 0, 65535));
    } else if (a == "--config") {
      config_path = value();
    } else if (a == "--db") {
      db = value();
    } else if (a == "--port-file") {
      port_file = value();
    } else if (a == "--max-connections") {
      so.max_connections = static_cast<int>(number_arg(a, value(), 1, 1000000));
    } else if (a == "--body-limit-mb") {
      so.body_limit = static_cast<std::size_t>(number_arg(a, value(), 1, 4096)) << 20;
    } else if (a == "--header-timeout") {
      so.header_timeout = seconds_arg(a, value());
    } else if (a == "--idle-timeout") {
      so.idle_timeout = seconds_arg(a, value());
    } else if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--version") {
      std::cout << "taskmgr-http " << taskmgr::version() << "\n";
      return 0;
    } else {
      std::cerr << "taskmgr-http: unknown option '" << a << "'\n" << kUsage;
      return 2;
    }
  }
  if (!loopback(so.address) && api.token.empty()) {
    std::cerr << "taskmgr-http: --address " << so.address
              << " is not a loopback address: give --token-file (and put a TLS-terminating proxy "
                 "in front)\n";
    return 2;
  }
  api.max_input_bytes = so.body_limit;
  try {
    taskmgr::Config config = config_path.empty() ? taskmgr::Config::defaults()
                                                 : taskmgr::Config::from_yaml_file(config_path);
    if (!db.empty()) config.storage.path = db;
    taskmgr::TaskManager tm(config);
    taskmgr_http::EventFanout events(tm);
    taskmgr_http::HttpServer server(
        so,
        [&tm, &api](const taskmgr_http::Request& req) {
          return taskmgr_http::handle(tm, api, req);
        },
        events.route(api));
    const unsigned short bound = server.port();
    if (!port_file.empty()) std::ofstream(port_file) << bound << "\n";
    std::cout << "listening on http://" << so.address << ":" << bound << std::endl;

    // Signals on a small io_context of their own: the server's threads are
    // its own business.
    boost::asio::io_context sig_ioc;
    boost::asio::signal_set signals(sig_ioc, SIGINT, SIGTERM);
    signals.async_wait([&](const boost::system::error_code& ec, int) {
      if (!ec) server.stop();
    });
    std::thread sig_thread([&] { sig_ioc.run(); });
    server.run();    // until a signal's stop() has drained the connections
    events.close();  // its streams are connections of the server: dropped while it exists
    signals.cancel();
    sig_ioc.stop();
    sig_thread.join();
    try {
      tm.close();  // running tasks finish (within the grace); queued ones stay in the database
    } catch (const taskmgr::Error& e) {
      if (e.code() != taskmgr::ErrorCode::kUnpersisted) throw;
      // Accepted outcomes the database could not take: not a clean stop.
      std::cerr << "taskmgr-http: " << e.what() << "\n";
      return 3;
    }
    std::cout << "stopped" << std::endl;
    return 0;
  } catch (const taskmgr::Error& e) {
    std::cerr << "taskmgr-http: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "taskmgr-http: " << e.what() << "\n";
    return 1;
  }
}
