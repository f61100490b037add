#include "devices/nvml.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstring>

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
constexpr unsigned int kUuidLength = 96;  // NVML_DEVICE_UUID_V2_BUFFER_SIZE is 96

std::string trimmed(std::string s) {
  const auto space = [](unsigned char c) { return std::isspace(c) != 0; };
  while (!s.empty() && space(static_cast<unsigned char>(s.back()))) s.pop_back();
  std::size_t i = 0;
  while (i < s.size() && space(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}
}  // namespace

struct Nvml::Api {
  void* handle = nullptr;
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*shutdown)() = nullptr;
  nvmlReturn_t (*count)(unsigned int*) = nullptr;
  nvmlReturn_t (*by_index)(unsigned int, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
  // Optional: older drivers lack them.
  nvmlReturn_t (*uuid)(nvmlDevice_t, char*, unsigned int) = nullptr;
  nvmlReturn_t (*mig_mode)(nvmlDevice_t, unsigned int*, unsigned int*) = nullptr;
};

template <typename F>
static bool bind(void* handle, const char* name, F& out) {
  void* sym = dlsym(handle, name);
  if (sym == nullptr) return false;
  out = reinterpret_cast<F>(sym);
  return true;
}

std::unique_ptr<Nvml> Nvml::load(const std::string& library, std::string* why) {
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    if (why != nullptr) {
      const char* e = dlerror();
      *why = "cannot load " + library + ": " + (e != nullptr ? e : "unknown error");
    }
    return nullptr;
  }
  auto api = std::make_unique<Api>();
  api->handle = handle;
  if (!bind(handle, "nvmlInit_v2", api->init) || !bind(handle, "nvmlShutdown", api->shutdown) ||
      !bind(handle, "nvmlDeviceGetCount_v2", api->count) ||
      !bind(handle, "nvmlDeviceGetHandleByIndex_v2", api->by_index) ||
      !bind(handle, "nvmlDeviceGetMemoryInfo", api->memory)) {
    if (why != nullptr) *why = library + " lacks an NVML function taskmgr needs";
    dlclose(handle);
    return nullptr;
  }
  (void)bind(handle, "nvmlDeviceGetUUID", api->uuid);
  (void)bind(handle, "nvmlDeviceGetMigMode", api->mig_mode);
  if (const nvmlReturn_t rc = api->init(); rc != kNvmlSuccess) {
    if (why != nullptr) *why = "nvmlInit_v2 failed (NVML error " + std::to_string(rc) + ")";
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

std::vector<GpuMemory> Nvml::probe() const {
  std::vector<GpuMemory> out;
  unsigned int n = 0;
  if (api_->count(&n) != kNvmlSuccess) return out;
  for (unsigned int i = 0; i < n; ++i) {
    nvmlDevice_t dev = nullptr;
    nvmlMemory_t mem{};
    if (api_->by_index(i, &dev) != kNvmlSuccess || api_->memory(dev, &mem) != kNvmlSuccess) {
      continue;
    }
    GpuMemory g;
    g.index = i;
    g.total_mb = static_cast<std::int64_t>(mem.total >> 20);
    g.used_mb = static_cast<std::int64_t>(mem.used >> 20);
    if (api_->uuid != nullptr) {
      char buf[kUuidLength] = {};
      if (api_->uuid(dev, buf, kUuidLength) == kNvmlSuccess) {
        g.uuid.assign(buf, strnlen(buf, kUuidLength));
      }
    }
    if (api_->mig_mode != nullptr) {
      unsigned int current = 0, pending = 0;
      if (api_->mig_mode(dev, &current, &pending) == kNvmlSuccess) g.mig = current != 0;
    }
    out.push_back(std::move(g));
  }
  return out;
}

std::vector<GpuMemory> visible_gpus(const std::vector<GpuMemory>& all,
                                    const std::optional<std::string>& visible,
                                    std::vector<std::string>* notes) {
  std::vector<GpuMemory> out;
  auto add = [&](GpuMemory g) {
    g.id = "cuda:" + std::to_string(out.size());
    out.push_back(std::move(g));
  };
  if (!visible) {
    for (const auto& g : all) add(g);
    return out;
  }
  auto stop = [&](const std::string& entry, const std::string& why) {
    if (notes != nullptr) {
      notes->push_back("CUDA_VISIBLE_DEVICES entry '" + entry + "' " + why +
                       ": it and the entries after it are not visible (as for CUDA)");
    }
  };
  std::vector<unsigned int> seen;
  std::string rest = *visible;
  while (!trimmed(rest).empty()) {
    const std::size_t comma = rest.find(',');
    const std::string entry = trimmed(rest.substr(0, comma));
    rest = comma == std::string::npos ? std::string() : rest.substr(comma + 1);
    if (entry.empty()) {
      stop(entry, "is empty");
      break;
    }
    if (entry.rfind("MIG-", 0) == 0) {
      GpuMemory m;
      m.uuid = entry;
      m.mig_instance = true;
      add(std::move(m));
      continue;
    }
    const GpuMemory* found = nullptr;
    if (!entry.empty() && std::all_of(entry.begin(), entry.end(),
                                      [](unsigned char c) { return std::isdigit(c) != 0; })) {
      const unsigned long index = entry.size() > 6 ? ~0UL : std::stoul(entry);
      for (const auto& g : all) {
        if (g.index == index) found = &g;
      }
      if (found == nullptr) {
        stop(entry, "names no GPU index NVML reports");
        break;
      }
    } else {
      const std::string prefix = entry.rfind("GPU-", 0) == 0 ? entry : "GPU-" + entry;
      int matches = 0;
      for (const auto& g : all) {
        if (!g.uuid.empty() && g.uuid.rfind(prefix, 0) == 0) {
          found = &g;
          ++matches;
        }
      }
      if (matches != 1) {
        stop(entry, matches == 0 ? "names no GPU UUID NVML reports"
                                 : "is a prefix of more than one GPU UUID");
        break;
      }
    }
    if (std::find(seen.begin(), seen.end(), found->index) != seen.end()) {
      stop(entry, "names a GPU already listed");
      break;
    }
    seen.push_back(found->index);
    add(*found);
  }
  return out;
}

}  // namespace taskmgr::detail
