// libFuzzer harness: the configuration loader (YAML text). Any input must
// either load (and then survive validate() and a round trip through
// to_yaml()) or throw ConfigError; nothing else, no crash, no leak.
#include <taskmgr/config.hpp>

#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view yaml(reinterpret_cast<const char*>(data), size);
  try {
    const taskmgr::Config c = taskmgr::Config::from_yaml_string(yaml, "fuzz");
    c.validate();
    // What to_yaml writes must load again to the same thing.
    const std::string again = c.to_yaml();
    const taskmgr::Config d = taskmgr::Config::from_yaml_string(again, "round trip");
    if (d.to_yaml() != again) std::abort();
  } catch (const taskmgr::ConfigError&) {
    // refused with a message: fine
  }
  return 0;
}
