#include "api.hpp"

#include <boost/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace taskmgr_http {

namespace json = boost::json;

namespace {

// An HTTP error with its status and our error code name.
struct HttpError {
  http::status status;
  std::string code;
  std::string message;
};

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
    default: break;
  }
  return {s, std::string(taskmgr::to_string(e.code())), e.what()};
}

[[noreturn]] void bad_request(const std::string& message) {
  throw HttpError{http::status::bad_request, "invalid_argument", message};
}

std::string base64_decode(std::string_view in) {
  static const std::string chars =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  unsigned val = 0;
  int bits = -8;
  for (char c : in) {
    if (c == '=' || c == '\n' || c == '\r') continue;
    const auto pos = chars.find(c);
    if (pos == std::string::npos) bad_request("input.data_base64 is not base64");
    val = (val << 6) + static_cast<unsigned>(pos);
    bits += 6;
    if (bits >= 0) {
      out.push_back(static_cast<char>((val >> bits) & 0xFF));
      bits -= 8;
    }
  }
  return out;
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

std::optional<int> get_int(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || v->is_null()) return std::nullopt;
  if (!v->is_int64() && !v->is_uint64()) bad_request(std::string(key) + " must be an integer");
  const std::int64_t n = v->to_number<std::int64_t>();
  if (n < INT32_MIN || n > INT32_MAX) bad_request(std::string(key) + " is out of range");
  return static_cast<int>(n);
}

std::string get_options(const json::object& o) {
  const json::value* v = o.if_contains("options");
  if (v == nullptr || v->is_null()) return "";
  if (!v->is_object()) bad_request("options must be a JSON object");
  return json::serialize(*v);
}

class Api {
 public:
  explicit Api(taskmgr::TaskManager& tm) : tm_(tm) {}

  Response handle(const Request& req) {
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
                        std::string(req.method_string()) + " is not allowed on " + target};
      }
    };
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
    if (target == "/tasks") {
      if (method == http::verb::get) return list(req, query);
      require(http::verb::post);
      return create(req);
    }
    if (target.rfind("/tasks/", 0) == 0) {
      const std::string rest = target.substr(7);
      const auto slash = rest.find('/');
      const std::string id = rest.substr(0, slash);
      const std::string action = slash == std::string::npos ? "" : rest.substr(slash + 1);
      if (action.empty()) {
        require(http::verb::get);
        return make_json(req, http::status::ok, taskmgr::to_json(tm_.get_task(id)));
      }
      if (action == "health") {
        require(http::verb::get);
        return make_json(req, http::status::ok, tm_.get_task_health(id).to_json());
      }
      if (action == "start") {
        require(http::verb::post);
        return start(req, id);
      }
      if (action == "cancel") {
        require(http::verb::post);
        tm_.cancel_task(id);
        return make_json(req, http::status::ok, taskmgr::to_json(tm_.get_task(id)));
      }
    }
    throw HttpError{http::status::not_found, "not_found", "no route " + target};
  }

  Response create(const Request& req) {
    const json::object body = parse_body(req, true);
    taskmgr::TaskCreateRequest r;
    if (auto s = get_string(body, "service", ""); !s.empty()) r.service = s;
    if (const json::value* in = body.if_contains("input"); in && !in->is_null()) {
      if (!in->is_object()) bad_request("input must be an object with path or data_base64");
      const json::object& io = in->as_object();
      r.input.path = get_string(io, "path", "input.");
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
    const taskmgr::Task t = tm_.create_task(r);
    Response res = make_json(req, http::status::created, taskmgr::to_json(t));
    res.set(http::field::location, "/tasks/" + t.id);
    return res;
  }

  Response start(const Request& req, const std::string& id) {
    const json::object body = parse_body(req, false);
    taskmgr::TaskStartRequest p;
    p.device = get_string(body, "device", "");
    p.priority = get_int(body, "priority");
    p.batch_size = get_int(body, "batch_size");
    p.options_json = get_options(body);
    return make_json(req, http::status::accepted, taskmgr::to_json(tm_.start_task(id, p)));
  }

  Response list(const Request& req, const std::string& query) {
    taskmgr::TaskFilter f;
    std::size_t at = 0;
    while (at < query.size()) {
      const auto amp = query.find('&', at);
      const std::string kv =
          query.substr(at, amp == std::string::npos ? std::string::npos : amp - at);
      at = amp == std::string::npos ? query.size() : amp + 1;
      const auto eq = kv.find('=');
      const std::string k = kv.substr(0, eq), v = eq == std::string::npos ? "" : kv.substr(eq + 1);
      if (k == "status") {
        f.status = taskmgr::parse_task_status(v);
        if (!f.status) bad_request("unknown status '" + v + "'");
      } else if (k == "service") {
        f.service = v;
      } else if (k == "limit") {
        // Digits only (no sign, no spaces, no 0x or exponent), 0 = all.
        if (v.empty() || v.size() > 9 || v.find_first_not_of("0123456789") != std::string::npos)
          bad_request("limit must be a whole number from 0 (all) to 999999999");
        f.limit = static_cast<std::size_t>(std::stoul(v));
      } else if (!k.empty()) {
        bad_request("unknown query parameter '" + k + "'");
      }
    }
    std::string out = "[";
    for (const auto& t : tm_.list_tasks(f)) {
      if (out.size() > 1) out += ',';
      out += taskmgr::to_json(t);
    }
    out += ']';
    return make_json(req, http::status::ok, out);
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
    return json_error(e.status, e.code, e.message, req.version(), req.keep_alive());
  }

  taskmgr::TaskManager& tm_;
};

}  // namespace

Response handle(taskmgr::TaskManager& tm, const Request& req) { return Api(tm).handle(req); }

}  // namespace taskmgr_http
