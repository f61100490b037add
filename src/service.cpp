#include "taskmgr/service.hpp"

#include <limits>

namespace taskmgr {

TaskContext::~TaskContext() = default;

void TaskContext::throw_if_cancelled() const {
  if (cancelled())
    throw TaskError(TaskFailureReason::kCancelled, "task " + task_id() + " was cancelled");
  if (deadline_exceeded()) {
    throw TaskError(TaskFailureReason::kTimeout, "task " + task_id() + " ran past its deadline");
  }
}
bool TaskContext::deadline_exceeded() const { return false; }
double TaskContext::seconds_left() const { return std::numeric_limits<double>::infinity(); }

TaskError::TaskError(TaskFailureReason reason, const std::string& message, bool retryable)
    : std::runtime_error(message), reason_(reason), retryable_(retryable) {}
TaskError::~TaskError() = default;

OutOfMemoryError::OutOfMemoryError(const std::string& message)
    : TaskError(TaskFailureReason::kOutOfMemory, message, true) {}
OutOfMemoryError::~OutOfMemoryError() = default;

InvalidInputError::InvalidInputError(const std::string& message)
    : TaskError(TaskFailureReason::kInvalidInput, message, false) {}
InvalidInputError::~InvalidInputError() = default;

Service::~Service() = default;
void Service::cleanup_task(const std::string&) noexcept {}
bool Service::healthy() const noexcept { return true; }

ServiceFactory::~ServiceFactory() = default;
bool ServiceFactory::supports(const DeviceInfo&) const { return true; }
std::shared_ptr<const MemoryModel> ServiceFactory::memory_model() const { return nullptr; }

namespace {

class FunctionService final : public Service {
 public:
  explicit FunctionService(std::shared_ptr<std::function<void(TaskContext&)>> fn)
      : fn_(std::move(fn)) {}
  void process(TaskContext& ctx) override { (*fn_)(ctx); }

 private:
  std::shared_ptr<std::function<void(TaskContext&)>> fn_;
};

class FunctionFactory final : public ServiceFactory {
 public:
  FunctionFactory(std::string kind, std::function<void(TaskContext&)> fn,
                  std::shared_ptr<const MemoryModel> model)
      : kind_(std::move(kind)),
        fn_(std::make_shared<std::function<void(TaskContext&)>>(std::move(fn))),
        model_(std::move(model)) {}
  std::string kind() const override { return kind_; }
  std::unique_ptr<Service> create(const std::string&) override {
    return std::make_unique<FunctionService>(fn_);
  }
  std::shared_ptr<const MemoryModel> memory_model() const override { return model_; }

 private:
  std::string kind_;
  std::shared_ptr<std::function<void(TaskContext&)>> fn_;
  std::shared_ptr<const MemoryModel> model_;
};

}  // namespace

std::shared_ptr<ServiceFactory> make_function_service(std::string kind,
                                                      std::function<void(TaskContext&)> fn,
                                                      std::shared_ptr<const MemoryModel> model) {
  return std::make_shared<FunctionFactory>(std::move(kind), std::move(fn), std::move(model));
}

}  // namespace taskmgr
