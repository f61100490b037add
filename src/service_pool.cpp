#include "taskmgr/service_pool.hpp"

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <thread>
#include <vector>

#include "forced_unwind.hpp"
#include "host_call.hpp"
#include "sync.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr {

struct ServicePool::Impl {
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

  Impl(std::shared_ptr<ServiceFactory> f, std::string k, PoolsConfig c, int cpu,
       std::shared_ptr<const Clock> cl)
      : factory(std::move(f)),
        kind(std::move(k)),
        config(std::move(c)),
        auto_max_cpu(cpu),
        clock(std::move(cl)) {}

  PoolSettings configured(const std::string& device) const;
  Sub& sub_locked(const std::string& device) REQUIRES(mu);
  // A slot, with an idle instance unless `fresh` (then one is made on use).
  Lease lease_locked(ServicePool* pool, Sub& sub, const std::string& device, bool fresh = false)
      REQUIRES(mu);
  std::unique_ptr<Service> create_instance(const std::string& device) REQUIRES(!mu);
  void give_back(Lease& lease) noexcept REQUIRES(!mu);

  // Fixed at construction.
  const std::shared_ptr<ServiceFactory> factory;
  const std::string kind;
  const PoolsConfig config;
  const int auto_max_cpu;
  const std::shared_ptr<const Clock> clock;

  detail::Mutex mu;
  std::condition_variable freed;  // a slot was given back (waits on mu)
  std::map<std::string, Sub> subs GUARDED_BY(mu);
  // warm_in_background's threads, joined by destroy_idle() and at the end.
  std::vector<std::thread> warmers GUARDED_BY(mu);
  bool closed GUARDED_BY(mu) = false;  // destroy_idle() ran: no more warming

  void join_warmers() REQUIRES(!mu);
};

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
  if (!instance_) instance_ = pool_->impl_->create_instance(device_);
  return *instance_;
}

void ServicePool::Lease::release() noexcept {
  if (pool_ == nullptr) return;
  pool_->impl_->give_back(*this);
  pool_ = nullptr;
}

ServicePool::ServicePool(std::shared_ptr<ServiceFactory> factory, PoolsConfig config,
                         int auto_max_cpu, std::shared_ptr<const Clock> clock) {
  if (!factory) throw Error(ErrorCode::kInvalidArgument, "ServicePool needs a factory");
  TASKMGR_HOST_CALL("ServicePool::ServicePool: ServiceFactory::kind");
  std::string kind = factory->kind();
  impl_ =
      std::make_unique<Impl>(std::move(factory), std::move(kind), std::move(config),
                             std::max(1, auto_max_cpu), clock ? std::move(clock) : Clock::system());
}

ServicePool::~ServicePool() {
  {
    detail::MutexLock g(impl_->mu);
    impl_->closed = true;
  }
  impl_->join_warmers();
  // Idle instances are destroyed with impl_, and an instance's destructor
  // may be host code (a C host's destroy_instance).
  TASKMGR_HOST_CALL("ServicePool::~ServicePool: destroying idle instances");
  impl_.reset();
}

const std::string& ServicePool::kind() const noexcept { return impl_->kind; }
ServiceFactory& ServicePool::factory() noexcept { return *impl_->factory; }

PoolSettings ServicePool::Impl::configured(const std::string& device) const {
  PoolSettings s = config.for_device(device);
  if (s.max_instances == 0) s.max_instances = device == "cpu" ? auto_max_cpu : 1;
  s.min_instances = std::min(s.min_instances, s.max_instances);
  return s;
}

PoolSettings ServicePool::settings(const std::string& device) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.subs.find(device);
  return it == im.subs.end() ? im.configured(device) : it->second.settings;
}

ServicePool::Impl::Sub& ServicePool::Impl::sub_locked(const std::string& device) {
  auto it = subs.find(device);
  if (it == subs.end()) {
    Sub sub;
    sub.settings = configured(device);
    sub.stats.max = sub.settings.max_instances;
    sub.stats.min = sub.settings.min_instances;
    it = subs.emplace(device, std::move(sub)).first;
  }
  return it->second;
}

// The lease belongs to the pool (pool_ set) only once nothing can throw: a
// lease destroyed by an exception here would give its slot back under the
// lock it already holds.
ServicePool::Lease ServicePool::Impl::lease_locked(ServicePool* pool, Sub& sub,
                                                   const std::string& device, bool fresh) {
  Lease lease;
  lease.device_ = device;
  if (!fresh && !sub.idle.empty()) {
    lease.instance_id_ = std::move(sub.idle.back().id);
    lease.instance_ = std::move(sub.idle.back().service);
    sub.idle.pop_back();
  } else {
    lease.instance_id_ = kind + "@" + device + "#" + std::to_string(sub.next_id++);
  }
  lease.pool_ = pool;
  ++sub.in_use;
  ++sub.stats.acquired;
  return lease;
}

std::unique_ptr<Service> ServicePool::Impl::create_instance(const std::string& device) {
  TASKMGR_HOST_CALL("ServicePool::Lease::service: ServiceFactory::create");
  auto svc = factory->create(device);
  if (!svc) {
    throw Error(ErrorCode::kInternal,
                "service factory '" + kind + "' returned no instance for " + device);
  }
  detail::MutexLock g(mu);
  ++sub_locked(device).stats.created;
  return svc;
}

ServicePool::Lease ServicePool::acquire(const std::string& device,
                                        std::optional<Duration> timeout) {
  Impl& im = *impl_;
  detail::MutexLock lock(im.mu);
  Impl::Sub& sub = im.sub_locked(device);
  const Duration wait = timeout.value_or(std::chrono::duration_cast<Duration>(
      std::chrono::duration<double>(sub.settings.acquire_timeout_seconds)));
  const SteadyTime deadline = im.clock->steady_now() + wait;
  while (sub.in_use >= sub.settings.max_instances) {
    if (im.clock->steady_now() >= deadline) {
      ++sub.stats.exhausted;
      throw Error(ErrorCode::kPoolExhausted,
                  "pool '" + im.kind + "' on " + device + ": all " +
                      std::to_string(sub.settings.max_instances) + " instance(s) busy for " +
                      std::to_string(std::chrono::duration<double>(wait).count()) + " s");
    }
    im.clock->wait_until(lock.native(), im.freed, deadline);
  }
  return im.lease_locked(this, sub, device);
}

std::optional<ServicePool::Lease> ServicePool::try_acquire(const std::string& device) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  Impl::Sub& sub = im.sub_locked(device);
  if (sub.in_use >= sub.settings.max_instances) return std::nullopt;
  return im.lease_locked(this, sub, device);
}

void ServicePool::release(Lease&& lease) noexcept { lease.release(); }

// Service::healthy and the destructor of a discarded instance are host code:
// both run without the pool's lock. The lease owns its instance until it is
// put back, so asking it first needs no lock.
void ServicePool::Impl::give_back(Lease& lease) noexcept {
  bool keep = false;
  if (lease.instance_ && !lease.discard_) {
    TASKMGR_HOST_CALL("ServicePool::Lease::release: Service::healthy");
    keep = lease.instance_->healthy();
  }
  std::unique_ptr<Service> doomed;
  {
    detail::MutexLock g(mu);
    Sub& sub = sub_locked(lease.device_);
    --sub.in_use;
    // Beyond a max that resize() lowered: retired, not kept.
    if (keep && static_cast<int>(sub.idle.size()) + sub.in_use >= sub.settings.max_instances)
      keep = false;
    if (keep) {
      sub.idle.push_back(Instance{std::move(lease.instance_id_), std::move(lease.instance_)});
    } else if (lease.instance_) {
      doomed = std::move(lease.instance_);
      ++sub.stats.destroyed;
    }
  }
  freed.notify_one();
  if (doomed) {
    TASKMGR_HOST_CALL("ServicePool::Lease::release: destroying an instance");
    doomed.reset();  // an engine may take a while to go
  }
}

void ServicePool::warm(const std::string& device) {
  Impl& im = *impl_;
  int need = 0;
  {
    detail::MutexLock g(im.mu);
    Impl::Sub& sub = im.sub_locked(device);
    need = sub.settings.min_instances - static_cast<int>(sub.idle.size()) - sub.in_use;
  }
  if (need <= 0) return;
  // Side by side: an instance may take a while to make (an OCR engine loads
  // its model), and a host with N workers waits for N of them. All are held
  // until all are made (else the same idle one would come back).
  std::vector<Lease> held(static_cast<std::size_t>(need));
  std::vector<std::exception_ptr> failed(held.size());
  std::vector<std::thread> makers;
  makers.reserve(held.size());
  for (std::size_t i = 0; i < held.size(); ++i) {
    makers.emplace_back([&, i] {
      try {
        held[i] = acquire(device);
        held[i].service();
      } catch (...) {
        ::taskmgr::detail::rethrow_if_forced_unwind();
        failed[i] = std::current_exception();
      }
    });
  }
  for (auto& t : makers) t.join();
  for (const auto& e : failed) {
    if (e) std::rethrow_exception(e);
  }
}

void ServicePool::Impl::join_warmers() {
  for (;;) {
    std::vector<std::thread> joining;
    {
      detail::MutexLock g(mu);
      joining.swap(warmers);
    }
    if (joining.empty()) return;
    for (auto& t : joining) t.join();
  }
}

void ServicePool::warm_in_background(const std::string& device,
                                     std::function<void(const std::string&)> on_error) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  if (im.closed) return;
  im.warmers.emplace_back([this, device, on_error = std::move(on_error)] {
    for (;;) {
      std::optional<Lease> lease;
      {
        Impl& pool = *impl_;
        detail::MutexLock g2(pool.mu);
        Impl::Sub& sub = pool.sub_locked(device);
        if (pool.closed ||
            static_cast<int>(sub.idle.size()) + sub.in_use >= sub.settings.min_instances ||
            sub.in_use >= sub.settings.max_instances) {
          return;
        }
        lease = pool.lease_locked(this, sub, device, /*fresh=*/true);
      }
      try {
        lease->service();  // created here; back to the pool, idle, when the lease goes
      } catch (...) {
        ::taskmgr::detail::rethrow_if_forced_unwind();
        lease->discard();
        std::string why = "unknown error";
        try {
          throw;
        } catch (const std::exception& e) {
          why = e.what();
        } catch (...) {
        }
        if (on_error) {
          TASKMGR_HOST_CALL("ServicePool::warm_in_background: on_error");
          on_error("pool '" + impl_->kind + "' on " + device + ": warming failed: " + why);
        }
        return;
      }
    }
  });
}

PoolSettings ServicePool::resize(const std::string& device, int min_instances, int max_instances,
                                 std::vector<std::unique_ptr<Service>>* retired) {
  constexpr int kMaxInstances = 4096;
  if (max_instances < 1 || max_instances > kMaxInstances || min_instances < 0 ||
      min_instances > max_instances) {
    throw Error(ErrorCode::kInvalidArgument,
                "resize: pool sizes need 0 <= min_instances <= max_instances and 1 <= "
                "max_instances <= " +
                    std::to_string(kMaxInstances) + " (got min " + std::to_string(min_instances) +
                    ", max " + std::to_string(max_instances) + ")");
  }
  Impl& im = *impl_;
  PoolSettings before;
  std::vector<Impl::Instance> doomed;
  {
    detail::MutexLock g(im.mu);
    Impl::Sub& sub = im.sub_locked(device);
    before = sub.settings;
    sub.settings.min_instances = min_instances;
    sub.settings.max_instances = max_instances;
    sub.stats.min = min_instances;
    sub.stats.max = max_instances;
    // Idle ones first: the slots beyond the new max that are not leased.
    while (!sub.idle.empty() && static_cast<int>(sub.idle.size()) + sub.in_use > max_instances) {
      doomed.push_back(std::move(sub.idle.front()));  // the oldest first
      sub.idle.erase(sub.idle.begin());
      ++sub.stats.destroyed;
    }
  }
  im.freed.notify_all();  // a larger max: waiting acquires may go on
  if (retired != nullptr) {
    for (auto& inst : doomed) retired->push_back(std::move(inst.service));
    return before;
  }
  if (!doomed.empty()) {
    TASKMGR_HOST_CALL("ServicePool::resize: destroying instances");
    doomed.clear();
  }
  return before;
}

void ServicePool::destroy_idle() {
  Impl& im = *impl_;
  {
    detail::MutexLock g(im.mu);
    im.closed = true;
  }
  im.join_warmers();
  std::vector<Impl::Instance> doomed;
  {
    detail::MutexLock g(im.mu);
    for (auto& [id, sub] : im.subs) {
      for (auto& inst : sub.idle) doomed.push_back(std::move(inst));
      sub.stats.destroyed += sub.idle.size();
      sub.idle.clear();
    }
  }
  if (doomed.empty()) return;
  TASKMGR_HOST_CALL("ServicePool::destroy_idle: destroying instances");
  doomed.clear();
}

bool ServicePool::has_capacity(const std::string& device) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.subs.find(device);
  if (it == im.subs.end()) return im.configured(device).max_instances > 0;
  return it->second.in_use < it->second.settings.max_instances;
}

ServicePool::Stats ServicePool::stats(const std::string& device) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.subs.find(device);
  if (it == im.subs.end()) {
    Stats s;
    const PoolSettings c = im.configured(device);
    s.max = c.max_instances;
    s.min = c.min_instances;
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
    Impl& im = *impl_;
    detail::MutexLock g(im.mu);
    for (const auto& [d, sub] : im.subs) devices.push_back(d);
  }
  for (const auto& d : devices) out[d] = stats(d);
  return out;
}

}  // namespace taskmgr
