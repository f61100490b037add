// Private: what the manager needs to know of worker-process factories
// (taskmgr/worker.hpp): whether a factory is one already, so that
// register_service does not wrap it twice.
#pragma once

namespace taskmgr::detail {

class ProcessFactoryTag {
 public:
  virtual ~ProcessFactoryTag() = default;
};

}  // namespace taskmgr::detail
