// taskmgr: memory estimates.
//
// The spec's _estimate_memory(request). Each service kind has a MemoryModel
// that turns a request's features (pixels, pages, bytes, batch size) into
// megabytes; services supply their own, and a linear default serves the rest.
// The estimator then learns from the measured actual_memory_mb of finished
// tasks, per service, device and size class of the model's figure (a
// doubling: 64-128 MB, 128-256 MB, ...): it keeps a running mean and spread of
// actual / model (each new ratio weighs 0.2; the first three use the largest
// ratio seen) and multiplies the model by mean + 2 * spread, capped to
// x0.05-x20, so estimates converge on reality while erring on the high side. Every estimate says
// how it was made (MemoryEstimate::explanation()).
//
// Thread-safety: every member is safe to call from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "taskmgr/export.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr {

// What a model may look at. Unknown values stay 0.
struct RequestFeatures {
  std::int64_t pixels = 0;  // per page (largest page when they differ)
  std::int64_t pages = 1;
  std::int64_t bytes = 0;  // encoded input size
  std::int64_t batch_size = 1;
};

class TASKMGR_API MemoryModel {
 public:
  virtual ~MemoryModel();
  virtual std::string name() const = 0;
  // Features of a request (may read the input's header; must be cheap).
  virtual RequestFeatures features(const TaskCreateRequest& request) const;
  // Model estimate in MB, before learning.
  virtual double estimate_mb(const RequestFeatures& f) const = 0;
};

struct LinearModelCoefficients {
  double base_mb = 16;  // instance/engine working set per task
  double per_page_mb = 1;
  double per_mpixel_mb = 8;  // decoded pixels and their copies
  double per_input_mb = 2;   // encoded bytes (per page) held plus decode buffers
};

// base + batch * (per_page + per_mpixel * pixels/1e6 + per_input_mb * bytes/pages/2^20),
// with batch = min(batch_size, pages).
class TASKMGR_API LinearMemoryModel : public MemoryModel {
 public:
  using Coefficients = LinearModelCoefficients;
  explicit LinearMemoryModel(std::string name = "linear", Coefficients c = Coefficients());
  std::string name() const override;
  double estimate_mb(const RequestFeatures& f) const override;
  const Coefficients& coefficients() const noexcept { return c_; }

 private:
  std::string name_;
  Coefficients c_;
};

struct MemoryEstimate {
  std::int64_t mb = 0;    // what placement and reservation use (>= 1)
  double model_mb = 0;    // the model's raw figure
  double correction = 1;  // learned factor applied (1 before learning)
  int samples = 0;        // actuals the correction rests on (0: the model's figure alone)
  // The size class the correction was learned in: model figures of
  // 2^size_class to 2^(size_class + 1) MB (memory_size_class). Learning is
  // per service, device and class; an estimate uses its own class, or the
  // nearest one measured within two classes (a factor of 4); farther, the
  // model's figure alone (samples 0).
  int size_class = 0;
  std::string model;  // model name
  std::string service;
  std::string device;  // "" = before placement
  RequestFeatures features;

  // One line: model, features, where the correction came from (the model
  // alone, or learned measurements: how many, which size class, device),
  // result. Built on request.
  TASKMGR_API std::string explanation() const;
};

// The size class of a model figure: floor(log2(mb)), 0 below 2 MB.
TASKMGR_API int memory_size_class(double model_mb);

class TASKMGR_API MemoryEstimator {
 public:
  MemoryEstimator();
  ~MemoryEstimator();
  MemoryEstimator(const MemoryEstimator&) = delete;
  MemoryEstimator& operator=(const MemoryEstimator&) = delete;

  // Sets the model of a service kind (replaces the default linear one).
  void register_model(const std::string& service, std::shared_ptr<const MemoryModel> model);

  // Features of the request per its service's model.
  RequestFeatures features(const TaskCreateRequest& request) const;

  // Estimate for a service on a device ("" = before placement: the most
  // conservative correction learned for the service on any device).
  // Error(kInvalidArgument) when the model's figure is not a number or below
  // zero; a figure above 10^15 MB (infinity included) is kept at 10^15 MB,
  // which no device holds.
  MemoryEstimate estimate(const std::string& service, const RequestFeatures& f,
                          const std::string& device = "") const;
  MemoryEstimate estimate(const TaskCreateRequest& request) const;

  // Learns from one finished task: what the model said for its features
  // and what was measured.
  void record_actual(const std::string& service, const std::string& device,
                     const RequestFeatures& f, std::int64_t actual_mb);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace taskmgr
