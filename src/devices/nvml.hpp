// Private: NVIDIA GPUs through NVML, loaded at run time with dlopen. No build
// dependency on CUDA; a machine without libnvidia-ml.so.1 has no GPUs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace taskmgr::detail {

struct GpuMemory {
  std::string id;  // "cuda:N"
  std::int64_t total_mb = 0;
  std::int64_t used_mb = 0;
};

class Nvml {
 public:
  // nullptr when the library is absent or fails to initialise.
  static std::unique_ptr<Nvml> load();
  ~Nvml();
  std::vector<GpuMemory> devices() const;

 private:
  Nvml() = default;
  struct Api;
  std::unique_ptr<Api> api_;
};

}  // namespace taskmgr::detail
