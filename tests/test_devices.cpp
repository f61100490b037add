#include <doctest/doctest.h>

#include <string>

#include "taskmgr/device.hpp"
#include "taskmgr/error.hpp"

using namespace taskmgr;

namespace {
DeviceRegistry two_gpus_and_cpu() {
  return DeviceRegistry(std::vector<DeviceInfo>{
      {"cpu", DeviceKind::kCpu, 16000, 0, 0, true, ""},
      {"cuda:0", DeviceKind::kGpu, 8000, 0, 0, true, ""},
      {"cuda:1", DeviceKind::kGpu, 6000, 0, 0, true, ""},
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
