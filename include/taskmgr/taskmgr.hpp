// taskmgr: the umbrella header of the C++ API.
#pragma once

#include <string_view>

#include "taskmgr/clock.hpp"
#include "taskmgr/config.hpp"
#include "taskmgr/device.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/error_handler.hpp"
#include "taskmgr/estimator.hpp"
#include "taskmgr/events.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/log.hpp"
#include "taskmgr/metrics.hpp"
#include "taskmgr/ocr.hpp"
#include "taskmgr/pause.hpp"
#include "taskmgr/postgres_store.hpp"
#include "taskmgr/service.hpp"
#include "taskmgr/service_pool.hpp"
#include "taskmgr/store.hpp"
#include "taskmgr/task.hpp"
#include "taskmgr/task_manager.hpp"
#include "taskmgr/task_queue.hpp"
#include "taskmgr/version.hpp"
#include "taskmgr/worker.hpp"

namespace taskmgr {

// The version the library was built as ("MAJOR.MINOR.PATCH") and as
// TASKMGR_VERSION_NUMBER; compare with the macros of the headers you built with.
TASKMGR_API std::string_view version() noexcept;
TASKMGR_API int version_number() noexcept;

}  // namespace taskmgr
