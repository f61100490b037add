#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "taskmgr/device.hpp"
#include "taskmgr/error.hpp"

using namespace taskmgr;

namespace {
DeviceRegistry two_gpus_and_cpu() {
  return DeviceRegistry(std::vector<DeviceInfo>{
      {"cpu", DeviceKind::kCpu, 16000, 0, 0, true, "", ""},
      {"cuda:0", DeviceKind::kGpu, 8000, 0, 0, true, "", ""},
      {"cuda:1", DeviceKind::kGpu, 6000, 0, 0, true, "", ""},
  });
}
}  // namespace

TEST_CASE("placement picks the GPU with the most free memory that fits") {
  DeviceRegistry r = two_gpus_and_cpu();
  CHECK(r.select_device(1000) == "cuda:0");  // 8000 free beats 6000
  REQUIRE(r.reserve("cuda:0", 5000));        // cuda:0 now 3000 free
  CHECK(r.select_device(1000) == "cuda:1");  // 6000 free now wins
  CHECK(r.select_device(4000) == "cuda:1");  // only cuda:1 has 4000 free
  REQUIRE(r.reserve("cuda:1", 5000));        // 3000 and 1000 free
  CHECK(r.select_device(3500) == "cpu");     // no GPU fits now: the CPU
  CHECK(r.select_device(2500) == "cuda:0");
}

TEST_CASE("a requested device is used when its total holds the estimate") {
  DeviceRegistry r = two_gpus_and_cpu();
  CHECK(r.select_device(1000, "cuda:1") == "cuda:1");
  CHECK(r.select_device(1000, "cpu") == "cpu");
  // Busy but big enough in total: still the requested one (the task waits).
  REQUIRE(r.reserve("cuda:1", 6000));
  CHECK(r.select_device(1000, "cuda:1") == "cuda:1");
  // Too small in total: automatic placement instead.
  CHECK(r.select_device(7000, "cuda:1") == "cuda:0");
  // An unknown device is the caller's error.
  try {
    r.select_device(10, "cuda:7");
    FAIL("expected kNotFound");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kNotFound);
    CHECK(std::string(e.what()).find("cuda:7") != std::string::npos);
  }
}

TEST_CASE("a task too big for every device fails with the numbers") {
  DeviceRegistry r = two_gpus_and_cpu();
  try {
    r.select_device(20000);
    FAIL("expected kDeviceUnavailable");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kDeviceUnavailable);
    const std::string m = e.what();
    CHECK(m.find("20000 MB") != std::string::npos);
    CHECK(m.find("cpu 16000 MB total") != std::string::npos);
    CHECK(m.find("cuda:0 8000 MB total") != std::string::npos);
    CHECK(m.find("cuda:1 6000 MB total") != std::string::npos);
  }
}

TEST_CASE("an unavailable device gets no task, and comes back") {
  DeviceRegistry r = two_gpus_and_cpu();
  r.set_available("cuda:0", false);
  CHECK(r.select_device(1000) == "cuda:1");
  CHECK(r.select_device(1000, "cuda:0") == "cuda:1");
  CHECK_FALSE(r.get("cuda:0")->available);
  r.set_available("cuda:0", true);
  CHECK(r.select_device(1000) == "cuda:0");
  CHECK_THROWS_AS(r.set_available("tpu:0", false), Error);
}

TEST_CASE("a service filter limits placement") {
  DeviceRegistry r = two_gpus_and_cpu();
  auto cpu_only = [](const DeviceInfo& d) { return d.kind == DeviceKind::kCpu; };
  CHECK(r.select_device(1000, "", cpu_only) == "cpu");
  CHECK(r.select_device(1000, "cuda:0", cpu_only) == "cpu");
  try {
    r.select_device(17000, "", cpu_only);
    FAIL("expected kDeviceUnavailable");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("not supported by the service") != std::string::npos);
  }
}

TEST_CASE("reservations add up and never go below zero") {
  DeviceRegistry r = two_gpus_and_cpu();
  CHECK(r.reserve("cuda:1", 4000));
  CHECK_FALSE(r.reserve("cuda:1", 4000));  // does not fit
  CHECK(r.reserve("cuda:1", 4000, true));  // forced
  CHECK(r.get("cuda:1")->reserved_mb == 8000);
  r.release("cuda:1", 8000);
  r.release("cuda:1", 100);
  CHECK(r.get("cuda:1")->reserved_mb == 0);
}

TEST_CASE("devices come from the config: declared devices are used as given") {
  DevicesConfig c;
  c.probe_nvidia = true;  // no libnvidia-ml here or in CI: no GPUs, no error
  c.cpu_memory_mb = 3000;
  c.declared.push_back({"cuda:0", "gpu", 2048});
  DeviceRegistry r(c);
  const auto list = r.list();
  REQUIRE(list.size() >= 2);
  CHECK(list[0].id == "cpu");
  CHECK(list[0].total_mb == 3000);
  CHECK(list[0].source == "config");
  const auto gpu = r.get("cuda:0");
  REQUIRE(gpu.has_value());
  CHECK(gpu->kind == DeviceKind::kGpu);
  CHECK(gpu->total_mb == 2048);
  CHECK(gpu->source == "config");
}

TEST_CASE("the CPU probe reads this machine's memory") {
  const CpuMemory m = probe_cpu_memory();
  CHECK(m.total_mb > 64);
  CHECK(m.used_mb >= 0);
  CHECK(m.used_mb <= m.total_mb * 2);
  CHECK((m.source == "/proc/meminfo" || m.source == "cgroup"));
  DevicesConfig c;
  c.cpu_memory_fraction = 0.5;
  DeviceRegistry r(c);
  const auto cpu = r.get("cpu");
  REQUIRE(cpu.has_value());
  CHECK(cpu->total_mb == static_cast<std::int64_t>(m.total_mb * 0.5));
  CHECK(process_rss_mb() > 0);
}

TEST_CASE("a service filter runs without the registry's lock and may call it") {
  DeviceRegistry r = two_gpus_and_cpu();
  int calls = 0;
  auto roomy = [&](const DeviceInfo& d) {
    ++calls;
    return r.free_memory(d.id).value_or(0) >= 7000;  // takes the registry's lock
  };
  CHECK(r.select_device(1000, "", roomy) == "cuda:0");
  CHECK(calls == 3);  // once per device
  REQUIRE(r.reserve("cuda:0", 2000));
  CHECK(r.select_device(1000, "cuda:0", roomy) == "cpu");
}

// ---- NVML, through a stand-in library (tests/fake_nvml.c) --------------------

namespace {
// The fake's state file and the environment it reads, for one test; the
// environment is restored at the end.
struct FakeNvml {
  std::string state;
  std::optional<std::string> old_visible;
  explicit FakeNvml(const std::string& lines) {
    state = (std::filesystem::temp_directory_path() /
             ("taskmgr-fake-nvml-" + std::to_string(::getpid()) + ".txt"))
                .string();
    write(lines);
    ::setenv("FAKE_NVML_STATE", state.c_str(), 1);
    if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) old_visible = v;
    ::unsetenv("CUDA_VISIBLE_DEVICES");
  }
  ~FakeNvml() {
    ::unsetenv("FAKE_NVML_STATE");
    if (old_visible) {
      ::setenv("CUDA_VISIBLE_DEVICES", old_visible->c_str(), 1);
    } else {
      ::unsetenv("CUDA_VISIBLE_DEVICES");
    }
    std::remove(state.c_str());
  }
  void write(const std::string& lines) const { std::ofstream(state) << lines; }
  static DevicesConfig config() {
    DevicesConfig c;
    c.probe_cpu = false;
    c.cpu_memory_mb = 4000;
    c.nvml_library = TASKMGR_FAKE_NVML;
    return c;
  }
};

std::vector<std::string> ids_of(const DeviceRegistry& r) {
  std::vector<std::string> out;
  for (const auto& d : r.list()) out.push_back(d.id);
  return out;
}
}  // namespace

TEST_CASE("NVML: GPUs are found with their memory, numbered in NVML's order") {
  FakeNvml fake("# uuid total used mig\nGPU-aaaa-1111 16000 1200 0\nGPU-bbbb-2222 8000 0 0\n");
  DeviceRegistry r(FakeNvml::config());
  CHECK(ids_of(r) == std::vector<std::string>{"cpu", "cuda:0", "cuda:1"});
  const DeviceInfo g0 = *r.get("cuda:0");
  CHECK(g0.kind == DeviceKind::kGpu);
  CHECK(g0.total_mb == 16000);
  CHECK(g0.observed_mb == 1200);
  CHECK(g0.source == "nvml");
  CHECK(g0.available);
  CHECK(g0.note.empty());
  CHECK(r.get("cuda:1")->total_mb == 8000);
}

TEST_CASE(
    "NVML: a refresh reads memory in use, and a GPU that goes away is unavailable until it "
    "comes back") {
  FakeNvml fake("GPU-aaaa 16000 1200 0\nGPU-bbbb 8000 0 0\n");
  DeviceRegistry r(FakeNvml::config());
  fake.write("GPU-aaaa 16000 5000 0\nGPU-bbbb 8000 700 0\n");
  r.refresh_observed();
  CHECK(r.get("cuda:0")->observed_mb == 5000);
  CHECK(r.get("cuda:1")->observed_mb == 700);
  // The first GPU is lost: NVML now lists only the second (at index 0).
  fake.write("GPU-bbbb 8000 900 0\n");
  r.refresh_observed();
  const DeviceInfo lost = *r.get("cuda:0");
  CHECK_FALSE(lost.available);
  CHECK(lost.note.find("NVML no longer reports GPU-aaaa") != std::string::npos);
  CHECK(r.get("cuda:1")->available);
  CHECK(r.get("cuda:1")->observed_mb == 900);  // found by its UUID, not its index
  // It comes back.
  fake.write("GPU-aaaa 16000 100 0\nGPU-bbbb 8000 900 0\n");
  r.refresh_observed();
  CHECK(r.get("cuda:0")->available);
  CHECK(r.get("cuda:0")->note.empty());
  CHECK(r.get("cuda:0")->observed_mb == 100);
}

TEST_CASE("NVML: CUDA_VISIBLE_DEVICES orders and hides GPUs as CUDA does") {
  FakeNvml fake("GPU-aaaa 16000 0 0\nGPU-bbbb 8000 0 0\nGPU-cccc 4000 0 0\n");
  struct Case {
    const char* visible;
    std::vector<std::int64_t> totals;  // of cuda:0, cuda:1, ...
    const char* note;                  // on the first GPU (or the CPU), "" for none
  };
  const Case cases[] = {
      {"2,0", {4000, 16000}, ""},
      {"GPU-bbbb,0", {8000, 16000}, ""},
      {"bb", {8000}, ""},  // a UUID prefix, "GPU-" implied
      {"1,7,0", {8000}, "entry '7' names no GPU index"},
      {"0,0", {16000}, "names a GPU already listed"},
      {"GPU-", {}, "is a prefix of more than one GPU UUID"},
      {"", {}, ""},  // set and empty: no GPU at all
  };
  for (const auto& k : cases) {
    CAPTURE(k.visible);
    ::setenv("CUDA_VISIBLE_DEVICES", k.visible, 1);
    DeviceRegistry r(FakeNvml::config());
    std::vector<std::int64_t> totals;
    for (const auto& d : r.list()) {
      if (d.kind == DeviceKind::kGpu) totals.push_back(d.total_mb);
    }
    CHECK(totals == k.totals);
    const auto list = r.list();
    const DeviceInfo& first = list.size() > 1 ? list[1] : list[0];
    if (std::string(k.note).empty()) {
      CHECK(first.note.empty());
    } else {
      CHECK(first.note.find(k.note) != std::string::npos);
    }
  }
}

TEST_CASE("NVML: a GPU in MIG mode and a MIG instance are listed unavailable, saying why") {
  FakeNvml fake("GPU-aaaa 80000 0 1\nGPU-bbbb 40000 0 0\n");
  {
    DeviceRegistry r(FakeNvml::config());
    const DeviceInfo mig = *r.get("cuda:0");
    CHECK_FALSE(mig.available);
    CHECK(mig.note.find("MIG mode is on for GPU-aaaa") != std::string::npos);
    CHECK(r.get("cuda:1")->available);
    r.refresh_observed();  // a MIG GPU is not watched: it stays as it is
    CHECK_FALSE(r.get("cuda:0")->available);
  }
  ::setenv("CUDA_VISIBLE_DEVICES", "MIG-1234-5678,1", 1);
  DeviceRegistry r(FakeNvml::config());
  const DeviceInfo instance = *r.get("cuda:0");
  CHECK_FALSE(instance.available);
  CHECK(instance.note.find("a MIG instance (MIG-1234-5678)") != std::string::npos);
  CHECK(r.get("cuda:1")->total_mb == 40000);
}

TEST_CASE("NVML: a library that is absent, incomplete or fails to start gives no GPU, no error") {
  FakeNvml fake("GPU-aaaa 16000 0 0\n");
  DevicesConfig c = FakeNvml::config();
  c.nvml_library = "/nonexistent/libnvidia-ml.so.1";
  CHECK(ids_of(DeviceRegistry(c)) == std::vector<std::string>{"cpu"});
  c.nvml_library = "libc.so.6";  // loads, but has no NVML function
  CHECK(ids_of(DeviceRegistry(c)) == std::vector<std::string>{"cpu"});
  ::setenv("FAKE_NVML_INIT", "fail", 1);
  CHECK(ids_of(DeviceRegistry(FakeNvml::config())) == std::vector<std::string>{"cpu"});
  ::unsetenv("FAKE_NVML_INIT");
  c = FakeNvml::config();
  c.probe_nvidia = false;
  CHECK(ids_of(DeviceRegistry(c)) == std::vector<std::string>{"cpu"});
}
