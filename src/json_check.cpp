#include "json_check.hpp"

#include <boost/json.hpp>
#include <cmath>

#include "utf8.hpp"

namespace taskmgr::detail {

namespace json = boost::json;

namespace {

// The JSON Pointer of the first number that is not finite, if any.
std::optional<std::string> non_finite_at(const json::value& v, const std::string& path) {
  switch (v.kind()) {
    case json::kind::double_:
      if (!std::isfinite(v.get_double())) return path.empty() ? std::string("/") : path;
      return std::nullopt;
    case json::kind::array: {
      const auto& a = v.get_array();
      for (std::size_t i = 0; i < a.size(); ++i) {
        if (auto at = non_finite_at(a[i], path + "/" + std::to_string(i))) return at;
      }
      return std::nullopt;
    }
    case json::kind::object:
      for (const auto& kv : v.get_object()) {
        std::string key(kv.key());
        // JSON Pointer escapes (RFC 6901): ~ as ~0, / as ~1.
        std::string escaped;
        for (char c : key) {
          if (c == '~') {
            escaped += "~0";
          } else if (c == '/') {
            escaped += "~1";
          } else {
            escaped += c;
          }
        }
        if (auto at = non_finite_at(kv.value(), path + "/" + escaped)) return at;
      }
      return std::nullopt;
    default: return std::nullopt;
  }
}

}  // namespace

std::optional<std::string> json_document_problem(std::string_view text) {
  if (auto at = invalid_utf8_at(text)) {
    return "not valid UTF-8 (byte " + std::to_string(*at) + ")";
  }
  json::parser p;
  boost::system::error_code ec;
  const std::size_t used = p.write(text.data(), text.size(), ec);
  if (ec) {
    return "not valid JSON (byte " + std::to_string(used) + ": " + ec.message() + ")";
  }
  const json::value v = p.release();
  if (auto at = non_finite_at(v, "")) {
    return "a number out of range (not finite) at " + *at;
  }
  return std::nullopt;
}

}  // namespace taskmgr::detail
