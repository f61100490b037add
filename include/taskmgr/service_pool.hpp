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
// Thread-safety: every member is safe to call from any thread. A Lease is
// used by one thread at a time and must not outlive its pool.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
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
    int in_use = 0;         // leased now
    int idle = 0;           // created and free
    int max = 0;            // max_instances in force
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

  const std::string& kind() const noexcept { return kind_; }
  ServiceFactory& factory() noexcept { return *factory_; }

  // The spec's acquire(device): waits up to `timeout` (default: the pool's
  // acquire_timeout_seconds) for a free slot; Error(kPoolExhausted) after.
  Lease acquire(const std::string& device, std::optional<Duration> timeout = std::nullopt);
  // A free slot now, or nothing.
  std::optional<Lease> try_acquire(const std::string& device);
  // The spec's release(service): the same as destroying the lease.
  void release(Lease&& lease) noexcept;

  // Creates instances until `device` has min_instances. Throws what the
  // factory throws.
  void warm(const std::string& device);

  bool has_capacity(const std::string& device) const;
  PoolSettings settings(const std::string& device) const;
  Stats stats(const std::string& device) const;
  std::map<std::string, Stats> stats() const;  // devices used so far

 private:
  struct Instance {
    std::string id;
    std::unique_ptr<Service> service;
  };
  struct Sub {
    PoolSettings settings;
    std::vector<Instance> idle;
    int in_use = 0;
    std::uint64_t next_id = 1;
    Stats stats;
  };
  Sub& sub_locked(const std::string& device);
  Lease lease_locked(Sub& sub, const std::string& device);
  void give_back(Lease& lease) noexcept;
  std::unique_ptr<Service> create_instance(const std::string& device);

  std::shared_ptr<ServiceFactory> factory_;
  std::string kind_;
  PoolsConfig config_;
  int auto_max_cpu_;
  std::shared_ptr<const Clock> clock_;
  mutable std::mutex mu_;
  std::condition_variable freed_;
  std::map<std::string, Sub> subs_;
};

}  // namespace taskmgr
