// Private: one table per enum gives both directions of its string form, so
// to_string and parse can never disagree.
#pragma once

#include <optional>
#include <string_view>
#include <utility>
#include <vector>

namespace taskmgr::detail {

template <typename E, std::size_t N>
using EnumTable = std::pair<E, std::string_view>[N];

template <typename E, std::size_t N>
constexpr std::string_view enum_name(const std::pair<E, std::string_view> (&table)[N],
                                     E value) noexcept {
  for (const auto& [e, name] : table) {
    if (e == value) return name;
  }
  return "unknown";
}

template <typename E, std::size_t N>
constexpr std::optional<E> enum_parse(const std::pair<E, std::string_view> (&table)[N],
                                      std::string_view s) noexcept {
  for (const auto& [e, name] : table) {
    if (name == s) return e;
  }
  return std::nullopt;
}

template <typename E, std::size_t N>
std::vector<E> enum_values(const std::pair<E, std::string_view> (&table)[N]) {
  std::vector<E> out;
  out.reserve(N);
  for (const auto& entry : table) out.push_back(entry.first);
  return out;
}

}  // namespace taskmgr::detail
