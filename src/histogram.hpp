// Private: a lock-free latency histogram with logarithmic buckets (about 9%
// wide, 1 microsecond to ~3 hours). record() is two relaxed atomic adds.
#pragma once

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "taskmgr/metrics.hpp"

namespace taskmgr::detail {

class Histogram {
 public:
  static constexpr int kBuckets = 256;
  static constexpr double kMin = 1e-6;  // seconds
  static constexpr double kGrowth = 1.09;

  void record(double seconds) noexcept {
    buckets_[index(seconds)].fetch_add(1, std::memory_order_relaxed);
    count_.fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(static_cast<std::uint64_t>(std::max(0.0, seconds) * 1e9),
                      std::memory_order_relaxed);
    std::uint64_t ns = static_cast<std::uint64_t>(std::max(0.0, seconds) * 1e9);
    std::uint64_t prev = max_ns_.load(std::memory_order_relaxed);
    while (ns > prev && !max_ns_.compare_exchange_weak(prev, ns, std::memory_order_relaxed)) {
    }
  }

  LatencySummary summary() const noexcept {
    LatencySummary s;
    std::array<std::uint64_t, kBuckets> b{};
    std::uint64_t total = 0;
    for (int i = 0; i < kBuckets; ++i) {
      b[i] = buckets_[i].load(std::memory_order_relaxed);
      total += b[i];
    }
    s.count = total;
    if (total == 0) return s;
    s.mean_s = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / 1e9 /
               static_cast<double>(count_.load(std::memory_order_relaxed));
    s.max_s = static_cast<double>(max_ns_.load(std::memory_order_relaxed)) / 1e9;
    s.p50_s = std::min(s.max_s, quantile(b, total, 0.50));
    s.p90_s = std::min(s.max_s, quantile(b, total, 0.90));
    s.p99_s = std::min(s.max_s, quantile(b, total, 0.99));
    return s;
  }

 private:
  static int index(double seconds) noexcept {
    if (!(seconds > kMin)) return 0;
    const int i = 1 + static_cast<int>(std::log(seconds / kMin) / std::log(kGrowth));
    return i >= kBuckets ? kBuckets - 1 : i;
  }
  // Upper edge of the bucket holding the q-quantile (errs high, by < 9%).
  static double quantile(const std::array<std::uint64_t, kBuckets>& b, std::uint64_t total,
                         double q) noexcept {
    const double rank = q * static_cast<double>(total);
    std::uint64_t seen = 0;
    for (int i = 0; i < kBuckets; ++i) {
      seen += b[i];
      if (static_cast<double>(seen) >= rank && seen > 0) return kMin * std::pow(kGrowth, i);
    }
    return kMin * std::pow(kGrowth, kBuckets - 1);
  }

  std::array<std::atomic<std::uint64_t>, kBuckets> buckets_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::uint64_t> sum_ns_{0};
  std::atomic<std::uint64_t> max_ns_{0};
};

}  // namespace taskmgr::detail
