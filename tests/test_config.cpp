#include <doctest/doctest.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "taskmgr/config.hpp"

using namespace taskmgr;

namespace {

// Loads `yaml`, expecting a ConfigError; returns it.
ConfigError load_error(const std::string& yaml) {
  try {
    Config::from_yaml_string(yaml, "test.yaml");
  } catch (const ConfigError& e) {
    return e;
  }
  FAIL("expected a ConfigError for:\n" << yaml);
  return ConfigError("", 0, "");
}

}  // namespace

TEST_CASE("defaults are the spec's values") {
  const Config c = Config::defaults();
  CHECK(c.tasks.max_queue_size == 100);
  CHECK(c.tasks.queue_timeout_seconds == 300);
  CHECK(c.tasks.enable_priority_queue == true);
  CHECK(c.tasks.enable_resource_tracking == true);
  CHECK(c.tasks.cleanup_timeout_seconds == 30);
  CHECK(c.tasks.close_grace_seconds == 30);
  CHECK(c.tasks.retry.max_attempts == 3);
  CHECK(c.tasks.retry.backoff_multiplier == 2);
  CHECK(c.tasks.retry.memory_reduction_factor == 0.5);
  CHECK(c.ocr.pdf_dpi == 300);
  CHECK(c.ocr.orientation == "auto");
  CHECK_NOTHROW(c.validate());
}

TEST_CASE("an empty document and an empty tasks block give the defaults") {
  for (const char* doc : {"", "tasks:\n", "tasks: {}\n", "# only a comment\n"}) {
    CAPTURE(doc);
    const Config c = Config::from_yaml_string(doc);
    CHECK(c.tasks.max_queue_size == 100);
    CHECK(c.tasks.retry.memory_reduction_factor == 0.5);
  }
}

TEST_CASE("the spec's tasks block is read with its exact keys") {
  const Config c = Config::from_yaml_string(R"(
tasks:
  max_queue_size: 7
  queue_timeout_seconds: 12.5
  enable_priority_queue: false
  enable_resource_tracking: false
  cleanup_timeout_seconds: 3
  close_grace_seconds: 0
  retry:
    max_attempts: 5
    max_interrupted_attempts: 9
    backoff_multiplier: 3
    memory_reduction_factor: 0.25
)");
  CHECK(c.tasks.max_queue_size == 7);
  CHECK(c.tasks.queue_timeout_seconds == 12.5);
  CHECK(c.tasks.enable_priority_queue == false);
  CHECK(c.tasks.enable_resource_tracking == false);
  CHECK(c.tasks.cleanup_timeout_seconds == 3);
  CHECK(c.tasks.close_grace_seconds == 0);
  CHECK(c.tasks.retry.max_attempts == 5);
  CHECK(c.tasks.retry.max_interrupted_attempts == 9);
  CHECK(c.tasks.retry.backoff_multiplier == 3);
  CHECK(c.tasks.retry.memory_reduction_factor == 0.25);
}

TEST_CASE("devices, pools, storage and ocr sections are read") {
  const Config c = Config::from_yaml_string(R"(
executor:
  worker_threads: 4
  worker_linger_us: 0
devices:
  probe_nvidia: false
  declared:
    - {id: "cuda:0", kind: gpu, memory_mb: 8192}
    - {id: "cuda:1", kind: gpu, memory_mb: 4096}
pools:
  defaults: {max_instances: 3, acquire_timeout_seconds: 2}
  devices:
    "cuda:0": {min_instances: 1, max_instances: 1}
storage:
  path: ":memory:"
  synchronous: full
  vacuum: full
ocr:
  languages: eng+deu
  page_segmentation_mode: 6
  pdf_dpi: 150
  orientation: always
  preprocess: {deskew: true, target_dpi: 0}
tasks:
  queue_ordering: largest_first
logging: {level: debug}
)");
  CHECK(c.executor.worker_threads == 4);
  CHECK(c.executor.worker_linger_us == 0);
  CHECK(c.devices.probe_nvidia == false);
  REQUIRE(c.devices.declared.size() == 2);
  CHECK(c.devices.declared[1].id == "cuda:1");
  CHECK(c.devices.declared[1].memory_mb == 4096);
  CHECK(c.pools.for_device("cpu").max_instances == 3);
  CHECK(c.pools.for_device("cuda:0").max_instances == 1);
  CHECK(c.pools.for_device("cuda:0").min_instances == 1);
  // A per-device block inherits the defaults it does not set.
  CHECK(c.pools.for_device("cuda:0").acquire_timeout_seconds == 2);
  CHECK(c.storage.path == ":memory:");
  CHECK(c.storage.synchronous == SyncMode::kFull);
  CHECK(c.storage.vacuum == VacuumMode::kFull);
  CHECK(Config{}.storage.vacuum == VacuumMode::kIncremental);
  CHECK(c.ocr.languages == "eng+deu");
  CHECK(c.ocr.page_segmentation_mode == 6);
  CHECK(c.ocr.preprocess.deskew == true);
  CHECK(c.ocr.preprocess.target_dpi == 0);
  CHECK(c.ocr.pdf_dpi == 150);
  CHECK(c.ocr.orientation == "always");
  CHECK(c.tasks.queue_ordering == QueueOrdering::kLargestFirst);
  CHECK(c.logging.level == "debug");
}

TEST_CASE("to_yaml round-trips through from_yaml_string") {
  Config c;
  c.tasks.max_queue_size = 42;
  c.tasks.retry.memory_reduction_factor = 0.3;
  c.tasks.queue_ordering = QueueOrdering::kLargestFirst;
  c.devices.declared.push_back({"cuda:0", "gpu", 1000});
  c.pools.devices["cuda:0"] = PoolSettings{1, 2, 5};
  c.storage.synchronous = SyncMode::kFull;
  c.storage.vacuum = VacuumMode::kNone;
  c.tasks.close_grace_seconds = 2.5;
  c.services["x"].memory_model = ServiceConfig::MemoryModel{40, 3, 0.5, 0};
  c.services["x"].device_kinds = {"cpu", "gpu"};
  c.services["x"].rate_limit_per_second = 0.5;
  c.services["x"].rate_limit_burst = 3;
  c.tasks.priority_aging_seconds = 90;
  c.services["x"].pool.max_instances = 3;
  c.services["x"].pool.devices["cuda:0"].acquire_timeout_seconds = 7;
  const Config back = Config::from_yaml_string(c.to_yaml());
  CHECK(back.to_yaml() == c.to_yaml());
  CHECK(back.tasks.close_grace_seconds == 2.5);
  REQUIRE(back.services.at("x").memory_model.has_value());
  CHECK(back.services.at("x").memory_model->per_mpixel_mb == 0.5);
  CHECK(back.services.at("x").device_kinds == std::vector<std::string>{"cpu", "gpu"});
  CHECK(back.tasks.max_queue_size == 42);
  CHECK(back.storage.vacuum == VacuumMode::kNone);
  CHECK(back.tasks.priority_aging_seconds == 90);
  CHECK(back.services.at("x").rate_limit_per_second == 0.5);
  CHECK(back.services.at("x").rate_limit_burst == 3);
  CHECK(back.services.at("x").pool.max_instances == 3);
  CHECK_FALSE(back.services.at("x").pool.min_instances.has_value());
  CHECK(back.services.at("x").pool.devices.at("cuda:0").acquire_timeout_seconds == 7);
  CHECK(back.pools.for_device("cuda:0").max_instances == 2);
  CHECK(back.devices.declared.at(0).memory_mb == 1000);
}

TEST_CASE("each out-of-range value is an error that names its key path and line") {
  struct Case {
    const char* yaml;
    const char* key;
    int line;
  };
  const Case cases[] = {
      {"tasks:\n  max_queue_size: 0\n", "tasks.max_queue_size", 2},
      {"ocr:\n  pdf_dpi: 71\n", "ocr.pdf_dpi", 2},
      {"ocr:\n  pdf_dpi: 1201\n", "ocr.pdf_dpi", 2},
      {"ocr:\n  orientation: sideways\n", "ocr.orientation", 2},
      {"tasks:\n  max_queue_size: -5\n", "tasks.max_queue_size", 2},
      {"tasks:\n  queue_timeout_seconds: 0\n", "tasks.queue_timeout_seconds", 2},
      {"tasks:\n  cleanup_timeout_seconds: -1\n", "tasks.cleanup_timeout_seconds", 2},
      {"tasks:\n  close_grace_seconds: -1\n", "tasks.close_grace_seconds", 2},
      {"tasks:\n  close_grace_seconds: .nan\n", "tasks.close_grace_seconds", 2},
      {"services:\n  x:\n    memory_model:\n      base_mb: -1\n", "services.x.memory_model.base_mb",
       4},
      {"services:\n  x:\n    memory_model:\n      per_page_mb: .inf\n",
       "services.x.memory_model.per_page_mb", 4},
      {"services:\n  x:\n    device_kinds: [cpu, tpu]\n", "services.x.device_kinds", 3},
      {"services:\n  x:\n    start_timeout_seconds: 1e18\n", "services.x.start_timeout_seconds", 3},
      {"services:\n  x:\n    rate_limit_per_second: -1\n", "services.x.rate_limit_per_second", 3},
      {"services:\n  x:\n    rate_limit_per_second: .nan\n", "services.x.rate_limit_per_second", 3},
      {"services:\n  x:\n    rate_limit_per_second: 1e7\n", "services.x.rate_limit_per_second", 3},
      {"services:\n  x:\n    rate_limit_per_second: 2\n    rate_limit_burst: -1\n",
       "services.x.rate_limit_burst", 4},
      {"services:\n  x:\n    rate_limit_burst: 5\n", "services.x.rate_limit_burst", 3},
      {"services:\n  x:\n    pool:\n      max_instances: -1\n", "services.x.pool.max_instances", 4},
      {"pools:\n  defaults:\n    max_instances: 4\nservices:\n  x:\n    pool:\n      "
       "min_instances: 5\n",
       "services.x.pool.min_instances", 7},
      {"services:\n  x:\n    pool:\n      devices:\n        'cuda:0':\n          "
       "acquire_timeout_seconds: 0\n",
       "services.x.pool.devices.cuda:0.acquire_timeout_seconds", 6},
      {"services:\n  x:\n    pool:\n      devices:\n        gpu:\n          max_instances: 1\n",
       "services.x.pool.devices.gpu", 5},
      {"tasks:\n  priority_aging_seconds: -1\n", "tasks.priority_aging_seconds", 2},
      {"tasks:\n  priority_aging_seconds: .inf\n", "tasks.priority_aging_seconds", 2},
      // A required key that is missing: the line of the key around it.
      {"services:\n  foo:\n    isolation: process\n", "services.foo.library", 2},
      {"tasks:\n  retry:\n    max_attempts: 0\n", "tasks.retry.max_attempts", 3},
      {"tasks:\n  retry:\n    max_interrupted_attempts: 0\n",
       "tasks.retry.max_interrupted_attempts", 3},
      {"tasks:\n  retry:\n    backoff_multiplier: 0.5\n", "tasks.retry.backoff_multiplier", 3},
      {"tasks:\n  retry:\n    memory_reduction_factor: 1.5\n",
       "tasks.retry.memory_reduction_factor", 3},
      {"tasks:\n  retry:\n    memory_reduction_factor: 1\n", "tasks.retry.memory_reduction_factor",
       3},
      {"tasks:\n  retry:\n    memory_reduction_factor: 0\n", "tasks.retry.memory_reduction_factor",
       3},
      {"tasks:\n  retry:\n    backoff_jitter: 1\n", "tasks.retry.backoff_jitter", 3},
      {"tasks:\n  retry:\n    backoff_base_seconds: 5\n    backoff_max_seconds: 1\n",
       "tasks.retry.backoff_max_seconds", 4},
      {"tasks:\n  max_task_memory_mb: -1\n", "tasks.max_task_memory_mb", 2},
      {"tasks:\n  device_warning_fraction: 1.5\n", "tasks.device_warning_fraction", 2},
      {"tasks:\n  queue_ordering: random\n", "tasks.queue_ordering", 2},
      {"executor:\n  worker_threads: -2\n", "executor.worker_threads", 2},
      {"executor:\n  worker_linger_us: -1\n", "executor.worker_linger_us", 2},
      {"devices:\n  cpu_memory_fraction: 0\n", "devices.cpu_memory_fraction", 2},
      {"devices:\n  declared:\n    - {id: gpu0, kind: gpu, memory_mb: 10}\n",
       "devices.declared[0].id", 3},
      {"devices:\n  declared:\n    - {id: 'cuda:0', kind: tpu, memory_mb: 10}\n",
       "devices.declared[0].kind", 3},
      {"devices:\n  declared:\n    - {id: 'cuda:0', kind: gpu, memory_mb: 0}\n",
       "devices.declared[0].memory_mb", 3},
      {"devices:\n  declared:\n    - {id: 'cuda:0', kind: gpu, memory_mb: 5}\n"
       "    - {id: 'cuda:0', kind: gpu, memory_mb: 5}\n",
       "devices.declared[1].id", 4},
      {"pools:\n  defaults:\n    min_instances: 3\n    max_instances: 2\n",
       "pools.defaults.min_instances", 3},
      {"pools:\n  devices:\n    'cuda:0':\n      acquire_timeout_seconds: 0\n",
       "pools.devices.cuda:0.acquire_timeout_seconds", 4},
      {"storage:\n  synchronous: sometimes\n", "storage.synchronous", 2},
      {"storage:\n  vacuum: often\n", "storage.vacuum", 2},
      {"storage:\n  path: ''\n", "storage.path", 2},
      {"storage:\n  postgres:\n    read_connections: 0\n", "storage.postgres.read_connections", 3},
      {"storage:\n  postgres:\n    read_connections: 65\n", "storage.postgres.read_connections", 3},
      {"storage:\n  postgres:\n    statement_timeout_seconds: -1\n",
       "storage.postgres.statement_timeout_seconds", 3},
      {"storage:\n  postgres:\n    connect_timeout_seconds: 0\n",
       "storage.postgres.connect_timeout_seconds", 3},
      {"ocr:\n  page_segmentation_mode: 14\n", "ocr.page_segmentation_mode", 2},
      {"ocr:\n  languages: ''\n", "ocr.languages", 2},
      {"logging:\n  level: loud\n", "logging.level", 2},
  };
  for (const auto& c : cases) {
    CAPTURE(c.yaml);
    const ConfigError e = load_error(c.yaml);
    CHECK(e.code() == ErrorCode::kInvalidConfig);
    CHECK(e.key_path() == c.key);
    CHECK(e.line() == c.line);
    const std::string what = e.what();
    CHECK(what.find(c.key) != std::string::npos);
    CHECK(what.find("test.yaml:" + std::to_string(c.line)) != std::string::npos);
  }
}

TEST_CASE("a value of the wrong type names its key, line and the offending value") {
  const ConfigError e = load_error("tasks:\n  retry:\n    max_attempts: three\n");
  CHECK(e.key_path() == "tasks.retry.max_attempts");
  CHECK(e.line() == 3);
  CHECK(std::string(e.what()).find("'three'") != std::string::npos);
  CHECK(std::string(e.what()).find("integer") != std::string::npos);

  const ConfigError b = load_error("tasks:\n  enable_priority_queue: maybe\n");
  CHECK(b.key_path() == "tasks.enable_priority_queue");
  CHECK(b.line() == 2);

  const ConfigError m = load_error("tasks:\n  retry: 3\n");
  CHECK(m.key_path() == "tasks.retry");
  CHECK(std::string(m.what()).find("mapping") != std::string::npos);

  const ConfigError l = load_error("tasks:\n  max_queue_size: [1, 2]\n");
  CHECK(l.key_path() == "tasks.max_queue_size");
  CHECK(std::string(l.what()).find("a list") != std::string::npos);

  const ConfigError f = load_error("tasks:\n  max_queue_size: 2.5\n");
  CHECK(f.key_path() == "tasks.max_queue_size");
}

TEST_CASE("an unknown key is an error that names its full path and line") {
  const ConfigError e = load_error("tasks:\n  retry:\n    max_attempts: 2\n    max_atempts: 4\n");
  CHECK(e.key_path() == "tasks.retry.max_atempts");
  CHECK(e.line() == 4);
  CHECK(std::string(e.what()).find("unknown key") != std::string::npos);

  const ConfigError top = load_error("taks:\n  max_queue_size: 1\n");
  CHECK(top.key_path() == "taks");
  CHECK(top.line() == 1);

  const ConfigError nested = load_error(
      "devices:\n  declared:\n    - id: 'cuda:0'\n      kind: gpu\n      memory_mb: 1\n"
      "      vram: 3\n");
  CHECK(nested.key_path() == "devices.declared[0].vram");
  CHECK(nested.line() == 6);
}

TEST_CASE("malformed YAML reports the line") {
  const ConfigError e = load_error("tasks:\n  max_queue_size: 1\n  bad: [unclosed\n");
  CHECK(e.line() >= 3);
  CHECK(std::string(e.what()).find("invalid YAML") != std::string::npos);
  const ConfigError notmap = load_error("- a\n- b\n");
  CHECK(std::string(notmap.what()).find("mapping") != std::string::npos);
}

TEST_CASE("a missing configuration file names the path") {
  const std::string path = "/nonexistent/dir/taskmgr-config.yaml";
  try {
    Config::from_yaml_file(path);
    FAIL("expected ConfigError");
  } catch (const ConfigError& e) {
    CHECK(e.code() == ErrorCode::kInvalidConfig);
    CHECK(std::string(e.what()).find(path) != std::string::npos);
  }
}

TEST_CASE("a configuration file is read and its errors name the file") {
  const std::string path = "taskmgr_test_config.yaml";
  {
    std::ofstream out(path);
    out << "tasks:\n  max_queue_size: 9\n  retry:\n    backoff_multiplier: 0\n";
  }
  try {
    Config::from_yaml_file(path);
    FAIL("expected ConfigError");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find(path + ":4") != std::string::npos);
    CHECK(e.key_path() == "tasks.retry.backoff_multiplier");
  }
  {
    std::ofstream out(path);
    out << "tasks:\n  max_queue_size: 9\n";
  }
  CHECK(Config::from_yaml_file(path).tasks.max_queue_size == 9);
  std::remove(path.c_str());
}

TEST_CASE("validate() on a config built in code names the key with line 0") {
  Config c;
  c.tasks.retry.memory_reduction_factor = 2;
  try {
    c.validate();
    FAIL("expected ConfigError");
  } catch (const ConfigError& e) {
    CHECK(e.key_path() == "tasks.retry.memory_reduction_factor");
    CHECK(e.line() == 0);
  }
}

TEST_CASE("every YAML example in docs/CONFIGURATION.md loads") {
  std::ifstream in(TASKMGR_DOCS_DIR "/CONFIGURATION.md");
  REQUIRE(in.good());
  std::string line, block;
  bool inside = false;
  int blocks = 0;
  while (std::getline(in, line)) {
    if (!inside && line == "```yaml") {
      inside = true;
      block.clear();
    } else if (inside && line == "```") {
      inside = false;
      ++blocks;
      CAPTURE(block);
      CHECK_NOTHROW(Config::from_yaml_string(block, "docs/CONFIGURATION.md"));
    } else if (inside) {
      block += line + "\n";
    }
  }
  CHECK(blocks >= 1);
}

TEST_CASE(
    "text values must be UTF-8 without control characters (they are written back by to_yaml)") {
  // Found by fuzz_config: such a value loaded, but to_yaml could not write
  // it back to the same value.
  const ConfigError bad_utf8 =
      load_error("ocr: {languages: eng\xff\xff\xff\xff\xff\xff\xff\r, max_pixels: 65536}\n");
  CHECK(bad_utf8.key_path() == "ocr.languages");
  CHECK(std::string(bad_utf8.what()).find("must be UTF-8 text") != std::string::npos);
  CHECK(std::string(bad_utf8.what()).find("offset 3") != std::string::npos);
  const ConfigError control = load_error("storage:\n  path: \"a\\x01b.db\"\n");
  CHECK(control.key_path() == "storage.path");
  CHECK(std::string(control.what()).find("control characters") != std::string::npos);
  const ConfigError in_enum = load_error("tasks:\n  queue_ordering: \"fifo\\r\"\n");
  CHECK(in_enum.key_path() == "tasks.queue_ordering");
  // Non-ASCII UTF-8 text is fine, and round-trips.
  const Config c = Config::from_yaml_string("tasks:\n  temp_dir: /tmp/données\n", "t.yaml");
  CHECK(c.tasks.temp_dir == "/tmp/données");
  CHECK(Config::from_yaml_string(c.to_yaml(), "again").tasks.temp_dir == "/tmp/données");
}

TEST_CASE("storage.url selects PostgreSQL: it is checked, never shown, and not with storage.path") {
  const Config c = Config::from_yaml_string(
      "storage:\n"
      "  url: postgresql://app:s3cret@db.example:5433/tasks?sslmode=require\n"
      "  retention_days: 7\n"
      "  postgres:\n"
      "    schema: taskmgr\n"
      "    read_connections: 4\n"
      "    statement_timeout_seconds: 0\n"
      "    connect_timeout_seconds: 2.5\n"
      "    allow_other_tables: true\n",
      "test.yaml");
  CHECK(c.storage.url == "postgresql://app:s3cret@db.example:5433/tasks?sslmode=require");
  CHECK(c.storage.path == "taskmgr.db");  // left at its default
  CHECK(c.storage.postgres.schema == "taskmgr");
  CHECK(c.storage.postgres.read_connections == 4);
  CHECK(c.storage.postgres.statement_timeout_seconds == 0);
  CHECK(c.storage.postgres.connect_timeout_seconds == 2.5);
  CHECK(c.storage.postgres.allow_other_tables);
  const Config back = Config::from_yaml_string(c.to_yaml());
  CHECK(back.to_yaml() == c.to_yaml());
  CHECK(back.storage.url == c.storage.url);
  CHECK(Config::from_yaml_string("storage: {url: 'host=/tmp dbname=t user=me'}").storage.url ==
        "host=/tmp dbname=t user=me");
  CHECK(Config::from_yaml_string("storage: {url: 'postgres://h/db'}").storage.url ==
        "postgres://h/db");

  struct Case {
    const char* yaml;
    const char* key;
    const char* says;
  };
  const Case cases[] = {
      {"storage:\n  path: other.db\n  url: postgresql://h/db\n", "storage.url", "both set"},
      {"storage:\n  url: 'sqlite:tasks.db'\n", "storage.url", "postgresql://"},
      {"storage:\n  url: 'postgresql://u:s3cr%zzet@h/db'\n", "storage.url",
       "not a valid PostgreSQL connection string"},
      {"storage:\n  url: 'host=h password=s3cret passsword=s3cret'\n", "storage.url",
       "invalid connection option"},
      {"storage:\n  url: postgresql://u:s3cret@h/db\n  synchronous: full\n", "storage.synchronous",
       "SQLite store only"},
      {"storage:\n  url: postgresql://u:s3cret@h/db\n  max_size_mb: 10\n", "storage.max_size_mb",
       "SQLite store only"},
      {"storage:\n  url: postgresql://u:s3cret@h/db\n  vacuum: none\n", "storage.vacuum",
       "SQLite store only"},
  };
  for (const auto& k : cases) {
    CAPTURE(k.yaml);
    const ConfigError e = load_error(k.yaml);
    CHECK(e.key_path() == k.key);
    CHECK(std::string(e.what()).find(k.says) != std::string::npos);
    CHECK(std::string(e.what()).find("s3cr") == std::string::npos);
  }
  // Built in code: the same checks.
  Config code;
  code.storage.url = "postgresql://h/db";
  code.storage.path = ":memory:";
  CHECK_THROWS_WITH_AS(code.validate(), doctest::Contains("storage.url"), ConfigError);
  code.storage.path = StorageConfig{}.path;
  code.storage.postgres.schema = std::string(64, 's');
  CHECK_THROWS_WITH_AS(code.validate(), doctest::Contains("storage.postgres.schema"), ConfigError);
}

TEST_CASE("storage.adopt and storage.allow_other_tables: read, written back, checked") {
  const Config c = Config::from_yaml_string(
      "storage:\n"
      "  allow_other_tables: true\n"
      "  adopt:\n"
      "    default_service: scan\n"
      "    status_map:\n"
      "      done: completed\n"
      "      waiting: pending\n"
      "      processing: running\n",
      "test.yaml");
  CHECK(c.storage.allow_other_tables);
  CHECK(c.storage.adopt.default_service == "scan");
  CHECK(c.storage.adopt.status_map == std::map<std::string, std::string>{{"done", "completed"},
                                                                         {"processing", "running"},
                                                                         {"waiting", "pending"}});
  const Config back = Config::from_yaml_string(c.to_yaml());
  CHECK(back.to_yaml() == c.to_yaml());
  CHECK(back.storage.adopt.status_map == c.storage.adopt.status_map);
  CHECK(Config{}.storage.adopt.default_service == "ocr");
  CHECK_FALSE(Config{}.storage.allow_other_tables);

  struct Case {
    const char* yaml;
    const char* key;
    const char* says;
  };
  const Case cases[] = {
      {"storage:\n  adopt:\n    status_map:\n      done: finished\n",
       "storage.adopt.status_map.done", "must be one of pending"},
      {"storage:\n  adopt:\n    status_map:\n      done: unrecognized\n",
       "storage.adopt.status_map.done", "must be one of pending"},
      {"storage:\n  adopt:\n    status_map:\n      failed: completed\n",
       "storage.adopt.status_map.failed", "taskmgr's own status word"},
      {"storage:\n  adopt:\n    status_map: [done]\n", "storage.adopt.status_map",
       "must be a mapping"},
      {"storage:\n  adopt:\n    status_maps: {}\n", "storage.adopt.status_maps", "unknown key"},
      {"storage:\n  adopt:\n    default_service: ''\n", "storage.adopt.default_service",
       "must not be empty"},
      {"storage:\n  url: postgresql://h/db\n  allow_other_tables: true\n",
       "storage.allow_other_tables", "storage.postgres.allow_other_tables"},
  };
  for (const auto& k : cases) {
    CAPTURE(k.yaml);
    const ConfigError e = load_error(k.yaml);
    CHECK(e.key_path() == k.key);
    CHECK(std::string(e.what()).find(k.says) != std::string::npos);
  }
}

TEST_CASE(
    "the http section is taskmgr-http's: kept as its YAML text, written back, refused when not a "
    "mapping") {
  const Config c = Config::from_yaml_string(
      "tasks:\n  max_queue_size: 7\nhttp:\n  port: 8080\n  input_roots: [/srv/a, /srv/b]\n"
      "  anything: {the: library reads none of it}\n");
  CHECK(c.tasks.max_queue_size == 7);
  REQUIRE_FALSE(c.http_yaml.empty());
  const Config back = Config::from_yaml_string(c.to_yaml());
  CHECK(back.http_yaml == c.http_yaml);
  CHECK(back.to_yaml() == c.to_yaml());
  CHECK(back.to_yaml().find("input_roots") != std::string::npos);
  CHECK(Config::from_yaml_string("http:\n").http_yaml.empty());  // an empty section: none
  try {
    (void)Config::from_yaml_string("logging:\n  level: info\nhttp: 8080\n");
    FAIL("expected a ConfigError");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("http: must be a mapping") != std::string::npos);
    CHECK(e.line() == 3);
  }
  Config bad;
  bad.http_yaml = "[1, 2]";
  try {
    bad.validate();
    FAIL("expected a ConfigError");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("http: must be the YAML text of a mapping") !=
          std::string::npos);
  }
}

TEST_CASE("a key given twice is refused with both lines (YAML would keep one silently)") {
  try {
    Config::from_yaml_string("tasks:\n  max_queue_size: 5\n  max_queue_size: 7\n", "test.yaml");
    FAIL("expected a ConfigError");
  } catch (const ConfigError& e) {
    CHECK(e.key_path() == "tasks.max_queue_size");
    CHECK(std::string(e.what()).find("given twice (lines 2 and 3)") != std::string::npos);
  }
  try {
    Config::from_yaml_string("http:\n  port: 1\nhttp:\n  port: 2\n", "test.yaml");
    FAIL("expected a ConfigError");
  } catch (const ConfigError& e) {
    CHECK(e.key_path() == "http");
  }
}

TEST_CASE(
    "services.<kind>.pool: a kind's own pool settings, per device, over pools.devices and "
    "pools.defaults field by field") {
  const Config c = Config::from_yaml_string(
      "pools:\n"
      "  defaults: {min_instances: 0, max_instances: 4, acquire_timeout_seconds: 30}\n"
      "  devices:\n"
      "    'cuda:0': {max_instances: 2}\n"
      "services:\n"
      "  ocr:\n"
      "    pool:\n"
      "      min_instances: 1\n"
      "      devices:\n"
      "        'cuda:1': {max_instances: 1, acquire_timeout_seconds: 5}\n",
      "test.yaml");
  const PoolsConfig ocr = c.pools_for("ocr");
  CHECK(ocr.for_device("cpu").min_instances == 1);
  CHECK(ocr.for_device("cpu").max_instances == 4);
  CHECK(ocr.for_device("cuda:0").max_instances == 2);  // pools.devices, under the kind's min
  CHECK(ocr.for_device("cuda:0").min_instances == 1);
  CHECK(ocr.for_device("cuda:1").max_instances == 1);
  CHECK(ocr.for_device("cuda:1").acquire_timeout_seconds == 5);
  CHECK(ocr.for_device("cuda:1").min_instances == 1);
  const PoolsConfig other = c.pools_for("other");  // a kind without its own: the pools
  CHECK(other.for_device("cpu").min_instances == 0);
  CHECK(other.for_device("cuda:0").max_instances == 2);
  CHECK(Config::from_yaml_string(c.to_yaml()).to_yaml() == c.to_yaml());
}

TEST_CASE("storage.shared and storage.cluster: read, written back, checked") {
  const Config c = Config::from_yaml_string(
      "storage:\n"
      "  url: postgresql://h/db\n"
      "  shared: true\n"
      "  cluster:\n"
      "    host_name: ocr-7\n"
      "    lease_seconds: 20\n"
      "    heartbeat_seconds: 4\n"
      "    poll_seconds: 1.5\n"
      "    rescue_batch: 50\n",
      "test.yaml");
  CHECK(c.storage.shared);
  CHECK(c.storage.cluster.host_name == "ocr-7");
  CHECK(c.storage.cluster.lease_seconds == 20);
  CHECK(c.storage.cluster.heartbeat_seconds == 4);
  CHECK(c.storage.cluster.poll_seconds == 1.5);
  CHECK(c.storage.cluster.rescue_batch == 50);
  const Config back = Config::from_yaml_string(c.to_yaml());
  CHECK(back.to_yaml() == c.to_yaml());
  CHECK(back.storage.shared);
  CHECK(back.storage.cluster.host_name == "ocr-7");
  // The defaults.
  const Config d;
  CHECK_FALSE(d.storage.shared);
  CHECK(d.storage.cluster.lease_seconds == 30);
  CHECK(d.storage.cluster.heartbeat_seconds == 5);
  CHECK(d.storage.cluster.poll_seconds == 2);
  CHECK(d.storage.cluster.rescue_batch == 500);

  struct Case {
    const char* yaml;
    const char* key;
    const char* says;
  };
  const Case cases[] = {
      {"storage:\n  shared: true\n", "storage.shared", "needs storage.url"},
      {"storage:\n  cluster:\n    lease_seconds: 0\n", "storage.cluster.lease_seconds", ">"},
      {"storage:\n  cluster:\n    lease_seconds: 100000\n", "storage.cluster.lease_seconds",
       "at most 86400"},
      {"storage:\n  cluster:\n    lease_seconds: 10\n    heartbeat_seconds: 6\n",
       "storage.cluster.heartbeat_seconds", "at most half"},
      {"storage:\n  cluster:\n    poll_seconds: -1\n", "storage.cluster.poll_seconds", ">"},
      {"storage:\n  cluster:\n    poll_seconds: 7200\n", "storage.cluster.poll_seconds",
       "at most 3600"},
      {"storage:\n  cluster:\n    rescue_batch: 0\n", "storage.cluster.rescue_batch",
       "[1, 100000]"},
      {"storage:\n  cluster:\n    host_name: \"a\\tb\"\n", "storage.cluster.host_name",
       "control characters"},
      {"storage:\n  cluster:\n    host_name: \"   \"\n", "storage.cluster.host_name",
       "only spaces"},
      {"storage:\n  cluster:\n    lease: 3\n", "storage.cluster.lease", "unknown"},
  };
  for (const auto& k : cases) {
    CAPTURE(k.yaml);
    const ConfigError e = load_error(k.yaml);
    CHECK(e.key_path() == k.key);
    CHECK(std::string(e.what()).find(k.says) != std::string::npos);
  }
  // Built in code: the same checks, also on what YAML cannot carry.
  Config code;
  code.storage.cluster.host_name = std::string(101, 'h');
  CHECK_THROWS_WITH_AS(code.validate(), doctest::Contains("at most 100 bytes"), ConfigError);
  code.storage.cluster.host_name = "bad\xff";
  CHECK_THROWS_WITH_AS(code.validate(), doctest::Contains("UTF-8"), ConfigError);
  code.storage.cluster.host_name = "bad\x01";
  CHECK_THROWS_WITH_AS(code.validate(), doctest::Contains("control characters"), ConfigError);
  code.storage.cluster.host_name = " ";
  CHECK_THROWS_WITH_AS(code.validate(), doctest::Contains("only spaces"), ConfigError);
  code.storage.cluster.host_name = "ok";
  code.storage.shared = true;
  CHECK_THROWS_WITH_AS(code.validate(), doctest::Contains("storage.shared"), ConfigError);
  code.storage.url = "postgresql://h/db";
  CHECK_NOTHROW(code.validate());
}
