// Private: a small, fast writer for flat JSON objects (event details), used
// on the hot path instead of building a boost::json::object per event.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace taskmgr::detail {

// Where JSON text is written: a fixed buffer on the stack that spills into a
// std::string only when the text outgrows it. Event details are short, and
// each std::string::append call costs more than the copy itself. (fmt's
// memory_buffer does the same, but its append is out of line: in the
// lifecycle benchmark it cost about 1,000 more instructions per task than
// this inline buffer, measured with callgrind; docs/PERFORMANCE.md.)
class JsonOut {
 public:
  static constexpr std::size_t kCapacity = 480;

  __attribute__((always_inline)) void put(char c) {
    if (!spilled_ && n_ < kCapacity) {
      buf_[n_++] = c;
    } else {
      spill().push_back(c);
    }
  }
  __attribute__((always_inline)) void put(std::string_view s) {
    if (!spilled_ && s.size() <= kCapacity - n_) {
      std::memcpy(buf_ + n_, s.data(), s.size());
      n_ += s.size();
    } else {
      spill().append(s);
    }
  }
  std::string str() const { return spilled_ ? big_ : std::string(buf_, n_); }
  // Into an existing string: no allocation when its capacity suffices.
  void assign_to(std::string& s) const {
    if (spilled_) {
      s.assign(big_);
    } else {
      s.assign(buf_, n_);
    }
  }

 private:
  std::string& spill() {
    if (!spilled_) {
      big_.reserve(2 * kCapacity);
      big_.assign(buf_, n_);
      spilled_ = true;
    }
    return big_;
  }
  char buf_[kCapacity];
  std::size_t n_ = 0;
  bool spilled_ = false;
  std::string big_;
};

// Appends to a std::string through the same interface.
struct StringOut {
  std::string& s;
  void put(char c) { s.push_back(c); }
  void put(std::string_view v) { s.append(v); }
};

// A JSON value a field can hold: string, integer, number, bool, null, or
// raw JSON text (an object or array serialized elsewhere).
class JsonValue {
 public:
  enum class Kind { kString, kInt, kDouble, kSeconds, kBool, kNull, kRaw };

  JsonValue(const std::string& s) : kind_(Kind::kString), str_(s) {}
  JsonValue(std::string_view s) : kind_(Kind::kString), str_(s) {}
  JsonValue(const char* s) : kind_(Kind::kString), str_(s) {}
  JsonValue(bool b) : kind_(Kind::kBool), b_(b) {}
  JsonValue(double d) : kind_(Kind::kDouble), d_(d) {}
  JsonValue(std::nullptr_t) : kind_(Kind::kNull) {}
  template <typename T,
            typename = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>>>
  JsonValue(T i) : kind_(Kind::kInt), i_(static_cast<std::int64_t>(i)) {}
  JsonValue(const std::optional<std::int64_t>& o)
      : kind_(o ? Kind::kInt : Kind::kNull), i_(o.value_or(0)) {}

  // A duration in seconds, written to the microsecond ("0.000125", "2.5"):
  // cheaper than the shortest round-trip form, and as precise as the
  // durations it carries. Always a JSON number with a fraction part.
  static JsonValue seconds(double s) {
    JsonValue v(s);
    v.kind_ = Kind::kSeconds;
    return v;
  }

  static JsonValue raw(std::string_view json) {
    JsonValue v(json);
    v.kind_ = Kind::kRaw;
    return v;
  }

  // Strings and raw text refer to outside data; a copy of the value can be
  // pointed at a copy of that text (CapturedObject).
  bool has_text() const noexcept { return kind_ == Kind::kString || kind_ == Kind::kRaw; }
  std::string_view text() const noexcept { return str_; }
  JsonValue with_text(std::string_view s) const noexcept {
    JsonValue v = *this;
    v.str_ = s;
    return v;
  }

  template <typename Out>
  void append_to(Out& out) const {
    switch (kind_) {
      case Kind::kString: append_string(out, str_); break;
      case Kind::kInt: {
        char buf[24];
        const auto res = std::to_chars(buf, buf + sizeof buf, i_);
        out.put(std::string_view(buf, static_cast<std::size_t>(res.ptr - buf)));
        break;
      }
      case Kind::kDouble: {
        if (!std::isfinite(d_)) {
          out.put("null");  // JSON has no NaN or infinity
          break;
        }
        if (d_ == std::trunc(d_) && std::fabs(d_) < 1e15) {  // whole: cheap and exact
          char buf[24];
          const auto res = std::to_chars(buf, buf + sizeof buf, static_cast<std::int64_t>(d_));
          out.put(std::string_view(buf, static_cast<std::size_t>(res.ptr - buf)));
          out.put(".0");
          break;
        }
        char buf[32];
        const auto res = std::to_chars(buf, buf + sizeof buf, d_);  // shortest round-trip form
        std::string_view s(buf, static_cast<std::size_t>(res.ptr - buf));
        out.put(s);
        if (s.find_first_of(".eEn") == std::string_view::npos) out.put(".0");  // stays a double
        break;
      }
      case Kind::kSeconds: {
        if (!std::isfinite(d_) || std::fabs(d_) >= 1e12) {
          JsonValue(d_).append_to(out);  // the general form
          break;
        }
        std::int64_t us = std::llround(d_ * 1e6);
        if (us < 0) {
          out.put('-');
          us = -us;
        }
        char buf[24];
        auto res = std::to_chars(buf, buf + sizeof buf, us / 1000000);
        out.put(std::string_view(buf, static_cast<std::size_t>(res.ptr - buf)));
        char frac[7] = {'.', '0', '0', '0', '0', '0', '0'};
        std::int64_t f = us % 1000000;
        for (int i = 6; i >= 1; --i, f /= 10) frac[i] = static_cast<char>('0' + f % 10);
        std::size_t len = 7;
        while (len > 2 && frac[len - 1] == '0') --len;  // keep one digit: "2.0"
        out.put(std::string_view(frac, len));
        break;
      }
      case Kind::kBool: out.put(b_ ? std::string_view("true") : std::string_view("false")); break;
      case Kind::kNull: out.put("null"); break;
      case Kind::kRaw: out.put(str_.empty() ? std::string_view("null") : str_); break;
    }
  }

  template <typename Out>
  static void append_string(Out& out, std::string_view s) {
    out.put('"');
    // Runs that need no escaping (nearly everything) are appended whole.
    std::size_t run = 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
      const char c = s[i];
      if (c != '"' && c != '\\' && static_cast<unsigned char>(c) >= 0x20) continue;
      out.put(s.substr(run, i - run));
      run = i + 1;
      switch (c) {
        case '"': out.put("\\\""); break;
        case '\\': out.put("\\\\"); break;
        case '\n': out.put("\\n"); break;
        case '\r': out.put("\\r"); break;
        case '\t': out.put("\\t"); break;
        default: {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          out.put(std::string_view(buf, 6));
        }
      }
    }
    out.put(s.substr(run));
    out.put('"');
  }
  static void append_string(std::string& out, std::string_view s) {
    StringOut o{out};
    append_string(o, s);
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

// One member of an object; `first` writes no comma before it. Keys are the
// library's own identifiers: nothing to escape.
template <typename Out>
void append_member(Out& out, bool first, std::string_view key, const JsonValue& value) {
  if (!first) out.put(',');
  out.put('"');
  out.put(key);
  out.put("\":");
  value.append_to(out);
}

inline std::string json_object(std::initializer_list<JsonField> fields) {
  JsonOut out;
  out.put('{');
  bool first = true;
  for (const auto& f : fields) {
    append_member(out, first, f.key, f.value);
    first = false;
  }
  out.put('}');
  return out.str();
}

// The fields of a flat object captured by value, to be written as JSON later
// (the manager captures event details while it holds its lock and writes
// them after releasing it). Keys are kept as views: they must outlive the
// capture, as the string literals every caller uses do. String and raw
// values are copied into an inline buffer: capturing allocates nothing.
// str() gives exactly what json_object() gives for the same fields.
class CapturedObject {
 public:
  static constexpr std::size_t kMaxFields = 8;
  static constexpr std::size_t kTextCapacity = 192;

  // Keeps the fields; false (and nothing kept) when they do not fit: more
  // than kMaxFields, or more text than kTextCapacity. The caller then writes
  // them at once with json_object().
  bool capture(std::initializer_list<JsonField> fields) noexcept {
    n_ = 0;
    if (fields.size() > kMaxFields) return false;
    std::size_t used = 0;
    for (const auto& f : fields) {
      Field& d = fields_[n_++];
      d.key = f.key;
      d.value = f.value;
      if (!f.value.has_text()) continue;
      const std::string_view t = f.value.text();
      if (t.size() > kTextCapacity - used) {
        n_ = 0;
        return false;
      }
      if (!t.empty()) std::memcpy(text_ + used, t.data(), t.size());
      d.offset = static_cast<std::uint16_t>(used);
      used += t.size();
    }
    return true;
  }

  std::string str() const {
    std::string s;
    assign_to(s);
    return s;
  }

  // The same text into an existing string (its capacity reused).
  void assign_to(std::string& s) const {
    JsonOut out;
    out.put('{');
    for (std::size_t i = 0; i < n_; ++i) {
      const Field& f = fields_[i];
      if (f.value.has_text()) {
        append_member(out, i == 0, f.key,
                      f.value.with_text(std::string_view(text_ + f.offset, f.value.text().size())));
      } else {
        append_member(out, i == 0, f.key, f.value);
      }
    }
    out.put('}');
    out.assign_to(s);
  }

 private:
  struct Field {
    std::string_view key;
    JsonValue value{nullptr};  // its text, if any, is at text_ + offset
    std::uint16_t offset = 0;
  };
  Field fields_[kMaxFields];
  std::size_t n_ = 0;
  char text_[kTextCapacity];
};

}  // namespace taskmgr::detail
