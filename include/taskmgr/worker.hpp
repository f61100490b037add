// taskmgr: service instances in worker processes.
//
// With services.<kind>.isolation: process (docs/CONFIGURATION.md), each
// pooled instance of the kind is a child process, taskmgr-worker, holding
// one warm engine. The host talks to it over a socketpair; a task's input
// bytes pass in a sealed memfd. What this buys (docs/RELIABILITY.md,
// "Worker processes"):
//
//  * A worker that dies during a task (a segfault, an abort, a kill from
//    outside) fails that attempt with PROCESSING_ERROR "worker crashed
//    (signal 11: Segmentation fault)", retryable: the task is retried per
//    tasks.retry. The worker is started again, warm, before the attempt
//    ends; the host and its other tasks go on.
//  * A worker that does not stop within kStopGraceSeconds of its task's
//    cancel or deadline is killed and replaced; the task ends CANCELLED or
//    TIMEOUT as it would in process.
//  * services.<kind>.memory_limit_mb is a hard limit (RLIMIT_DATA) on each
//    worker: an allocation past it fails, and the task is OUT_OF_MEMORY
//    with the error handler's policy (a smaller batch, another device). A
//    worker killed by SIGKILL within 10% of its limit is also reported as
//    out of memory (the kernel's OOM killer).
//  * actual_memory_mb is measured: the worker's peak resident memory during
//    the task (VmHWM, reset at the start of each task), and every
//    task_metrics sample carries the worker's resident memory at that stage.
//
// The manager wraps a kind itself when the configuration says so; this
// factory is public for hosts that assemble services by hand.
#pragma once

#include <memory>
#include <string>

#include "taskmgr/config.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/log.hpp"
#include "taskmgr/service.hpp"

namespace taskmgr {

// Seconds a worker has to stop after its task is cancelled or passes its
// deadline before it is killed (SIGKILL) and replaced.
inline constexpr double kStopGraceSeconds = 2.0;

// A factory whose instances are worker processes for `kind`, set up by
// config.services[kind] (defaults when absent). `local`, when given, is the
// in-process factory of the same kind: its supports() and memory_model()
// are used here, in the host (placement and estimates do not start a
// worker). The worker makes its instances from services.<kind>.library
// (taskmgr_worker_factory below), or the built-in OCR for "ocr".
// With services.<kind>.library set, a worker is started here to check it (it
// loads the library and makes the kind's factory, no instance, and exits):
// Error(kInvalidConfig) with the worker's message when the library does not
// load, lacks taskmgr_worker_factory, has no factory for the kind (null), a
// factory of another kind, or throws; also when no worker program is found.
// create() starts a worker and waits until its engine is loaded (at most
// start_timeout_seconds); it throws std::runtime_error with the worker's
// message when it cannot (no worker program, a library that does not load,
// an engine that fails or needs more than the memory limit).
// `log`, when given, hears each worker's start (its pid, how long the
// engine took to load, the memory limit in force: "RLIMIT_DATA 300 MB" or
// "none") at info level, and each crash, kill and replacement at warn level.
TASKMGR_API std::shared_ptr<ServiceFactory> make_process_service(
    const std::string& kind, const Config& config, std::shared_ptr<ServiceFactory> local = nullptr,
    LogSink log = nullptr);

// The worker program the manager starts for `settings`: worker_executable,
// or taskmgr-worker beside libtaskmgr.so (a build tree), in the
// libexec/taskmgr of the prefix libtaskmgr.so is installed in (wherever
// that prefix was moved), or where it was installed; "" when none is an
// executable file.
TASKMGR_API std::string find_worker_executable(const ServiceConfig& settings);

}  // namespace taskmgr

// A worker library (services.<kind>.library) exports this C function: a new
// factory for `kind`, owned by the caller from then on, or null when the
// library has none for it. It is called once per worker process.
extern "C" {
typedef taskmgr::ServiceFactory* (*taskmgr_worker_factory_fn)(const char* kind);
}
#define TASKMGR_WORKER_FACTORY_SYMBOL "taskmgr_worker_factory"
