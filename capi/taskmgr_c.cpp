// The extern "C" facade. Every body runs inside capi::guarded().
#include "taskmgr.h"

#include <algorithm>
#include <atomic>
#include <boost/json.hpp>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "guard.hpp"
#include "host_call.hpp"
#include "input_requirement.hpp"
#include "sync.hpp"
#include "taskmgr/taskmgr.hpp"  // also defines TASKMGR_VERSION_*: must match taskmgr.h
#include "utf8.hpp"

static_assert(TASKMGR_OK == static_cast<int>(taskmgr::ErrorCode::kOk));
static_assert(TASKMGR_E_INVALID_ARGUMENT == static_cast<int>(taskmgr::ErrorCode::kInvalidArgument));
static_assert(TASKMGR_E_NOT_FOUND == static_cast<int>(taskmgr::ErrorCode::kNotFound));
static_assert(TASKMGR_E_QUEUE_FULL == static_cast<int>(taskmgr::ErrorCode::kQueueFull));
static_assert(TASKMGR_E_OUT_OF_MEMORY == static_cast<int>(taskmgr::ErrorCode::kOutOfMemory));
static_assert(TASKMGR_E_TIMEOUT == static_cast<int>(taskmgr::ErrorCode::kTimeout));
static_assert(TASKMGR_E_BUSY == static_cast<int>(taskmgr::ErrorCode::kBusy));
static_assert(TASKMGR_E_INVALID_CONFIG == static_cast<int>(taskmgr::ErrorCode::kInvalidConfig));
static_assert(TASKMGR_E_IO == static_cast<int>(taskmgr::ErrorCode::kIoError));
static_assert(TASKMGR_E_DEVICE_UNAVAILABLE ==
              static_cast<int>(taskmgr::ErrorCode::kDeviceUnavailable));
static_assert(TASKMGR_E_MEMORY_LIMIT_EXCEEDED ==
              static_cast<int>(taskmgr::ErrorCode::kMemoryLimitExceeded));
static_assert(TASKMGR_E_POOL_EXHAUSTED == static_cast<int>(taskmgr::ErrorCode::kPoolExhausted));
static_assert(TASKMGR_E_INVALID_STATE == static_cast<int>(taskmgr::ErrorCode::kInvalidState));
static_assert(TASKMGR_E_INCOMPATIBLE == static_cast<int>(taskmgr::ErrorCode::kIncompatible));
static_assert(TASKMGR_E_CANCELLED == static_cast<int>(taskmgr::ErrorCode::kCancelled));
static_assert(TASKMGR_E_UNSUPPORTED == static_cast<int>(taskmgr::ErrorCode::kUnsupported));
static_assert(TASKMGR_E_UNPERSISTED == static_cast<int>(taskmgr::ErrorCode::kUnpersisted));
static_assert(TASKMGR_E_INTERNAL == static_cast<int>(taskmgr::ErrorCode::kInternal));

namespace taskmgr::capi {

std::string& last_error() {
  thread_local std::string message;
  return message;
}

int fail(int status, std::string message) {
  // Messages quote what the caller gave (a device, a key, a path): a bad
  // byte there must not make the message itself invalid UTF-8.
  if (taskmgr::detail::invalid_utf8_at(message)) message = taskmgr::detail::to_valid_utf8(message);
  last_error() = std::move(message);
  return status;
}

char* dup_string(const std::string& s) {
  auto* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p == nullptr) throw std::bad_alloc();
  std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

}  // namespace taskmgr::capi

static_assert(TASKMGR_TASK_PENDING == static_cast<int>(taskmgr::TaskStatus::kPending));
static_assert(TASKMGR_TASK_CANCELLED == static_cast<int>(taskmgr::TaskStatus::kCancelled));
static_assert(TASKMGR_TASK_UNRECOGNIZED == static_cast<int>(taskmgr::TaskStatus::kUnrecognized));
static_assert(TASKMGR_REASON_NONE == static_cast<int>(taskmgr::TaskFailureReason::kNone));
static_assert(TASKMGR_REASON_INVALID_INPUT ==
              static_cast<int>(taskmgr::TaskFailureReason::kInvalidInput));
static_assert(TASKMGR_REASON_INTERRUPTED ==
              static_cast<int>(taskmgr::TaskFailureReason::kInterrupted));
static_assert(TASKMGR_REASON_OUT_OF_MEMORY ==
              static_cast<int>(taskmgr::TaskFailureReason::kOutOfMemory));
static_assert(TASKMGR_REASON_MEMORY_LIMIT_EXCEEDED ==
              static_cast<int>(taskmgr::TaskFailureReason::kMemoryLimitExceeded));
static_assert(TASKMGR_REASON_HOST_LOST == static_cast<int>(taskmgr::TaskFailureReason::kHostLost));
static_assert(TASKMGR_EVENT_CREATED == static_cast<int>(taskmgr::TaskEvent::kCreated));
static_assert(TASKMGR_EVENT_DEVICE_FALLBACK ==
              static_cast<int>(taskmgr::TaskEvent::kDeviceFallback));
static_assert(TASKMGR_EVENT_CLEANUP_COMPLETED ==
              static_cast<int>(taskmgr::TaskEvent::kCleanupCompleted));
static_assert(TASKMGR_EVENT_PRIORITY_CHANGED ==
              static_cast<int>(taskmgr::TaskEvent::kPriorityChanged));
static_assert(TASKMGR_EVENT_DELETED == static_cast<int>(taskmgr::TaskEvent::kDeleted));
static_assert(TASKMGR_EVENT_RESUMED == static_cast<int>(taskmgr::TaskEvent::kResumed));
static_assert(TASKMGR_PAUSE_MANAGER == static_cast<int>(taskmgr::PauseScope::kManager));
static_assert(TASKMGR_PAUSE_SERVICE == static_cast<int>(taskmgr::PauseScope::kService));
static_assert(TASKMGR_LOG_TRACE == static_cast<int>(taskmgr::LogLevel::kTrace));
static_assert(TASKMGR_LOG_ERROR == static_cast<int>(taskmgr::LogLevel::kError));

using taskmgr::capi::dup_string;
using taskmgr::capi::fail;
using taskmgr::capi::guarded;

namespace {

namespace json = boost::json;

// True when a versioned struct of `size` bytes has the member at
// [offset, offset + width): fields a caller's older header lacks keep
// their defaults.
constexpr bool has_field(std::size_t size, std::size_t offset, std::size_t width) {
  return size >= offset + width;
}
#define TASKMGR_HAS(ptr, member)                                                        \
  has_field((ptr)->struct_size, offsetof(std::remove_pointer_t<decltype(ptr)>, member), \
            sizeof((ptr)->member))

// The size of each versioned struct's first version (0.1.0): a smaller
// struct_size is no header's, but garbage. Fields are only ever appended.
#define TASKMGR_END_OF(type, member) (offsetof(type, member) + sizeof(std::declval<type>().member))
template <typename T>
constexpr std::size_t first_version_size();
template <>
constexpr std::size_t first_version_size<taskmgr_open_options>() {
  return TASKMGR_END_OF(taskmgr_open_options, log_free);
}
template <>
constexpr std::size_t first_version_size<taskmgr_task_request>() {
  return TASKMGR_END_OF(taskmgr_task_request, options_json);
}
template <>
constexpr std::size_t first_version_size<taskmgr_start_params>() {
  return TASKMGR_END_OF(taskmgr_start_params, options_json);
}
template <>
constexpr std::size_t first_version_size<taskmgr_list_params>() {
  return TASKMGR_END_OF(taskmgr_list_params, with_results);
}
template <>
constexpr std::size_t first_version_size<taskmgr_service>() {
  return TASKMGR_END_OF(taskmgr_service, memory_per_input_mb);
}

// Refuses a versioned struct whose struct_size was not set, is smaller than
// its first version (not a size any header had), or is larger than this
// library knows (a header newer than the library).
template <typename T>
void check_struct(const T* p, const char* function, const char* type) {
  if (p->struct_size == 0) {
    throw taskmgr::Error(taskmgr::ErrorCode::kInvalidArgument,
                         std::string(function) + ": " + type +
                             ".struct_size is 0 (initialise it with " + type + "_init)");
  }
  if (p->struct_size < first_version_size<T>()) {
    throw taskmgr::Error(taskmgr::ErrorCode::kInvalidArgument,
                         std::string(function) + ": " + type + ".struct_size is " +
                             std::to_string(p->struct_size) + ", smaller than any version of " +
                             type + " (" + std::to_string(first_version_size<T>()) +
                             " bytes or more; initialise it with " + type + "_init)");
  }
  if (p->struct_size > sizeof(T)) {
    throw taskmgr::Error(taskmgr::ErrorCode::kIncompatible,
                         std::string(function) + ": " + type + ".struct_size is " +
                             std::to_string(p->struct_size) + ", larger than this library's " +
                             std::to_string(sizeof(T)) +
                             ": the header is newer than the library (" TASKMGR_VERSION_STRING ")");
  }
}

[[noreturn]] void throw_invalid(const std::string& message) {
  throw taskmgr::Error(taskmgr::ErrorCode::kInvalidArgument, message);
}

void require(const void* p, const char* function, const char* name) {
  if (p == nullptr) throw_invalid(std::string(function) + ": " + name + " is NULL");
}

template <typename E>
const char* enum_name(int value, int last) {
  if (value < 0 || value > last) return "unknown";
  return taskmgr::to_string(static_cast<E>(value)).data();  // literals: NUL-terminated
}

taskmgr::Duration timeout_from_seconds(double s) {
  if (!(s >= 0)) return std::chrono::hours(24 * 365 * 10);  // negative: no limit (NaN refused)
  if (s > 1e9) s = 1e9;
  return std::chrono::duration_cast<taskmgr::Duration>(std::chrono::duration<double>(s));
}

// ---- event subscriptions ----------------------------------------------------
struct Subscription;
thread_local Subscription* tls_delivering = nullptr;  // the callback running on this thread

struct Subscription {
  taskmgr_event_fn fn = nullptr;
  void* user_data = nullptr;
  taskmgr_free_fn free_fn = nullptr;
  taskmgr::SubscriptionId id = 0;
  std::atomic<bool> ended{false};
  std::atomic<bool> released{false};

  // Calls free_fn once, when fn will not run again.
  void release() noexcept {
    if (!released.exchange(true) && free_fn != nullptr) {
      TASKMGR_HOST_CALL("taskmgr_c: event free_user_data");
      free_fn(user_data);
    }
  }
  ~Subscription() { release(); }

  void deliver(const taskmgr::EventRecord& ev) {
    if (ended.load(std::memory_order_acquire)) return;
    const std::string timestamp = taskmgr::format_timestamp(ev.timestamp);
    const std::string whole = taskmgr::to_json(ev);
    taskmgr_event e{};
    e.struct_size = sizeof(e);
    e.sequence = ev.sequence;
    e.task_id = ev.task_id.c_str();
    e.event = static_cast<int32_t>(ev.event);
    e.event_type = taskmgr::to_string(ev.event).data();
    e.timestamp_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(ev.timestamp.time_since_epoch())
            .count();
    e.timestamp = timestamp.c_str();
    e.details_json = ev.details_json.c_str();
    e.json = whole.c_str();
    tls_delivering = this;
    TASKMGR_HOST_CALL("taskmgr_c: event callback");
    fn(&e, user_data);
    tls_delivering = nullptr;
    // Unsubscribed from inside its own callback: free now that it returned.
    if (ended.load(std::memory_order_acquire)) release();
  }
};

// ---- the log callback --------------------------------------------------------
struct LogTarget {
  taskmgr_log_fn fn = nullptr;
  void* user_data = nullptr;
  taskmgr_free_fn free_fn = nullptr;
  ~LogTarget() {
    if (free_fn != nullptr) {
      TASKMGR_HOST_CALL("taskmgr_c: log free_user_data");
      free_fn(user_data);
    }
  }
};

// ---- host services -------------------------------------------------------------
struct ServiceDef {
  taskmgr_service s{};
  std::string kind;
  // Set once the registration succeeded: only then does the library own
  // user_data (a refused registration leaves it to the caller).
  std::atomic<bool> owned{false};
  ~ServiceDef() {
    if (owned.load() && s.free_user_data != nullptr) {
      TASKMGR_HOST_CALL("taskmgr_c: service free_user_data");
      s.free_user_data(s.user_data);
    }
  }
};

}  // namespace

// The context handed to a host service's process(): the C++ context plus
// what the C side cannot throw.
struct taskmgr_task_context {
  taskmgr::TaskContext* ctx = nullptr;
  std::string error_message;
  std::exception_ptr pending;  // a failure report_memory or temp_dir raised
  std::string path_or_null;
};

namespace {

class CService final : public taskmgr::Service {
 public:
  CService(std::shared_ptr<const ServiceDef> def, void* instance, std::string device)
      : def_(std::move(def)), instance_(instance), device_(std::move(device)) {}
  ~CService() override {
    if (def_->s.destroy_instance != nullptr) {
      TASKMGR_HOST_CALL("taskmgr_c: service destroy_instance");
      def_->s.destroy_instance(def_->s.user_data, instance_);
    }
  }

  void process(taskmgr::TaskContext& ctx) override {
    taskmgr_task_context c;
    c.ctx = &ctx;
    TASKMGR_HOST_CALL("taskmgr_c: service process");
    const int rc = def_->s.process(def_->s.user_data, instance_, &c);
    if (c.pending) std::rethrow_exception(c.pending);
    if (rc == TASKMGR_OK) return;
    const std::string message =
        !c.error_message.empty()
            ? c.error_message
            : "service '" + def_->kind + "' failed on " + device_ + ": " + taskmgr_status_name(rc);
    using R = taskmgr::TaskFailureReason;
    switch (rc) {
      case TASKMGR_E_OUT_OF_MEMORY: throw taskmgr::OutOfMemoryError(message);
      case TASKMGR_E_INVALID_ARGUMENT: throw taskmgr::InvalidInputError(message);
      case TASKMGR_E_TIMEOUT: throw taskmgr::TaskError(R::kTimeout, message);
      case TASKMGR_E_CANCELLED: throw taskmgr::TaskError(R::kCancelled, message);
      case TASKMGR_E_MEMORY_LIMIT_EXCEEDED:
        throw taskmgr::TaskError(R::kMemoryLimitExceeded, message);
      default: throw taskmgr::TaskError(R::kProcessingError, message);
    }
  }

 private:
  std::shared_ptr<const ServiceDef> def_;
  void* instance_;
  std::string device_;
};

class CServiceFactory final : public taskmgr::ServiceFactory,
                              public taskmgr::detail::InputRequirement {
 public:
  // taskmgr_service.input_optional: 0 (the default) = its tasks need an input.
  bool needs_input() const override { return def_->s.input_optional == 0; }
  explicit CServiceFactory(std::shared_ptr<const ServiceDef> def) : def_(std::move(def)) {
    const taskmgr_service& s = def_->s;
    if (s.memory_base_mb > 0 || s.memory_per_page_mb > 0 || s.memory_per_mpixel_mb > 0 ||
        s.memory_per_input_mb > 0) {
      taskmgr::LinearModelCoefficients c;
      c.base_mb = s.memory_base_mb;
      c.per_page_mb = s.memory_per_page_mb;
      c.per_mpixel_mb = s.memory_per_mpixel_mb;
      c.per_input_mb = s.memory_per_input_mb;
      model_ = std::make_shared<taskmgr::LinearMemoryModel>(def_->kind + "/linear", c);
    }
  }
  std::string kind() const override { return def_->kind; }
  std::unique_ptr<taskmgr::Service> create(const std::string& device) override {
    void* instance = nullptr;
    TASKMGR_HOST_CALL("taskmgr_c: service create_instance");
    const int rc = def_->s.create_instance(def_->s.user_data, device.c_str(), &instance);
    if (rc != TASKMGR_OK) {
      throw std::runtime_error("service '" + def_->kind + "' could not create an instance on " +
                               device + ": create_instance returned " + taskmgr_status_name(rc));
    }
    return std::make_unique<CService>(def_, instance, device);
  }
  bool supports(const taskmgr::DeviceInfo& d) const override {
    if (def_->s.supports_device == nullptr) return true;
    TASKMGR_HOST_CALL("taskmgr_c: service supports_device");
    return def_->s.supports_device(def_->s.user_data, d.id.c_str(),
                                   taskmgr::to_string(d.kind).data()) != 0;
  }
  std::shared_ptr<const taskmgr::MemoryModel> memory_model() const override { return model_; }

 private:
  std::shared_ptr<const ServiceDef> def_;
  std::shared_ptr<const taskmgr::MemoryModel> model_;
};

}  // namespace

struct taskmgr_manager {
  std::shared_ptr<LogTarget> log;             // taskmgr_open_options.log_callback
  std::shared_ptr<Subscription> opened_with;  // taskmgr_open_options.event_callback
  std::unique_ptr<taskmgr::TaskManager> tm;
  taskmgr::detail::Mutex subs_mu;
  std::map<taskmgr::SubscriptionId, std::shared_ptr<Subscription>> subs GUARDED_BY(subs_mu);
};

namespace {

taskmgr::TaskManager& manager_of(taskmgr_manager* m, const char* function) {
  require(m, function, "manager");
  return *m->tm;
}

// A string argument must be UTF-8: the message names the first bad byte.
void require_utf8(const char* s, const char* function, const char* name) {
  if (auto at = taskmgr::detail::invalid_utf8_at(s)) {
    throw_invalid(std::string(function) + ": " + name + " is not valid UTF-8 (byte " +
                  std::to_string(*at) + ")");
  }
}

std::string task_id_arg(const char* id, const char* function) {
  require(id, function, "task_id");
  require_utf8(id, function, "task_id");  // not NOT_FOUND: no id can be like it
  return id;
}

void set_out(char** out, const std::string& value) { *out = dup_string(value); }

char** checked_out(char** out, const char* function, const char* name) {
  require(out, function, name);
  *out = nullptr;
  return out;
}

std::string json_array(const std::vector<std::string>& items) {
  std::string s = "[";
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i) s += ',';
    s += items[i];
  }
  s += ']';
  return s;
}

// A request of the C ABI (copied to the library's full struct size) as the
// C++ one. `where` names the function (and request) in error messages.
taskmgr::TaskCreateRequest to_create_request(const taskmgr_task_request& r, const char* where) {
  const std::string w(where);
  if (r.input_path != nullptr && r.input_data != nullptr) {
    throw_invalid(w + ": give input_path or input_data, not both");
  }
  if (r.input_data == nullptr && r.input_size != 0) {
    throw_invalid(w + ": input_size is " + std::to_string(r.input_size) +
                  " but input_data is NULL");
  }
  if (r.batch_size < 0) {
    throw_invalid(w + ": batch_size must be >= 0 (0 = 1), got " + std::to_string(r.batch_size));
  }
  taskmgr::TaskCreateRequest req;
  if (r.service != nullptr) req.service = r.service;
  if (r.input_path != nullptr) {
    req.input.path = r.input_path;
    if (req.input.path.empty()) throw_invalid(w + ": input_path is empty");
  }
  if (r.input_data != nullptr) {
    const auto* b = static_cast<const std::uint8_t*>(r.input_data);
    req.input.data.assign(b, b + r.input_size);
  }
  if (r.media_type != nullptr) req.input.media_type = r.media_type;
  req.priority = r.priority;
  req.batch_size = r.batch_size == 0 ? 1 : r.batch_size;
  if (r.device != nullptr) req.device = r.device;
  if (r.options_json != nullptr) req.options_json = r.options_json;
  req.start = r.start != 0;
  return req;
}

// Copies a task id into a caller's char[TASKMGR_TASK_ID_SIZE], NUL-terminated.
void copy_task_id(const std::string& id, char* out) {
  std::memcpy(out, id.c_str(), std::min<std::size_t>(id.size() + 1, TASKMGR_TASK_ID_SIZE));
  out[TASKMGR_TASK_ID_SIZE - 1] = '\0';
}

int open_manager(const taskmgr_open_options* o, taskmgr_manager** out) {
  // The log target and the subscription made at open take their free
  // functions only once the manager is open: a failed open leaves the user
  // data to the caller.
  std::shared_ptr<LogTarget> log;
  if (o != nullptr && TASKMGR_HAS(o, log_free) && o->struct_size != 0) {
    log = std::make_shared<LogTarget>();
    log->fn = o->log_callback;
    log->user_data = o->log_user_data;
  }
  std::shared_ptr<Subscription> sub;
  if (o != nullptr && o->struct_size != 0 && TASKMGR_HAS(o, event_free) &&
      o->event_callback != nullptr) {
    sub = std::make_shared<Subscription>();
    sub->fn = o->event_callback;
    sub->user_data = o->event_user_data;
  }
  require(out, "taskmgr_open", "out_manager");
  *out = nullptr;
  taskmgr_open_options opt;
  taskmgr_open_options_init(&opt);
  if (o != nullptr) {
    check_struct(o, "taskmgr_open", "taskmgr_open_options");
    std::memcpy(&opt, o, o->struct_size);
    opt.struct_size = sizeof(opt);
  }
  if (opt.config_yaml != nullptr && opt.config_path != nullptr) {
    throw_invalid("taskmgr_open: give config_yaml or config_path, not both");
  }
  if (opt.config_path != nullptr) require_utf8(opt.config_path, "taskmgr_open", "config_path");
  if (opt.config_yaml != nullptr) require_utf8(opt.config_yaml, "taskmgr_open", "config_yaml");
  if (opt.database_path != nullptr) {
    require_utf8(opt.database_path, "taskmgr_open", "database_path");
  }
  if (opt.database_url != nullptr) {
    if (opt.database_path != nullptr) {
      throw_invalid("taskmgr_open: give database_path or database_url, not both");
    }
    require_utf8(opt.database_url, "taskmgr_open", "database_url");
  }
  taskmgr::Config config = opt.config_path != nullptr
                               ? taskmgr::Config::from_yaml_file(opt.config_path)
                           : (opt.config_yaml != nullptr && *opt.config_yaml != '\0')
                               ? taskmgr::Config::from_yaml_string(opt.config_yaml, "config_yaml")
                               : taskmgr::Config::defaults();
  // Each selects the store on its own: the other storage key goes back to
  // its default.
  if (opt.database_path != nullptr) {
    config.storage.path = opt.database_path;
    config.storage.url.clear();
  }
  if (opt.database_url != nullptr) {
    config.storage.url = opt.database_url;
    config.storage.path = taskmgr::StorageConfig{}.path;
  }
  if (opt.worker_threads > 0) config.executor.worker_threads = opt.worker_threads;
  taskmgr::TaskManagerOptions options;
  options.builtin_ocr = opt.disable_builtin_ocr == 0;
  if (log && log->fn != nullptr) {
    options.log_sink = [log](taskmgr::LogLevel level, std::string_view message) {
      const std::string m(message);
      TASKMGR_HOST_CALL("taskmgr_c: log callback");
      log->fn(static_cast<int>(level), m.c_str(), log->user_data);
    };
  }
  if (sub) {
    options.subscribers.push_back([s = sub](const taskmgr::EventRecord& ev) { s->deliver(ev); });
  }
  auto handle = std::make_unique<taskmgr_manager>();
  handle->opened_with = sub;
  handle->log = log;
  handle->tm = std::make_unique<taskmgr::TaskManager>(std::move(config), std::move(options));
  // Open: from here the library owns the user data (freed by destroy).
  if (log) log->free_fn = o->log_free;
  if (sub) sub->free_fn = o->event_free;
  *out = handle.release();
  return TASKMGR_OK;
}

// A taskmgr_start_params as the TaskStartRequest it asks for (NULL: keep
// everything), checked: start and retry read it alike.
taskmgr::TaskStartRequest start_request(const taskmgr_start_params* params, const char* fn) {
  taskmgr::TaskStartRequest req;
  if (params == nullptr) return req;
  check_struct(params, fn, "taskmgr_start_params");
  taskmgr_start_params p;
  taskmgr_start_params_init(&p);
  std::memcpy(&p, params, params->struct_size);
  if (p.batch_size < 0) {
    throw_invalid(std::string(fn) + ": batch_size must be >= 0 (0 = keep), got " +
                  std::to_string(p.batch_size));
  }
  if (p.device != nullptr) {
    require_utf8(p.device, fn, "device");
    req.device = p.device;
  }
  if (p.set_priority != 0) req.priority = p.priority;
  if (p.batch_size > 0) req.batch_size = p.batch_size;
  if (p.options_json != nullptr) req.options_json = p.options_json;
  return req;
}

}  // namespace

extern "C" {

const char* taskmgr_version_string(void) { return TASKMGR_VERSION_STRING; }

int taskmgr_version_number(void) { return TASKMGR_VERSION_NUMBER; }

const char* taskmgr_status_name(int status) {
  // to_string returns views of string literals: NUL-terminated, static.
  return taskmgr::to_string(static_cast<taskmgr::ErrorCode>(status)).data();
}

const char* taskmgr_task_status_name(int status) {
  return enum_name<taskmgr::TaskStatus>(status, TASKMGR_TASK_UNRECOGNIZED);
}
const char* taskmgr_failure_reason_name(int reason) {
  return enum_name<taskmgr::TaskFailureReason>(reason, TASKMGR_REASON_HOST_LOST);
}
const char* taskmgr_event_name(int event) {
  return enum_name<taskmgr::TaskEvent>(event, TASKMGR_EVENT_DELETED);
}
const char* taskmgr_log_level_name(int level) {
  return enum_name<taskmgr::LogLevel>(level, TASKMGR_LOG_ERROR);
}

const char* taskmgr_last_error(void) { return taskmgr::capi::last_error().c_str(); }

void taskmgr_free(void* ptr) { std::free(ptr); }

int taskmgr_config_normalize(const char* yaml, char** out_yaml) {
  return guarded([&]() -> int {
    if (out_yaml == nullptr) {
      return fail(TASKMGR_E_INVALID_ARGUMENT, "taskmgr_config_normalize: out_yaml is NULL");
    }
    *out_yaml = nullptr;
    if (yaml != nullptr) require_utf8(yaml, "taskmgr_config_normalize", "yaml");
    const taskmgr::Config c = (yaml == nullptr || *yaml == '\0')
                                  ? taskmgr::Config::defaults()
                                  : taskmgr::Config::from_yaml_string(yaml);
    *out_yaml = dup_string(c.to_yaml());
    return TASKMGR_OK;
  });
}

int taskmgr_config_normalize_file(const char* path, char** out_yaml) {
  return guarded([&]() -> int {
    if (out_yaml == nullptr) {
      return fail(TASKMGR_E_INVALID_ARGUMENT, "taskmgr_config_normalize_file: out_yaml is NULL");
    }
    *out_yaml = nullptr;
    if (path == nullptr) {
      return fail(TASKMGR_E_INVALID_ARGUMENT, "taskmgr_config_normalize_file: path is NULL");
    }
    require_utf8(path, "taskmgr_config_normalize_file", "path");
    const taskmgr::Config c = taskmgr::Config::from_yaml_file(path);
    *out_yaml = dup_string(c.to_yaml());
    return TASKMGR_OK;
  });
}

// ---- documents -------------------------------------------------------------------
int taskmgr_describe_document(const char* path, int dpi, char** out_json) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_describe_document";
    char** out = checked_out(out_json, fn, "out_json");
    require(path, fn, "path");
    require_utf8(path, fn, "path");
    const taskmgr::DocumentInfo info = taskmgr::describe_document(path, dpi);
    boost::json::array pages;
    for (const auto& p : info.pages) {
      pages.push_back(
          boost::json::object{{"page", p.page}, {"width", p.width}, {"height", p.height}});
    }
    set_out(out, boost::json::serialize(
                     boost::json::object{{"media_type", info.media_type}, {"pages", pages}}));
  });
}

// ---- open / close --------------------------------------------------------------
void taskmgr_open_options_init(taskmgr_open_options* o) {
  if (o == nullptr) return;
  std::memset(o, 0, sizeof(*o));
  o->struct_size = sizeof(*o);
}

int taskmgr_open(const taskmgr_open_options* options, taskmgr_manager** out_manager) {
  return guarded([&] { return open_manager(options, out_manager); });
}

int taskmgr_open_yaml(const char* config_yaml, taskmgr_manager** out_manager) {
  return guarded([&] {
    taskmgr_open_options o;
    taskmgr_open_options_init(&o);
    o.config_yaml = config_yaml;
    return open_manager(&o, out_manager);
  });
}

int taskmgr_open_file(const char* config_path, taskmgr_manager** out_manager) {
  return guarded([&] {
    if (out_manager != nullptr) *out_manager = nullptr;
    require(config_path, "taskmgr_open_file", "config_path");
    taskmgr_open_options o;
    taskmgr_open_options_init(&o);
    o.config_path = config_path;
    return open_manager(&o, out_manager);
  });
}

int taskmgr_close(taskmgr_manager* manager) {
  return guarded([&] { manager_of(manager, "taskmgr_close").close(); });
}

int taskmgr_destroy(taskmgr_manager* manager) {
  return guarded([&]() -> int {
    if (manager == nullptr) return TASKMGR_OK;
    if (taskmgr::detail::in_host_call()) {
      return fail(
          TASKMGR_E_INVALID_STATE,
          "taskmgr_destroy was called from code the library called (an event or log callback, "
          "or a service); it would wait for itself: destroy the manager from another "
          "thread. Nothing was destroyed.");
    }
    // Writes the store could not persist are reported, and the handle is
    // freed all the same (the caller could not use it any more).
    int status = TASKMGR_OK;
    try {
      manager->tm->close();
    } catch (const taskmgr::Error& e) {
      if (e.code() != taskmgr::ErrorCode::kUnpersisted) throw;
      status = fail(TASKMGR_E_UNPERSISTED, e.what());
    }
    manager->tm.reset();  // threads stopped: no callback runs any more
    delete manager;       // frees what subscriptions remain
    return status;
  });
}

// ---- tasks -----------------------------------------------------------------------
void taskmgr_task_request_init(taskmgr_task_request* r) {
  if (r == nullptr) return;
  std::memset(r, 0, sizeof(*r));
  r->struct_size = sizeof(*r);
}

int taskmgr_create_task(taskmgr_manager* manager, const taskmgr_task_request* request,
                        char out_task_id[TASKMGR_TASK_ID_SIZE]) {
  return guarded([&]() -> int {
    constexpr const char* fn = "taskmgr_create_task";
    auto& tm = manager_of(manager, fn);
    require(request, fn, "request");
    require(out_task_id, fn, "out_task_id");
    out_task_id[0] = '\0';
    check_struct(request, fn, "taskmgr_task_request");
    taskmgr_task_request r;
    taskmgr_task_request_init(&r);
    std::memcpy(&r, request, request->struct_size);
    const taskmgr::Task t = tm.create_task(to_create_request(r, fn));
    copy_task_id(t.id, out_task_id);
    return TASKMGR_OK;
  });
}

int taskmgr_create_tasks(taskmgr_manager* manager, const taskmgr_task_request* requests,
                         size_t count, char (*out_task_ids)[TASKMGR_TASK_ID_SIZE]) {
  return guarded([&]() -> int {
    constexpr const char* fn = "taskmgr_create_tasks";
    auto& tm = manager_of(manager, fn);
    if (count == 0) return TASKMGR_OK;
    require(requests, fn, "requests");
    require(out_task_ids, fn, "out_task_ids");
    check_struct(requests, fn, "taskmgr_task_request");
    // The array is strided by the caller's struct size (sizeof its
    // taskmgr_task_request), which every element must carry. Elements are
    // copied byte-wise: nothing is read through a misaligned pointer.
    const std::size_t stride = requests[0].struct_size;
    if (stride < sizeof(requests[0].struct_size)) {
      throw_invalid(std::string(fn) + ": taskmgr_task_request.struct_size is " +
                    std::to_string(stride) +
                    ", smaller than the field itself (initialise it with "
                    "taskmgr_task_request_init)");
    }
    if (count > static_cast<std::size_t>(-1) / stride) {
      throw_invalid(std::string(fn) + ": count " + std::to_string(count) + " is too large");
    }
    const auto* base = reinterpret_cast<const unsigned char*>(requests);
    const bool many = count > 1;
    std::vector<taskmgr::TaskCreateRequest> reqs;
    reqs.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      const unsigned char* at = base + i * stride;
      const std::string where =
          many ? std::string(fn) + ": request " + std::to_string(i) : std::string(fn);
      const char* nothing = many ? "; no task was created" : "";
      std::size_t size = 0;
      std::memcpy(&size, at, sizeof(size));
      if (size != stride) {
        throw_invalid(where + ": struct_size is " + std::to_string(size) +
                      ", not requests[0].struct_size = " + std::to_string(stride) +
                      " (the array is strided by it: initialise every element with "
                      "taskmgr_task_request_init)" +
                      nothing);
      }
      taskmgr_task_request r;
      taskmgr_task_request_init(&r);
      std::memcpy(&r, at, stride);
      try {
        reqs.push_back(to_create_request(r, where.c_str()));
      } catch (const taskmgr::Error& e) {
        throw taskmgr::Error(e.code(), e.what() + std::string(nothing));
      }
    }
    // All or none; a failure of one of many names it ("request 3: ...").
    const std::vector<taskmgr::Task> tasks = tm.create_tasks(reqs);
    for (std::size_t i = 0; i < tasks.size() && i < count; ++i) {
      copy_task_id(tasks[i].id, out_task_ids[i]);
    }
    return TASKMGR_OK;
  });
}

void taskmgr_start_params_init(taskmgr_start_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof(*p));
  p->struct_size = sizeof(*p);
}

int taskmgr_start_task(taskmgr_manager* manager, const char* task_id,
                       const taskmgr_start_params* params) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_start_task";
    auto& tm = manager_of(manager, fn);
    const std::string id = task_id_arg(task_id, fn);
    tm.start_task(id, start_request(params, fn));
  });
}

int taskmgr_retry_task(taskmgr_manager* manager, const char* task_id,
                       const taskmgr_start_params* params) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_retry_task";
    auto& tm = manager_of(manager, fn);
    const std::string id = task_id_arg(task_id, fn);
    tm.retry_task(id, start_request(params, fn));
  });
}

int taskmgr_cancel_task(taskmgr_manager* manager, const char* task_id, int* out_cancelled) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_cancel_task";
    auto& tm = manager_of(manager, fn);
    const std::string id = task_id_arg(task_id, fn);
    if (out_cancelled != nullptr) *out_cancelled = 0;
    const bool cancelled = tm.cancel_task(id);
    if (out_cancelled != nullptr) *out_cancelled = cancelled ? 1 : 0;
  });
}

int taskmgr_set_task_priority(taskmgr_manager* manager, const char* task_id, int32_t priority) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_set_task_priority";
    auto& tm = manager_of(manager, fn);
    tm.set_task_priority(task_id_arg(task_id, fn), priority);
  });
}

int taskmgr_delete_task(taskmgr_manager* manager, const char* task_id) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_delete_task";
    auto& tm = manager_of(manager, fn);
    tm.delete_task(task_id_arg(task_id, fn));
  });
}

}  // extern "C"

namespace {
int set_paused(taskmgr_manager* manager, int scope, const char* name, int* out_changed, bool on) {
  return guarded([&] {
    const char* fn = on ? "taskmgr_pause" : "taskmgr_resume";
    if (out_changed != nullptr) *out_changed = 0;
    auto& tm = manager_of(manager, fn);
    if (scope < TASKMGR_PAUSE_MANAGER || scope > TASKMGR_PAUSE_SERVICE) {
      throw_invalid(std::string(fn) +
                    ": scope must be TASKMGR_PAUSE_MANAGER (0), _DEVICE (1) or "
                    "_SERVICE (2), got " +
                    std::to_string(scope));
    }
    if (name != nullptr) require_utf8(name, fn, "name");
    if (scope != TASKMGR_PAUSE_MANAGER && (name == nullptr || *name == '\0')) {
      throw_invalid(std::string(fn) + ": name must be the " +
                    (scope == TASKMGR_PAUSE_DEVICE ? "device id" : "service kind") +
                    " (NULL or empty given)");
    }
    const auto s = static_cast<taskmgr::PauseScope>(scope);
    const std::string n = name != nullptr ? name : "";
    const bool changed = on ? tm.pause(s, n) : tm.resume(s, n);
    if (out_changed != nullptr) *out_changed = changed ? 1 : 0;
  });
}
}  // namespace

extern "C" {

int taskmgr_pause(taskmgr_manager* manager, int scope, const char* name, int* out_changed) {
  return set_paused(manager, scope, name, out_changed, true);
}

int taskmgr_resume(taskmgr_manager* manager, int scope, const char* name, int* out_changed) {
  return set_paused(manager, scope, name, out_changed, false);
}

int taskmgr_resize_pool(taskmgr_manager* manager, const char* service, const char* device,
                        int min_instances, int max_instances, int* out_previous_min,
                        int* out_previous_max) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_resize_pool";
    if (out_previous_min != nullptr) *out_previous_min = 0;
    if (out_previous_max != nullptr) *out_previous_max = 0;
    auto& tm = manager_of(manager, fn);
    if (service == nullptr) throw_invalid(std::string(fn) + ": service is NULL");
    if (device == nullptr) throw_invalid(std::string(fn) + ": device is NULL");
    require_utf8(service, fn, "service");
    require_utf8(device, fn, "device");
    const taskmgr::PoolSettings before =
        tm.resize_pool(service, device, min_instances, max_instances);
    if (out_previous_min != nullptr) *out_previous_min = before.min_instances;
    if (out_previous_max != nullptr) *out_previous_max = before.max_instances;
  });
}

int taskmgr_paused(taskmgr_manager* manager, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_paused";
    auto& tm = manager_of(manager, fn);
    char** out = checked_out(out_json, fn, "out_json");
    std::string json = "[";
    for (const auto& p : tm.paused()) {
      if (json.size() > 1) json += ',';
      json += taskmgr::to_json(p);
    }
    set_out(out, json + "]");
  });
}

int taskmgr_get_task(taskmgr_manager* manager, const char* task_id, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_get_task";
    auto& tm = manager_of(manager, fn);
    char** out = checked_out(out_json, fn, "out_json");
    const std::string id = task_id_arg(task_id, fn);
    set_out(out, taskmgr::to_json(tm.get_task(id)));
  });
}

int taskmgr_get_task_status(taskmgr_manager* manager, const char* task_id, int* out_status,
                            int* out_failure_reason) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_get_task_status";
    auto& tm = manager_of(manager, fn);
    const std::string id = task_id_arg(task_id, fn);
    const taskmgr::Task t = tm.get_task(id);
    if (out_status != nullptr) *out_status = static_cast<int>(t.status);
    if (out_failure_reason != nullptr) *out_failure_reason = static_cast<int>(t.failure_reason);
  });
}

int taskmgr_get_task_result(taskmgr_manager* manager, const char* task_id, char** out_result) {
  return guarded([&] {
    if (out_result != nullptr) *out_result = nullptr;
    constexpr const char* fn = "taskmgr_get_task_result";
    auto& tm = manager_of(manager, fn);
    char** out = checked_out(out_result, fn, "out_result");
    const std::string id = task_id_arg(task_id, fn);
    set_out(out, tm.get_task(id).result);
  });
}

int taskmgr_wait_task(taskmgr_manager* manager, const char* task_id, double timeout_seconds,
                      char** out_json) {
  return guarded([&]() -> int {
    constexpr const char* fn = "taskmgr_wait_task";
    auto& tm = manager_of(manager, fn);
    const std::string id = task_id_arg(task_id, fn);
    if (out_json != nullptr) *out_json = nullptr;
    if (std::isnan(timeout_seconds)) {
      return fail(TASKMGR_E_INVALID_ARGUMENT,
                  "taskmgr_wait_task: timeout_seconds is NaN (< 0 waits without limit)");
    }
    const auto t = tm.wait_task(id, timeout_from_seconds(timeout_seconds));
    if (!t) {
      return fail(TASKMGR_E_TIMEOUT,
                  "task " + id + " has not ended after " + std::to_string(timeout_seconds) + " s");
    }
    if (out_json != nullptr) set_out(out_json, taskmgr::to_json(*t));
    return TASKMGR_OK;
  });
}

int taskmgr_wait_idle(taskmgr_manager* manager, double timeout_seconds) {
  return guarded([&]() -> int {
    auto& tm = manager_of(manager, "taskmgr_wait_idle");
    if (std::isnan(timeout_seconds)) {
      return fail(TASKMGR_E_INVALID_ARGUMENT,
                  "taskmgr_wait_idle: timeout_seconds is NaN (< 0 waits without limit)");
    }
    if (!tm.wait_idle(timeout_from_seconds(timeout_seconds))) {
      return fail(TASKMGR_E_TIMEOUT,
                  "tasks still queued or running after " + std::to_string(timeout_seconds) + " s");
    }
    return TASKMGR_OK;
  });
}

int taskmgr_list_tasks(taskmgr_manager* manager, const char* status, const char* service,
                       size_t limit, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_list_tasks";
    auto& tm = manager_of(manager, fn);
    checked_out(out_json, fn, "out_json");
    taskmgr::TaskFilter f;
    if (status != nullptr) {
      require_utf8(status, fn, "status");
      f.status = taskmgr::parse_task_status(status);
      if (!f.status) {
        throw_invalid(std::string(fn) + ": unknown status '" + status +
                      "' (pending, queued, running, completed, failed, cancelled, unrecognized)");
      }
    }
    if (service != nullptr) f.service = service;
    f.limit = limit;
    std::vector<std::string> items;
    for (const auto& t : tm.list_tasks(f)) items.push_back(taskmgr::to_json(t));
    set_out(out_json, json_array(items));
  });
}

void taskmgr_list_params_init(taskmgr_list_params* p) {
  if (p == nullptr) return;
  std::memset(p, 0, sizeof(*p));
  p->struct_size = sizeof(*p);
}

int taskmgr_list_tasks_page(taskmgr_manager* manager, const taskmgr_list_params* params,
                            char** out_json, char** out_next_cursor) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    if (out_next_cursor != nullptr) *out_next_cursor = nullptr;
    constexpr const char* fn = "taskmgr_list_tasks_page";
    auto& tm = manager_of(manager, fn);
    checked_out(out_json, fn, "out_json");
    taskmgr_list_params p;
    taskmgr_list_params_init(&p);
    if (params != nullptr) {
      check_struct(params, fn, "taskmgr_list_params");
      std::memcpy(&p, params, params->struct_size);
      p.struct_size = sizeof(p);
    }
    constexpr std::size_t kMaxPage = 10000;
    if (p.limit > kMaxPage) {
      throw_invalid(std::string(fn) + ": limit must be at most " + std::to_string(kMaxPage) +
                    " (0 = 100), got " + std::to_string(p.limit));
    }
    taskmgr::TaskFilter f;
    f.limit = p.limit == 0 ? 100 : p.limit;
    f.with_payloads = p.with_results != 0;
    f.with_input_bytes = false;
    if (p.status != nullptr) {
      require_utf8(p.status, fn, "status");
      f.status = taskmgr::parse_task_status(p.status);
      if (!f.status) {
        throw_invalid(std::string(fn) + ": unknown status '" + p.status +
                      "' (pending, queued, running, completed, failed, cancelled, unrecognized)");
      }
    }
    if (p.service != nullptr) {
      require_utf8(p.service, fn, "service");
      f.service = p.service;
    }
    if (p.before != nullptr && p.before[0] != '\0') {
      require_utf8(p.before, fn, "before");
      f.before = taskmgr::parse_task_cursor(p.before);
      if (!f.before) {
        // Quoted in part: a cursor is short, and what was passed may not be.
        std::string shown(p.before);
        if (shown.size() > 80) {
          std::size_t cut = 80;  // at a character's start: the message stays UTF-8
          while (cut > 0 && (static_cast<unsigned char>(shown[cut]) & 0xC0) == 0x80) --cut;
          shown = shown.substr(0, cut) + "...";
        }
        for (char& ch : shown) {
          if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7F) ch = '?';
        }
        throw_invalid(std::string(fn) + ": before '" + shown +
                      "' is not a cursor (pass the *out_next_cursor of the previous page)");
      }
    }
    const std::vector<taskmgr::Task> page = tm.list_tasks(f);  // oldest first
    std::vector<std::string> items;
    items.reserve(page.size());
    for (auto it = page.rbegin(); it != page.rend(); ++it) items.push_back(taskmgr::to_json(*it));
    std::string next;
    if (page.size() == f.limit) next = taskmgr::to_string(*taskmgr::page_cursor(page));
    // Both or neither: the cursor is copied first, so a failure leaves
    // nothing to free.
    char* cursor = nullptr;
    if (out_next_cursor != nullptr && !next.empty()) cursor = dup_string(next);
    try {
      set_out(out_json, json_array(items));
    } catch (...) {
      std::free(cursor);
      throw;
    }
    if (out_next_cursor != nullptr) *out_next_cursor = cursor;
  });
}

int taskmgr_get_task_events(taskmgr_manager* manager, const char* task_id, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_get_task_events";
    auto& tm = manager_of(manager, fn);
    checked_out(out_json, fn, "out_json");
    const std::string id = task_id_arg(task_id, fn);
    std::vector<std::string> items;
    for (const auto& e : tm.get_task_events(id)) items.push_back(taskmgr::to_json(e));
    set_out(out_json, json_array(items));
  });
}

// ---- metrics, health, devices ----------------------------------------------------------
int taskmgr_get_task_metrics(taskmgr_manager* manager, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_get_task_metrics";
    auto& tm = manager_of(manager, fn);
    char** out = checked_out(out_json, fn, "out_json");
    set_out(out, tm.get_task_metrics().to_json());
  });
}

int taskmgr_get_metrics_prometheus(taskmgr_manager* manager, char** out_text) {
  return guarded([&] {
    if (out_text != nullptr) *out_text = nullptr;
    constexpr const char* fn = "taskmgr_get_metrics_prometheus";
    auto& tm = manager_of(manager, fn);
    char** out = checked_out(out_text, fn, "out_text");
    set_out(out, tm.get_task_metrics().to_prometheus());
  });
}

int taskmgr_get_task_health(taskmgr_manager* manager, const char* task_id, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_get_task_health";
    auto& tm = manager_of(manager, fn);
    char** out = checked_out(out_json, fn, "out_json");
    const std::string id = task_id_arg(task_id, fn);
    set_out(out, tm.get_task_health(id).to_json());
  });
}

int taskmgr_cluster(taskmgr_manager* manager, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_cluster";
    auto& tm = manager_of(manager, fn);
    char** out = checked_out(out_json, fn, "out_json");
    set_out(out, taskmgr::to_json(tm.cluster()));
  });
}

int taskmgr_list_devices(taskmgr_manager* manager, char** out_json) {
  return guarded([&] {
    if (out_json != nullptr) *out_json = nullptr;
    constexpr const char* fn = "taskmgr_list_devices";
    auto& tm = manager_of(manager, fn);
    checked_out(out_json, fn, "out_json");
    json::array a;
    for (const auto& d : tm.devices()) {
      json::object o;
      o["id"] = d.id;
      o["kind"] = taskmgr::to_string(d.kind);
      o["total_mb"] = d.total_mb;
      o["reserved_mb"] = d.reserved_mb;
      o["observed_mb"] = d.observed_mb;
      o["free_mb"] = d.free_mb();
      o["available"] = d.available;
      o["source"] = d.source;
      o["note"] = d.note;
      a.push_back(std::move(o));
    }
    set_out(out_json, json::serialize(a));
  });
}

int taskmgr_set_device_available(taskmgr_manager* manager, const char* device, int available) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_set_device_available";
    auto& tm = manager_of(manager, fn);
    require(device, fn, "device");
    require_utf8(device, fn, "device");
    tm.set_device_available(device, available != 0);
  });
}

// ---- events ---------------------------------------------------------------------------------
int taskmgr_subscribe(taskmgr_manager* manager, taskmgr_event_fn callback, void* user_data,
                      taskmgr_free_fn free_user_data, uint64_t* out_subscription) {
  // The library owns user_data only once the subscription is made: on a
  // failure free_user_data is not called (the caller still owns it).
  auto sub = std::make_shared<Subscription>();
  sub->user_data = user_data;
  return guarded([&] {
    constexpr const char* fn = "taskmgr_subscribe";
    auto& tm = manager_of(manager, fn);
    require(reinterpret_cast<const void*>(callback), fn, "callback");
    require(out_subscription, fn, "out_subscription");
    *out_subscription = 0;
    sub->fn = callback;
    taskmgr::detail::MutexLock g(manager->subs_mu);
    sub->id = tm.subscribe([s = sub](const taskmgr::EventRecord& ev) { s->deliver(ev); });
    try {
      manager->subs.emplace(sub->id, sub);
    } catch (...) {
      // Not kept, so not made: the caller keeps its user data.
      tm.unsubscribe(sub->id);
      throw;
    }
    sub->free_fn = free_user_data;  // made: the library owns user_data now
    *out_subscription = sub->id;
  });
}

int taskmgr_unsubscribe(taskmgr_manager* manager, uint64_t subscription) {
  return guarded([&]() -> int {
    constexpr const char* fn = "taskmgr_unsubscribe";
    auto& tm = manager_of(manager, fn);
    std::shared_ptr<Subscription> sub;
    {
      taskmgr::detail::MutexLock g(manager->subs_mu);
      auto it = manager->subs.find(subscription);
      if (it != manager->subs.end()) {
        sub = std::move(it->second);
        manager->subs.erase(it);
      }
    }
    if (!sub) {
      return fail(TASKMGR_E_NOT_FOUND,
                  std::string(fn) + ": no subscription " + std::to_string(subscription));
    }
    sub->ended.store(true, std::memory_order_release);
    tm.unsubscribe(sub->id);  // outside a callback: waits until it is not running
    // From inside its own callback, deliver() frees it when the callback returns.
    if (tls_delivering != sub.get()) sub->release();
    return TASKMGR_OK;
  });
}

int taskmgr_flush_events(taskmgr_manager* manager) {
  return guarded([&] { manager_of(manager, "taskmgr_flush_events").flush_events(); });
}

// ---- host services -----------------------------------------------------------------------------
void taskmgr_service_init(taskmgr_service* s) {
  if (s == nullptr) return;
  std::memset(s, 0, sizeof(*s));
  s->struct_size = sizeof(*s);
}

int taskmgr_register_service(taskmgr_manager* manager, const taskmgr_service* service) {
  std::shared_ptr<ServiceDef> def;
  if (service != nullptr && service->struct_size != 0 && service->struct_size <= sizeof(*service) &&
      TASKMGR_HAS(service, free_user_data)) {
    // Owns user_data once registered (ServiceDef::owned): freed at destroy.
    def = std::make_shared<ServiceDef>();
    taskmgr_service_init(&def->s);
    std::memcpy(&def->s, service, service->struct_size);
    def->s.struct_size = sizeof(def->s);
  }
  return guarded([&] {
    constexpr const char* fn = "taskmgr_register_service";
    auto& tm = manager_of(manager, fn);
    require(service, fn, "service");
    check_struct(service, fn, "taskmgr_service");
    if (!def) throw_invalid(std::string(fn) + ": taskmgr_service.struct_size is too small");
    if (def->s.kind == nullptr || *def->s.kind == '\0') {
      throw_invalid(std::string(fn) + ": taskmgr_service.kind is NULL or empty");
    }
    if (def->s.create_instance == nullptr) {
      throw_invalid(std::string(fn) + ": taskmgr_service.create_instance is NULL");
    }
    if (def->s.process == nullptr)
      throw_invalid(std::string(fn) + ": taskmgr_service.process is NULL");
    def->kind = def->s.kind;
    def->s.kind = nullptr;  // the caller's string need not outlive the call
    for (double v : {def->s.memory_base_mb, def->s.memory_per_page_mb, def->s.memory_per_mpixel_mb,
                     def->s.memory_per_input_mb}) {
      if (!(v >= 0)) throw_invalid(std::string(fn) + ": memory model coefficients must be >= 0");
    }
    ServiceDef* registered = def.get();
    tm.register_service(std::make_shared<CServiceFactory>(std::move(def)));
    registered->owned = true;  // registered: the library frees user_data at destroy
  });
}

// The context of a running task. These run inside process(), on its thread.
const char* taskmgr_context_task_id(const taskmgr_task_context* c) {
  return c == nullptr ? nullptr : c->ctx->task_id().c_str();
}
const char* taskmgr_context_device(const taskmgr_task_context* c) {
  return c == nullptr ? nullptr : c->ctx->device().c_str();
}
const char* taskmgr_context_service_instance_id(const taskmgr_task_context* c) {
  return c == nullptr ? nullptr : c->ctx->service_instance_id().c_str();
}
const char* taskmgr_context_options_json(const taskmgr_task_context* c) {
  return c == nullptr ? nullptr : c->ctx->options_json().c_str();
}
const char* taskmgr_context_input_path(const taskmgr_task_context* c) {
  if (c == nullptr || c->ctx->input().path.empty()) return nullptr;
  return c->ctx->input().path.c_str();
}
int taskmgr_context_input_data(const taskmgr_task_context* c, const void** out_data,
                               size_t* out_size) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_context_input_data";
    require(c, fn, "context");
    require(out_data, fn, "out_data");
    require(out_size, fn, "out_size");
    const auto& d = c->ctx->input().data;
    *out_data = d.empty() ? nullptr : d.data();
    *out_size = d.size();
  });
}
int taskmgr_context_batch_size(const taskmgr_task_context* c) {
  return c == nullptr ? 0 : c->ctx->batch_size();
}
int taskmgr_context_attempt(const taskmgr_task_context* c) {
  return c == nullptr ? 0 : c->ctx->attempt();
}
int64_t taskmgr_context_estimated_memory_mb(const taskmgr_task_context* c) {
  return c == nullptr ? 0 : c->ctx->estimated_memory_mb();
}
int taskmgr_context_cancelled(const taskmgr_task_context* c) {
  return c != nullptr && c->ctx->cancelled() ? 1 : 0;
}

double taskmgr_context_seconds_left(const taskmgr_task_context* c) {
  return c == nullptr ? 0.0 : c->ctx->seconds_left();
}

const char* taskmgr_context_temp_dir(taskmgr_task_context* c) {
  const char* dir = nullptr;
  guarded([&] {
    require(c, "taskmgr_context_temp_dir", "context");
    dir = c->ctx->temp_dir().c_str();
  });
  return dir;
}

int taskmgr_context_stage(taskmgr_task_context* c, const char* name) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_context_stage";
    require(c, fn, "context");
    require(name, fn, "name");
    c->ctx->stage(name);
  });
}

int taskmgr_context_report_memory(taskmgr_task_context* c, int64_t mb) {
  return guarded([&]() -> int {
    constexpr const char* fn = "taskmgr_context_report_memory";
    require(c, fn, "context");
    if (mb < 0) throw_invalid(std::string(fn) + ": mb must be >= 0, got " + std::to_string(mb));
    try {
      c->ctx->report_memory(mb);
    } catch (const taskmgr::TaskError& e) {
      // The task fails (or is retried) this way whatever process() returns.
      if (!c->pending) c->pending = std::current_exception();
      const bool oom = e.reason() == taskmgr::TaskFailureReason::kOutOfMemory;
      return fail(oom ? TASKMGR_E_OUT_OF_MEMORY : TASKMGR_E_MEMORY_LIMIT_EXCEEDED, e.what());
    }
    return TASKMGR_OK;
  });
}

int taskmgr_context_set_result(taskmgr_task_context* c, const char* result_json) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_context_set_result";
    require(c, fn, "context");
    require(result_json, fn, "result_json");
    c->ctx->set_result(result_json);
  });
}

int taskmgr_context_set_error(taskmgr_task_context* c, const char* message) {
  return guarded([&] {
    constexpr const char* fn = "taskmgr_context_set_error";
    require(c, fn, "context");
    require(message, fn, "message");
    require_utf8(message, fn, "message");
    c->error_message = message;
  });
}

}  // extern "C"
