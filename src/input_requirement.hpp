// Private: a service factory of the library's own (the built-in OCR, a C
// ABI service) that says whether its tasks need an input. create_task
// refuses a task with neither input path nor bytes for such a service
// (INVALID_ARGUMENT at the call, not a failure later). A C++ host's own
// factories do not implement it: their tasks may have no input.
#pragma once

namespace taskmgr::detail {

class InputRequirement {
 public:
  virtual ~InputRequirement() = default;
  virtual bool needs_input() const = 0;
};

}  // namespace taskmgr::detail
