// Private: estimate and placement (the spec's _estimate_memory and
// _select_device), for every path that places a task: create, start with a
// new device or batch size, an out-of-memory retry, recovery, a device
// becoming unavailable.
//
// All of it may run host code (a service's MemoryModel, the factory's
// supports()) or read files (an image header for the features), so none of
// it is ever called with the scheduler lock held: callers work out the
// placement first and apply it under the lock.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "manager/service_registry.hpp"
#include "sync.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/estimator.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail {

struct Placed {
  RequestFeatures features;
  std::optional<MemoryEstimate> estimate;  // none with resource tracking off
  std::string device;
};

class Placement {
 public:
  Placement(const TasksConfig& config, DeviceRegistry& devices, MemoryEstimator& estimator)
      : config_(config), devices_(devices), estimator_(estimator) {}

  // A new task: features, estimate (Error(kMemoryLimitExceeded) past
  // tasks.max_task_memory_mb), device (Error(kDeviceUnavailable) when no
  // device the service supports can hold it, kNotFound for an unknown
  // requested device).
  Placed place(const ServiceEntry& service, const TaskCreateRequest& req) REQUIRES(!scheduler_lock);
  // The features of a stored task's request (recovery).
  RequestFeatures features(const Task& t) REQUIRES(!scheduler_lock);
  // The estimate for these features on `device` ("" = before placement);
  // nullopt with resource tracking off.
  std::optional<std::int64_t> estimate(const std::string& service, const RequestFeatures& f,
                                       const std::string& device = "") REQUIRES(!scheduler_lock);
  // A device for a task of `service` with this estimate.
  std::string select_device(const ServiceEntry& service, std::int64_t estimate_mb,
                            const std::string& requested) REQUIRES(!scheduler_lock);
  // Whether `service` runs on the CPU (an out-of-memory fallback needs it).
  bool cpu_supported(const ServiceEntry& service) REQUIRES(!scheduler_lock);
  // Learns from an attempt's measured peak.
  void learn(const std::string& service, const std::string& device, const RequestFeatures& f,
             std::int64_t actual_mb) REQUIRES(!scheduler_lock);
  MemoryEstimate explain(const TaskCreateRequest& req) REQUIRES(!scheduler_lock);

  bool tracking() const noexcept { return config_.enable_resource_tracking; }

 private:
  const TasksConfig& config_;
  DeviceRegistry& devices_;
  MemoryEstimator& estimator_;
};

}  // namespace taskmgr::detail
