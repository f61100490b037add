#include "taskmgr/config.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <type_traits>
#include <unordered_map>

#include "enum_table.hpp"
#include "store/pg.hpp"
#include "taskmgr/task.hpp"
#include "utf8.hpp"

namespace taskmgr {
namespace {

constexpr std::pair<QueueOrdering, std::string_view> kOrderingNames[] = {
    {QueueOrdering::kFifo, "fifo"},
    {QueueOrdering::kLargestFirst, "largest_first"},
};
constexpr std::pair<SyncMode, std::string_view> kSyncNames[] = {
    {SyncMode::kNormal, "normal"},
    {SyncMode::kFull, "full"},
};
constexpr std::pair<VacuumMode, std::string_view> kVacuumNames[] = {
    {VacuumMode::kIncremental, "incremental"},
    {VacuumMode::kFull, "full"},
    {VacuumMode::kNone, "none"},
};
constexpr std::string_view kLogLevels[] = {"trace", "debug", "info", "warn", "error", "off"};

std::string join(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}

const char* node_kind(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Null: return "nothing (null)";
    case YAML::NodeType::Scalar: return "a scalar";
    default: return "an undefined node";
  }
}

// Reads one YAML mapping against the schema: every key read is remembered,
// anything left over is an unknown key. Records the line of every key path so
// that validate() failures can be reported with a line too.
class MapReader {
 public:
  MapReader(const YAML::Node& node, std::string path, std::unordered_map<std::string, int>& lines)
      : node_(node), path_(std::move(path)), lines_(lines) {
    if (node_ && !node_.IsNull() && !node_.IsMap()) {
      throw ConfigError(path_, line_of(node_),
                        fmt_msg(path_, "must be a mapping, got " + std::string(node_kind(node_))));
    }
  }

  bool present() const { return node_ && node_.IsMap(); }

  template <typename T>
  void read(std::string_view key, T& out) {
    YAML::Node v = lookup(key);
    if (!v) return;
    const std::string path = join(path_, key);
    if (!v.IsScalar()) {
      throw ConfigError(
          path, line_of(v),
          fmt_msg(path, std::string("must be ") + type_name<T>() + ", got " + node_kind(v)));
    }
    try {
      out = v.as<T>();
    } catch (const YAML::Exception&) {
      throw ConfigError(
          path, line_of(v),
          fmt_msg(path, std::string("must be ") + type_name<T>() + ", got '" + v.Scalar() + "'"));
    }
    if constexpr (std::is_same_v<T, std::string>) check_text(path, v, out);
  }

  // Text values (paths, names) must be UTF-8 without control characters:
  // anything else cannot be written back (to_yaml) or logged unchanged.
  static void check_text(const std::string& path, const YAML::Node& v, const std::string& s) {
    if (auto at = detail::invalid_utf8_at(s)) {
      throw ConfigError(path, line_of(v),
                        fmt_msg(path, "must be UTF-8 text, got an invalid byte at offset " +
                                          std::to_string(*at)));
    }
    for (std::size_t i = 0; i < s.size(); ++i) {
      const auto c = static_cast<unsigned char>(s[i]);
      if (c < 0x20 || c == 0x7F) {
        throw ConfigError(path, line_of(v),
                          fmt_msg(path, "must not contain control characters, got byte " +
                                            std::to_string(c) + " at offset " + std::to_string(i)));
      }
    }
  }

  template <typename E, std::size_t N>
  void read_enum(std::string_view key, E& out, const std::pair<E, std::string_view> (&table)[N]) {
    std::string s;
    read(key, s);
    if (s.empty() && !lookup(key)) return;
    auto parsed = detail::enum_parse(table, s);
    if (!parsed) {
      std::string allowed;
      for (const auto& [e, name] : table) {
        allowed += allowed.empty() ? "" : ", ";
        allowed += name;
      }
      const std::string path = join(path_, key);
      throw ConfigError(path, line_of(lookup(key)),
                        fmt_msg(path, "must be one of " + allowed + ", got '" + s + "'"));
    }
    out = *parsed;
  }

  template <typename T>
  void read_opt(std::string_view key, std::optional<T>& out) {
    if (!lookup(key)) return;
    T v{};
    read(key, v);
    out = v;
  }

  MapReader child(std::string_view key) { return MapReader(lookup(key), join(path_, key), lines_); }

  YAML::Node raw(std::string_view key) { return lookup(key); }
  const YAML::Node& raw_node() const { return node_; }
  const std::string& path() const { return path_; }

  // Throws on the first key given twice (YAML's loader keeps one of them
  // silently), then on the first key the schema did not read.
  void finish() const {
    if (!present()) return;
    std::unordered_map<std::string, int> first_line;
    for (const auto& kv : node_) {
      const std::string k = kv.first.as<std::string>();
      const auto [it, fresh] = first_line.emplace(k, line_of(kv.first));
      if (!fresh) {
        const std::string path = join(path_, k);
        throw ConfigError(
            path, line_of(kv.first),
            fmt_msg(path, "given twice (lines " + std::to_string(it->second) + " and " +
                              std::to_string(line_of(kv.first)) + "): keep one"));
      }
    }
    for (const auto& kv : node_) {
      const std::string k = kv.first.as<std::string>();
      if (!seen_.count(k)) {
        const std::string path = join(path_, k);
        throw ConfigError(path, line_of(kv.first), fmt_msg(path, "unknown key"));
      }
    }
  }

  static int line_of(const YAML::Node& n) { return n ? n.Mark().line + 1 : 0; }

  static std::string fmt_msg(const std::string& path, const std::string& what) {
    return (path.empty() ? std::string("configuration") : path) + ": " + what;
  }

 private:
  YAML::Node lookup(std::string_view key) {
    seen_.insert(std::string(key));
    if (!present()) return YAML::Node(YAML::NodeType::Undefined);
    for (const auto& kv : node_) {
      if (kv.first.as<std::string>() == key) {
        lines_[join(path_, key)] = line_of(kv.first);
        return kv.second;
      }
    }
    return YAML::Node(YAML::NodeType::Undefined);
  }

  template <typename T>
  static const char* type_name() {
    if constexpr (std::is_same_v<T, bool>)
      return "a boolean (true/false)";
    else if constexpr (std::is_integral_v<T>)
      return "an integer";
    else if constexpr (std::is_floating_point_v<T>)
      return "a number";
    else
      return "a string";
  }

  YAML::Node node_;
  std::string path_;
  std::unordered_map<std::string, int>& lines_;
  std::set<std::string> seen_;
};

void read_pool(MapReader r, PoolSettings& p) {
  r.read("min_instances", p.min_instances);
  r.read("max_instances", p.max_instances);
  r.read("acquire_timeout_seconds", p.acquire_timeout_seconds);
  r.finish();
}

void read_pool_override(MapReader& r, PoolOverride& o) {
  r.read_opt("min_instances", o.min_instances);
  r.read_opt("max_instances", o.max_instances);
  r.read_opt("acquire_timeout_seconds", o.acquire_timeout_seconds);
}

Config parse_document(const YAML::Node& root, std::unordered_map<std::string, int>& lines) {
  Config c;
  MapReader top(root, "", lines);

  {
    MapReader t = top.child("tasks");
    auto& k = c.tasks;
    t.read("max_queue_size", k.max_queue_size);
    t.read("queue_timeout_seconds", k.queue_timeout_seconds);
    t.read("enable_priority_queue", k.enable_priority_queue);
    t.read("enable_resource_tracking", k.enable_resource_tracking);
    t.read("cleanup_timeout_seconds", k.cleanup_timeout_seconds);
    t.read("close_grace_seconds", k.close_grace_seconds);
    {
      MapReader r = t.child("retry");
      auto& y = k.retry;
      r.read("max_attempts", y.max_attempts);
      r.read("max_interrupted_attempts", y.max_interrupted_attempts);
      r.read("backoff_multiplier", y.backoff_multiplier);
      r.read("memory_reduction_factor", y.memory_reduction_factor);
      r.read("backoff_base_seconds", y.backoff_base_seconds);
      r.read("backoff_max_seconds", y.backoff_max_seconds);
      r.read("backoff_jitter", y.backoff_jitter);
      r.read("cpu_fallback", y.cpu_fallback);
      r.finish();
    }
    t.read_enum("queue_ordering", k.queue_ordering, kOrderingNames);
    t.read("max_task_memory_mb", k.max_task_memory_mb);
    t.read("task_timeout_seconds", k.task_timeout_seconds);
    t.read("memory_warning_fraction", k.memory_warning_fraction);
    t.read("device_warning_fraction", k.device_warning_fraction);
    t.read("starvation_seconds", k.starvation_seconds);
    t.read("priority_aging_seconds", k.priority_aging_seconds);
    t.read("temp_dir", k.temp_dir);
    t.finish();
  }
  {
    MapReader e = top.child("executor");
    e.read("worker_threads", c.executor.worker_threads);
    e.read("worker_linger_us", c.executor.worker_linger_us);
    e.finish();
  }
  {
    MapReader d = top.child("devices");
    auto& k = c.devices;
    d.read("probe_cpu", k.probe_cpu);
    d.read("probe_nvidia", k.probe_nvidia);
    d.read("nvml_library", k.nvml_library);
    d.read("cpu_memory_mb", k.cpu_memory_mb);
    d.read("cpu_memory_fraction", k.cpu_memory_fraction);
    YAML::Node list = d.raw("declared");
    if (list && !list.IsNull()) {
      const std::string path = join(d.path(), "declared");
      if (!list.IsSequence()) {
        throw ConfigError(
            path, MapReader::line_of(list),
            MapReader::fmt_msg(path, std::string("must be a list, got ") + node_kind(list)));
      }
      for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string ipath = path + "[" + std::to_string(i) + "]";
        MapReader item(list[i], ipath, lines);
        lines[ipath] = MapReader::line_of(list[i]);
        DeclaredDevice dev{"", "", 0};
        item.read("id", dev.id);
        item.read("kind", dev.kind);
        item.read("memory_mb", dev.memory_mb);
        item.finish();
        k.declared.push_back(std::move(dev));
      }
    }
    d.finish();
  }
  {
    MapReader p = top.child("pools");
    read_pool(p.child("defaults"), c.pools.defaults);
    YAML::Node devs = p.raw("devices");
    if (devs && !devs.IsNull()) {
      const std::string path = join(p.path(), "devices");
      if (!devs.IsMap()) {
        throw ConfigError(
            path, MapReader::line_of(devs),
            MapReader::fmt_msg(path, std::string("must be a mapping, got ") + node_kind(devs)));
      }
      for (const auto& kv : devs) {
        const std::string id = kv.first.as<std::string>();
        PoolSettings s = c.pools.defaults;
        lines[join(path, id)] = MapReader::line_of(kv.first);
        read_pool(MapReader(kv.second, join(path, id), lines), s);
        c.pools.devices[id] = s;
      }
    }
    p.finish();
  }
  {
    MapReader s = top.child("storage");
    s.read("path", c.storage.path);
    s.read_enum("synchronous", c.storage.synchronous, kSyncNames);
    s.read("busy_timeout_seconds", c.storage.busy_timeout_seconds);
    s.read("retention_days", c.storage.retention_days);
    s.read_enum("vacuum", c.storage.vacuum, kVacuumNames);
    s.read("max_size_mb", c.storage.max_size_mb);
    s.read("wal_max_mb", c.storage.wal_max_mb);
    s.read("max_backlog", c.storage.max_backlog);
    s.read("url", c.storage.url);
    s.read("allow_other_tables", c.storage.allow_other_tables);
    {
      MapReader a = s.child("adopt");
      a.read("default_service", c.storage.adopt.default_service);
      MapReader m = a.child("status_map");
      if (m.present()) {
        for (const auto& kv : m.raw_node()) {
          const std::string word = kv.first.as<std::string>();
          std::string to;
          m.read(word, to);
          c.storage.adopt.status_map[word] = to;
        }
      }
      m.finish();
      a.finish();
    }
    MapReader pg = s.child("postgres");
    auto& k = c.storage.postgres;
    pg.read("schema", k.schema);
    pg.read("read_connections", k.read_connections);
    pg.read("statement_timeout_seconds", k.statement_timeout_seconds);
    pg.read("connect_timeout_seconds", k.connect_timeout_seconds);
    pg.read("allow_other_tables", k.allow_other_tables);
    pg.finish();
    s.read("shared", c.storage.shared);
    MapReader cl = s.child("cluster");
    auto& h = c.storage.cluster;
    cl.read("host_name", h.host_name);
    cl.read("lease_seconds", h.lease_seconds);
    cl.read("heartbeat_seconds", h.heartbeat_seconds);
    cl.read("poll_seconds", h.poll_seconds);
    cl.read("rescue_batch", h.rescue_batch);
    cl.finish();
    s.finish();
  }
  {
    MapReader o = top.child("ocr");
    o.read("tessdata_path", c.ocr.tessdata_path);
    o.read("languages", c.ocr.languages);
    o.read("page_segmentation_mode", c.ocr.page_segmentation_mode);
    o.read("max_pixels", c.ocr.max_pixels);
    o.read("pdf_dpi", c.ocr.pdf_dpi);
    o.read("orientation", c.ocr.orientation);
    MapReader pp = o.child("preprocess");
    pp.read("grayscale", c.ocr.preprocess.grayscale);
    pp.read("target_dpi", c.ocr.preprocess.target_dpi);
    pp.read("deskew", c.ocr.preprocess.deskew);
    pp.read("binarize", c.ocr.preprocess.binarize);
    pp.finish();
    o.finish();
  }
  {
    YAML::Node svcs = top.raw("services");
    if (svcs && !svcs.IsNull()) {
      const std::string path = "services";
      if (!svcs.IsMap()) {
        throw ConfigError(
            path, MapReader::line_of(svcs),
            MapReader::fmt_msg(path, std::string("must be a mapping, got ") + node_kind(svcs)));
      }
      for (const auto& kv : svcs) {
        const std::string kind = kv.first.as<std::string>();
        lines[join(path, kind)] = MapReader::line_of(kv.first);
        MapReader r(kv.second, join(path, kind), lines);
        ServiceConfig sc;
        r.read("isolation", sc.isolation);
        r.read("library", sc.library);
        r.read("worker_executable", sc.worker_executable);
        r.read("memory_limit_mb", sc.memory_limit_mb);
        r.read("start_timeout_seconds", sc.start_timeout_seconds);
        r.read("rate_limit_per_second", sc.rate_limit_per_second);
        r.read("rate_limit_burst", sc.rate_limit_burst);
        if (YAML::Node m = r.raw("memory_model"); m && !m.IsNull()) {
          MapReader mr = r.child("memory_model");
          ServiceConfig::MemoryModel mm;
          mr.read("base_mb", mm.base_mb);
          mr.read("per_page_mb", mm.per_page_mb);
          mr.read("per_mpixel_mb", mm.per_mpixel_mb);
          mr.read("per_input_mb", mm.per_input_mb);
          mr.finish();
          sc.memory_model = mm;
        }
        if (YAML::Node pn = r.raw("pool"); pn && !pn.IsNull()) {
          MapReader pr = r.child("pool");
          read_pool_override(pr, sc.pool);
          YAML::Node devs = pr.raw("devices");
          if (devs && !devs.IsNull()) {
            const std::string dpath = join(pr.path(), "devices");
            if (!devs.IsMap()) {
              throw ConfigError(dpath, MapReader::line_of(devs),
                                MapReader::fmt_msg(dpath, std::string("must be a mapping, got ") +
                                                              node_kind(devs)));
            }
            for (const auto& dv : devs) {
              const std::string id = dv.first.as<std::string>();
              lines[join(dpath, id)] = MapReader::line_of(dv.first);
              MapReader dr(dv.second, join(dpath, id), lines);
              read_pool_override(dr, sc.pool.devices[id]);
              dr.finish();
            }
          }
          pr.finish();
        }
        if (YAML::Node d = r.raw("device_kinds"); d && !d.IsNull()) {
          const std::string dpath = join(join(path, kind), "device_kinds");
          lines[dpath] = MapReader::line_of(d);
          if (!d.IsSequence()) {
            throw ConfigError(
                dpath, MapReader::line_of(d),
                MapReader::fmt_msg(dpath, std::string("must be a list, got ") + node_kind(d)));
          }
          for (const auto& item : d) {
            if (!item.IsScalar()) {
              throw ConfigError(dpath, MapReader::line_of(item),
                                MapReader::fmt_msg(dpath, "must be a list of device kinds"));
            }
            sc.device_kinds.push_back(item.as<std::string>());
          }
        }
        r.finish();
        c.services[kind] = sc;
      }
    }
  }
  {
    MapReader l = top.child("logging");
    l.read("level", c.logging.level);
    l.finish();
  }
  {
    // taskmgr-http's section: a mapping, kept as text (the server checks
    // its keys against the file, with their lines).
    MapReader h = top.child("http");
    if (h.present()) c.http_yaml = YAML::Dump(h.raw_node());
  }
  top.finish();
  return c;
}

[[noreturn]] void invalid(const std::string& path, const std::string& what) {
  throw ConfigError(path, 0, path + ": " + what);
}

std::string num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

void check_positive(const std::string& path, double v) {
  if (!(v > 0) || !std::isfinite(v)) invalid(path, "must be > 0, got " + num(v));
}

void validate_pool(const std::string& path, const PoolSettings& p) {
  if (p.min_instances < 0) {
    invalid(path + ".min_instances", "must be >= 0, got " + std::to_string(p.min_instances));
  }
  if (p.max_instances < 0) {
    invalid(path + ".max_instances",
            "must be >= 0 (0 = auto), got " + std::to_string(p.max_instances));
  }
  if (p.max_instances > 0 && p.min_instances > p.max_instances) {
    invalid(path + ".min_instances", "must be <= max_instances (" +
                                         std::to_string(p.max_instances) + "), got " +
                                         std::to_string(p.min_instances));
  }
  check_positive(path + ".acquire_timeout_seconds", p.acquire_timeout_seconds);
}

bool valid_device_id(const std::string& id) {
  if (id == "cpu") return true;
  const auto colon = id.find(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == id.size()) return false;
  for (std::size_t i = colon + 1; i < id.size(); ++i) {
    if (id[i] < '0' || id[i] > '9') return false;
  }
  for (std::size_t i = 0; i < colon; ++i) {
    const char ch = id[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_')) return false;
  }
  return true;
}

}  // namespace

std::string_view to_string(QueueOrdering o) noexcept {
  return detail::enum_name(kOrderingNames, o);
}
std::optional<QueueOrdering> parse_queue_ordering(std::string_view s) noexcept {
  return detail::enum_parse(kOrderingNames, s);
}
std::string_view to_string(SyncMode m) noexcept { return detail::enum_name(kSyncNames, m); }
std::optional<SyncMode> parse_sync_mode(std::string_view s) noexcept {
  return detail::enum_parse(kSyncNames, s);
}
std::string_view to_string(VacuumMode m) noexcept { return detail::enum_name(kVacuumNames, m); }
std::optional<VacuumMode> parse_vacuum_mode(std::string_view s) noexcept {
  return detail::enum_parse(kVacuumNames, s);
}

PoolSettings PoolOverride::over(PoolSettings base) const {
  if (min_instances) base.min_instances = *min_instances;
  if (max_instances) base.max_instances = *max_instances;
  if (acquire_timeout_seconds) base.acquire_timeout_seconds = *acquire_timeout_seconds;
  return base;
}

PoolsConfig Config::pools_for(const std::string& kind) const {
  auto sc = services.find(kind);
  if (sc == services.end()) return pools;
  const ServicePoolConfig& sp = sc->second.pool;
  PoolsConfig out;
  out.defaults = sp.over(pools.defaults);
  for (const auto& [id, s] : pools.devices) out.devices[id] = sp.over(s);
  for (const auto& [id, o] : sp.devices) out.devices[id] = o.over(sp.over(pools.for_device(id)));
  return out;
}

PoolSettings PoolsConfig::for_device(const std::string& device_id) const {
  auto it = devices.find(device_id);
  return it == devices.end() ? defaults : it->second;
}

ConfigError::ConfigError(std::string key_path, int line, const std::string& message)
    : Error(ErrorCode::kInvalidConfig, message), key_path_(std::move(key_path)), line_(line) {}
ConfigError::~ConfigError() = default;

Config Config::defaults() { return Config{}; }

void Config::validate() const {
  const auto& t = tasks;
  if (t.max_queue_size < 1) {
    invalid("tasks.max_queue_size", "must be >= 1, got " + std::to_string(t.max_queue_size));
  }
  check_positive("tasks.queue_timeout_seconds", t.queue_timeout_seconds);
  check_positive("tasks.cleanup_timeout_seconds", t.cleanup_timeout_seconds);
  if (!(t.close_grace_seconds >= 0) || !std::isfinite(t.close_grace_seconds)) {
    invalid(
        "tasks.close_grace_seconds",
        "must be >= 0 (0 = interrupt running tasks at once), got " + num(t.close_grace_seconds));
  }
  const auto& r = t.retry;
  if (r.max_interrupted_attempts < 1) {
    invalid("tasks.retry.max_interrupted_attempts",
            "must be >= 1, got " + std::to_string(r.max_interrupted_attempts));
  }
  if (r.max_attempts < 1) {
    invalid("tasks.retry.max_attempts", "must be >= 1, got " + std::to_string(r.max_attempts));
  }
  if (!(r.backoff_multiplier >= 1) || !std::isfinite(r.backoff_multiplier)) {
    invalid("tasks.retry.backoff_multiplier", "must be >= 1, got " + num(r.backoff_multiplier));
  }
  if (!(r.memory_reduction_factor > 0 && r.memory_reduction_factor < 1)) {
    invalid("tasks.retry.memory_reduction_factor",
            "must be in (0, 1), got " + num(r.memory_reduction_factor));
  }
  if (!(r.backoff_base_seconds >= 0) || !std::isfinite(r.backoff_base_seconds)) {
    invalid("tasks.retry.backoff_base_seconds", "must be >= 0, got " + num(r.backoff_base_seconds));
  }
  if (!(r.backoff_max_seconds >= r.backoff_base_seconds) || !std::isfinite(r.backoff_max_seconds)) {
    invalid("tasks.retry.backoff_max_seconds", "must be >= tasks.retry.backoff_base_seconds (" +
                                                   num(r.backoff_base_seconds) + "), got " +
                                                   num(r.backoff_max_seconds));
  }
  if (!(r.backoff_jitter >= 0 && r.backoff_jitter < 1)) {
    invalid("tasks.retry.backoff_jitter", "must be in [0, 1), got " + num(r.backoff_jitter));
  }
  if (t.max_task_memory_mb < 0) {
    invalid("tasks.max_task_memory_mb",
            "must be >= 0 (0 = no limit), got " + std::to_string(t.max_task_memory_mb));
  }
  check_positive("tasks.memory_warning_fraction", t.memory_warning_fraction);
  if (!(t.device_warning_fraction > 0 && t.device_warning_fraction <= 1)) {
    invalid("tasks.device_warning_fraction",
            "must be in (0, 1], got " + num(t.device_warning_fraction));
  }
  check_positive("tasks.starvation_seconds", t.starvation_seconds);
  if (!(t.priority_aging_seconds >= 0) || !(t.priority_aging_seconds <= 86400.0 * 365)) {
    invalid("tasks.priority_aging_seconds",
            "must be >= 0 (0 = no aging) and at most a year (31536000), got " +
                num(t.priority_aging_seconds));
  }
  if (!(t.task_timeout_seconds >= 0) || !std::isfinite(t.task_timeout_seconds)) {
    invalid("tasks.task_timeout_seconds",
            "must be >= 0 (0 = no deadline), got " + num(t.task_timeout_seconds));
  }

  if (executor.worker_threads < 0 || executor.worker_threads > 1024) {
    invalid("executor.worker_threads", "must be in [0, 1024] (0 = number of CPUs), got " +
                                           std::to_string(executor.worker_threads));
  }
  if (executor.worker_linger_us < 0 || executor.worker_linger_us > 1'000'000) {
    invalid("executor.worker_linger_us", "must be in [0, 1000000] (0 = no linger), got " +
                                             std::to_string(executor.worker_linger_us));
  }

  if (devices.cpu_memory_mb < 0) {
    invalid("devices.cpu_memory_mb",
            "must be >= 0 (0 = probe), got " + std::to_string(devices.cpu_memory_mb));
  }
  if (!(devices.cpu_memory_fraction > 0 && devices.cpu_memory_fraction <= 1)) {
    invalid("devices.cpu_memory_fraction",
            "must be in (0, 1], got " + num(devices.cpu_memory_fraction));
  }
  std::set<std::string> ids;
  for (std::size_t i = 0; i < devices.declared.size(); ++i) {
    const auto& d = devices.declared[i];
    const std::string p = "devices.declared[" + std::to_string(i) + "]";
    if (!valid_device_id(d.id)) {
      invalid(p + ".id", "must be 'cpu' or '<kind>:<index>' such as 'cuda:0', got '" + d.id + "'");
    }
    if (d.kind != "cpu" && d.kind != "gpu") {
      invalid(p + ".kind", "must be one of cpu, gpu, got '" + d.kind + "'");
    }
    if ((d.id == "cpu") != (d.kind == "cpu")) {
      invalid(p + ".kind", "device 'cpu' must have kind cpu and only it, got id '" + d.id +
                               "' with kind '" + d.kind + "'");
    }
    if (d.memory_mb <= 0) {
      invalid(p + ".memory_mb", "must be > 0, got " + std::to_string(d.memory_mb));
    }
    if (!ids.insert(d.id).second) invalid(p + ".id", "duplicate device id '" + d.id + "'");
  }

  validate_pool("pools.defaults", pools.defaults);
  for (const auto& [id, s] : pools.devices) {
    if (!valid_device_id(id)) {
      invalid("pools.devices." + id, "is not a device id ('cpu' or '<kind>:<index>')");
    }
    validate_pool("pools.devices." + id, s);
  }

  if (storage.path.empty()) invalid("storage.path", "must not be empty (use ':memory:')");
  if (!storage.url.empty()) {
    // The URL may hold a password: no message here shows it.
    if (storage.path != StorageConfig{}.path) {
      invalid("storage.url",
              "and storage.path are both set: give one (storage.url selects PostgreSQL, "
              "storage.path SQLite or ':memory:')");
    }
    const bool url_form =
        storage.url.rfind("postgresql://", 0) == 0 || storage.url.rfind("postgres://", 0) == 0;
    if (!url_form && storage.url.find('=') == std::string::npos) {
      invalid("storage.url",
              "must be a postgresql:// (or postgres://) URL or libpq key=value pairs "
              "(e.g. 'host=db.example dbname=taskmgr')");
    }
    if (auto problem = detail::pg::conninfo_problem(storage.url)) {
      invalid("storage.url", "is not a valid PostgreSQL connection string: " + *problem);
    }
    if (storage.synchronous != SyncMode::kNormal) {
      invalid("storage.synchronous",
              "applies to the SQLite store only; with storage.url the PostgreSQL server's "
              "settings decide (taskmgr's sessions commit with synchronous_commit = on)");
    }
    if (storage.max_size_mb != 0) {
      invalid("storage.max_size_mb", "applies to the SQLite store only (storage.url is set)");
    }
    if (storage.wal_max_mb != StorageConfig{}.wal_max_mb) {
      invalid("storage.wal_max_mb", "applies to the SQLite store only (storage.url is set)");
    }
    if (storage.vacuum != StorageConfig{}.vacuum) {
      invalid("storage.vacuum",
              "applies to the SQLite store only (storage.url is set: PostgreSQL's autovacuum "
              "reclaims deleted rows)");
    }
  }
  {
    const auto& p = storage.postgres;
    if (p.schema.size() > 63) {
      invalid("storage.postgres.schema",
              "must be at most 63 bytes (PostgreSQL's longest name), got " +
                  std::to_string(p.schema.size()));
    }
    if (p.read_connections < 1 || p.read_connections > 64) {
      invalid("storage.postgres.read_connections",
              "must be in [1, 64], got " + std::to_string(p.read_connections));
    }
    if (!(p.statement_timeout_seconds >= 0) || !std::isfinite(p.statement_timeout_seconds)) {
      invalid("storage.postgres.statement_timeout_seconds",
              "must be >= 0 (0 = no limit), got " + num(p.statement_timeout_seconds));
    }
    check_positive("storage.postgres.connect_timeout_seconds", p.connect_timeout_seconds);
  }
  if (storage.shared && storage.url.empty()) {
    invalid("storage.shared",
            "needs storage.url: hosts share a queue in a PostgreSQL database (a SQLite file "
            "is one process's)");
  }
  {
    const auto& h = storage.cluster;
    if (h.host_name.size() > 100) {
      invalid("storage.cluster.host_name",
              "must be at most 100 bytes, got " + std::to_string(h.host_name.size()));
    }
    if (auto at = detail::invalid_utf8_at(h.host_name)) {
      invalid("storage.cluster.host_name",
              "must be UTF-8 text, got an invalid byte at offset " + std::to_string(*at));
    }
    if (!h.host_name.empty() && h.host_name.find_first_not_of(' ') == std::string::npos) {
      invalid("storage.cluster.host_name",
              "must not be only spaces (\"\" means the machine's host name)");
    }
    for (std::size_t i = 0; i < h.host_name.size(); ++i) {
      const auto ch = static_cast<unsigned char>(h.host_name[i]);
      if (ch < 0x20 || ch == 0x7F) {
        invalid("storage.cluster.host_name", "must not contain control characters, got byte " +
                                                 std::to_string(ch) + " at offset " +
                                                 std::to_string(i));
      }
    }
    check_positive("storage.cluster.lease_seconds", h.lease_seconds);
    check_positive("storage.cluster.heartbeat_seconds", h.heartbeat_seconds);
    check_positive("storage.cluster.poll_seconds", h.poll_seconds);
    if (h.lease_seconds > 86400) {
      invalid("storage.cluster.lease_seconds",
              "must be at most 86400, got " + num(h.lease_seconds));
    }
    if (h.poll_seconds > 3600) {
      invalid("storage.cluster.poll_seconds", "must be at most 3600, got " + num(h.poll_seconds));
    }
    if (h.heartbeat_seconds > h.lease_seconds / 2) {
      invalid("storage.cluster.heartbeat_seconds",
              "must be at most half of storage.cluster.lease_seconds (" + num(h.lease_seconds) +
                  "): a lease is renewed at least twice before it runs out; got " +
                  num(h.heartbeat_seconds));
    }
    if (h.rescue_batch < 1 || h.rescue_batch > 100000) {
      invalid("storage.cluster.rescue_batch",
              "must be in [1, 100000], got " + std::to_string(h.rescue_batch));
    }
  }
  if (!storage.url.empty() && storage.allow_other_tables) {
    invalid("storage.allow_other_tables",
            "applies to the SQLite store only; with storage.url use "
            "storage.postgres.allow_other_tables");
  }
  for (const auto& [word, to] : storage.adopt.status_map) {
    const std::string path = "storage.adopt.status_map." + word;
    if (word.empty()) invalid("storage.adopt.status_map", "an old status word is empty");
    const auto own = parse_task_status(word);
    if (own)
      invalid(path, "'" + word + "' is taskmgr's own status word; only other words are mapped");
    const auto status = parse_task_status(to);
    if (!status || *status == TaskStatus::kUnrecognized) {
      invalid(path, "must be one of pending, queued, running, completed, failed, cancelled, got '" +
                        to + "'");
    }
  }
  if (storage.adopt.default_service.empty()) {
    invalid("storage.adopt.default_service", "must not be empty");
  }
  check_positive("storage.busy_timeout_seconds", storage.busy_timeout_seconds);
  if (storage.max_size_mb < 0)
    invalid("storage.max_size_mb",
            "must be >= 0 (0 = no limit), got " + std::to_string(storage.max_size_mb));
  if (storage.wal_max_mb < 1 || storage.wal_max_mb > 1024 * 1024)
    invalid("storage.wal_max_mb",
            "must be in [1, 1048576] (MiB), got " + std::to_string(storage.wal_max_mb));
  if (storage.max_backlog < 1)
    invalid("storage.max_backlog",
            "must be >= 1 (failed writes kept), got " + std::to_string(storage.max_backlog));
  if (!(storage.retention_days >= 0) || !std::isfinite(storage.retention_days)) {
    invalid("storage.retention_days",
            "must be >= 0 (0 = keep), got " + num(storage.retention_days));
  }

  if (ocr.languages.empty())
    invalid("ocr.languages", "must name at least one language, e.g. 'eng'");
  if (ocr.max_pixels <= 0) {
    invalid("ocr.max_pixels", "must be > 0, got " + std::to_string(ocr.max_pixels));
  }
  if (ocr.page_segmentation_mode < 0 || ocr.page_segmentation_mode > 13) {
    invalid("ocr.page_segmentation_mode",
            "must be in [0, 13], got " + std::to_string(ocr.page_segmentation_mode));
  }
  if (ocr.pdf_dpi < 72 || ocr.pdf_dpi > 1200) {
    invalid("ocr.pdf_dpi", "must be in [72, 1200], got " + std::to_string(ocr.pdf_dpi));
  }
  if (ocr.orientation != "auto" && ocr.orientation != "off" && ocr.orientation != "always") {
    invalid("ocr.orientation", "must be one of auto, off, always, got '" + ocr.orientation + "'");
  }
  if (ocr.preprocess.target_dpi < 0 || ocr.preprocess.target_dpi > 1200) {
    invalid("ocr.preprocess.target_dpi",
            "must be in [0, 1200] (0 = off), got " + std::to_string(ocr.preprocess.target_dpi));
  }

  for (const auto& [kind, sc] : services) {
    const std::string p = "services." + kind;
    if (kind.empty() || kind.size() > 100 || detail::invalid_utf8_at(kind) ||
        std::any_of(kind.begin(), kind.end(),
                    [](char ch) { return static_cast<unsigned char>(ch) < 0x20 || ch == 0x7F; })) {
      invalid(p, "is not a service kind (1..100 bytes of UTF-8 without control characters)");
    }
    if (sc.isolation != "auto" && sc.isolation != "in_process" && sc.isolation != "process") {
      invalid(p + ".isolation",
              "must be one of auto, in_process, process, got '" + sc.isolation + "'");
    }
    if (sc.isolation != "process") {
      if (!sc.library.empty()) {
        invalid(p + ".library", "is only read with isolation: process (the worker loads it)");
      }
    } else if (sc.library.empty() && kind != "ocr") {
      invalid(p + ".library",
              "must name the shared object that makes '" + kind +
                  "' instances in the worker (taskmgr_worker_factory): only ocr is built in");
    }
    if (sc.memory_limit_mb < 0) {
      invalid(p + ".memory_limit_mb",
              "must be >= 0 (0 = none), got " + std::to_string(sc.memory_limit_mb));
    } else if (sc.memory_limit_mb > 0 && sc.memory_limit_mb < 16) {
      invalid(p + ".memory_limit_mb",
              "must be 0 (none) or at least 16 (a worker does not start in less), got " +
                  std::to_string(sc.memory_limit_mb));
    }
    if (!(sc.start_timeout_seconds > 0) || !(sc.start_timeout_seconds <= 86400)) {
      invalid(p + ".start_timeout_seconds",
              "must be > 0 and at most 86400 (a day), got " + num(sc.start_timeout_seconds));
    }
    if (sc.memory_model) {
      const auto& m = *sc.memory_model;
      for (const auto& [key, v] : {std::pair<const char*, double>{"base_mb", m.base_mb},
                                   {"per_page_mb", m.per_page_mb},
                                   {"per_mpixel_mb", m.per_mpixel_mb},
                                   {"per_input_mb", m.per_input_mb}}) {
        if (!(v >= 0) || !std::isfinite(v)) {
          invalid(p + ".memory_model." + key, "must be >= 0, got " + num(v));
        }
      }
      if (!(m.base_mb + m.per_page_mb + m.per_mpixel_mb + m.per_input_mb > 0)) {
        invalid(p + ".memory_model", "estimates 0 MB for every task: give one figure above 0");
      }
    }
    {
      // The settings the kind's pool will have, on each device named.
      const PoolsConfig kp = pools_for(kind);
      if (!sc.pool.empty()) validate_pool(p + ".pool", kp.defaults);
      for (const auto& [id, s] : pools.devices) {
        if (!sc.pool.empty()) validate_pool(p + ".pool", kp.for_device(id));
      }
      for (const auto& [id, o] : sc.pool.devices) {
        if (!valid_device_id(id)) {
          invalid(p + ".pool.devices." + id, "is not a device id ('cpu' or '<kind>:<index>')");
        }
        validate_pool(p + ".pool.devices." + id, kp.for_device(id));
      }
    }
    if (!(sc.rate_limit_per_second >= 0) || !(sc.rate_limit_per_second <= 1e6)) {
      invalid(
          p + ".rate_limit_per_second",
          "must be >= 0 (0 = no limit) and at most 1000000, got " + num(sc.rate_limit_per_second));
    }
    if (sc.rate_limit_burst < 0 || sc.rate_limit_burst > 1000000) {
      invalid(p + ".rate_limit_burst", "must be in [0, 1000000] (0 = the rate, at least 1), got " +
                                           std::to_string(sc.rate_limit_burst));
    }
    if (sc.rate_limit_burst > 0 && sc.rate_limit_per_second == 0) {
      invalid(p + ".rate_limit_burst",
              "is set but rate_limit_per_second is 0 (no limit): set the rate too");
    }
    for (const std::string& k : sc.device_kinds) {
      if (k != "cpu" && k != "gpu") {
        invalid(p + ".device_kinds", "must list cpu and/or gpu, got '" + k + "'");
      }
    }
  }

  bool level_ok = false;
  for (auto l : kLogLevels) level_ok = level_ok || l == logging.level;
  if (!level_ok) {
    invalid("logging.level",
            "must be one of trace, debug, info, warn, error, off, got '" + logging.level + "'");
  }
  if (!http_yaml.empty()) {
    bool mapping = false;
    try {
      mapping = YAML::Load(http_yaml).IsMap();
    } catch (const YAML::Exception&) {
    }
    if (!mapping) invalid("http", "must be the YAML text of a mapping (taskmgr-http's settings)");
  }
}

Config Config::from_yaml_string(std::string_view yaml, std::string_view source_name) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::ParserException& e) {
    throw ConfigError("", e.mark.line + 1,
                      std::string(source_name) + ":" + std::to_string(e.mark.line + 1) +
                          ": invalid YAML: " + e.msg);
  }
  std::unordered_map<std::string, int> lines;
  try {
    Config c = parse_document(root, lines);
    c.validate();
    return c;
  } catch (const ConfigError& e) {
    int line = e.line();
    // The key's line; for a key that is missing (a required one), the line
    // of the nearest enclosing key that is there.
    for (std::string path = e.key_path(); line == 0 && !path.empty();) {
      if (auto it = lines.find(path); it != lines.end()) line = it->second;
      const auto dot = path.rfind('.');
      path = dot == std::string::npos ? std::string() : path.substr(0, dot);
    }
    std::string where(source_name);
    if (line > 0) where += ":" + std::to_string(line);
    throw ConfigError(e.key_path(), line, where + ": " + e.what());
  } catch (const YAML::Exception& e) {
    throw ConfigError(
        "", e.mark.line + 1,
        std::string(source_name) + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
}

Config Config::from_yaml_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw ConfigError("", 0, "cannot open configuration file '" + path + "'");
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw ConfigError("", 0, "cannot read configuration file '" + path + "'");
  return from_yaml_string(ss.str(), path);
}

std::string Config::to_yaml() const {
  YAML::Emitter e;
  e.SetDoublePrecision(15);  // 0.1, not 0.10000000000000001
  auto pool = [&e](const PoolSettings& p) {
    e << YAML::BeginMap;
    e << YAML::Key << "min_instances" << YAML::Value << p.min_instances;
    e << YAML::Key << "max_instances" << YAML::Value << p.max_instances;
    e << YAML::Key << "acquire_timeout_seconds" << YAML::Value << p.acquire_timeout_seconds;
    e << YAML::EndMap;
  };
  e << YAML::BeginMap;
  e << YAML::Key << "tasks" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "max_queue_size" << YAML::Value << tasks.max_queue_size;
  e << YAML::Key << "queue_timeout_seconds" << YAML::Value << tasks.queue_timeout_seconds;
  e << YAML::Key << "enable_priority_queue" << YAML::Value << tasks.enable_priority_queue;
  e << YAML::Key << "enable_resource_tracking" << YAML::Value << tasks.enable_resource_tracking;
  e << YAML::Key << "cleanup_timeout_seconds" << YAML::Value << tasks.cleanup_timeout_seconds;
  e << YAML::Key << "close_grace_seconds" << YAML::Value << tasks.close_grace_seconds;
  e << YAML::Key << "retry" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "max_attempts" << YAML::Value << tasks.retry.max_attempts;
  e << YAML::Key << "max_interrupted_attempts" << YAML::Value
    << tasks.retry.max_interrupted_attempts;
  e << YAML::Key << "backoff_multiplier" << YAML::Value << tasks.retry.backoff_multiplier;
  e << YAML::Key << "memory_reduction_factor" << YAML::Value << tasks.retry.memory_reduction_factor;
  e << YAML::Key << "backoff_base_seconds" << YAML::Value << tasks.retry.backoff_base_seconds;
  e << YAML::Key << "backoff_max_seconds" << YAML::Value << tasks.retry.backoff_max_seconds;
  e << YAML::Key << "backoff_jitter" << YAML::Value << tasks.retry.backoff_jitter;
  e << YAML::Key << "cpu_fallback" << YAML::Value << tasks.retry.cpu_fallback;
  e << YAML::EndMap;
  e << YAML::Key << "queue_ordering" << YAML::Value << std::string(to_string(tasks.queue_ordering));
  e << YAML::Key << "max_task_memory_mb" << YAML::Value << tasks.max_task_memory_mb;
  e << YAML::Key << "task_timeout_seconds" << YAML::Value << tasks.task_timeout_seconds;
  e << YAML::Key << "memory_warning_fraction" << YAML::Value << tasks.memory_warning_fraction;
  e << YAML::Key << "device_warning_fraction" << YAML::Value << tasks.device_warning_fraction;
  e << YAML::Key << "starvation_seconds" << YAML::Value << tasks.starvation_seconds;
  e << YAML::Key << "priority_aging_seconds" << YAML::Value << tasks.priority_aging_seconds;
  e << YAML::Key << "temp_dir" << YAML::Value << tasks.temp_dir;
  e << YAML::EndMap;

  e << YAML::Key << "executor" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "worker_threads" << YAML::Value << executor.worker_threads;
  e << YAML::Key << "worker_linger_us" << YAML::Value << executor.worker_linger_us;
  e << YAML::EndMap;

  e << YAML::Key << "devices" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "probe_cpu" << YAML::Value << devices.probe_cpu;
  e << YAML::Key << "probe_nvidia" << YAML::Value << devices.probe_nvidia;
  e << YAML::Key << "nvml_library" << YAML::Value << devices.nvml_library;
  e << YAML::Key << "cpu_memory_mb" << YAML::Value << devices.cpu_memory_mb;
  e << YAML::Key << "cpu_memory_fraction" << YAML::Value << devices.cpu_memory_fraction;
  e << YAML::Key << "declared" << YAML::Value << YAML::BeginSeq;
  for (const auto& d : devices.declared) {
    e << YAML::BeginMap << YAML::Key << "id" << YAML::Value << d.id << YAML::Key << "kind"
      << YAML::Value << d.kind << YAML::Key << "memory_mb" << YAML::Value << d.memory_mb
      << YAML::EndMap;
  }
  e << YAML::EndSeq << YAML::EndMap;

  e << YAML::Key << "pools" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "defaults" << YAML::Value;
  pool(pools.defaults);
  e << YAML::Key << "devices" << YAML::Value << YAML::BeginMap;
  for (const auto& [id, s] : pools.devices) {
    e << YAML::Key << id << YAML::Value;
    pool(s);
  }
  e << YAML::EndMap << YAML::EndMap;

  e << YAML::Key << "storage" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "path" << YAML::Value << storage.path;
  e << YAML::Key << "synchronous" << YAML::Value << std::string(to_string(storage.synchronous));
  e << YAML::Key << "busy_timeout_seconds" << YAML::Value << storage.busy_timeout_seconds;
  e << YAML::Key << "retention_days" << YAML::Value << storage.retention_days;
  e << YAML::Key << "vacuum" << YAML::Value << std::string(to_string(storage.vacuum));
  e << YAML::Key << "max_size_mb" << YAML::Value << storage.max_size_mb;
  e << YAML::Key << "wal_max_mb" << YAML::Value << storage.wal_max_mb;
  e << YAML::Key << "max_backlog" << YAML::Value << storage.max_backlog;
  e << YAML::Key << "url" << YAML::Value << storage.url;
  e << YAML::Key << "allow_other_tables" << YAML::Value << storage.allow_other_tables;
  e << YAML::Key << "adopt" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "status_map" << YAML::Value << YAML::BeginMap;
  for (const auto& [word, to] : storage.adopt.status_map)
    e << YAML::Key << word << YAML::Value << to;
  e << YAML::EndMap;
  e << YAML::Key << "default_service" << YAML::Value << storage.adopt.default_service;
  e << YAML::EndMap;
  e << YAML::Key << "postgres" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "schema" << YAML::Value << storage.postgres.schema;
  e << YAML::Key << "read_connections" << YAML::Value << storage.postgres.read_connections;
  e << YAML::Key << "statement_timeout_seconds" << YAML::Value
    << storage.postgres.statement_timeout_seconds;
  e << YAML::Key << "connect_timeout_seconds" << YAML::Value
    << storage.postgres.connect_timeout_seconds;
  e << YAML::Key << "allow_other_tables" << YAML::Value << storage.postgres.allow_other_tables;
  e << YAML::EndMap;
  e << YAML::Key << "shared" << YAML::Value << storage.shared;
  e << YAML::Key << "cluster" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "host_name" << YAML::Value << storage.cluster.host_name;
  e << YAML::Key << "lease_seconds" << YAML::Value << storage.cluster.lease_seconds;
  e << YAML::Key << "heartbeat_seconds" << YAML::Value << storage.cluster.heartbeat_seconds;
  e << YAML::Key << "poll_seconds" << YAML::Value << storage.cluster.poll_seconds;
  e << YAML::Key << "rescue_batch" << YAML::Value << storage.cluster.rescue_batch;
  e << YAML::EndMap;
  e << YAML::EndMap;

  e << YAML::Key << "ocr" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "tessdata_path" << YAML::Value << ocr.tessdata_path;
  e << YAML::Key << "languages" << YAML::Value << ocr.languages;
  e << YAML::Key << "page_segmentation_mode" << YAML::Value << ocr.page_segmentation_mode;
  e << YAML::Key << "max_pixels" << YAML::Value << ocr.max_pixels;
  e << YAML::Key << "pdf_dpi" << YAML::Value << ocr.pdf_dpi;
  e << YAML::Key << "orientation" << YAML::Value << ocr.orientation;
  e << YAML::Key << "preprocess" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "grayscale" << YAML::Value << ocr.preprocess.grayscale;
  e << YAML::Key << "target_dpi" << YAML::Value << ocr.preprocess.target_dpi;
  e << YAML::Key << "deskew" << YAML::Value << ocr.preprocess.deskew;
  e << YAML::Key << "binarize" << YAML::Value << ocr.preprocess.binarize;
  e << YAML::EndMap << YAML::EndMap;

  e << YAML::Key << "services" << YAML::Value << YAML::BeginMap;
  for (const auto& [kind, sc] : services) {
    e << YAML::Key << kind << YAML::Value << YAML::BeginMap;
    e << YAML::Key << "isolation" << YAML::Value << sc.isolation;
    e << YAML::Key << "library" << YAML::Value << sc.library;
    e << YAML::Key << "worker_executable" << YAML::Value << sc.worker_executable;
    e << YAML::Key << "memory_limit_mb" << YAML::Value << sc.memory_limit_mb;
    e << YAML::Key << "start_timeout_seconds" << YAML::Value << sc.start_timeout_seconds;
    e << YAML::Key << "rate_limit_per_second" << YAML::Value << sc.rate_limit_per_second;
    e << YAML::Key << "rate_limit_burst" << YAML::Value << sc.rate_limit_burst;
    if (sc.memory_model) {
      e << YAML::Key << "memory_model" << YAML::Value << YAML::BeginMap;
      e << YAML::Key << "base_mb" << YAML::Value << sc.memory_model->base_mb;
      e << YAML::Key << "per_page_mb" << YAML::Value << sc.memory_model->per_page_mb;
      e << YAML::Key << "per_mpixel_mb" << YAML::Value << sc.memory_model->per_mpixel_mb;
      e << YAML::Key << "per_input_mb" << YAML::Value << sc.memory_model->per_input_mb;
      e << YAML::EndMap;
    }
    if (!sc.device_kinds.empty()) {
      e << YAML::Key << "device_kinds" << YAML::Value << YAML::Flow << sc.device_kinds;
    }
    auto pool_override = [&e](const PoolOverride& o) {
      if (o.min_instances) e << YAML::Key << "min_instances" << YAML::Value << *o.min_instances;
      if (o.max_instances) e << YAML::Key << "max_instances" << YAML::Value << *o.max_instances;
      if (o.acquire_timeout_seconds) {
        e << YAML::Key << "acquire_timeout_seconds" << YAML::Value << *o.acquire_timeout_seconds;
      }
    };
    if (!sc.pool.empty() || !sc.pool.devices.empty()) {
      e << YAML::Key << "pool" << YAML::Value << YAML::BeginMap;
      pool_override(sc.pool);
      if (!sc.pool.devices.empty()) {
        e << YAML::Key << "devices" << YAML::Value << YAML::BeginMap;
        for (const auto& [id, o] : sc.pool.devices) {
          e << YAML::Key << id << YAML::Value << YAML::BeginMap;
          pool_override(o);
          e << YAML::EndMap;
        }
        e << YAML::EndMap;
      }
      e << YAML::EndMap;
    }
    e << YAML::EndMap;
  }
  e << YAML::EndMap;

  e << YAML::Key << "logging" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "level" << YAML::Value << logging.level;
  e << YAML::EndMap;
  if (!http_yaml.empty()) e << YAML::Key << "http" << YAML::Value << YAML::Load(http_yaml);
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace taskmgr
