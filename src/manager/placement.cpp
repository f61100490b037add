#include "manager/placement.hpp"

#include <fmt/format.h>
#include <algorithm>

#include "taskmgr/error.hpp"

namespace taskmgr::detail {

Placed Placement::place(const ServiceEntry& service, const TaskCreateRequest& req) {
  Placed p;
  if (!config_.enable_resource_tracking) {
    p.features.batch_size = req.batch_size;
    p.device = select_device(service, 0, req.device);
    return p;
  }
  p.features = estimator_.features(req);
  MemoryEstimate est = estimator_.estimate(req.service, p.features, req.device);
  if (config_.max_task_memory_mb > 0 && est.mb > config_.max_task_memory_mb) {
    throw Error(ErrorCode::kMemoryLimitExceeded,
                fmt::format("task estimated at {} MB exceeds tasks.max_task_memory_mb = {} ({})",
                            est.mb, config_.max_task_memory_mb, est.explanation()));
  }
  p.device = select_device(service, est.mb, req.device);
  p.estimate = std::move(est);
  return p;
}

RequestFeatures Placement::features(const Task& t) {
  TaskCreateRequest req;
  req.service = t.service;
  req.input = t.input;
  req.options_json = t.options_json;
  req.batch_size = std::max(1, t.batch_size);
  return estimator_.features(req);
}

std::optional<std::int64_t> Placement::estimate(const std::string& service,
                                                const RequestFeatures& f,
                                                const std::string& device) {
  if (!config_.enable_resource_tracking) return std::nullopt;
  return estimator_.estimate(service, f, device).mb;
}

std::string Placement::select_device(const ServiceEntry& service, std::int64_t estimate_mb,
                                     const std::string& requested) {
  return devices_.select_device(estimate_mb, requested, [&service](const DeviceInfo& d) {
    assert_scheduler_not_held("ServiceFactory::supports");  // for the analysis
    return ServiceRegistry::supports(service, d);
  });
}

bool Placement::cpu_supported(const ServiceEntry& service) {
  const auto cpu = devices_.get("cpu");
  return cpu && ServiceRegistry::supports(service, *cpu);
}

void Placement::learn(const std::string& service, const std::string& device,
                      const RequestFeatures& f, std::int64_t actual_mb) {
  if (!config_.enable_resource_tracking) return;
  estimator_.record_actual(service, device, f, actual_mb);
}

MemoryEstimate Placement::explain(const TaskCreateRequest& req) { return estimator_.estimate(req); }

}  // namespace taskmgr::detail
