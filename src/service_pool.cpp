#include "taskmgr/service_pool.hpp"

#include <algorithm>

#include "taskmgr/error.hpp"

namespace taskmgr {

ServicePool::Lease::Lease(Lease&& o) noexcept
    : pool_(o.pool_),
      device_(std::move(o.device_)),
      instance_id_(std::move(o.instance_id_)),
      instance_(std::move(o.instance_)),
      discard_(o.discard_) {
  o.pool_ = nullptr;
}

ServicePool::Lease& ServicePool::Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    release();
    pool_ = o.pool_;
    device_ = std::move(o.device_);
    instance_id_ = std::move(o.instance_id_);
    instance_ = std::move(o.instance_);
    discard_ = o.discard_;
    o.pool_ = nullptr;
  }
  return *this;
}

ServicePool::Lease::~Lease() { release(); }

Service& ServicePool::Lease::service() {
  if (pool_ == nullptr) throw Error(ErrorCode::kInvalidState, "service(): the lease was released");
  if (!instance_) instance_ = pool_->create_instance(device_);
  return *instance_;
}

void ServicePool::Lease::release() noexcept {
  if (pool_ == nullptr) return;
  pool_->give_back(*this);
  pool_ = nullptr;
}

ServicePool::ServicePool(std::shared_ptr<ServiceFactory> factory, PoolsConfig config,
                         int auto_max_cpu, std::shared_ptr<const Clock> clock)
    : factory_(std::move(factory)),
      config_(std::move(config)),
      auto_max_cpu_(std::max(1, auto_max_cpu)),
      clock_(clock ? std::move(clock) : Clock::system()) {
  if (!factory_) throw Error(ErrorCode::kInvalidArgument, "ServicePool needs a factory");
  kind_ = factory_->kind();
}

ServicePool::~ServicePool() = default;

PoolSettings ServicePool::settings(const std::string& device) const {
  PoolSettings s = config_.for_device(device);
  if (s.max_instances == 0) s.max_instances = device == "cpu" ? auto_max_cpu_ : 1;
  s.min_instances = std::min(s.min_instances, s.max_instances);
  return s;
}

ServicePool::Sub& ServicePool::sub_locked(const std::string& device) {
  auto it = subs_.find(device);
  if (it == subs_.end()) {
    Sub sub;
    sub.settings = settings(device);
    sub.stats.max = sub.settings.max_instances;
    it = subs_.emplace(device, std::move(sub)).first;
  }
  return it->second;
}

ServicePool::Lease ServicePool::lease_locked(Sub& sub, const std::string& device) {
  Lease lease;
  lease.pool_ = this;
  lease.device_ = device;
  if (!sub.idle.empty()) {
    lease.instance_id_ = std::move(sub.idle.back().id);
    lease.instance_ = std::move(sub.idle.back().service);
    sub.idle.pop_back();
  } else {
    lease.instance_id_ = kind_ + "@" + device + "#" + std::to_string(sub.next_id++);
  }
  ++sub.in_use;
  ++sub.stats.acquired;
  return lease;
}

std::unique_ptr<Service> ServicePool::create_instance(const std::string& device) {
  auto svc = factory_->create(device);
  if (!svc) {
    throw Error(ErrorCode::kInternal,
                "service factory '" + kind_ + "' returned no instance for " + device);
  }
  std::lock_guard<std::mutex> g(mu_);
  ++sub_locked(device).stats.created;
  return svc;
}

ServicePool::Lease ServicePool::acquire(const std::string& device,
                                        std::optional<Duration> timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  Sub& sub = sub_locked(device);
  const Duration wait = timeout.value_or(std::chrono::duration_cast<Duration>(
      std::chrono::duration<double>(sub.settings.acquire_timeout_seconds)));
  const SteadyTime deadline = clock_->steady_now() + wait;
  while (sub.in_use >= sub.settings.max_instances) {
    if (clock_->steady_now() >= deadline) {
      ++sub.stats.exhausted;
      throw Error(ErrorCode::kPoolExhausted,
                  "pool '" + kind_ + "' on " + device + ": all " +
                      std::to_string(sub.settings.max_instances) +
                      " instance(s) busy for " +
                      std::to_string(std::chrono::duration<double>(wait).count()) + " s");
    }
    clock_->wait_until(lock, freed_, deadline);
  }
  return lease_locked(sub, device);
}

std::optional<ServicePool::Lease> ServicePool::try_acquire(const std::string& device) {
  std::lock_guard<std::mutex> g(mu_);
  Sub& sub = sub_locked(device);
  if (sub.in_use >= sub.settings.max_instances) return std::nullopt;
  return lease_locked(sub, device);
}

void ServicePool::release(Lease&& lease) noexcept { lease.release(); }

void ServicePool::give_back(Lease& lease) noexcept {
  std::unique_ptr<Service> doomed;
  {
    std::lock_guard<std::mutex> g(mu_);
    Sub& sub = sub_locked(lease.device_);
    --sub.in_use;
    const bool keep = lease.instance_ && !lease.discard_ && lease.instance_->healthy();
    if (keep) {
      sub.idle.push_back(Instance{std::move(lease.instance_id_), std::move(lease.instance_)});
    } else if (lease.instance_) {
      doomed = std::move(lease.instance_);
      ++sub.stats.destroyed;
    }
  }
  freed_.notify_one();
  doomed.reset();  // destroyed outside the lock: an engine may take a while
}

void ServicePool::warm(const std::string& device) {
  int need = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    Sub& sub = sub_locked(device);
    need = sub.settings.min_instances - static_cast<int>(sub.idle.size()) - sub.in_use;
  }
  std::vector<Lease> held;  // hold all until done, or the same idle one comes back
  for (int i = 0; i < need; ++i) {
    held.push_back(acquire(device));
    held.back().service();
  }
}

bool ServicePool::has_capacity(const std::string& device) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = subs_.find(device);
  if (it == subs_.end()) return settings(device).max_instances > 0;
  return it->second.in_use < it->second.settings.max_instances;
}

ServicePool::Stats ServicePool::stats(const std::string& device) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = subs_.find(device);
  if (it == subs_.end()) {
    Stats s;
    s.max = settings(device).max_instances;
    return s;
  }
  Stats s = it->second.stats;
  s.in_use = it->second.in_use;
  s.idle = static_cast<int>(it->second.idle.size());
  return s;
}

std::map<std::string, ServicePool::Stats> ServicePool::stats() const {
  std::map<std::string, Stats> out;
  std::vector<std::string> devices;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [d, sub] : subs_) devices.push_back(d);
  }
  for (const auto& d : devices) out[d] = stats(d);
  return out;
}

}  // namespace taskmgr
