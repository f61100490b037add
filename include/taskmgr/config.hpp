// taskmgr: configuration.
//
// A Config is read once, when a manager opens; it is plain data that can be
// built in code, loaded from YAML (a file or a string) or taken as defaults.
// The `tasks:` block holds exactly the spec's keys and defaults; the other
// sections (executor, devices, pools, storage, ocr) are taskmgr's own. Every
// key, its type, default and meaning is listed in docs/CONFIGURATION.md.
//
// Validation is strict: a key taskmgr does not know, a value of the wrong
// type or out of range is a ConfigError that names the key path (e.g.
// "tasks.retry.memory_reduction_factor") and, for YAML input, the line.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "taskmgr/cluster.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/export.hpp"

namespace taskmgr {

// How tasks of equal priority are ordered within a device queue.
enum class QueueOrdering {
  kFifo,          // "fifo": first queued, first started
  kLargestFirst,  // "largest_first": largest estimated memory first, then FIFO
};

TASKMGR_API std::string_view to_string(QueueOrdering ordering) noexcept;
TASKMGR_API std::optional<QueueOrdering> parse_queue_ordering(std::string_view s) noexcept;

// tasks.retry (spec).
struct RetryConfig {
  int max_attempts = 3;  // attempts in all, first run included (>= 1)
  // Attempts in all for a task the process died under (kill, crash, power
  // loss), each retried after the backoff: a page that crashes the process
  // stops after this many starts; a host killed now and then does not fail
  // the pages that happened to run. At least max_attempts is used.
  int max_interrupted_attempts = 5;
  double backoff_multiplier = 2.0;       // delay = base * multiplier^(attempt-1) (>= 1)
  double memory_reduction_factor = 0.5;  // batch_size *= factor after an OOM, in (0, 1)
  // taskmgr's own retry keys.
  double backoff_base_seconds = 1.0;  // first retry delay (>= 0)
  double backoff_max_seconds = 60.0;  // cap on any delay (>= backoff_base_seconds)
  double backoff_jitter = 0.1;        // +/- fraction of random jitter, in [0, 1)
  bool cpu_fallback = true;           // an OOM on a GPU moves the task to the CPU
};

// tasks (spec).
struct TasksConfig {
  int max_queue_size = 100;              // queued tasks in all devices' queues (>= 1)
  double queue_timeout_seconds = 300;    // fail a task queued longer (> 0)
  bool enable_priority_queue = true;     // false: strict FIFO, priority ignored
  bool enable_resource_tracking = true;  // estimate/reserve/measure memory per task
  double cleanup_timeout_seconds = 30;   // bound on one task's cleanup (> 0)
  // close() waits this long for running attempts, then interrupts them (as a
  // cancel does; a worker process is killed 2 s later): an interrupted task
  // stays queued for the next open (>= 0; 0 = interrupt at once).
  double close_grace_seconds = 30;
  RetryConfig retry;
  // taskmgr's own task keys.
  QueueOrdering queue_ordering = QueueOrdering::kFifo;
  std::int64_t max_task_memory_mb = 0;   // per-task estimate limit; 0 = none
  double task_timeout_seconds = 0;       // a running attempt's deadline (TIMEOUT); 0 = none;
                                         // a task's options may set "timeout_seconds"
  double memory_warning_fraction = 1.0;  // warn when observed > fraction * estimate (> 0)
  double device_warning_fraction = 0.9;  // warn when a device is this full, in (0, 1]
  double starvation_seconds = 10;        // a task skipped this long for lack of memory
                                         // blocks smaller tasks until it fits (> 0)
  // Priority aging: a queued task gains one priority level per this many
  // seconds of waiting, so a low priority cannot starve behind a steady
  // stream of higher ones (TaskQueue). 0 = off: the spec's strict order.
  double priority_aging_seconds = 0;
  std::string temp_dir;  // root for per-task temp dirs; "" = system temp
};

// executor
struct ExecutorConfig {
  int worker_threads = 0;  // threads that run services; 0 = number of CPUs
  // How long an idle worker spins for the next task (microseconds) when
  // tasks arrive faster than that apart, instead of giving its thread back;
  // 0 = never. Trades CPU for latency on streams of short tasks.
  int worker_linger_us = 50;
};

// devices.declared[]: a device the host manages itself (or a test fakes).
struct DeclaredDevice {
  std::string id;          // "cpu" or "cuda:N" (or any "<kind>:<n>")
  std::string kind;        // "cpu" or "gpu"
  std::int64_t memory_mb;  // total memory taskmgr may place tasks into (> 0)
};

// devices
struct DevicesConfig {
  bool probe_cpu = true;                           // read /proc/meminfo and the cgroup v2 limit
  bool probe_nvidia = true;                        // dlopen(nvml_library) when present
  std::string nvml_library = "libnvidia-ml.so.1";  // NVML: a name the loader finds, or a path
  std::int64_t cpu_memory_mb = 0;                  // override the probed CPU memory; 0 = probe
  double cpu_memory_fraction = 0.8;                // share of probed CPU memory usable, in (0, 1]
  std::vector<DeclaredDevice> declared;
};

// pools.defaults and pools.devices.<id>
struct PoolSettings {
  int min_instances = 0;                // created when the manager opens (warm)
  int max_instances = 0;                // 0 = auto: worker_threads for cpu, 1 for a gpu
  double acquire_timeout_seconds = 30;  // a stuck pool (held past a deadline or cleanup
                                        // timeout) this long: POOL_EXHAUSTED (> 0)
};

// pools
struct PoolsConfig {
  PoolSettings defaults;
  std::map<std::string, PoolSettings> devices;  // per device id, overrides defaults

  // The settings in force for a device.
  TASKMGR_API PoolSettings for_device(const std::string& device_id) const;
};

// services.<kind>.pool and services.<kind>.pool.devices.<id>: a kind's own
// pool settings. A field left unset falls back to the kind's pool, then to
// pools.devices.<id>, then to pools.defaults.
struct PoolOverride {
  std::optional<int> min_instances;
  std::optional<int> max_instances;
  std::optional<double> acquire_timeout_seconds;
  bool empty() const { return !min_instances && !max_instances && !acquire_timeout_seconds; }
  // `base` with the fields set here replacing its own.
  TASKMGR_API PoolSettings over(PoolSettings base) const;
};
struct ServicePoolConfig : PoolOverride {
  std::map<std::string, PoolOverride> devices;  // per device id
};

enum class SyncMode {
  kNormal,  // "normal": survives a process kill (WAL + synchronous=NORMAL)
  kFull,    // "full": also survives power loss (synchronous=FULL)
};
TASKMGR_API std::string_view to_string(SyncMode mode) noexcept;
TASKMGR_API std::optional<SyncMode> parse_sync_mode(std::string_view s) noexcept;

// storage.vacuum: what the SQLite store does with the pages that deleted
// tasks (retention's prune, delete_task) leave free.
enum class VacuumMode {
  // "incremental" (default): new files are made with auto_vacuum =
  // INCREMENTAL, and after each delete the free pages go back to the file
  // system (the file shrinks by what was deleted). A file made without it
  // is converted by one VACUUM at the first delete that leaves a quarter of
  // it free.
  kIncremental,
  // "full": a VACUUM (the whole file rewritten, defragmented) after a
  // delete that leaves a quarter of the file free.
  kFull,
  // "none": free pages are reused by later writes; the file keeps its size.
  kNone,
};
TASKMGR_API std::string_view to_string(VacuumMode mode) noexcept;
TASKMGR_API std::optional<VacuumMode> parse_vacuum_mode(std::string_view s) noexcept;

// storage.postgres: the PostgreSQL store's settings (with storage.url).
struct PostgresConfig {
  std::string schema;                     // "" = the first schema of the connection's search_path
  int read_connections = 2;               // connections for reads, 1..64
  double statement_timeout_seconds = 30;  // a longer statement fails; 0 = no limit
  double connect_timeout_seconds = 10;    // a broken connection is tried again this long (> 0)
  bool allow_other_tables = false;        // create taskmgr's tables beside others in the schema
};

// storage.adopt: reading a `tasks` table adopted from an earlier
// application (docs/STORAGE.md, "Adopting an existing database").
struct AdoptConfig {
  // Old status word -> pending, queued, running, completed, failed or
  // cancelled. A word neither taskmgr's nor mapped reads as "unrecognized".
  std::map<std::string, std::string> status_map;
  std::string default_service = "ocr";  // the service of rows that name none
};

// storage: where tasks are kept. storage.url selects PostgreSQL; otherwise
// storage.path selects SQLite (or ":memory:"). Not both.
struct StorageConfig {
  std::string path = "taskmgr.db";  // SQLite file; ":memory:" keeps nothing
  // A PostgreSQL connection string: a postgresql:// (or postgres://) URL or
  // libpq key=value pairs; "" = none. May hold a password: to_yaml() writes
  // it back as given, messages never show it.
  std::string url;
  SyncMode synchronous = SyncMode::kNormal;  // SQLite only
  double busy_timeout_seconds = 5;           // wait for a lock before failing (> 0); SQLite only
  double retention_days = 0;                 // prune finished tasks older than this; 0 = keep
  VacuumMode vacuum = VacuumMode::kIncremental;  // SQLite only: what deletes give back
  std::int64_t max_size_mb = 0;                  // the database grows to about this; past it writes
                                 // fail as on a full disk; 0 = no limit; SQLite only
  std::int64_t wal_max_mb = 64;  // the WAL file is kept to about this (>= 1); SQLite only
  // Failed writes kept for a retry (>= 1); while this many wait, new tasks
  // are refused (IO_ERROR) instead of holding more in memory.
  std::int64_t max_backlog = 100000;
  // SQLite only: an unversioned file with tables but no `tasks` table is
  // refused; true creates taskmgr's tables beside them.
  bool allow_other_tables = false;
  AdoptConfig adopt;
  PostgresConfig postgres;
  // Several hosts share storage.url's queue (docs/SCALING.md); needs
  // storage.url. The host's settings in storage.cluster.
  bool shared = false;
  ClusterOptions cluster;
};

// ocr.preprocess
struct PreprocessConfig {
  bool grayscale =
      false;  // convert colour input to gray (Tesseract does it itself; off: no CER gain measured)
  int target_dpi = 300;   // rescale toward this resolution when the page's is believable and
                          // under 0.6 of it (a 72/96 or missing tag is not believed: the text's
                          // size is measured; docs/OCR.md, "Resolution"); 0 = off
  bool deskew = false;    // estimate and correct small rotations
  bool binarize = false;  // Otsu threshold before recognition
};

// ocr
struct OcrConfig {
  std::string tessdata_path;  // "" = found automatically (TESSDATA_PREFIX, Debian paths)
  std::string languages = "eng";
  int page_segmentation_mode = 3;         // Tesseract PSM, 0..13 (3 = fully automatic)
  std::int64_t max_pixels = 200'000'000;  // per page; larger pages fail INVALID_INPUT from
                                          // their header, before any decoding (> 0)
  int pdf_dpi = 300;  // resolution PDF pages are rendered at, 72..1200 (task option "dpi")
  std::string orientation = "auto";  // "auto", "off" or "always": Tesseract's orientation
                                     // detection (task option "orientation", docs/OCR.md)
  PreprocessConfig preprocess;
};

// services.<kind>: how the instances of one service kind run
// (docs/RELIABILITY.md, "Worker processes").
struct ServiceConfig {
  // "process": each pooled instance is a child process (taskmgr-worker)
  // holding one warm engine; a crash, an abort or a kill ends its task with
  // a clear reason, and the worker is started again. "in_process":
  // instances are objects in the host's process (a crash in an engine is
  // the host's crash). "auto": process for the built-in OCR when
  // taskmgr-worker is found (else in process, with a warning in the log),
  // in process for every other kind.
  std::string isolation = "auto";
  // process: a shared object whose taskmgr_worker_factory(kind) makes the
  // kind's instances inside the worker ("" = built in: only "ocr").
  std::string library;
  // process: the worker program; "" = taskmgr-worker beside libtaskmgr.so,
  // or in <prefix>/libexec/taskmgr.
  std::string worker_executable;
  // process: each worker's hard memory limit (RLIMIT_DATA: heap and private
  // mappings); past it an allocation fails and the task is OUT_OF_MEMORY.
  // 0 = none.
  std::int64_t memory_limit_mb = 0;
  // process: a worker whose engine is not loaded by then fails to start (> 0).
  double start_timeout_seconds = 60;
  // Any isolation. The kind's memory model as configuration (the linear
  // model's coefficients, LinearModelCoefficients in estimator.hpp): it
  // replaces the model of the kind's factory, or gives one to a kind whose
  // factory has none (a worker library's kind, a C or Python service
  // without an estimate function). Unset: the factory's model, else the
  // default linear model.
  struct MemoryModel {
    double base_mb = 16;
    double per_page_mb = 1;
    double per_mpixel_mb = 8;
    double per_input_mb = 2;
  };
  std::optional<MemoryModel> memory_model;
  // Any isolation. The kinds of device the kind's instances run on ("cpu",
  // "gpu"); a device of another kind is not supported, whatever the
  // factory's supports() says. Empty: as the factory says (a worker
  // library's kind: every device).
  std::vector<std::string> device_kinds;
  // Any isolation. The kind's own pool settings (see PoolOverride).
  ServicePoolConfig pool;
  // Any isolation. At most this many of the kind's tasks start per second,
  // over all devices (a token bucket of rate_limit_burst tokens, refilled
  // at this rate): for a service that calls a metered backend. Tasks over
  // the rate wait in their queue (other kinds pass them). 0 = no limit.
  double rate_limit_per_second = 0;
  // The bucket's size: how many tasks may start at once after a quiet
  // spell (>= 1; 0 = the rate rounded up, at least 1).
  int rate_limit_burst = 0;
};

// logging
struct LoggingConfig {
  std::string level = "info";  // "trace", "debug", "info", "warn", "error", "off"
};

struct TASKMGR_API Config {
  TasksConfig tasks;
  ExecutorConfig executor;
  DevicesConfig devices;
  PoolsConfig pools;
  StorageConfig storage;
  OcrConfig ocr;
  std::map<std::string, ServiceConfig> services;  // per service kind
  LoggingConfig logging;
  // The `http` section: taskmgr-http's settings (docs/CLI.md), kept as its
  // YAML text (a mapping) and written back by to_yaml; the library reads
  // none of it. Empty: no section.
  std::string http_yaml;

  // The spec's defaults (same as a default-constructed Config).
  // The pool settings of a service kind: pools, with services.<kind>.pool
  // over them (Config::pools when the kind has none).
  PoolsConfig pools_for(const std::string& kind) const;

  static Config defaults();
  // Parse and validate. Throws ConfigError; a missing or unreadable file is a
  // ConfigError whose message names the path.
  static Config from_yaml_file(const std::string& path);
  static Config from_yaml_string(std::string_view yaml, std::string_view source_name = "<string>");

  // Throws ConfigError naming the first invalid key (line 0: built in code).
  void validate() const;

  // Every key with its value, in the layout from_yaml_string() reads.
  std::string to_yaml() const;
};

// A configuration failure: error code kInvalidConfig, with the key path
// ("tasks.retry.max_attempts", "" for the document as a whole), the 1-based
// line in the YAML source (0 when unknown) and the source name.
class TASKMGR_API ConfigError : public Error {
 public:
  ConfigError(std::string key_path, int line, const std::string& message);
  ~ConfigError() override;
  ConfigError(const ConfigError&) = default;
  ConfigError& operator=(const ConfigError&) = default;

  const std::string& key_path() const noexcept { return key_path_; }
  int line() const noexcept { return line_; }

 private:
  std::string key_path_;
  int line_;
};

}  // namespace taskmgr
