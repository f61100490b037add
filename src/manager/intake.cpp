#include "manager/intake.hpp"

#include "input_requirement.hpp"

#include <fmt/format.h>

#include <boost/container/small_vector.hpp>

#include "host_call.hpp"
#include "input_requirement.hpp"
#include "manager/admission.hpp"
#include "manager/lifecycle.hpp"
#include "manager/task_events.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/estimator.hpp"
#include "taskmgr/worker.hpp"
#include "worker/process_service.hpp"

namespace taskmgr::detail {

std::vector<Task> Intake::create(const TaskCreateRequest* reqs, std::size_t n) {
  const bool many = n != 1;
  // Runs `f` for request i; a failure of one of many names it.
  auto for_request = [many](std::size_t i, auto&& f) REQUIRES(!scheduler_lock) {
    if (!many) return f();
    try {
      return f();
    } catch (const Error& e) {
      throw Error(e.code(), fmt::format("request {}: {}; no task was created", i, e.what()));
    }
  };
  if (n == 0) return {};
  for (std::size_t i = 0; i < n; ++i) {
    for_request(i, [&] { validate_request(reqs[i]); });
  }
  scheduler_.check_open();
  // Each request's service (entries are never removed: the pointers stay valid).
  boost::container::small_vector<const ServiceEntry*, 1> entries(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (i > 0 && reqs[i].service == reqs[i - 1].service) {
      entries[i] = entries[i - 1];
      continue;
    }
    entries[i] = registry_.find(reqs[i].service);
    for_request(i, [&] {
      if (entries[i] == nullptr) {
        const std::string known = registry_.kinds();
        throw Error(ErrorCode::kNotFound,
                    "no service '" + reqs[i].service + "' is registered" +
                        (known.empty() ? "" : " (registered: " + known + ")"));
      }
    });
  }
  for (std::size_t i = 0; i < n; ++i) {
    for_request(i, [&] {
      if (entries[i]->needs_input && reqs[i].input.path.empty() && reqs[i].input.data.empty()) {
        throw Error(
            ErrorCode::kInvalidArgument,
            "service '" + reqs[i].service + "' needs an input: give an input path or input bytes");
      }
    });
  }
  std::size_t starting = 0;
  // A shared queue's tasks wait in the shared table, not in this host's
  // queues: no room to reserve here.
  for (std::size_t i = 0; i < n; ++i) starting += reqs[i].start && !shared() ? 1 : 0;
  QueueAdmission& admission = scheduler_.admission();
  if (starting > 0) admission.reserve(starting, many);
  // Gives back the reserved queue room if anything below fails.
  struct Reservation {
    QueueAdmission& a;
    std::size_t n;
    ~Reservation() {
      if (n != 0) a.unreserve(n);
    }
  } reservation{admission, starting};

  // One create allocates nothing for these (the common case).
  boost::container::small_vector<RecordPtr, 1> recs;
  boost::container::small_vector<bool, 1> start;
  std::vector<NewTask> rows;
  recs.reserve(n);
  start.reserve(n);
  rows.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const TaskCreateRequest& req = reqs[i];
    auto rec = std::make_shared<Record>();
    rec->device_pinned.store(!req.device.empty());
    Task& t = rec->unshared_task();  // no other thread sees it before add_created
    t.id = generate_task_id();
    t.service = req.service;
    t.input.path = req.input.path;  // the bytes: below, for the store only
    t.input.media_type = req.input.media_type;
    t.input.left_out_bytes = req.input.data.size();
    t.options_json = req.options_json;
    t.priority = req.priority;
    t.batch_size = req.batch_size;
    t.created_at = stored_time(*clock_);
    Placed placed;
    for_request(i,
                [&]() REQUIRES(!scheduler_lock) { placed = placement_.place(*entries[i], req); });
    rec->unshared_features() = placed.features;
    if (placed.estimate) t.estimated_memory_mb = placed.estimate->mb;
    t.assigned_device = placed.device;
    if (shared()) {
      // The host that claims it chooses among its devices, unless one was named.
      if (!req.device.empty()) t.requested_device = req.device;
      t.assigned_device = t.requested_device;
    }
    EventBatch b(*clock_);
    events::created(b, t, placed.estimate ? &*placed.estimate : nullptr);
    if (req.start) {
      (void)Lifecycle::apply_unshared(*rec, Step::kCreateQueued);
      t.queued_at = stored_time(*clock_);
      events::queued(b, t, false, false);
    } else {
      (void)Lifecycle::apply_unshared(*rec, Step::kCreate);
    }
    NewTask& row = rows.emplace_back();  // built in place: a Task is large to move
    row.task = t;
    row.events = b.take_records(t.id);
    // The input's bytes go to the store only: the record (and the task
    // returned) hold its path and media type, and the attempt reads the
    // bytes when it runs, so that a waiting task costs no memory for them.
    if (!req.input.data.empty()) {
      row.task.input.data = req.input.data;
      rec->set_input_in_store_unshared();
    }
    recs.push_back(std::move(rec));
    start.push_back(req.start);
  }
  journal_.insert_tasks(rows);  // durable before we return; throws on failure: nothing kept
  if (shared()) {
    {
      SchedulerLock g(scheduler_.mutex());
      scheduler_.outbox().publish_stored(rows);  // this host's subscribers see them too
    }
    scheduler_.outbox().drain();
    cluster_->wake();
    std::vector<Task> out;
    out.reserve(rows.size());
    for (auto& row : rows) {
      out.push_back(std::move(row.task));
      out.back().input.leave_out_data();
    }
    return out;
  }
  std::vector<RecordPtr> retired;  // finished records to drop, after the lock
  bool worker_drains = false;
  {
    SchedulerLock g(scheduler_.mutex());
    scheduler_.add_created(recs.data(), start.data(), recs.size(), rows, starting);
    reservation.n = 0;  // now in the queue
    scheduler_.outbox().take_retired(retired);
    // A lingering worker drains when it takes the task or when its linger
    // ends (~50 us): the host thread, often the bottleneck of a stream of
    // creates, leaves the events to it.
    worker_drains = dispatcher_.lingering() > 0;
  }
  retired.clear();
  std::vector<Task> out;
  out.reserve(rows.size());
  for (auto& row : rows) {
    out.push_back(std::move(row.task));
    out.back().input.leave_out_data();  // a snapshot, as get_task's: the bytes are in the store
  }
  if (!worker_drains) scheduler_.outbox().drain();
  return out;
}

Task Intake::start(const std::string& id, const TaskStartRequest& p) {
  scheduler_.check_open();
  if (p.batch_size && *p.batch_size < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("batch_size must be >= 1, got {}", *p.batch_size));
  }
  check_options(p.options_json);
  check_name("device", p.device);
  StartPlan plan;
  std::string service;
  bool known = false;
  {
    SchedulerLock g(scheduler_.mutex());
    RecordPtr rec = scheduler_.records().find(id);
    // A shared queue's task that ended here is judged by its row: another
    // host may have retried it since.
    if (rec && cluster_ != nullptr && rec->phase() == Phase::kDone) rec.reset();
    if (rec) {
      known = true;
      const Task& t = rec->task;
      plan.priority = p.priority.value_or(t.priority);
      plan.batch_size = p.batch_size.value_or(t.batch_size);
      plan.features = rec->features;
      plan.features.batch_size = plan.batch_size;
      plan.estimate = t.estimated_memory_mb;
      plan.device = t.assigned_device.value_or("");
      plan.options_json = p.options_json;
      // Nothing to place again: queued in this one section (start() refuses
      // a task that is not pending). A task with no device (a row of a table
      // taskmgr adopted, which it never placed) is placed now.
      const bool replace =
          (!p.device.empty() || plan.batch_size != t.batch_size || plan.device.empty()) &&
          rec->phase() == Phase::kPending;
      if (!p.device.empty()) rec->device_pinned.store(true);
      if (!replace) return scheduler_.start(rec, plan);
      service = t.service;
    }
  }
  if (!known && cluster_ != nullptr) return cluster_->start(id, p);  // in the shared table
  if (!known) {
    if (auto t = journal_.load_task(id)) {
      if (t->status == TaskStatus::kUnrecognized) {
        throw Error(ErrorCode::kInvalidState,
                    fmt::format("task {} has the status '{}', which taskmgr does not know "
                                "(storage.adopt.status_map does not map it): only a pending task "
                                "can be started; it was left as it is",
                                id, t->stored_status));
      }
      throw Error(ErrorCode::kInvalidState,
                  fmt::format("task {} is {}: only a pending task can be started", id,
                              to_string(t->status)));
    }
    throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
  }
  // A new device or batch size: estimate and place again, without the lock.
  const ServiceEntry* entry = registry_.find(service);
  if (entry == nullptr) {
    const std::string kinds = registry_.kinds();
    throw Error(ErrorCode::kNotFound,
                "task " + id + " is for service '" + service +
                    "', which is not registered: register it, then start the task" +
                    (kinds.empty() ? "" : " (registered: " + kinds + ")"));
  }
  if (auto est = placement_.estimate(service, plan.features, p.device)) plan.estimate = est;
  plan.device = placement_.select_device(*entry, plan.estimate.value_or(0),
                                         p.device.empty() ? plan.device : p.device);
  SchedulerLock g(scheduler_.mutex());
  RecordPtr rec = scheduler_.records().find(id);
  if (!rec) throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
  if (!p.device.empty()) rec->device_pinned.store(true);
  return scheduler_.start(rec, plan);  // still pending? it checks
}

Task Intake::retry(const std::string& id, const TaskStartRequest& p) {
  scheduler_.check_open();
  if (p.batch_size && *p.batch_size < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("batch_size must be >= 1, got {}", *p.batch_size));
  }
  check_options(p.options_json);
  check_name("device", p.device);
  RecordPtr rec;
  StartPlan plan;
  std::string service;
  int batch_now = 1;
  std::uint64_t deletes_seen = 0;
  {
    SchedulerLock g(scheduler_.mutex());
    if (scheduler_.deleting(id)) {
      throw Error(ErrorCode::kInvalidState, "task " + id + " is being deleted: not retried");
    }
    deletes_seen = scheduler_.deletes_done();
    rec = scheduler_.records().find(id);
    // A shared queue's ended task is queued again in the shared table (for
    // any host), also when it ended here.
    if (rec && cluster_ != nullptr && rec->phase() == Phase::kDone) rec.reset();
    if (rec) {
      const Task& t = rec->task;
      if (std::string why = not_retryable(t, rec->phase() == Phase::kDone); !why.empty()) {
        throw Error(ErrorCode::kInvalidState, why);
      }
      plan.features = rec->features;
      plan.estimate = t.estimated_memory_mb;
      plan.device = t.assigned_device.value_or("");
      plan.priority = p.priority.value_or(t.priority);
      plan.batch_size = p.batch_size.value_or(t.batch_size);
      batch_now = t.batch_size;
      service = t.service;
    }
  }
  if (!rec && cluster_ != nullptr) return cluster_->retry(id, p);
  if (!rec) {
    // Ended a while ago: its record is rebuilt from the store, as recovery
    // builds one (its features read from its input, bytes included).
    std::optional<Task> t = journal_.load_task(id);
    if (!t) throw Error(ErrorCode::kNotFound, "unknown task id '" + id + "'");
    // Never placed (a row of an adopted table that ended before taskmgr):
    // nothing of taskmgr's to clean up, and no open ever does.
    if (!t->assigned_device && is_terminal(t->status)) t->resource_cleanup_completed = true;
    if (std::string why = not_retryable(*t, true); !why.empty()) {
      throw Error(ErrorCode::kInvalidState, why);
    }
    const bool in_store = t->input.path.empty() && !t->input.data.empty();
    const RequestFeatures features = placement_.features(*t);
    t->input.leave_out_data();
    plan.features = features;
    plan.estimate = t->estimated_memory_mb;
    plan.device = t->assigned_device.value_or("");
    plan.priority = p.priority.value_or(t->priority);
    plan.batch_size = p.batch_size.value_or(t->batch_size);
    batch_now = t->batch_size;
    service = t->service;
    rec = std::make_shared<Record>();
    rec->init_unshared(std::move(*t), features);
    if (in_store) rec->set_input_in_store_unshared();
    (void)Lifecycle::apply_unshared(*rec, Step::kRecoverEnded);
  }
  plan.options_json = p.options_json;
  plan.features.batch_size = plan.batch_size;
  // Placed again when the host names a device, the batch size changes, or
  // its device can take nothing now (gone or unavailable).
  const bool moved = !p.device.empty() || plan.batch_size != batch_now || plan.device.empty() ||
                     !devices_.free_memory(plan.device);
  if (moved) {
    const ServiceEntry* entry = registry_.find(service);
    if (entry == nullptr) {
      const std::string kinds = registry_.kinds();
      throw Error(ErrorCode::kNotFound,
                  "task " + id + " is for service '" + service +
                      "', which is not registered: register it, then retry the task" +
                      (kinds.empty() ? "" : " (registered: " + kinds + ")"));
    }
    if (auto est = placement_.estimate(service, plan.features, p.device)) plan.estimate = est;
    plan.device = placement_.select_device(*entry, plan.estimate.value_or(0),
                                           p.device.empty() ? plan.device : p.device);
  }
  Task out;
  bool again = false;
  {
    SchedulerLock g(scheduler_.mutex());
    if (scheduler_.deleting(id)) {
      throw Error(ErrorCode::kInvalidState, "task " + id + " is being deleted: not retried");
    }
    RecordPtr held = scheduler_.records().find(id);
    // A delete ended since the task was read (its record gone from the
    // table, or read from the store): read again, as a new call would.
    again = held != rec && scheduler_.deletes_done() != deletes_seen;
    if (!again) {
      // Rebuilt meanwhile by another retry (or the manager holds it again):
      // that record, whose state decides.
      if (held && held != rec) rec = held;
      if (!p.device.empty()) rec->device_pinned.store(true);
      out = scheduler_.retry(rec, plan);
    }
  }
  if (again) return retry(id, p);
  scheduler_.outbox().drain();
  out.input.data.clear();
  return out;
}

void Intake::set_device_available(const std::string& device, bool available) {
  devices_.set_available(device, available);  // kNotFound for an unknown id
  if (available) {
    SchedulerLock g(scheduler_.mutex());
    dispatcher_.dispatch();
    return;
  }
  std::vector<QueuedTask> queued;
  {
    SchedulerLock g(scheduler_.mutex());
    queued = scheduler_.queue().snapshot(device);
  }
  // Where each can go, without the lock (supports() is host code).
  std::vector<std::pair<std::string, std::string>> moves(queued.size());  // to, why
  for (std::size_t i = 0; i < queued.size(); ++i) {
    const ServiceEntry* entry = registry_.find(queued[i].service);
    try {
      moves[i].first = entry ? placement_.select_device(*entry, queued[i].estimated_memory_mb, "")
                             : devices_.select_device(queued[i].estimated_memory_mb, "");
    } catch (const Error& e) {
      moves[i].second = e.what();
    }
  }
  SchedulerLock g(scheduler_.mutex());
  for (std::size_t i = 0; i < queued.size(); ++i) {
    if (RecordPtr rec = scheduler_.records().find(queued[i].task_id)) {
      scheduler_.move_queued(rec, device, moves[i].first, moves[i].second);
    }
  }
  dispatcher_.dispatch();
}

void Intake::register_service(std::shared_ptr<ServiceFactory> factory) {
  if (!factory) throw Error(ErrorCode::kInvalidArgument, "register_service: factory is null");
  // The host's code first, with no library lock held: its kind, its memory
  // model, a pool (which asks the kind again), the devices it supports.
  std::string kind;
  std::shared_ptr<const MemoryModel> model;
  {
    TASKMGR_HOST_CALL("ServiceFactory::kind, memory_model");
    kind = factory->kind();
    model = factory->memory_model();
  }
  ServiceRegistry::validate_kind(kind);
  scheduler_.check_open();
  const auto svc_config = config_.services.find(kind);
  // services.<kind>.memory_model: the operator's figures for the kind, over
  // the factory's model (or in place of none).
  if (svc_config != config_.services.end() && svc_config->second.memory_model) {
    const auto& m = *svc_config->second.memory_model;
    LinearModelCoefficients c;
    c.base_mb = m.base_mb;
    c.per_page_mb = m.per_page_mb;
    c.per_mpixel_mb = m.per_mpixel_mb;
    c.per_input_mb = m.per_input_mb;
    model = std::make_shared<LinearMemoryModel>("services." + kind + ".memory_model", c);
  }
  // services.<kind>.isolation: process: the instances run in worker
  // processes; the host's factory keeps answering supports() and the
  // memory model here.
  if (auto it = config_.services.find(kind);
      it != config_.services.end() && it->second.isolation == "process" &&
      !dynamic_cast<const ProcessFactoryTag*>(factory.get())) {
    factory = make_process_service(kind, config_, factory, worker_log_sink(log_));
  }
  if (registry_.contains(kind)) {
    throw Error(ErrorCode::kInvalidState, "service '" + kind + "' is registered already");
  }
  auto entry = std::make_unique<ServiceEntry>();
  entry->kind = kind;
  if (svc_config != config_.services.end()) {
    for (const std::string& k : svc_config->second.device_kinds) {
      entry->device_kinds.push_back(k == "gpu" ? DeviceKind::kGpu : DeviceKind::kCpu);
    }
  }
  entry->factory = factory;
  if (const auto* r = dynamic_cast<const InputRequirement*>(factory.get())) {
    entry->needs_input = r->needs_input();  // the library's own factories: no host code
  }
  entry->pool = std::make_unique<ServicePool>(factory, config_.pools_for(kind), workers_, clock_);
  for (const auto& d : devices_.list()) {
    if (ServiceRegistry::supports(*entry, d)) entry->devices.push_back(d.id);
  }
  ServicePool* pool = entry->pool.get();
  const ServiceEntry* added = nullptr;
  {
    // The check and the additions in one section: two registrations of a
    // kind cannot both pass. Nothing here runs host code.
    MutexLock reg(register_mu_);
    if (registry_.contains(kind)) {
      throw Error(ErrorCode::kInvalidState, "service '" + kind + "' is registered already");
    }
    estimator_.register_model(kind, std::move(model));
    {
      SchedulerLock g(scheduler_.mutex());
      dispatcher_.add_pool(kind, pool);
    }
    // Visible to create_task only now that its pool and memory model exist.
    added = &registry_.add(std::move(entry));
  }
  // Warm instances on the registering thread (the factory's create: host
  // code, no lock held).
  for (const auto& id : added->devices) {
    if (pool->settings(id).min_instances > 0) pool->warm(id);
  }
  SchedulerLock g(scheduler_.mutex());
  dispatcher_.dispatch();  // recovered tasks of this service may be waiting
}

}  // namespace taskmgr::detail
