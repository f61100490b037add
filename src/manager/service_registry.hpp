// Private: the service kinds a manager knows, each with its factory and its
// pool of warm instances.
//
// Kinds are added at open or by register_service and never removed, so a
// pointer to an entry stays valid for the manager's life. An entry becomes
// visible to lookups (find) only once it is complete: its pool exists and
// its memory model is registered (create_task looks kinds up without the
// scheduler lock). The factory's supports() is host code: it is called only
// through supports() here, never with the scheduler lock held.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "sync.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/service.hpp"
#include "taskmgr/service_pool.hpp"

namespace taskmgr::detail {

struct ServiceEntry {
  std::string kind;
  std::shared_ptr<ServiceFactory> factory;
  std::unique_ptr<ServicePool> pool;
  // The devices it supported when it was registered (asked once per device):
  // the pools get_task_metrics lists. Metrics never run host code, so a
  // host may read them from anywhere, supports() included.
  std::vector<std::string> devices;
  // Tasks of this kind must have an input (path or bytes): the factory
  // said so at registration (detail::InputRequirement).
  bool needs_input = false;
  // services.<kind>.device_kinds: the kinds of device it may run on; empty:
  // as the factory's supports() says.
  std::vector<DeviceKind> device_kinds;
};

// A pool's identity: service kind and device (never joined into one string).
struct PoolKey {
  std::string service;
  std::string device;
  bool operator<(const PoolKey& o) const {
    return service != o.service ? service < o.service : device < o.device;
  }
};

class ServiceRegistry {
 public:
  // A service kind must be 1..100 bytes of UTF-8 without control characters
  // (it appears in logs, JSON, HTTP paths and SQL): Error(kInvalidArgument)
  // naming the problem.
  // `fn` names the call in the message.
  static void validate_kind(const std::string& kind, std::string_view fn = "register_service");

  // Adds a complete entry. Error(kInvalidState) when the kind exists.
  const ServiceEntry& add(std::unique_ptr<ServiceEntry> entry) REQUIRES(!mu_);
  // The entry of a kind, or null.
  const ServiceEntry* find(std::string_view kind) const REQUIRES(!mu_);
  bool contains(std::string_view kind) const REQUIRES(!mu_) { return find(kind) != nullptr; }
  // "ocr, svc": the registered kinds, for error messages.
  std::string kinds() const REQUIRES(!mu_);
  std::vector<const ServiceEntry*> entries() const REQUIRES(!mu_);

  // The factory's supports(d): host code.
  static bool supports(const ServiceEntry& e, const DeviceInfo& d) REQUIRES(!scheduler_lock);

 private:
  mutable SharedMutex mu_;
  std::map<std::string, std::unique_ptr<ServiceEntry>, std::less<>> entries_ GUARDED_BY(mu_);
};

}  // namespace taskmgr::detail
