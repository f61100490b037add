// taskmgr: the umbrella header of the C++ API.
#pragma once

#include <string_view>

#include "taskmgr/config.hpp"
#include "taskmgr/error.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/task.hpp"
#include "taskmgr/version.hpp"

namespace taskmgr {

// The version the library was built as ("MAJOR.MINOR.PATCH") and as
// TASKMGR_VERSION_NUMBER; compare with the macros of the headers you built with.
TASKMGR_API std::string_view version() noexcept;
TASKMGR_API int version_number() noexcept;

}  // namespace taskmgr
