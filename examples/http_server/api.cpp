#include "api.hpp"

#include "dashboard.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>

namespace taskmgr_http {

namespace json = boost::json;

namespace {

// An HTTP error with its status and our error code name.
struct HttpError {
  http::status status;
  std::string code;
  std::string message;
  std::string allow = {};  // 405: the methods the route takes
};

// What a single option value or JSON options document may be at most: they
// live in memory with their task while it waits.
constexpr std::size_t kMaxOptionsBytes = 64 * 1024;
// A page of GET /tasks: at most this many tasks.
constexpr std::size_t kMaxPage = 1000;

HttpError from_error(const taskmgr::Error& e) {
  using C = taskmgr::ErrorCode;
  http::status s = http::status::internal_server_error;
  switch (e.code()) {
    case C::kInvalidArgument:
    case C::kInvalidConfig: s = http::status::bad_request; break;
    case C::kNotFound: s = http::status::not_found; break;
    case C::kQueueFull: s = http::status::too_many_requests; break;
    case C::kDeviceUnavailable: s = http::status::service_unavailable; break;
    case C::kMemoryLimitExceeded: s = http::status::payload_too_large; break;
    case C::kInvalidState: s = http::status::conflict; break;
    case C::kBusy:
    case C::kIoError:  // the database cannot take the task now (disk full, backlog full)
    case C::kPoolExhausted: s = http::status::service_unavailable; break;
    case C::kUnsupported: s = http::status::not_implemented; break;
    default: break;
  }
  return {s, std::string(taskmgr::to_string(e.code())), e.what()};
}

[[noreturn]] void bad_request(const std::string& message) {
  throw HttpError{http::status::bad_request, "invalid_argument", message};
}

std::string base64_decode(std::string_view in) {
  // The value of each byte (-1: not base64), built once.
  static const std::array<signed char, 256> value = [] {
    std::array<signed char, 256> v{};
    v.fill(-1);
    const std::string_view chars =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (std::size_t i = 0; i < chars.size(); ++i) {
      v[static_cast<unsigned char>(chars[i])] = static_cast<signed char>(i);
    }
    return v;
  }();
  // RFC 4648 with padding; line breaks are skipped. Padding only at the
  // end, and the bits it leaves unused zero (one text per byte string).
  std::string clean;
  clean.reserve(in.size());
  for (char c : in) {
    if (c != '\n' && c != '\r') clean.push_back(c);
  }
  const auto not_base64 = [] {
    bad_request("input.data_base64 is not base64 (RFC 4648, with padding)");
  };
  if (clean.size() % 4 != 0) not_base64();
  std::size_t pad = 0;
  while (pad < 2 && pad < clean.size() && clean[clean.size() - 1 - pad] == '=') ++pad;
  clean.resize(clean.size() - pad);
  if (clean.find('=') != std::string::npos) not_base64();
  if (pad > 0) {
    const int last = value[static_cast<unsigned char>(clean.back())];
    if (last < 0 || (last & (pad == 1 ? 0x3 : 0xF)) != 0) not_base64();
  }
  std::string out;
  out.reserve(clean.size() / 4 * 3 + 3);
  unsigned val = 0;
  int bits = -8;
  for (char c : clean) {
    const int pos = value[static_cast<unsigned char>(c)];
    if (pos < 0) not_base64();
    val = ((val << 6) + static_cast<unsigned>(pos)) & 0xFFFFFFu;
    bits += 6;
    if (bits >= 0) {
      out.push_back(static_cast<char>((val >> bits) & 0xFF));
      bits -= 8;
    }
  }
  return out;
}

// Strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF.
bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (s.size() - i <= static_cast<std::size_t>(n)) return false;  // cut short
    for (int k = 1; k <= n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return false;
    }
    i += static_cast<std::size_t>(n) + 1;
  }
  return true;
}

// A query string's parameters, percent-decoded ('+' is a space), in order.
// A malformed escape, a NUL or a value that is not UTF-8 is a 400.
std::vector<std::pair<std::string, std::string>> parse_query(const std::string& query) {
  auto decode = [](std::string_view in) {
    std::string out;
    out.reserve(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) {
      const char c = in[i];
      if (c == '+') {
        out.push_back(' ');
      } else if (c == '%') {
        auto hex = [](char h) -> int {
          if (h >= '0' && h <= '9') return h - '0';
          if (h >= 'a' && h <= 'f') return h - 'a' + 10;
          if (h >= 'A' && h <= 'F') return h - 'A' + 10;
          return -1;
        };
        const int hi = i + 2 < in.size() ? hex(in[i + 1]) : -1;
        const int lo = i + 2 < in.size() ? hex(in[i + 2]) : -1;
        if (hi < 0 || lo < 0) bad_request("the query has a malformed %-escape");
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
      } else {
        out.push_back(c);
      }
    }
    if (out.find('\0') != std::string::npos) bad_request("the query has a NUL byte");
    if (!valid_utf8(out)) bad_request("the query is not valid UTF-8 once decoded");
    return out;
  };
  std::vector<std::pair<std::string, std::string>> out;
  std::size_t at = 0;
  while (at < query.size()) {
    const auto amp = query.find('&', at);
    const std::string_view kv =
        std::string_view(query).substr(at, amp == std::string::npos ? std::string::npos : amp - at);
    at = amp == std::string::npos ? query.size() : amp + 1;
    if (kv.empty()) continue;
    const auto eq = kv.find('=');
    out.emplace_back(decode(kv.substr(0, eq)),
                     eq == std::string_view::npos ? std::string() : decode(kv.substr(eq + 1)));
  }
  return out;
}

// "%XX" for every byte but the unreserved ones (RFC 3986).
std::string percent_encode(std::string_view s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (const char c : s) {
    const auto b = static_cast<unsigned char>(c);
    if (std::isalnum(b) != 0 || c == '-' || c == '.' || c == '_' || c == '~') {
      out.push_back(c);
    } else {
      out += {'%', hex[b >> 4], hex[b & 15]};
    }
  }
  return out;
}

// A page cursor (taskmgr::to_string(TaskCursor) wrote it).
taskmgr::TaskCursor parse_cursor(const std::string& v) {
  auto c = taskmgr::parse_task_cursor(v);
  if (!c) bad_request("before must be a cursor from X-Next-Cursor (or the Link header)");
  return std::move(*c);
}

// An integer query value: digits with an optional sign, within int's range.
int query_int(const std::string& key, const std::string& v) {
  const std::size_t digits = v.size() - (!v.empty() && (v[0] == '-' || v[0] == '+') ? 1 : 0);
  if (digits == 0 || digits > 10 ||
      v.find_first_not_of("0123456789", v.size() - digits) != std::string::npos) {
    bad_request(key + " must be an integer");
  }
  const long long n = std::stoll(v);
  if (n < INT32_MIN || n > INT32_MAX) bad_request(key + " is out of range");
  return static_cast<int>(n);
}

bool query_flag(const std::string& key, const std::string& v) {
  if (v == "1" || v == "true") return true;
  if (v == "0" || v == "false") return false;
  bad_request(key + " must be 0, 1, true or false");
}

json::object parse_body(const Request& req, bool required) {
  if (req.body().empty()) {
    if (required) bad_request("the request needs a JSON object body");
    return {};
  }
  boost::system::error_code ec;
  json::value v = json::parse(req.body(), ec);
  if (ec) bad_request("the body is not valid JSON: " + ec.message());
  if (!v.is_object()) bad_request("the body must be a JSON object");
  return std::move(v.as_object());
}

std::string get_string(const json::object& o, const char* key, const std::string& path) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || v->is_null()) return "";
  if (!v->is_string()) bad_request(path + key + " must be a string");
  return std::string(v->as_string());
}

// A body's keys must be among `known` (a misspelt key is not ignored).
void only_keys(const json::object& o, std::initializer_list<std::string_view> known,
               const std::string& prefix) {
  for (const auto& kv : o) {
    const std::string_view k(kv.key().data(), kv.key().size());
    if (std::find(known.begin(), known.end(), k) == known.end()) {
      std::string list;
      for (const auto& n : known) list += (list.empty() ? "" : ", ") + prefix + std::string(n);
      bad_request("unknown key '" + prefix + std::string(k) + "' (known: " + list + ")");
    }
  }
}

std::optional<int> get_int(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || v->is_null()) return std::nullopt;
  if (!v->is_int64() && !v->is_uint64()) bad_request(std::string(key) + " must be an integer");
  if (v->is_uint64() && v->as_uint64() > static_cast<std::uint64_t>(INT32_MAX)) {
    bad_request(std::string(key) + " is out of range");
  }
  const std::int64_t n = v->is_int64() ? v->as_int64() : static_cast<std::int64_t>(v->as_uint64());
  if (n < INT32_MIN || n > INT32_MAX) bad_request(std::string(key) + " is out of range");
  return static_cast<int>(n);
}

std::string check_options_size(std::string options) {
  if (options.size() > kMaxOptionsBytes) {
    bad_request("options are " + std::to_string(options.size()) + " bytes, more than " +
                std::to_string(kMaxOptionsBytes) +
                " (they stay in memory with the task: put data in the input)");
  }
  return options;
}

std::string get_options(const json::object& o) {
  const json::value* v = o.if_contains("options");
  if (v == nullptr || v->is_null()) return "";
  if (!v->is_object()) bad_request("options must be a JSON object");
  return check_options_size(json::serialize(*v));
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool iequals_prefix(std::string_view s, std::string_view prefix);
bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && iequals_prefix(a, b);
}

bool iequals_prefix(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(s[i])) !=
        std::tolower(static_cast<unsigned char>(prefix[i]))) {
      return false;
    }
  }
  return true;
}

// Equal, in time that depends on the lengths only (a token is not guessed
// byte by byte from the answer's timing).
bool same_secret(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const std::size_t n = std::max(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

// One answer for every input.path that is not served, whatever the reason
// (missing, a directory, a FIFO, a device, outside the roots, a symlink
// out of them, unreadable): the file system is not probed through it.
[[noreturn]] void path_refused() {
  throw HttpError{http::status::forbidden, "forbidden",
                  "input.path is not a readable regular file under an --input-root of this "
                  "server"};
}

// 401 unless the request carries the server's token (when it has one).
std::optional<Response> unauthorized(const ApiOptions& o, const Request& req) {
  if (o.token.empty()) return std::nullopt;
  const auto h = req.find(http::field::authorization);
  std::string_view given =
      h == req.end() ? std::string_view() : std::string_view(h->value().data(), h->value().size());
  // The scheme is case-insensitive (RFC 9110); the token is compared whole.
  const bool bearer = iequals_prefix(given, "bearer ");
  given.remove_prefix(bearer ? 7 : given.size());
  while (!given.empty() && given.front() == ' ') given.remove_prefix(1);
  if (same_secret(given, o.token) && bearer) return std::nullopt;
  Response r = json_error(http::status::unauthorized, "unauthorized",
                          h == req.end() ? "this server needs Authorization: Bearer <token>"
                                         : "the token is not this server's",
                          req.version(), req.keep_alive());
  r.set(http::field::www_authenticate, "Bearer");
  return r;
}

class Api {
 public:
  Api(taskmgr::TaskManager& tm, const ApiOptions& o) : tm_(tm), o_(o) {}

  Response handle(const Request& req) {
    if (req.method() == http::verb::head) {
      // A GET's answer without its body (its Content-Length kept).
      Request get = req;
      get.method(http::verb::get);
      Response r = handle(get);
      const std::size_t n = r.body().size();
      r.body().clear();
      r.content_length(n);
      return r;
    }
    try {
      return route(req);
    } catch (const HttpError& e) {
      return error(req, e);
    } catch (const taskmgr::Error& e) {
      return error(req, from_error(e));
    } catch (const std::exception& e) {
      return error(req, {http::status::internal_server_error, "internal", e.what()});
    }
  }

 private:
  Response route(const Request& req) {
    std::string target(req.target());
    // Open without a token: liveness, and the dashboard page (it holds no
    // data; it asks for the token and sends it with its requests).
    const bool open_route = req.method() == http::verb::get &&
                            (target == "/health" || target == "/" || target == "/index.html");
    if (!open_route) {
      if (auto r = unauthorized(o_, req)) return std::move(*r);
    }
    std::string query;
    if (const auto q = target.find('?'); q != std::string::npos) {
      query = target.substr(q + 1);
      target.resize(q);
    }
    while (target.size() > 1 && target.back() == '/') target.pop_back();
    const auto method = req.method();
    auto require = [&](http::verb v) {
      if (method != v) {
        throw HttpError{http::status::method_not_allowed, "method_not_allowed",
                        std::string(req.method_string()) + " is not allowed on " + target,
                        v == http::verb::get ? "GET, HEAD" : std::string(http::to_string(v))};
      }
      // Only GET /tasks, POST /tasks (an upload), /result and /events take
      // a query; elsewhere one is a mistake the client should hear of.
      if (!query.empty()) bad_request(target + " takes no query parameters");
    };
    if (target == "/" || target == "/index.html") {
      require(http::verb::get);  // the dashboard: no token (its data needs one)
      Response r = make(req, http::status::ok, kDashboardHtml);
      r.set(http::field::content_type, "text/html; charset=utf-8");
      r.set(http::field::cache_control, "no-cache");
      return r;
    }
    if (target == "/health") {
      require(http::verb::get);
      return health(req);
    }
    if (target == "/metrics") {
      require(http::verb::get);
      Response r = make(req, http::status::ok, tm_.get_task_metrics().to_prometheus());
      r.set(http::field::content_type, "text/plain; version=0.0.4");
      return r;
    }
    if (target == "/tasks/metrics") {
      require(http::verb::get);
      return make_json(req, http::status::ok, tm_.get_task_metrics().to_json());
    }
    if (target == "/pause" || target == "/resume") {
      // {"manager": true} pauses the whole manager; {"device": id} one
      // device's queue; {"service": kind} one kind's tasks: exactly one of
      // them (an empty body is a mistake, not "everything").
      // 200 {"changed", "paused"}.
      require(http::verb::post);
      const json::object body = parse_body(req, false);
      only_keys(body, {"manager", "device", "service"}, "");
      const std::string device = get_string(body, "device", "");
      const std::string service = get_string(body, "service", "");
      bool manager = false;
      if (const json::value* m = body.if_contains("manager")) {
        if (!m->is_bool() || !m->as_bool()) bad_request("manager must be true");
        manager = true;
      }
      if (body.contains("device") && device.empty()) bad_request("device must not be empty");
      if (body.contains("service") && service.empty()) bad_request("service must not be empty");
      if (int(manager) + int(!device.empty()) + int(!service.empty()) != 1) {
        bad_request(
            "say what to " + target.substr(1) +
            ", one thing at a time: {\"manager\": true}, {\"device\": id} or {\"service\": kind}");
      }
      const auto scope = !device.empty()    ? taskmgr::PauseScope::kDevice
                         : !service.empty() ? taskmgr::PauseScope::kService
                                            : taskmgr::PauseScope::kManager;
      const std::string& name = !device.empty() ? device : service;
      const bool changed = target == "/pause" ? tm_.pause(scope, name) : tm_.resume(scope, name);
      return make_json(req, http::status::ok,
                       json::serialize(json::object{{"changed", changed}, {"paused", paused()}}));
    }
    if (target == "/cluster") {
      // The shared queue's hosts (storage.shared): 501 when this server's
      // store is not shared.
      require(http::verb::get);
      return make_json(req, http::status::ok, taskmgr::to_json(tm_.cluster()));
    }
    if (target == "/paused") {
      require(http::verb::get);
      return make_json(req, http::status::ok, json::serialize(paused()));
    }
    if (target == "/pools/resize") {
      // {"service", "device", "min_instances", "max_instances"}: every key.
      // 200 {"service", "device", "min_instances", "max_instances",
      // "previous": {"min_instances", "max_instances"}}.
      require(http::verb::post);
      const json::object body = parse_body(req, true);
      only_keys(body, {"service", "device", "min_instances", "max_instances"}, "");
      const std::string service = get_string(body, "service", "");
      const std::string device = get_string(body, "device", "");
      const std::optional<int> min = get_int(body, "min_instances");
      const std::optional<int> max = get_int(body, "max_instances");
      if (service.empty()) bad_request("service is required (a service kind)");
      if (device.empty()) bad_request("device is required (a device id)");
      if (!min || !max) bad_request("min_instances and max_instances are required (integers)");
      const taskmgr::PoolSettings before = tm_.resize_pool(service, device, *min, *max);
      return make_json(req, http::status::ok,
                       json::serialize(json::object{
                           {"service", service},
                           {"device", device},
                           {"min_instances", *min},
                           {"max_instances", *max},
                           {"previous", json::object{{"min_instances", before.min_instances},
                                                     {"max_instances", before.max_instances}}}}));
    }
    if (target == "/tasks") {
      if (method == http::verb::get) return list(req, query);
      if (method != http::verb::post) {
        throw HttpError{http::status::method_not_allowed, "method_not_allowed",
                        std::string(req.method_string()) + " is not allowed on /tasks",
                        "GET, HEAD, POST"};
      }
      return create(req, query);
    }
    if (target.rfind("/tasks/", 0) == 0) {
      const std::string rest = target.substr(7);
      const auto slash = rest.find('/');
      const std::string id = rest.substr(0, slash);
      const std::string action = slash == std::string::npos ? "" : rest.substr(slash + 1);
      if (action.empty()) {
        if (method == http::verb::delete_) {
          // An ended task, with its events, samples and input: 204.
          if (!query.empty()) bad_request(target + " takes no query parameters");
          tm_.delete_task(id);
          Response r = make(req, http::status::no_content, "");
          return r;
        }
        if (method != http::verb::get) {
          throw HttpError{http::status::method_not_allowed, "method_not_allowed",
                          std::string(req.method_string()) + " is not allowed on " + target,
                          "GET, HEAD, DELETE"};
        }
        if (!query.empty()) bad_request(target + " takes no query parameters");
        return make_json(req, http::status::ok, taskmgr::to_json(tm_.get_task(id)));
      }
      if (action == "health") {
        require(http::verb::get);
        return make_json(req, http::status::ok, tm_.get_task_health(id).to_json());
      }
      if (action == "events") {
        require(http::verb::get);
        (void)tm_.get_task(id);  // 404 for an unknown task
        std::string out = "[";
        for (const auto& e : tm_.get_task_events(id)) {
          if (out.size() > 1) out += ',';
          out += taskmgr::to_json(e);
        }
        out += ']';
        return make_json(req, http::status::ok, out);
      }
      if (action == "result") {
        const std::string q = std::move(query);  // the only /tasks/{id} route with one
        query.clear();
        require(http::verb::get);
        return result(req, id, q);
      }
      if (action == "start") {
        require(http::verb::post);
        return start(req, id);
      }
      if (action == "retry") {
        // A failed or cancelled task again; the body as start's (optional).
        require(http::verb::post);
        const json::object body = parse_body(req, false);
        only_keys(body, {"device", "priority", "batch_size", "options"}, "");
        taskmgr::TaskStartRequest p;
        p.device = get_string(body, "device", "");
        p.priority = get_int(body, "priority");
        p.batch_size = get_int(body, "batch_size");
        p.options_json = get_options(body);
        return make_json(req, http::status::accepted, taskmgr::to_json(tm_.retry_task(id, p)));
      }
      if (action == "priority") {
        // A waiting task's new priority: {"priority": n}.
        require(http::verb::post);
        const json::object body = parse_body(req, false);
        only_keys(body, {"priority"}, "");
        const std::optional<int> priority = get_int(body, "priority");
        if (!priority) bad_request("priority is required: {\"priority\": n}");
        return make_json(req, http::status::ok,
                         taskmgr::to_json(tm_.set_task_priority(id, *priority)));
      }
      if (action == "cancel") {
        require(http::verb::post);
        tm_.cancel_task(id);
        return make_json(req, http::status::ok, taskmgr::to_json(tm_.get_task(id)));
      }
    }
    throw HttpError{http::status::not_found, "not_found", "no route " + target};
  }

  // POST /tasks with a body that is not JSON: the body is the input's bytes
  // (an image or a PDF), its Content-Type the media type, and the rest of
  // the request in the query (service, priority, batch_size, device, start,
  // options as URL-encoded JSON).
  Response create_upload(const Request& req, const std::string& query) {
    taskmgr::TaskCreateRequest r;
    for (const auto& [k, v] : parse_query(query)) {
      if (k == "service") {
        if (!v.empty()) r.service = v;
      } else if (k == "priority") {
        r.priority = query_int(k, v);
      } else if (k == "batch_size") {
        r.batch_size = query_int(k, v);
      } else if (k == "device") {
        r.device = v;
      } else if (k == "start") {
        r.start = query_flag(k, v);
      } else if (k == "options") {
        boost::system::error_code ec;
        const json::value o = json::parse(v, ec);
        if (ec || !o.is_object()) bad_request("options must be a JSON object");
        r.options_json = check_options_size(json::serialize(o));
      } else {
        bad_request("unknown query parameter '" + k +
                    "' (service, priority, batch_size, "
                    "device, start, options)");
      }
    }
    if (req.body().empty()) bad_request("the upload is empty: the body is the input's bytes");
    const auto ct = req.find(http::field::content_type);
    std::string media = ct == req.end() ? "" : std::string(ct->value());
    if (const auto semi = media.find(';'); semi != std::string::npos) media.resize(semi);
    while (!media.empty() && media.back() == ' ') media.pop_back();
    if (iequals_prefix(media, "application/octet-stream") &&
        media.size() == std::string_view("application/octet-stream").size()) {
      media.clear();
    }
    if (!valid_utf8(media)) bad_request("Content-Type is not valid UTF-8");
    r.input.media_type = media;
    r.input.data.assign(req.body().begin(), req.body().end());
    const taskmgr::Task t = tm_.create_task(r);
    Response res = make_json(req, http::status::created, taskmgr::to_json(t));
    res.set(http::field::location, "/tasks/" + t.id);
    return res;
  }

  Response create(const Request& req, const std::string& query) {
    const auto ct = req.find(http::field::content_type);
    const std::string_view type = ct == req.end()
                                      ? std::string_view()
                                      : std::string_view(ct->value().data(), ct->value().size());
    // application/json exactly (parameters after ';' aside); a request with
    // no Content-Type is read as JSON too. Anything else is an upload.
    const std::string_view essence = trim(type.substr(0, type.find(';')));
    const bool is_json = essence.empty() || iequals(essence, "application/json");
    if (!is_json) return create_upload(req, query);
    if (!query.empty()) {
      bad_request(
          "a JSON create takes no query parameters (they are for uploads: a body that "
          "is the input's bytes)");
    }
    const json::object body = parse_body(req, true);
    only_keys(body, {"service", "input", "priority", "batch_size", "device", "options", "start"},
              "");
    taskmgr::TaskCreateRequest r;
    if (auto s = get_string(body, "service", ""); !s.empty()) r.service = s;
    if (const json::value* in = body.if_contains("input"); in && !in->is_null()) {
      if (!in->is_object()) bad_request("input must be an object with path or data_base64");
      const json::object& io = in->as_object();
      only_keys(io, {"path", "data_base64", "media_type"}, "input.");
      const std::string path = get_string(io, "path", "input.");
      if (!path.empty()) read_under_roots(path, r.input);
      const std::string b64 = get_string(io, "data_base64", "input.");
      if (!b64.empty()) {
        const std::string bytes = base64_decode(b64);
        r.input.data.assign(bytes.begin(), bytes.end());
      }
      r.input.media_type = get_string(io, "media_type", "input.");
    }
    r.priority = get_int(body, "priority").value_or(0);
    r.batch_size = get_int(body, "batch_size").value_or(1);
    r.device = get_string(body, "device", "");
    r.options_json = get_options(body);
    if (const json::value* s = body.if_contains("start"); s && !s->is_null()) {
      if (!s->is_bool()) bad_request("start must be true or false");
      r.start = s->as_bool();
    }
    const taskmgr::Task t = tm_.create_task(r);
    Response res = make_json(req, http::status::created, taskmgr::to_json(t));
    res.set(http::field::location, "/tasks/" + t.id);
    return res;
  }

  static std::int64_t total(const std::map<std::string, std::int64_t>& per_device) {
    const auto it = per_device.find("total");
    return it == per_device.end() ? 0 : it->second;
  }

  // GET /health: live (it answers) and ready (the store takes writes, a
  // device is available): 200, else 503 with what is wrong.
  json::array paused() {
    json::array out;
    for (const auto& p : tm_.paused()) out.push_back(json::parse(taskmgr::to_json(p)));
    return out;
  }

  Response health(const Request& req) {
    const taskmgr::TaskMetrics m = tm_.get_task_metrics();
    json::array devices;
    bool any_device = false;
    for (const auto& d : tm_.devices()) {
      any_device = any_device || d.available;
      devices.push_back(json::object{{"id", d.id}, {"available", d.available}});
    }
    const bool store_ok = m.store.backlog == 0;
    json::array problems;
    if (!store_ok) {
      problems.push_back(json::string("the store has " + std::to_string(m.store.backlog) +
                                      " write(s) waiting for a retry"));
    }
    if (!any_device) problems.push_back(json::string("no device is available"));
    const bool ready = problems.empty();
    json::object o{{"status", ready ? "ok" : "degraded"},
                   {"live", true},
                   {"ready", ready},
                   {"problems", std::move(problems)},
                   {"store", json::object{{"backlog", m.store.backlog},
                                          {"failed_writes", m.store.failed_writes}}},
                   {"devices", std::move(devices)},
                   {"active_tasks", total(m.active_tasks)},
                   {"connections", o_.connections ? o_.connections() : 0},
                   {"queued_tasks", total(m.queued_tasks)},
                   {"paused", paused()},
                   // A host of a shared queue (storage.shared): GET /cluster.
                   {"shared", tm_.config().storage.shared},
                   {"version", std::string(taskmgr::version())}};
    return make_json(req, ready ? http::status::ok : http::status::service_unavailable,
                     json::serialize(o));
  }

  // input.path: only a regular file that resolves (symlinks followed)
  // inside an --input-root, read here (at most max_input_bytes) so that the
  // library gets bytes, never a path of the client's choosing.
  void read_under_roots(const std::string& path, taskmgr::TaskInput& in) {
    if (o_.input_roots.empty() || path.find('\0') != std::string::npos) path_refused();
    // The root is chosen from the text alone: a path that does not start
    // with a root touches nothing on disk, so that no timing tells what
    // exists outside the roots.
    const std::string* root = nullptr;
    for (const auto& r : o_.input_roots) {
      if (path.size() > r.size() && path.compare(0, r.size(), r) == 0 &&
          (r.back() == '/' || path[r.size()] == '/')) {
        root = &r;
        break;
      }
    }
    if (root == nullptr) path_refused();
    std::size_t from = root->size();
    while (from < path.size() && path[from] == '/') ++from;
    if (from == path.size()) path_refused();
    const std::string rel = path.substr(from);
    // Only down from the root: a ".." would look at what is above it.
    if (rel == ".." || rel.rfind("../", 0) == 0 || rel.find("/../") != std::string::npos ||
        (rel.size() >= 3 && rel.compare(rel.size() - 3, 3, "/..") == 0)) {
      path_refused();
    }
    const int fd = open_below(*root, rel);
    if (fd < 0) path_refused();
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      path_refused();
    }
    if (static_cast<std::uint64_t>(st.st_size) > o_.max_input_bytes) {
      ::close(fd);
      throw HttpError{
          http::status::payload_too_large, "payload_too_large",
          "input.path names a file larger than " + std::to_string(o_.max_input_bytes) + " bytes"};
    }
    in.data.resize(static_cast<std::size_t>(st.st_size));
    std::size_t got = 0;
    while (got < in.data.size()) {
      const ssize_t n = ::read(fd, in.data.data() + got, in.data.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
    }
    ::close(fd);
    if (got != in.data.size()) path_refused();  // changed while read
  }

  // Opens `rel`, a path below `root` with no ".." (checked by the caller),
  // for reading without blocking (a FIFO does not hang); -1 when refused.
  // Symlinks are followed (realpath) and the result must be under a root;
  // the final component is opened without following a link (one swapped
  // in after realpath is refused).
  int open_below(const std::string& root, const std::string& rel) const {
    const std::string joined = root + (root.back() == '/' ? "" : "/") + rel;
    char* real = ::realpath(joined.c_str(), nullptr);
    if (real == nullptr) return -1;
    const std::string resolved(real);
    std::free(real);
    bool inside = false;
    for (const auto& r : o_.input_roots) {
      inside = inside || (resolved.size() > r.size() && resolved.compare(0, r.size(), r) == 0 &&
                          (r.back() == '/' || resolved[r.size()] == '/'));
    }
    if (!inside) return -1;
    return ::open(resolved.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
  }

  // GET /tasks/{id}/result[?format=json|text]: a completed task's result
  // (its JSON), or its text (the result's "text" field) as text/plain.
  // GET /tasks/{id}/result: a completed task's result in the format that
  // ?format= names, else the first of the Accept header's types served,
  // else JSON. hocr, alto, tsv and pdf need the task to have made that
  // output (options {"output": "hocr"}, docs/OCR.md "Outputs"); the pages'
  // parts are joined into one document as taskmgr-ocr writes it.
  Response result(const Request& req, const std::string& id, const std::string& query) {
    static const std::pair<const char*, const char*> kFormats[] = {
        {"json", "application/json"},
        {"text", "text/plain; charset=utf-8"},
        {"hocr", "application/xhtml+xml; charset=utf-8"},
        {"alto", "application/xml; charset=utf-8"},
        {"tsv", "text/tab-separated-values; charset=utf-8"},
        {"pdf", "application/pdf"},
    };
    std::string format;
    for (const auto& [k, v] : parse_query(query)) {
      if (k != "format" || !format.empty()) {
        bad_request("the only query parameter of /result is format=json|text|hocr|alto|tsv|pdf");
      }
      format = v;
      bool known = false;
      for (const auto& f : kFormats) known = known || format == f.first;
      if (!known) bad_request("format must be json, text, hocr, alto, tsv or pdf");
    }
    // format= names one; else the Accept header's acceptable types, best
    // first: the first of them this task's result has.
    const std::vector<std::string> wanted =
        format.empty() ? accepted_formats(req) : std::vector<std::string>{format};
    const taskmgr::Task t = tm_.get_task(id);
    if (t.status != taskmgr::TaskStatus::kCompleted) {
      throw HttpError{http::status::conflict, "invalid_state",
                      "task " + id + " is " + std::string(taskmgr::to_string(t.status)) +
                          ": only a completed task has a result"};
    }
    boost::system::error_code ec;
    const json::value v = json::parse(t.result, ec);
    const json::object empty;
    const json::object& o = !ec && v.is_object() ? v.as_object() : empty;
    // The result as `f`, or nullopt when the task did not make it.
    auto as = [&](const std::string& f) -> std::optional<std::string> {
      if (f == "json") return t.result.empty() ? std::string("null") : t.result;
      if (f == "text") {
        const json::value* text = o.if_contains("text");
        if (text == nullptr || !text->is_string()) return std::nullopt;
        return std::string(text->as_string());
      }
      if (f == "pdf") {
        const json::value* pdf = o.if_contains("pdf_base64");
        if (pdf == nullptr || !pdf->is_string()) return std::nullopt;
        try {
          return base64_decode(pdf->as_string());
        } catch (const HttpError&) {
          throw HttpError{http::status::internal_server_error, "internal",
                          "task " + id + "'s pdf_base64 is not base64"};
        }
      }
      std::string doc = document(f, o, id);
      if (doc.empty()) return std::nullopt;
      return doc;
    };
    for (const std::string& f : wanted) {
      std::optional<std::string> body = as(f);
      if (!body) continue;
      if (f == "json") {
        Response r = make_json(req, http::status::ok, std::move(*body));
        r.set(http::field::vary, "Accept");
        return r;
      }
      const char* type = "application/json";
      for (const auto& k : kFormats) {
        if (f == k.first) type = k.second;
      }
      Response r = make(req, http::status::ok, std::move(*body));
      r.set(http::field::content_type, type);
      r.set(http::field::vary, "Accept");
      return r;
    }
    const std::string& first = wanted.front();
    throw HttpError{
        http::status::not_found, "not_found",
        "task " + id + "'s result has no " + first +
            (first == "text" ? std::string(" (format=json gives all of it)")
                             : " (create the task with options {\"output\": \"" + first + "\"})")};
  }

  // The formats the Accept header asks for, best first: its media types
  // that /result serves, by q (highest first; equal ones in the header's
  // order), q=0 left out; JSON without the header or for */*. 406 when it
  // names only types /result does not serve; 400 for a q that is not a
  // number from 0 to 1.
  static std::vector<std::string> accepted_formats(const Request& req) {
    const auto h = req.find(http::field::accept);
    if (h == req.end()) return {"json"};
    static const std::pair<const char*, const char*> kTypes[] = {
        {"application/json", "json"},
        {"text/plain", "text"},
        {"application/xhtml+xml", "hocr"},
        {"text/html", "hocr"},
        {"application/xml", "alto"},
        {"text/xml", "alto"},
        {"text/tab-separated-values", "tsv"},
        {"application/pdf", "pdf"},
        {"*/*", "json"},
        {"application/*", "json"},
        {"text/*", "text"},
    };
    struct Choice {
      int q;  // thousandths
      std::size_t order;
      std::string format;
    };
    std::vector<Choice> choices;
    const std::string accept(h->value());
    std::size_t at = 0, order = 0;
    while (at <= accept.size()) {
      const auto comma = accept.find(',', at);
      const std::string item =
          accept.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
      at = comma == std::string::npos ? accept.size() + 1 : comma + 1;
      std::vector<std::string_view> parts;
      for (std::size_t p = 0; p <= item.size();) {
        const auto semi = item.find(';', p);
        const auto end = semi == std::string::npos ? item.size() : semi;
        parts.push_back(trim(std::string_view(item).substr(p, end - p)));
        p = end + 1;
      }
      int q = 1000;
      for (std::size_t k = 1; k < parts.size(); ++k) {
        const std::string_view param = parts[k];
        if (param.size() < 2 || (param[0] != 'q' && param[0] != 'Q') || param[1] != '=') continue;
        const std::optional<int> parsed = parse_qvalue(param.substr(2));
        if (!parsed) bad_request("Accept: q must be a number from 0 to 1 (at most 3 decimals)");
        q = *parsed;
      }
      if (q == 0) continue;
      for (const auto& [type, f] : kTypes) {
        if (iequals(parts[0], type)) choices.push_back({q, order++, f});
      }
    }
    if (choices.empty()) {
      throw HttpError{http::status::not_acceptable, "not_acceptable",
                      "/result serves application/json, text/plain, application/xhtml+xml "
                      "(hOCR), application/xml (ALTO), text/tab-separated-values and "
                      "application/pdf"};
    }
    std::stable_sort(choices.begin(), choices.end(),
                     [](const Choice& a, const Choice& b) { return a.q > b.q; });
    std::vector<std::string> out;
    for (const auto& c : choices) {
      if (std::find(out.begin(), out.end(), c.format) == out.end()) out.push_back(c.format);
    }
    return out;
  }

  // RFC 9110's qvalue: 0[.ddd] or 1[.000], as thousandths.
  static std::optional<int> parse_qvalue(std::string_view v) {
    if (v.empty() || (v[0] != '0' && v[0] != '1')) return std::nullopt;
    int q = (v[0] - '0') * 1000;
    if (v.size() == 1) return q;
    if (v[1] != '.' || v.size() > 5) return std::nullopt;
    int scale = 100;
    for (std::size_t i = 2; i < v.size(); ++i, scale /= 10) {
      if (v[i] < '0' || v[i] > '9') return std::nullopt;
      q += (v[i] - '0') * scale;
    }
    if (q > 1000) return std::nullopt;
    return q;
  }

  static std::string xml_escape(const std::string& s) {
    std::string out;
    for (const char c : s) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        default: out.push_back(c);
      }
    }
    return out;
  }

  // One hOCR, ALTO or TSV document of the result's pages, as taskmgr-ocr
  // writes a document (examples/taskmgr_ocr/output.cpp); "" when no page
  // has that output.
  static std::string document(const std::string& format, const json::object& result,
                              const std::string& id) {
    std::string body;
    int n = 0;
    bool any = false;
    if (const json::value* ps = result.if_contains("pages"); ps && ps->is_array()) {
      for (const auto& p : ps->as_array()) {
        if (!p.is_object()) continue;
        ++n;
        const json::value* part = p.as_object().if_contains(format);
        if (part == nullptr || !part->is_string()) continue;
        any = true;
        std::string s(part->as_string());
        if (format == "tsv") {
          if (!s.empty() && s.back() != '\n') s += '\n';
        } else if (format == "alto") {
          // Tesseract numbers an ALTO page's ids from 0 on each page; in one
          // document they must be unique (xsd:ID): prefixed with the page.
          const std::string prefix = " ID=\"p" + std::to_string(n) + "_";
          for (std::size_t at = s.find(" ID=\""); at != std::string::npos;
               at = s.find(" ID=\"", at + prefix.size())) {
            s.replace(at, 5, prefix);
          }
        }
        body += s;
      }
    }
    if (!any) return "";
    const std::string software = "taskmgr " + std::string(taskmgr::version());
    if (format == "tsv") {
      return "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\t"
             "height\tconf\ttext\n" +
             body;
    }
    if (format == "hocr") {
      std::set<std::string> classes = {"ocr_page", "ocr_carea", "ocr_par",
                                       "ocr_line", "ocrx_word", "ocrp_wconf"};
      for (std::size_t at = body.find("class='"); at != std::string::npos;
           at = body.find("class='", at)) {
        at += 7;
        const std::size_t end = body.find('\'', at);
        if (end == std::string::npos) break;
        std::istringstream words(body.substr(at, end - at));
        for (std::string c; words >> c;) {
          if (c.rfind("ocr", 0) == 0) classes.insert(c);
        }
      }
      std::string capabilities;
      for (const auto& c : classes) capabilities += (capabilities.empty() ? "" : " ") + c;
      return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
             "<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n"
             "    \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n"
             "<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n<head>\n"
             "  <title>task " +
             xml_escape(id) +
             "</title>\n"
             "  <meta http-equiv=\"Content-Type\" content=\"text/html;charset=utf-8\"/>\n"
             "  <meta name=\"ocr-system\" content=\"" +
             software + " (Tesseract)\"/>\n  <meta name=\"ocr-capabilities\" content=\"" +
             capabilities + "\"/>\n</head>\n<body>\n" + body + "</body>\n</html>\n";
    }
    return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
           "<alto xmlns=\"http://www.loc.gov/standards/alto/ns-v3#\" "
           "xmlns:xlink=\"http://www.w3.org/1999/xlink\" "
           "xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" "
           "xsi:schemaLocation=\"http://www.loc.gov/standards/alto/ns-v3# "
           "http://www.loc.gov/alto/v3/alto-3-0.xsd\">\n"
           "  <Description>\n    <MeasurementUnit>pixel</MeasurementUnit>\n"
           "    <sourceImageInformation><fileName>task " +
           xml_escape(id) +
           "</fileName></sourceImageInformation>\n"
           "    <OCRProcessing ID=\"OCR_0\"><ocrProcessingStep><processingSoftware>"
           "<softwareName>" +
           software +
           " (Tesseract)</softwareName></processingSoftware></ocrProcessingStep>"
           "</OCRProcessing>\n  </Description>\n  <Layout>\n" +
           body + "  </Layout>\n</alto>\n";
  }

  Response start(const Request& req, const std::string& id) {
    const json::object body = parse_body(req, false);
    only_keys(body, {"device", "priority", "batch_size", "options"}, "");
    taskmgr::TaskStartRequest p;
    p.device = get_string(body, "device", "");
    p.priority = get_int(body, "priority");
    p.batch_size = get_int(body, "batch_size");
    p.options_json = get_options(body);
    return make_json(req, http::status::accepted, taskmgr::to_json(tm_.start_task(id, p)));
  }

  Response list(const Request& req, const std::string& query) {
    taskmgr::TaskFilter f;
    // A listing reads how tasks stand, not their results or input bytes
    // (payloads=1 includes results): GET /tasks/{id} gives one whole.
    f.with_payloads = false;
    f.limit = 100;  // a page
    for (const auto& [k, v] : parse_query(query)) {
      if (k == "before") {
        f.before = parse_cursor(v);
      } else if (k == "status") {
        f.status = taskmgr::parse_task_status(v);
        if (!f.status) bad_request("unknown status '" + v + "'");
      } else if (k == "service") {
        f.service = v;
      } else if (k == "limit") {
        // Digits only (no sign, no spaces, no 0x or exponent).
        if (v.empty() || v.size() > 4 || v.find_first_not_of("0123456789") != std::string::npos ||
            std::stoul(v) < 1 || std::stoul(v) > kMaxPage) {
          bad_request("limit must be a whole number from 1 to " + std::to_string(kMaxPage) +
                      " (a page; the Link header leads to the next)");
        }
        f.limit = static_cast<std::size_t>(std::stoul(v));
      } else if (k == "payloads") {
        // The results; input bytes are never in a task's JSON (its
        // input.bytes says how many), so they are not read.
        if (v != "0" && v != "1") bad_request("payloads must be 0 or 1");
        f.with_payloads = v == "1";
        f.with_input_bytes = false;
      } else if (!k.empty()) {
        bad_request("unknown query parameter '" + k + "'");
      }
    }
    const std::vector<taskmgr::Task> page = tm_.list_tasks(f);  // oldest first
    std::string out = "[";
    for (auto it = page.rbegin(); it != page.rend(); ++it) {  // newest first
      if (out.size() > 1) out += ',';
      out += taskmgr::to_json(*it);
    }
    out += ']';
    Response r = make_json(req, http::status::ok, out);
    // A full page may have more before it: the next page's link, the same
    // query with its cursor.
    if (f.limit != 0 && page.size() == f.limit) {
      const std::string cursor = taskmgr::to_string(*taskmgr::page_cursor(page));
      std::string next = "/tasks?";
      for (const auto& [k, v] : parse_query(query)) {
        if (k != "before") next += percent_encode(k) + "=" + percent_encode(v) + "&";
      }
      next += "before=" + percent_encode(cursor);
      r.set("X-Next-Cursor", cursor);
      r.set(http::field::link, "<" + next + ">; rel=\"next\"");
    }
    return r;
  }

  static Response make(const Request& req, http::status s, std::string body) {
    Response r{s, req.version()};
    r.set(http::field::server, "taskmgr-http");
    r.keep_alive(req.keep_alive());
    r.body() = std::move(body);
    r.prepare_payload();
    return r;
  }
  static Response make_json(const Request& req, http::status s, std::string body) {
    Response r = make(req, s, std::move(body));
    r.set(http::field::content_type, "application/json");
    return r;
  }
  static Response error(const Request& req, const HttpError& e) {
    Response r = json_error(e.status, e.code, e.message, req.version(), req.keep_alive());
    if (!e.allow.empty()) r.set(http::field::allow, e.allow);
    return r;
  }

  taskmgr::TaskManager& tm_;
  const ApiOptions& o_;
};

}  // namespace

Response handle(taskmgr::TaskManager& tm, const ApiOptions& options, const Request& req) {
  return Api(tm, options).handle(req);
}

EventFanout::EventFanout(taskmgr::TaskManager& tm) : tm_(tm) {
  id_ = tm_.subscribe([this](const taskmgr::EventRecord& e) { publish(e); });
}

EventFanout::~EventFanout() {
  tm_.unsubscribe(id_);
  close();
}

void EventFanout::close() {
  std::vector<Sub> gone;
  {
    std::lock_guard<std::mutex> g(mu_);
    closed_ = true;
    gone.swap(subs_);
  }
  // Released here, with no lock held.
}

int EventFanout::streams() const {
  std::lock_guard<std::mutex> g(mu_);
  return static_cast<int>(subs_.size());
}

// On the manager's event thread: send() only queues, so one slow client
// delays nobody (it is dropped past its backlog).
void EventFanout::publish(const taskmgr::EventRecord& e) {
  // One copy of the message, shared by every stream it goes to.
  const auto msg = std::make_shared<const std::string>(
      "id: " + std::to_string(e.sequence) + "\nevent: " + std::string(taskmgr::to_string(e.event)) +
      "\ndata: " + taskmgr::to_json(e) + "\n\n");
  std::lock_guard<std::mutex> g(mu_);
  subs_.erase(std::remove_if(subs_.begin(), subs_.end(),
                             [&](const Sub& s) {
                               if (!s.task_id.empty() && s.task_id != e.task_id) return false;
                               return !s.stream->send(msg);
                             }),
              subs_.end());
}

namespace {
// GET /events[?task_id=ID]: the task id, percent-decoded ("" = every task);
// any other query is a 400.
std::string events_task_id(const Request& req) {
  const std::string t(req.target());
  const auto q = t.find('?');
  if (q == std::string::npos) return "";
  std::string id;
  bool seen = false;
  for (const auto& [k, v] : parse_query(t.substr(q + 1))) {
    if (k != "task_id" || seen) bad_request("the only query parameter of /events is task_id=ID");
    if (v.empty()) bad_request("task_id is empty: /events?task_id=ID, or /events for every task");
    id = v;
    seen = true;
  }
  return id;
}
}  // namespace

StreamRoute EventFanout::route(const ApiOptions& options) {
  StreamRoute r;
  r.matches = [](const Request& req) {
    const std::string_view t(req.target().data(), req.target().size());
    return t == "/events" || t.rfind("/events?", 0) == 0;
  };
  r.admit = [this, &options](const Request& req) -> std::optional<Response> {
    if (auto u = unauthorized(options, req)) return u;
    if (req.method() != http::verb::get && req.method() != http::verb::head) {
      Response e = json_error(http::status::method_not_allowed, "method_not_allowed",
                              std::string(req.method_string()) + " is not allowed on /events",
                              req.version(), req.keep_alive());
      e.set(http::field::allow, "GET, HEAD");
      return e;
    }
    try {
      const std::string id = events_task_id(req);
      if (!id.empty()) (void)tm_.get_task(id);  // 404 for an unknown task
    } catch (const HttpError& e) {
      return json_error(e.status, e.code, e.message, req.version(), req.keep_alive());
    } catch (const taskmgr::Error& e) {
      const HttpError h = from_error(e);
      return json_error(h.status, h.code, h.message, req.version(), req.keep_alive());
    }
    if (req.method() == http::verb::head) {
      // A stream's header without the stream: nothing follows it.
      Response h{http::status::ok, req.version()};
      h.set(http::field::server, "taskmgr-http");
      h.set(http::field::content_type, "text/event-stream");
      h.set(http::field::cache_control, "no-cache");
      h.keep_alive(req.keep_alive());
      return h;
    }
    return std::nullopt;
  };
  r.on_open = [this](const Request& req, std::shared_ptr<Stream> s) {
    Sub sub{std::move(s), events_task_id(req)};  // checked by admit
    // The reconnection delay a browser's EventSource uses.
    if (!sub.stream->send("retry: 2000\n\n")) return;
    std::lock_guard<std::mutex> g(mu_);
    if (!closed_) subs_.push_back(std::move(sub));
  };
  return r;
}

std::string canonical_directory(const std::string& dir) {
  char* real = ::realpath(dir.c_str(), nullptr);
  if (real == nullptr) return "";
  std::string out(real);
  std::free(real);
  struct stat st {};
  if (::stat(out.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return "";
  return out;
}

}  // namespace taskmgr_http
