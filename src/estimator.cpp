#include "taskmgr/estimator.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <tuple>
#include <utility>

#include "host_call.hpp"
#include "sync.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr {
namespace {

constexpr double kAlpha = 0.2;     // weight of a new sample in the running mean
constexpr int kWarmupSamples = 3;  // before this many, use the largest ratio seen
constexpr double kMinCorrection = 0.05;
constexpr double kMaxCorrection = 20;
constexpr int kMaxClassDistance = 2;  // size classes: a factor of 4 either way

std::string fmt_double(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

}  // namespace

MemoryModel::~MemoryModel() = default;

std::string MemoryEstimate::explanation() const {
  const RequestFeatures& f = features;
  std::string learned;
  if (samples == 0) {
    learned = "; no task of about this size measured yet: the model's figure";
  } else {
    learned = "; learned correction x" + fmt_double(correction) + " from " +
              std::to_string(samples) + " measured task(s) with a model figure of " +
              std::to_string(std::int64_t{1} << size_class) + "-" +
              std::to_string(std::int64_t{1} << (size_class + 1)) + " MB" +
              (device.empty() ? std::string(" (any device)") : " on " + device);
  }
  return "model " + model + " (service " + service + "): pixels=" + std::to_string(f.pixels) +
         " pages=" + std::to_string(f.pages) + " bytes=" + std::to_string(f.bytes) +
         " batch_size=" + std::to_string(f.batch_size) + " -> " + fmt_double(model_mb) + " MB" +
         learned + " -> " + std::to_string(mb) + " MB";
}

int memory_size_class(double model_mb) {
  if (!(model_mb >= 2)) return 0;
  return std::min(50, static_cast<int>(std::floor(std::log2(model_mb))));
}

RequestFeatures MemoryModel::features(const TaskCreateRequest& request) const {
  RequestFeatures f;
  f.batch_size = std::max(1, request.batch_size);
  if (!request.input.data.empty()) {
    f.bytes = static_cast<std::int64_t>(request.input.data.size());
  } else if (!request.input.path.empty()) {
    struct stat st {};
    if (::stat(request.input.path.c_str(), &st) == 0) f.bytes = st.st_size;
  }
  return f;
}

LinearMemoryModel::LinearMemoryModel(std::string name, Coefficients c)
    : name_(std::move(name)), c_(c) {}

std::string LinearMemoryModel::name() const { return name_; }

double LinearMemoryModel::estimate_mb(const RequestFeatures& f) const {
  const double batch = static_cast<double>(
      std::max<std::int64_t>(1, std::min(f.batch_size, std::max<std::int64_t>(1, f.pages))));
  const double per_item = c_.per_page_mb + c_.per_mpixel_mb * static_cast<double>(f.pixels) / 1e6 +
                          c_.per_input_mb * static_cast<double>(f.bytes) / (1024.0 * 1024.0) /
                              static_cast<double>(std::max<std::int64_t>(1, f.pages));
  return c_.base_mb + batch * per_item;
}

struct MemoryEstimator::Impl {
  struct Learned {
    double mean = 0;
    double var = 0;
    int samples = 0;
    double max_ratio = 0;
  };

  double correction_locked(const std::string& service, const std::string& device, int size_class,
                           int* samples, int* from_class) const REQUIRES(mu);
  std::shared_ptr<const MemoryModel> model_locked(const std::string& service) const REQUIRES(mu);
  // The service's model, taken under the lock; used outside it.
  std::shared_ptr<const MemoryModel> model(const std::string& service) REQUIRES(!mu);

  const std::shared_ptr<const MemoryModel> default_model = std::make_shared<LinearMemoryModel>();

  detail::Mutex mu;
  std::map<std::string, std::shared_ptr<const MemoryModel>> models GUARDED_BY(mu);
  // Per (service, device, size class of the model's figure).
  std::map<std::tuple<std::string, std::string, int>, Learned> learned GUARDED_BY(mu);
};

MemoryEstimator::MemoryEstimator() : impl_(std::make_unique<Impl>()) {}
MemoryEstimator::~MemoryEstimator() = default;

// A model's destructor is host code: the one replaced goes after the lock.
void MemoryEstimator::register_model(const std::string& service,
                                     std::shared_ptr<const MemoryModel> model) {
  Impl& im = *impl_;
  std::shared_ptr<const MemoryModel> old;
  {
    detail::MutexLock g(im.mu);
    if (model) {
      std::shared_ptr<const MemoryModel>& slot = im.models[service];
      old = std::move(slot);
      slot = std::move(model);
    } else if (auto it = im.models.find(service); it != im.models.end()) {
      old = std::move(it->second);
      im.models.erase(it);
    }
  }
  if (old) {
    TASKMGR_HOST_CALL("MemoryEstimator::register_model: ~MemoryModel");
    old.reset();
  }
}

std::shared_ptr<const MemoryModel> MemoryEstimator::Impl::model_locked(
    const std::string& service) const {
  auto it = models.find(service);
  return it == models.end() ? default_model : it->second;
}

std::shared_ptr<const MemoryModel> MemoryEstimator::Impl::model(const std::string& service) {
  detail::MutexLock g(mu);
  return model_locked(service);
}

RequestFeatures MemoryEstimator::features(const TaskCreateRequest& request) const {
  const std::shared_ptr<const MemoryModel> model = impl_->model(request.service);
  // May read the input: outside the lock.
  TASKMGR_HOST_CALL("MemoryEstimator::features: MemoryModel::features");
  return model->features(request);
}

// Per device: the correction learned in the estimate's own size class, or
// else in the nearest class within kMaxClassDistance that has one (the
// larger correction of two at the same distance). A ratio learned on much
// smaller or larger figures says little here (an engine's fixed cost is
// most of a small task and little of a large one): past that distance the
// model's figure stands alone. With no device given, the most conservative
// device's.
double MemoryEstimator::Impl::correction_locked(const std::string& service,
                                                const std::string& device, int size_class,
                                                int* samples, int* from_class) const {
  auto one = [](const Learned& l) {
    if (l.samples < kWarmupSamples) return std::max(l.max_ratio, l.mean);
    return l.mean + 2 * std::sqrt(std::max(0.0, l.var));
  };
  struct Best {
    int distance = -1;
    double value = 0;
    int samples = 0;
    int cls = 0;
  };
  std::map<std::string, Best> per_device;
  for (const auto& [key, l] : learned) {
    const auto& [svc, dev, cls] = key;
    if (svc != service || (!device.empty() && dev != device) || l.samples == 0) continue;
    const int d = std::abs(cls - size_class);
    if (d > kMaxClassDistance) continue;
    const double v = one(l);
    Best& b = per_device[dev];
    if (b.distance < 0 || d < b.distance || (d == b.distance && v > b.value)) {
      b = Best{d, v, l.samples, cls};
    }
  }
  double c = 1;
  int n = 0, from = size_class;
  bool any = false;
  for (const auto& [dev, b] : per_device) {
    if (!any || b.value > c) {
      c = b.value;
      n = b.samples;
      from = b.cls;
    }
    any = true;
  }
  if (samples != nullptr) *samples = n;
  if (from_class != nullptr) *from_class = from;
  if (!any) return 1.0;
  return std::clamp(c, kMinCorrection, kMaxCorrection);
}

MemoryEstimate MemoryEstimator::estimate(const std::string& service, const RequestFeatures& f,
                                         const std::string& device) const {
  Impl& im = *impl_;
  MemoryEstimate e;
  std::shared_ptr<const MemoryModel> model;
  {
    detail::MutexLock g(im.mu);
    model = im.model_locked(service);
  }
  {
    TASKMGR_HOST_CALL("MemoryEstimator::estimate: MemoryModel::name, estimate_mb");
    e.model = model->name();
    e.model_mb = model->estimate_mb(f);
  }
  e.service = service;
  e.device = device;
  e.features = f;
  {
    detail::MutexLock g(im.mu);
    e.correction = im.correction_locked(service, device, memory_size_class(e.model_mb), &e.samples,
                                        &e.size_class);
  }
  const double mb = std::ceil(e.model_mb * e.correction);
  // A model's figure is a size: not a number, or below zero, is its bug and
  // is named as such; a figure too large for any machine (infinity included)
  // stays too large, so that no device takes the task (it used to wrap to 1).
  if (std::isnan(mb) || mb < 0) {
    throw Error(ErrorCode::kInvalidArgument, "the memory model '" + e.model + "' of service '" +
                                                 service + "' estimated " +
                                                 std::to_string(e.model_mb) + " MB: not a size");
  }
  constexpr double kMaxMb = 1e15;  // a zettabyte: no device holds it
  e.mb = mb > kMaxMb ? static_cast<std::int64_t>(kMaxMb)
                     : std::max<std::int64_t>(1, static_cast<std::int64_t>(mb));
  return e;
}

MemoryEstimate MemoryEstimator::estimate(const TaskCreateRequest& request) const {
  return estimate(request.service, features(request), request.device);
}

void MemoryEstimator::record_actual(const std::string& service, const std::string& device,
                                    const RequestFeatures& f, std::int64_t actual_mb) {
  if (actual_mb <= 0) return;
  Impl& im = *impl_;
  const std::shared_ptr<const MemoryModel> model = im.model(service);
  TASKMGR_HOST_CALL("MemoryEstimator::record_actual: MemoryModel::estimate_mb");
  const double predicted = model->estimate_mb(f);
  if (!(predicted > 0) || !std::isfinite(predicted)) return;
  const double ratio = static_cast<double>(actual_mb) / predicted;
  detail::MutexLock g(im.mu);
  Impl::Learned& l = im.learned[{service, device, memory_size_class(predicted)}];
  if (l.samples == 0) {
    l.mean = ratio;
    l.var = 0;
  } else {
    const double diff = ratio - l.mean;
    l.mean += kAlpha * diff;
    l.var = (1 - kAlpha) * (l.var + kAlpha * diff * diff);
  }
  l.max_ratio = std::max(l.max_ratio, ratio);
  ++l.samples;
}

}  // namespace taskmgr
