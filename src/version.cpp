#include "taskmgr/taskmgr.hpp"

namespace taskmgr {

std::string_view version() noexcept { return TASKMGR_VERSION_STRING; }
int version_number() noexcept { return TASKMGR_VERSION_NUMBER; }

}  // namespace taskmgr
