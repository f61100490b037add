// Private: NVIDIA GPUs through NVML, loaded at run time with dlopen. No build
// dependency on CUDA; a machine without libnvidia-ml.so.1 has no GPUs.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace taskmgr::detail {

// One GPU as NVML reports it now, or a MIG instance CUDA_VISIBLE_DEVICES
// names (mig_instance: taskmgr does not place on those).
struct GpuMemory {
  std::string id;          // "cuda:N", N its place in the visible order ("" from probe())
  std::string uuid;        // "GPU-..." ("MIG-..." for an instance; "" when NVML does not say)
  unsigned int index = 0;  // NVML's index (PCI bus order)
  std::int64_t total_mb = 0;
  std::int64_t used_mb = 0;
  bool mig = false;           // MIG mode is on: its memory belongs to its instances
  bool mig_instance = false;  // a "MIG-..." entry of CUDA_VISIBLE_DEVICES
};

class Nvml {
 public:
  // The NVML library at `library` (a file name for the loader's search, or a
  // path), initialised; nullptr when it is absent, lacks a function taskmgr
  // needs, or fails to initialise (`why` says which, when given).
  static std::unique_ptr<Nvml> load(const std::string& library, std::string* why = nullptr);
  ~Nvml();
  // Every GPU NVML reports now, in its index order; a GPU whose queries
  // fail is left out.
  std::vector<GpuMemory> probe() const;

 private:
  Nvml() = default;
  struct Api;
  std::unique_ptr<Api> api_;
};

// The GPUs a CUDA program sees with CUDA_VISIBLE_DEVICES = `visible`
// (nullopt: unset, every GPU in NVML's order), in that order, each with
// its "cuda:N" id. Entries are NVML indices or GPU UUIDs (a unique prefix,
// "GPU-" included) or MIG instance UUIDs ("MIG-...", returned with
// mig_instance set); as in CUDA, the first entry that names no GPU (or one
// already named) ends the list. `notes` gets a line for each entry that
// ended it.
std::vector<GpuMemory> visible_gpus(const std::vector<GpuMemory>& all,
                                    const std::optional<std::string>& visible,
                                    std::vector<std::string>* notes = nullptr);

}  // namespace taskmgr::detail
