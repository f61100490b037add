// taskmgr: pools of warm service instances (the spec's service_pool).
//
// One ServicePool per service kind, with a sub-pool per device. A sub-pool
// holds at most max_instances instances (pools.defaults / pools.devices.<id>;
// 0 = auto: `auto_max_cpu` for the cpu, 1 for a GPU), creates them lazily on
// first use or up front with warm() (min_instances), and hands them out one
// task at a time:
//
//   auto lease = pool.acquire("cuda:0");   // waits up to acquire_timeout_seconds
//   lease.service().process(ctx);          // created here on first use
//   // ~Lease releases it, on every path
//
// acquire() waits for a free instance up to the timeout and then throws
// Error(kPoolExhausted). A lease marked discard() (the instance ran out of
// memory or threw) destroys its instance on release; the slot is free again
// and the next acquire creates a replacement. Each instance has a stable id,
// "<kind>@<device>#<n>", recorded on the task as service_instance_id.
//
// resize() changes a device's min_instances and max_instances while the
// pool is in use: a smaller max retires idle instances at once and leased
// ones as they are released (none is taken from its task), and no acquire
// gets a slot while max or more are leased; warm_in_background() then
// creates the instances a larger min asks for without blocking the caller.
//
// Thread-safety: every member is safe to call from any thread. A Lease is
// used by one thread at a time and must not outlive its pool.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/clock.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/service.hpp"

namespace taskmgr {

class TASKMGR_API ServicePool {
 public:
  struct Stats {
    int in_use = 0;  // leased now
    int idle = 0;    // created and free
    int max = 0;     // max_instances in force
    int min = 0;     // min_instances in force
    std::uint64_t created = 0;
    std::uint64_t destroyed = 0;
    std::uint64_t acquired = 0;
    std::uint64_t exhausted = 0;  // acquires that timed out
  };

  class TASKMGR_API Lease {
   public:
    Lease() = default;
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();

    // The instance, created on first call (throws what the factory throws).
    Service& service();
    // Whether the instance exists yet (service() creates it).
    bool has_instance() const noexcept { return instance_ != nullptr; }
    // "<kind>@<device>#<n>"; assigned when the slot is leased.
    const std::string& instance_id() const noexcept { return instance_id_; }
    const std::string& device() const noexcept { return device_; }
    // The instance is broken: destroy it on release instead of reusing it.
    void discard() noexcept { discard_ = true; }
    // Returns the instance to the pool now (idempotent).
    void release() noexcept;
    explicit operator bool() const noexcept { return pool_ != nullptr; }

   private:
    friend class ServicePool;
    ServicePool* pool_ = nullptr;
    std::string device_;
    std::string instance_id_;
    std::unique_ptr<Service> instance_;
    bool discard_ = false;
  };

  ServicePool(std::shared_ptr<ServiceFactory> factory, PoolsConfig config, int auto_max_cpu,
              std::shared_ptr<const Clock> clock = nullptr);
  ~ServicePool();
  ServicePool(const ServicePool&) = delete;
  ServicePool& operator=(const ServicePool&) = delete;

  const std::string& kind() const noexcept;
  ServiceFactory& factory() noexcept;

  // The spec's acquire(device): waits up to `timeout` (default: the pool's
  // acquire_timeout_seconds) for a free slot; Error(kPoolExhausted) after.
  Lease acquire(const std::string& device, std::optional<Duration> timeout = std::nullopt);
  // A free slot now, or nothing.
  std::optional<Lease> try_acquire(const std::string& device);
  // The spec's release(service): the same as destroying the lease.
  void release(Lease&& lease) noexcept;

  // Creates instances until `device` has min_instances, side by side: each
  // on a thread of its own (the factory's create() runs there), returning
  // when all are made. Throws what the factory throws (the first failure).
  void warm(const std::string& device);
  // Creates instances until `device` has min_instances, on a thread of the
  // pool's own, only into free slots (never waiting for one: a busy slot
  // makes its instance when a task needs it). Returns at once. A failure of
  // the factory is passed to `on_error` (on that thread) and ends the
  // warming; the next acquire tries again. Does nothing after destroy_idle().
  void warm_in_background(const std::string& device,
                          std::function<void(const std::string& message)> on_error = nullptr);
  // Sets a device's min_instances and max_instances now (the acquire
  // timeout is kept) and returns the settings it replaced. Idle instances
  // beyond the new max are destroyed on the calling thread before it
  // returns (no lock of the pool held); leased ones beyond it are destroyed
  // as they are released. A larger max wakes acquire() calls waiting for a
  // slot. It does not create instances: warm_in_background() does.
  // Error(kInvalidArgument) unless 0 <= min_instances <= max_instances and
  // 1 <= max_instances <= 4096. With `retired`, the idle instances it
  // retires are moved there instead, for the caller to destroy where it
  // holds no lock of its own (an instance's destructor may be host code
  // that calls back into the caller).
  PoolSettings resize(const std::string& device, int min_instances, int max_instances,
                      std::vector<std::unique_ptr<Service>>* retired = nullptr);
  // Destroys the idle instances now, on the calling thread (an instance's
  // destructor may be host code: no lock of the pool is held); instances
  // leased out go when they are released. Waits for background warming to
  // end first, and no warming starts after it. The manager calls it when it
  // closes, so a host's destroy_instance runs while the manager still works.
  void destroy_idle();

  bool has_capacity(const std::string& device) const;
  // The settings in force: the configuration's, or the last resize().
  PoolSettings settings(const std::string& device) const;
  Stats stats(const std::string& device) const;
  std::map<std::string, Stats> stats() const;  // devices used so far

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace taskmgr
