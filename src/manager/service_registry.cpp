#include "manager/service_registry.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "host_call.hpp"
#include "taskmgr/error.hpp"
#include "utf8.hpp"

namespace taskmgr::detail {

void ServiceRegistry::validate_kind(const std::string& kind, std::string_view fn) {
  constexpr std::size_t kMaxKind = 100;
  if (kind.empty())
    throw Error(ErrorCode::kInvalidArgument, fmt::format("{}: empty service kind", fn));
  if (kind.size() > kMaxKind) {
    throw Error(
        ErrorCode::kInvalidArgument,
        fmt::format("{}: service kind is {} bytes long (at most {})", fn, kind.size(), kMaxKind));
  }
  if (auto at = invalid_utf8_at(kind)) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{}: service kind is not valid UTF-8 (byte {})", fn, *at));
  }
  for (std::size_t i = 0; i < kind.size(); ++i) {
    const auto c = static_cast<unsigned char>(kind[i]);
    // C0 controls, DEL, and the C1 controls U+0080..U+009F (0xC2 0x80..0x9F).
    const bool c1 = c == 0xC2 && i + 1 < kind.size() &&
                    static_cast<unsigned char>(kind[i + 1]) >= 0x80 &&
                    static_cast<unsigned char>(kind[i + 1]) <= 0x9F;
    if (c < 0x20 || c == 0x7F || c1) {
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("{}: service kind has a control character (byte {})", fn, i));
    }
  }
}

const ServiceEntry& ServiceRegistry::add(std::unique_ptr<ServiceEntry> entry) {
  WriterLock g(mu_);
  auto [it, inserted] = entries_.try_emplace(entry->kind, nullptr);
  if (!inserted) {
    throw Error(ErrorCode::kInvalidState, "service '" + entry->kind + "' is registered already");
  }
  it->second = std::move(entry);
  return *it->second;
}

const ServiceEntry* ServiceRegistry::find(std::string_view kind) const {
  ReaderLock g(mu_);
  auto it = entries_.find(kind);
  return it == entries_.end() ? nullptr : it->second.get();
}

std::string ServiceRegistry::kinds() const {
  ReaderLock g(mu_);
  std::string known;
  for (const auto& [k, e] : entries_) known += (known.empty() ? "" : ", ") + k;
  return known;
}

std::vector<const ServiceEntry*> ServiceRegistry::entries() const {
  ReaderLock g(mu_);
  std::vector<const ServiceEntry*> out;
  for (const auto& [k, e] : entries_) out.push_back(e.get());
  return out;
}

bool ServiceRegistry::supports(const ServiceEntry& e, const DeviceInfo& d) {
  if (!e.device_kinds.empty() &&
      std::find(e.device_kinds.begin(), e.device_kinds.end(), d.kind) == e.device_kinds.end()) {
    return false;  // services.<kind>.device_kinds leaves it out: the factory is not asked
  }
  TASKMGR_HOST_CALL("ServiceFactory::supports");
  return e.factory->supports(d);
}

}  // namespace taskmgr::detail
