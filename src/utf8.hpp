// Private: UTF-8 validation of strings a host hands in (paths, names), so
// that they can be stored and written into JSON unchanged.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace taskmgr::detail {

// The offset of the first byte that is not part of a well-formed UTF-8
// sequence (RFC 3629: no overlongs, no surrogates, at most U+10FFFF), or
// nullopt when the whole string is valid.
inline std::optional<std::size_t> invalid_utf8_at(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return std::nullopt;
}

// `s` with every byte that is not part of a well-formed sequence replaced
// by U+FFFD: for text the library cannot refuse (an exception's message
// from host code) but must hand on as valid UTF-8.
inline std::string to_valid_utf8(std::string_view s) {
  std::optional<std::size_t> at = invalid_utf8_at(s);
  if (!at) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  while (at) {
    out.append(s.data(), *at);
    out.append("\xEF\xBF\xBD");  // U+FFFD
    s.remove_prefix(*at + 1);
    at = invalid_utf8_at(s);
  }
  out.append(s.data(), s.size());
  return out;
}

// A name a caller gave, fit to quote in a message: at most 100 bytes (then
// "..."), control characters (NUL included) as U+FFFD, valid UTF-8.
inline std::string printable_name(std::string_view s) {
  constexpr std::size_t kMax = 100;
  const bool cut = s.size() > kMax;
  std::string out = to_valid_utf8(s.substr(0, kMax));
  std::string clean;
  clean.reserve(out.size());
  for (char c : out) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7F) {
      clean.append("\xEF\xBF\xBD");
    } else {
      clean.push_back(c);
    }
  }
  return cut ? clean + "..." : clean;
}

}  // namespace taskmgr::detail
