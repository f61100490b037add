#include <unistd.h>

#include <algorithm>
#include <boost/container/small_vector.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include "devices/nvml.hpp"
#include "forced_unwind.hpp"
#include "host_call.hpp"
#include "sync.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/error.hpp"

namespace taskmgr {
namespace {

std::int64_t read_meminfo_kb(const std::string& text, const std::string& key) {
  const auto pos = text.find(key + ":");
  if (pos == std::string::npos) return -1;
  std::istringstream in(text.substr(pos + key.size() + 1));
  std::int64_t kb = -1;
  in >> kb;
  return kb;
}

std::string slurp(const char* path) {
  std::ifstream in(path);
  if (!in) return {};
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// cgroup v2 value in bytes, -1 when absent or "max".
std::int64_t read_cgroup_bytes(const char* file) {
  const std::string cg = slurp("/proc/self/cgroup");  // "0::/path"
  std::string rel;
  const auto p = cg.find("0::");
  if (p != std::string::npos) {
    rel = cg.substr(p + 3);
    rel = rel.substr(0, rel.find('\n'));
  }
  for (const std::string& dir :
       {std::string("/sys/fs/cgroup") + rel, std::string("/sys/fs/cgroup")}) {
    std::string v = slurp((dir + "/" + file).c_str());
    if (v.empty()) continue;
    if (v.rfind("max", 0) == 0) return -1;
    try {
      return std::stoll(v);
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      return -1;
    }
  }
  return -1;
}

std::string describe(const DeviceInfo& d) {
  std::string s = d.id + " " + std::to_string(d.total_mb) + " MB total, " +
                  std::to_string(d.free_mb()) + " MB free";
  if (!d.available) s += " (unavailable)";
  return s;
}

}  // namespace

std::string_view to_string(DeviceKind k) noexcept { return k == DeviceKind::kCpu ? "cpu" : "gpu"; }

CpuMemory probe_cpu_memory() {
  CpuMemory m;
  const std::string info = slurp("/proc/meminfo");
  const std::int64_t total_kb = read_meminfo_kb(info, "MemTotal");
  const std::int64_t avail_kb = read_meminfo_kb(info, "MemAvailable");
  if (total_kb > 0) {
    m.total_mb = total_kb / 1024;
    m.used_mb = avail_kb >= 0 ? (total_kb - avail_kb) / 1024 : 0;
    m.source = "/proc/meminfo";
  }
  const std::int64_t limit = read_cgroup_bytes("memory.max");
  if (limit > 0 && (m.total_mb == 0 || limit / (1024 * 1024) < m.total_mb)) {
    m.total_mb = limit / (1024 * 1024);
    const std::int64_t current = read_cgroup_bytes("memory.current");
    m.used_mb = current > 0 ? current / (1024 * 1024) : m.used_mb;
    m.source = "cgroup";
  }
  if (m.total_mb <= 0) {  // no /proc: assume a small machine rather than fail
    m.total_mb = 1024;
    m.source = "default";
  }
  return m;
}

std::int64_t process_rss_mb() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  long pages_total = 0, pages_rss = 0;
  const int n = std::fscanf(f, "%ld %ld", &pages_total, &pages_rss);
  std::fclose(f);
  if (n != 2) return 0;
  return static_cast<std::int64_t>(pages_rss) * sysconf(_SC_PAGESIZE) / (1024 * 1024);
}

struct DeviceRegistry::Impl {
  struct Probe {
    DevicesConfig config;
    std::unique_ptr<detail::Nvml> nvml;
    // The NVML GPUs found at construction: their id ("cuda:N") and UUID
    // (or NVML index as text when it has none). Fixed.
    std::vector<std::pair<std::string, std::string>> gpus;
  };
  using Devices = std::map<std::string, DeviceInfo>;

  Impl(Devices d, std::unique_ptr<Probe> p) : probe(std::move(p)), devices(std::move(d)) {}

  // What refresh_observed() reads; null for a registry of given devices.
  // Fixed at construction.
  const std::unique_ptr<const Probe> probe;

  detail::Mutex mu;
  Devices devices GUARDED_BY(mu);
  // GPUs a refresh found gone (made unavailable by it, not by the host).
  std::set<std::string> lost GUARDED_BY(mu);
};

namespace {
std::string key_of(const detail::GpuMemory& g) {
  return g.uuid.empty() ? "index " + std::to_string(g.index) : g.uuid;
}
}  // namespace

DeviceRegistry::DeviceRegistry(const DevicesConfig& config) {
  auto probe = std::make_unique<Impl::Probe>();
  probe->config = config;
  Impl::Devices devices;
  DeviceInfo cpu;
  cpu.id = "cpu";
  cpu.kind = DeviceKind::kCpu;
  if (config.cpu_memory_mb > 0) {
    cpu.total_mb = config.cpu_memory_mb;
    cpu.source = "config";
  } else if (config.probe_cpu) {
    const CpuMemory m = probe_cpu_memory();
    cpu.total_mb =
        static_cast<std::int64_t>(static_cast<double>(m.total_mb) * config.cpu_memory_fraction);
    cpu.observed_mb = m.used_mb;
    cpu.source = m.source;
  } else {
    cpu.total_mb = 1024;
    cpu.source = "default";
  }
  devices[cpu.id] = cpu;

  if (config.probe_nvidia) {
    probe->nvml = detail::Nvml::load(config.nvml_library);
    if (probe->nvml) {
      // Numbered as CUDA numbers them for this process: CUDA_VISIBLE_DEVICES
      // (NVML's PCI bus order; CUDA's own with CUDA_DEVICE_ORDER=PCI_BUS_ID).
      const char* env = std::getenv("CUDA_VISIBLE_DEVICES");
      std::vector<std::string> notes;
      const auto gpus = detail::visible_gpus(
          probe->nvml->probe(), env ? std::optional<std::string>(env) : std::nullopt, &notes);
      for (const auto& g : gpus) {
        DeviceInfo d;
        d.id = g.id;
        d.kind = DeviceKind::kGpu;
        d.total_mb = g.total_mb;
        d.observed_mb = g.used_mb;
        d.source = "nvml";
        if (g.mig_instance) {
          d.available = false;
          d.note = "a MIG instance (" + g.uuid +
                   "): taskmgr does not place tasks on MIG instances, and NVML does not give "
                   "their memory";
        } else if (g.mig) {
          d.available = false;
          d.note = "MIG mode is on for " + key_of(g) +
                   ": its memory belongs to its MIG instances, on which taskmgr does not place "
                   "tasks";
        } else {
          probe->gpus.emplace_back(d.id, key_of(g));
        }
        devices[d.id] = d;
      }
      // What CUDA_VISIBLE_DEVICES hid, on the first GPU (or nowhere when
      // none is visible: then the CPU carries it).
      if (!notes.empty()) {
        DeviceInfo& on = gpus.empty() ? devices["cpu"] : devices[gpus.front().id];
        for (const auto& n : notes) on.note += (on.note.empty() ? "" : "; ") + n;
      }
    }
  }
  for (const auto& decl : config.declared) {
    DeviceInfo d;
    d.id = decl.id;
    d.kind = decl.kind == "cpu" ? DeviceKind::kCpu : DeviceKind::kGpu;
    d.total_mb = decl.memory_mb;
    d.source = "config";
    devices[d.id] = d;
  }
  impl_ = std::make_unique<Impl>(std::move(devices), std::move(probe));
}

DeviceRegistry::DeviceRegistry(std::vector<DeviceInfo> given) {
  Impl::Devices devices;
  for (auto& d : given) {
    if (d.id.empty() || d.total_mb <= 0) {
      throw Error(ErrorCode::kInvalidArgument,
                  "device '" + d.id + "' needs an id and a total memory > 0");
    }
    if (d.source.empty()) d.source = "given";
    const std::string id = d.id;
    devices[id] = std::move(d);
  }
  if (devices.empty()) throw Error(ErrorCode::kInvalidArgument, "a registry needs a device");
  impl_ = std::make_unique<Impl>(std::move(devices), nullptr);
}

DeviceRegistry::~DeviceRegistry() = default;

std::vector<DeviceInfo> DeviceRegistry::list() const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  std::vector<DeviceInfo> out;
  out.reserve(im.devices.size());
  if (auto it = im.devices.find("cpu"); it != im.devices.end()) out.push_back(it->second);
  for (const auto& [id, d] : im.devices) {
    if (id != "cpu") out.push_back(d);
  }
  return out;
}

std::optional<DeviceInfo> DeviceRegistry::get(const std::string& id) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.devices.find(id);
  if (it == im.devices.end()) return std::nullopt;
  return it->second;
}

std::optional<std::int64_t> DeviceRegistry::free_memory(const std::string& id) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.devices.find(id);
  if (it == im.devices.end() || !it->second.available) return std::nullopt;
  return it->second.free_mb();
}

std::vector<std::string> DeviceRegistry::ids() const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  std::vector<std::string> out;
  if (im.devices.count("cpu")) out.push_back("cpu");
  for (const auto& [id, d] : im.devices) {
    if (id != "cpu") out.push_back(id);
  }
  return out;
}

bool DeviceRegistry::contains(const std::string& id) const {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  return im.devices.count(id) != 0;
}

// `allowed` is host code (ServiceFactory::supports), which may call back
// into the registry: the choice is made on a snapshot, outside the lock, and
// asks `allowed` once per device. The snapshot costs one allocation: a
// handful of devices, whose short ids and sources fit in their strings.
std::string DeviceRegistry::select_device(
    std::int64_t estimate_mb, const std::string& requested,
    const std::function<bool(const DeviceInfo&)>& allowed) const {
  struct Candidate {
    DeviceInfo d;
    bool supported = true;
    bool usable() const { return d.available && supported; }
  };
  // In id order; inline for a handful of devices (no allocation per call:
  // this runs for every task created).
  boost::container::small_vector<Candidate, 4> devices;
  {
    Impl& im = *impl_;
    detail::MutexLock g(im.mu);
    for (const auto& [id, d] : im.devices) devices.push_back(Candidate{d});
  }
  if (allowed) {
    TASKMGR_HOST_CALL("DeviceRegistry::select_device: allowed");
    for (Candidate& c : devices) c.supported = allowed(c.d);
  }
  if (!requested.empty()) {
    auto it = std::find_if(devices.begin(), devices.end(),
                           [&](const Candidate& c) { return c.d.id == requested; });
    if (it == devices.end()) {
      std::string known;
      for (const Candidate& c : devices) known += (known.empty() ? "" : ", ") + c.d.id;
      throw Error(ErrorCode::kNotFound,
                  "unknown device '" + requested + "' (devices: " + known + ")");
    }
    if (it->usable() && estimate_mb <= it->d.total_mb) return requested;
  }
  const DeviceInfo* best_gpu = nullptr;
  for (const Candidate& c : devices) {
    const DeviceInfo& d = c.d;
    if (d.kind != DeviceKind::kGpu || !c.usable() || d.free_mb() < estimate_mb) continue;
    if (best_gpu == nullptr || d.free_mb() > best_gpu->free_mb()) best_gpu = &d;
  }
  if (best_gpu != nullptr) return best_gpu->id;
  for (const Candidate& c : devices) {
    if (c.d.id == "cpu" && c.usable() && estimate_mb <= c.d.total_mb) return "cpu";
  }
  // Nothing has room now: any device whose total holds it (it waits in queue).
  const DeviceInfo* roomiest = nullptr;
  for (const Candidate& c : devices) {
    if (!c.usable() || estimate_mb > c.d.total_mb) continue;
    if (roomiest == nullptr || c.d.total_mb > roomiest->total_mb) roomiest = &c.d;
  }
  if (roomiest != nullptr) return roomiest->id;

  std::string msg = "no device can hold a task estimated at " + std::to_string(estimate_mb) + " MB";
  if (!requested.empty()) msg += " (requested " + requested + ")";
  msg += ": ";
  bool first = true;
  for (const Candidate& c : devices) {
    msg += (first ? "" : "; ") + describe(c.d);
    if (!c.supported) msg += " (not supported by the service)";
    first = false;
  }
  throw Error(ErrorCode::kDeviceUnavailable, msg);
}

bool DeviceRegistry::reserve(const std::string& id, std::int64_t mb, bool force) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.devices.find(id);
  if (it == im.devices.end()) return false;
  if (!force && it->second.free_mb() < mb) return false;
  it->second.reserved_mb += mb;
  return true;
}

void DeviceRegistry::release(const std::string& id, std::int64_t mb) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.devices.find(id);
  if (it == im.devices.end()) return;
  it->second.reserved_mb = std::max<std::int64_t>(0, it->second.reserved_mb - mb);
}

void DeviceRegistry::set_available(const std::string& id, bool available) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.devices.find(id);
  if (it == im.devices.end()) throw Error(ErrorCode::kNotFound, "unknown device '" + id + "'");
  it->second.available = available;
}

void DeviceRegistry::refresh_observed() {
  Impl& im = *impl_;
  if (!im.probe) return;
  // The probes read files and NVML: outside the lock.
  CpuMemory cpu;
  const bool probe_cpu = im.probe->config.probe_cpu;
  if (probe_cpu) cpu = probe_cpu_memory();
  std::vector<detail::GpuMemory> gpus;
  if (im.probe->nvml) gpus = im.probe->nvml->probe();
  detail::MutexLock g(im.mu);
  if (probe_cpu) {
    auto it = im.devices.find("cpu");
    if (it != im.devices.end()) it->second.observed_mb = cpu.used_mb;
  }
  // Each GPU found at construction, by its UUID: observed memory now, or
  // gone (unavailable, said why) until NVML reports it again.
  for (const auto& [id, key] : im.probe->gpus) {
    auto it = im.devices.find(id);
    if (it == im.devices.end()) continue;
    DeviceInfo& d = it->second;
    const auto now =
        std::find_if(gpus.begin(), gpus.end(),
                     [&key = key](const detail::GpuMemory& x) { return key_of(x) == key; });
    if (now == gpus.end()) {
      if (im.lost.insert(id).second) {
        d.available = false;
        d.note = "NVML no longer reports " + key + " (lost, reset or removed)";
      }
      continue;
    }
    d.observed_mb = now->used_mb;
    if (im.lost.erase(id) > 0) {
      d.available = true;
      d.note.clear();
    }
  }
}

void DeviceRegistry::set_observed(const std::string& id, std::int64_t mb) {
  Impl& im = *impl_;
  detail::MutexLock g(im.mu);
  auto it = im.devices.find(id);
  if (it != im.devices.end()) it->second.observed_mb = mb;
}

}  // namespace taskmgr
