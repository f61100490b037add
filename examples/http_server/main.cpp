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
//   POST /pause, /resume         {} (the manager), {"device"} or {"service"}  -> 200
//   {"changed","paused"} GET  /paused                 the pauses in force -> 200
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

#include <yaml-cpp/yaml.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/signal_set.hpp>

#include <charconv>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

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
    "                    [--header-timeout S] [--idle-timeout S] [--help] [--version]\n"
    "The server's settings may also be in the --config file's http section (address, port,\n"
    "token_file, input_roots, max_connections, body_limit_mb, header_timeout_seconds,\n"
    "idle_timeout_seconds); an option on the command line wins. docs/CLI.md.\n";

// The token: the file's first line, without its line end; exit 2 when the
// file cannot be read or the token is empty or shorter than 16 bytes.
std::string read_token(const std::string& label, const std::string& path) {
  std::ifstream in(path);
  std::string token;
  if (!in || !std::getline(in, token)) {
    std::cerr << "taskmgr-http: " << label << " " << path << ": cannot read it\n";
    std::exit(2);
  }
  while (!token.empty() && (token.back() == '\r' || token.back() == ' ')) token.pop_back();
  if (token.size() < 16) {
    std::cerr << "taskmgr-http: " << label << " " << path
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

// One setting: an option and its value, from the command line or from the
// configuration file's `http` section (`label` names where, for messages).
struct Setting {
  std::string option;
  std::string value;
  std::string label;
};

// The `http` section of the configuration file as settings, each key named
// with its line in messages; exit 2 for an unknown key or a value of the
// wrong shape.
std::vector<Setting> file_settings(const std::string& path) {
  static const std::pair<const char*, const char*> keys[] = {
      {"address", "--address"},
      {"port", "--port"},
      {"token_file", "--token-file"},
      {"input_roots", "--input-root"},
      {"max_connections", "--max-connections"},
      {"body_limit_mb", "--body-limit-mb"},
      {"header_timeout_seconds", "--header-timeout"},
      {"idle_timeout_seconds", "--idle-timeout"},
  };
  std::vector<Setting> out;
  const YAML::Node http = YAML::LoadFile(path)["http"];  // parsed and checked by the library
  if (!http || !http.IsMap()) return out;
  std::map<std::string, int> lines;  // each key's line: a key given twice is refused
  auto text = [](const std::string& label, const std::string& v) {
    if (v.find('\0') != std::string::npos) {
      std::cerr << "taskmgr-http: " << label << ": contains a NUL byte\n";
      std::exit(2);
    }
    return v;
  };
  for (const auto& kv : http) {
    const std::string key = kv.first.as<std::string>();
    const int line = kv.first.Mark().line + 1;
    const std::string label = "http." + key + " (" + path + " line " + std::to_string(line) + ")";
    if (const auto [it, fresh] = lines.emplace(key, line); !fresh) {
      std::cerr << "taskmgr-http: " << label << ": given twice (first at line " << it->second
                << "): keep one\n";
      std::exit(2);
    }
    const char* option = nullptr;
    for (const auto& [k, o] : keys) {
      if (key == k) option = o;
    }
    if (option == nullptr) {
      std::cerr << "taskmgr-http: " << label << ": unknown key (address, port, token_file, "
                << "input_roots, max_connections, body_limit_mb, header_timeout_seconds, "
                << "idle_timeout_seconds)\n";
      std::exit(2);
    }
    if (key == "input_roots") {
      if (!kv.second.IsSequence()) {
        std::cerr << "taskmgr-http: " << label << ": must be a list of directories\n";
        std::exit(2);
      }
      for (const auto& dir : kv.second) {
        if (!dir.IsScalar()) {
          std::cerr << "taskmgr-http: " << label << ": must be a list of directories\n";
          std::exit(2);
        }
        out.push_back({option, text(label, dir.Scalar()), label});
      }
      continue;
    }
    if (!kv.second.IsScalar()) {
      std::cerr << "taskmgr-http: " << label << ": must be a single value\n";
      std::exit(2);
    }
    out.push_back({option, text(label, kv.second.Scalar()), label});
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  taskmgr_http::ServerOptions so;
  taskmgr_http::ApiOptions api;
  std::string config_path, db, port_file;
  std::vector<Setting> given;  // the command line's server settings
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "taskmgr-http: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--config") {
      config_path = value();
    } else if (a == "--db") {
      db = value();
    } else if (a == "--port-file") {
      port_file = value();
    } else if (a == "--address" || a == "--token-file" || a == "--input-root" || a == "--port" ||
               a == "--max-connections" || a == "--body-limit-mb" || a == "--header-timeout" ||
               a == "--idle-timeout") {
      given.push_back({a, value(), a});
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
  taskmgr::Config config;
  try {
    config = config_path.empty() ? taskmgr::Config::defaults()
                                 : taskmgr::Config::from_yaml_file(config_path);
  } catch (const taskmgr::Error& e) {
    std::cerr << "taskmgr-http: " << e.what() << "\n";
    return 2;
  }
  // The file's settings first, then the command line's: an option given
  // there wins (--input-root: the command line's list replaces the file's).
  std::vector<Setting> settings;
  bool roots_given = false;
  for (const auto& s : given) roots_given = roots_given || s.option == "--input-root";
  if (!config.http_yaml.empty()) {
    std::vector<Setting> from_file;
    try {
      from_file = file_settings(config_path);
    } catch (const std::exception& e) {  // the file changed since the library read it
      std::cerr << "taskmgr-http: " << config_path << ": " << e.what() << "\n";
      return 2;
    }
    for (auto& s : from_file) {
      if (!(roots_given && s.option == "--input-root")) settings.push_back(std::move(s));
    }
  }
  settings.insert(settings.end(), given.begin(), given.end());
  for (const auto& [a, v, label] : settings) {
    if (a == "--address") {
      so.address = v;
      boost::system::error_code ec;
      boost::asio::ip::make_address(so.address, ec);
      if (ec) {
        std::cerr << "taskmgr-http: " << label << " must be an IP address, got '" << v << "'\n";
        return 2;
      }
    } else if (a == "--token-file") {
      api.token = read_token(label, v);
    } else if (a == "--input-root") {
      const std::string real = taskmgr_http::canonical_directory(v);
      if (real.empty() || v.empty() || v[0] != '/') {
        std::cerr << "taskmgr-http: " << label << " " << v
                  << " is not a directory given by its absolute path\n";
        return 2;
      }
      // Paths are matched by their text against the root as given and as
      // it resolves (with symlinks in it, the two differ); what they
      // resolve to must be under the resolved one.
      api.input_roots.push_back(real);
      std::string given_root = v;
      while (given_root.size() > 1 && given_root.back() == '/') given_root.pop_back();
      if (given_root != real) api.input_roots.push_back(given_root);
    } else if (a == "--port") {
      so.port = static_cast<unsigned short>(number_arg(label, v, 0, 65535));
    } else if (a == "--max-connections") {
      so.max_connections = static_cast<int>(number_arg(label, v, 1, 1000000));
    } else if (a == "--body-limit-mb") {
      so.body_limit = static_cast<std::size_t>(number_arg(label, v, 1, 4096)) << 20;
    } else if (a == "--header-timeout") {
      so.header_timeout = seconds_arg(label, v);
    } else if (a == "--idle-timeout") {
      so.idle_timeout = seconds_arg(label, v);
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
    if (!db.empty()) config.storage.path = db;
    taskmgr::TaskManager tm(config);
    taskmgr_http::EventFanout events(tm);
    taskmgr_http::HttpServer server(
        so,
        [&tm, &api](const taskmgr_http::Request& req) {
          return taskmgr_http::handle(tm, api, req);
        },
        events.route(api));
    api.connections = [&server] { return server.connections(); };
    const unsigned short bound = server.port();
    if (!port_file.empty()) std::ofstream(port_file) << bound << "\n";
    // An IPv6 address goes in brackets in a URL.
    const bool v6 = so.address.find(':') != std::string::npos;
    std::cout << "listening on http://" << (v6 ? "[" : "") << so.address << (v6 ? "]" : "") << ":"
              << bound << std::endl;

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
