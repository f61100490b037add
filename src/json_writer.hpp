// Private: a small, fast writer for flat JSON objects (event details), used
// on the hot path instead of building a boost::json::object per event.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace taskmgr::detail {

// A JSON value a field can hold: string, integer, number, bool, null, or
// raw JSON text (an object or array serialized elsewhere).
class JsonValue {
 public:
  enum class Kind { kString, kInt, kDouble, kBool, kNull, kRaw };

  JsonValue(const std::string& s) : kind_(Kind::kString), str_(s) {}
  JsonValue(std::string_view s) : kind_(Kind::kString), str_(s) {}
  JsonValue(const char* s) : kind_(Kind::kString), str_(s) {}
  JsonValue(bool b) : kind_(Kind::kBool), b_(b) {}
  JsonValue(double d) : kind_(Kind::kDouble), d_(d) {}
  JsonValue(std::nullptr_t) : kind_(Kind::kNull) {}
  template <typename T, typename = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>>>
  JsonValue(T i) : kind_(Kind::kInt), i_(static_cast<std::int64_t>(i)) {}
  JsonValue(const std::optional<std::int64_t>& o)
      : kind_(o ? Kind::kInt : Kind::kNull), i_(o.value_or(0)) {}

  static JsonValue raw(std::string_view json) {
    JsonValue v(json);
    v.kind_ = Kind::kRaw;
    return v;
  }

  void append_to(std::string& out) const {
    switch (kind_) {
      case Kind::kString: append_string(out, str_); break;
      case Kind::kInt: out += std::to_string(i_); break;
      case Kind::kDouble: {
        if (!std::isfinite(d_)) {
          out += "null";  // JSON has no NaN or infinity
          break;
        }
        char buf[32];
        const auto res = std::to_chars(buf, buf + sizeof buf, d_);  // shortest round-trip form
        std::string_view s(buf, static_cast<std::size_t>(res.ptr - buf));
        out += s;
        if (s.find_first_of(".eEn") == std::string_view::npos) out += ".0";  // stays a double
        break;
      }
      case Kind::kBool: out += b_ ? "true" : "false"; break;
      case Kind::kNull: out += "null"; break;
      case Kind::kRaw: out += str_.empty() ? std::string_view("null") : str_; break;
    }
  }

  static void append_string(std::string& out, std::string_view s) {
    out += '"';
    for (const char c : s) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
            out += buf;
          } else {
            out += c;
          }
      }
    }
    out += '"';
  }

 private:
  Kind kind_;
  std::string_view str_;
  std::int64_t i_ = 0;
  double d_ = 0;
  bool b_ = false;
};

struct JsonField {
  std::string_view key;
  JsonValue value;
};

inline std::string json_object(std::initializer_list<JsonField> fields) {
  std::string out;
  out.reserve(96);
  out += '{';
  bool first = true;
  for (const auto& f : fields) {
    if (!first) out += ',';
    first = false;
    JsonValue::append_string(out, f.key);
    out += ':';
    f.value.append_to(out);
  }
  out += '}';
  return out;
}

}  // namespace taskmgr::detail
