// taskmgr: devices and their memory.
//
// A DeviceRegistry knows the devices tasks can be placed on: "cpu" and
// "cuda:N" (or any "<kind>:<index>" a host declares), each with
//   total_mb     memory tasks may be placed into,
//   reserved_mb  the sum of the estimates of the tasks running on it,
//   observed_mb  memory in use as the device's probe last saw it.
// Devices come from probes (CPU: /proc/meminfo and the cgroup v2 limit;
// NVIDIA GPUs: NVML, loaded at run time with dlopen when present, so there is
// no build dependency on CUDA and no library means no GPUs) and from the
// configuration (devices.declared), which replaces a probed device of the
// same id.
//
// Thread-safety: every member is safe to call from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "taskmgr/config.hpp"
#include "taskmgr/export.hpp"

namespace taskmgr {

enum class DeviceKind { kCpu, kGpu };
TASKMGR_API std::string_view to_string(DeviceKind kind) noexcept;

struct DeviceInfo {
  std::string id;  // "cpu", "cuda:0", ...
  DeviceKind kind = DeviceKind::kCpu;
  std::int64_t total_mb = 0;
  std::int64_t reserved_mb = 0;
  std::int64_t observed_mb = 0;
  bool available = true;  // false: marked unavailable by the host or a probe
  std::string source;     // "config", "/proc/meminfo", "cgroup", "nvml", "default"
  // Why a probe made it unavailable, or what a host should know of it ("MIG
  // mode is on ...", "NVML no longer reports ..."); "" when nothing.
  std::string note;

  std::int64_t free_mb() const noexcept { return total_mb - reserved_mb; }
};

class TASKMGR_API DeviceRegistry {
 public:
  // Probes and declares devices as `config` says. There is always a "cpu".
  explicit DeviceRegistry(const DevicesConfig& config);
  // Exactly these devices, no probing (tests, hosts that know their devices).
  explicit DeviceRegistry(std::vector<DeviceInfo> devices);
  ~DeviceRegistry();
  DeviceRegistry(const DeviceRegistry&) = delete;
  DeviceRegistry& operator=(const DeviceRegistry&) = delete;

  // Snapshots, in id order ("cpu" first).
  std::vector<DeviceInfo> list() const;
  std::optional<DeviceInfo> get(const std::string& id) const;
  bool contains(const std::string& id) const;
  // Free memory (total - reserved) of an available device; nullopt when the
  // device is unknown or unavailable. No copy: cheap enough for the hot path.
  std::optional<std::int64_t> free_memory(const std::string& id) const;
  std::vector<std::string> ids() const;  // "cpu" first

  // The spec's _select_device(estimate): the requested device if it is
  // available and its total holds the estimate; else the available GPU with
  // the most free memory that holds it; else the CPU if its total holds it;
  // else any available device whose total holds it. Throws
  // Error(kDeviceUnavailable) with the numbers when none can, and
  // Error(kNotFound) when `requested` names no device.
  // `allowed`, when given, limits the choice (e.g. devices a service supports);
  // it is called on a snapshot of the devices, without the registry's lock.
  std::string select_device(std::int64_t estimate_mb, const std::string& requested = "",
                            const std::function<bool(const DeviceInfo&)>& allowed = nullptr) const;

  // Adds mb to the device's reservation when it fits its free memory (or
  // unconditionally with force). Returns false when it does not fit.
  bool reserve(const std::string& id, std::int64_t mb, bool force = false);
  // Returns mb of reservation (never below zero).
  void release(const std::string& id, std::int64_t mb);

  // Host call: a device that is unavailable gets no new task. Throws
  // Error(kNotFound) for an unknown id.
  void set_available(const std::string& id, bool available);

  // Re-reads observed memory from the probes (cheap; the manager calls it
  // about once a second).
  void refresh_observed();
  void set_observed(const std::string& id, std::int64_t mb);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// CPU memory as the probes see it (MB): min(MemTotal, cgroup v2 memory.max),
// and memory in use (MemTotal - MemAvailable, or the cgroup's memory.current).
struct CpuMemory {
  std::int64_t total_mb = 0;
  std::int64_t used_mb = 0;
  std::string source;
};
TASKMGR_API CpuMemory probe_cpu_memory();

// This process's resident set size in MB (from /proc/self/statm).
TASKMGR_API std::int64_t process_rss_mb();

}  // namespace taskmgr
