#include "devices/nvml.hpp"

#include <dlfcn.h>

namespace taskmgr::detail {

namespace {
// The few NVML declarations used (nvml.h, stable C ABI since CUDA 5).
using nvmlReturn_t = int;
using nvmlDevice_t = void*;
struct nvmlMemory_t {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
constexpr nvmlReturn_t kNvmlSuccess = 0;
}  // namespace

struct Nvml::Api {
  void* handle = nullptr;
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*shutdown)() = nullptr;
  nvmlReturn_t (*count)(unsigned int*) = nullptr;
  nvmlReturn_t (*by_index)(unsigned int, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
};

template <typename F>
static bool bind(void* handle, const char* name, F& out) {
  void* sym = dlsym(handle, name);
  if (sym == nullptr) return false;
  out = reinterpret_cast<F>(sym);
  return true;
}

std::unique_ptr<Nvml> Nvml::load() {
  void* handle = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return nullptr;
  auto api = std::make_unique<Api>();
  api->handle = handle;
  if (!bind(handle, "nvmlInit_v2", api->init) || !bind(handle, "nvmlShutdown", api->shutdown) ||
      !bind(handle, "nvmlDeviceGetCount_v2", api->count) ||
      !bind(handle, "nvmlDeviceGetHandleByIndex_v2", api->by_index) ||
      !bind(handle, "nvmlDeviceGetMemoryInfo", api->memory) || api->init() != kNvmlSuccess) {
    dlclose(handle);
    return nullptr;
  }
  std::unique_ptr<Nvml> nvml(new Nvml());
  nvml->api_ = std::move(api);
  return nvml;
}

Nvml::~Nvml() {
  if (api_ && api_->handle != nullptr) {
    api_->shutdown();
    dlclose(api_->handle);
  }
}

std::vector<GpuMemory> Nvml::devices() const {
  std::vector<GpuMemory> out;
  unsigned int n = 0;
  if (api_->count(&n) != kNvmlSuccess) return out;
  for (unsigned int i = 0; i < n; ++i) {
    nvmlDevice_t dev = nullptr;
    nvmlMemory_t mem{};
    if (api_->by_index(i, &dev) != kNvmlSuccess || api_->memory(dev, &mem) != kNvmlSuccess) {
      continue;
    }
    out.push_back({"cuda:" + std::to_string(i), static_cast<std::int64_t>(mem.total >> 20),
                   static_cast<std::int64_t>(mem.used >> 20)});
  }
  return out;
}

}  // namespace taskmgr::detail
