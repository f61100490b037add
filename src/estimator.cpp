#include "taskmgr/estimator.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace taskmgr {
namespace {

constexpr double kAlpha = 0.2;         // weight of a new sample in the running mean
constexpr int kWarmupSamples = 3;      // before this many, use the largest ratio seen
constexpr double kMinCorrection = 0.05;
constexpr double kMaxCorrection = 20;

std::string fmt_double(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

}  // namespace

MemoryModel::~MemoryModel() = default;

std::string MemoryEstimate::explanation() const {
  const RequestFeatures& f = features;
  return "model " + model + " (service " + service + "): pixels=" + std::to_string(f.pixels) +
         " pages=" + std::to_string(f.pages) + " bytes=" + std::to_string(f.bytes) +
         " batch_size=" + std::to_string(f.batch_size) + " -> " + fmt_double(model_mb) + " MB" +
         "; learned correction x" + fmt_double(correction) + " from " + std::to_string(samples) +
         " measured task(s)" + (device.empty() ? std::string(" (any device)") : " on " + device) +
         " -> " + std::to_string(mb) + " MB";
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
  const double batch = static_cast<double>(std::max<std::int64_t>(
      1, std::min(f.batch_size, std::max<std::int64_t>(1, f.pages))));
  const double per_item = c_.per_page_mb + c_.per_mpixel_mb * static_cast<double>(f.pixels) / 1e6 +
                          c_.per_input_mb * static_cast<double>(f.bytes) / (1024.0 * 1024.0) /
                              static_cast<double>(std::max<std::int64_t>(1, f.pages));
  return c_.base_mb + batch * per_item;
}

MemoryEstimator::MemoryEstimator() : default_model_(std::make_shared<LinearMemoryModel>()) {}
MemoryEstimator::~MemoryEstimator() = default;

void MemoryEstimator::register_model(const std::string& service,
                                     std::shared_ptr<const MemoryModel> model) {
  std::lock_guard<std::mutex> g(mu_);
  if (model) {
    models_[service] = std::move(model);
  } else {
    models_.erase(service);
  }
}

std::shared_ptr<const MemoryModel> MemoryEstimator::model_locked(const std::string& service) const {
  auto it = models_.find(service);
  return it == models_.end() ? default_model_ : it->second;
}

RequestFeatures MemoryEstimator::features(const TaskCreateRequest& request) const {
  std::shared_ptr<const MemoryModel> model;
  {
    std::lock_guard<std::mutex> g(mu_);
    model = model_locked(request.service);
  }
  return model->features(request);  // may read the input: outside the lock
}

double MemoryEstimator::correction_locked(const std::string& service, const std::string& device,
                                          int* samples) const {
  auto one = [](const Learned& l) {
    if (l.samples == 0) return 1.0;
    if (l.samples < kWarmupSamples) return std::max(l.max_ratio, l.mean);
    return l.mean + 2 * std::sqrt(std::max(0.0, l.var));
  };
  double c = 0;
  int n = 0;
  bool any = false;
  for (const auto& [key, l] : learned_) {
    if (key.first != service || (!device.empty() && key.second != device)) continue;
    const double v = one(l);
    if (!any || v > c) c = v;  // no device given: the most conservative
    any = true;
    n = std::max(n, l.samples);
  }
  if (samples != nullptr) *samples = n;
  if (!any) return 1.0;
  return std::clamp(c, kMinCorrection, kMaxCorrection);
}

MemoryEstimate MemoryEstimator::estimate(const std::string& service, const RequestFeatures& f,
                                         const std::string& device) const {
  MemoryEstimate e;
  std::shared_ptr<const MemoryModel> model;
  {
    std::lock_guard<std::mutex> g(mu_);
    model = model_locked(service);
    e.correction = correction_locked(service, device, &e.samples);
  }
  e.model = model->name();
  e.service = service;
  e.device = device;
  e.features = f;
  e.model_mb = model->estimate_mb(f);
  e.mb = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(e.model_mb * e.correction)));
  return e;
}

MemoryEstimate MemoryEstimator::estimate(const TaskCreateRequest& request) const {
  return estimate(request.service, features(request), request.device);
}

void MemoryEstimator::record_actual(const std::string& service, const std::string& device,
                                    const RequestFeatures& f, std::int64_t actual_mb) {
  if (actual_mb <= 0) return;
  std::shared_ptr<const MemoryModel> model;
  {
    std::lock_guard<std::mutex> g(mu_);
    model = model_locked(service);
  }
  const double predicted = model->estimate_mb(f);
  if (!(predicted > 0)) return;
  const double ratio = static_cast<double>(actual_mb) / predicted;
  std::lock_guard<std::mutex> g(mu_);
  Learned& l = learned_[{service, device}];
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
