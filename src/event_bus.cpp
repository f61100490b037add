#include <boost/json.hpp>
#include <future>

#include "taskmgr/events.hpp"

#include "host_call.hpp"

namespace taskmgr {

std::string to_json(const EventRecord& e) {
  boost::json::object o;
  o["sequence"] = e.sequence;
  o["task_id"] = e.task_id;
  o["event_type"] = to_string(e.event);
  o["timestamp"] = format_timestamp(e.timestamp);
  boost::system::error_code ec;
  auto details = boost::json::parse(e.details_json.empty() ? "{}" : e.details_json, ec);
  o["details"] = ec ? boost::json::value(boost::json::string(e.details_json)) : details;
  return boost::json::serialize(o);
}

namespace {
struct Subscriber {
  SubscriptionId id;
  EventCallback callback;
  std::atomic<bool> active{true};
};
}  // namespace

struct EventBus::Impl {
  LogSink log;
  std::size_t max_pending;

  // Published, not yet taken by the dispatcher. A mutex-guarded vector that
  // the dispatcher swaps out whole: one short lock per publish, one per
  // batch. (Boost.Lockfree's queue was measured no faster here and its
  // freelist is reported as racy by ThreadSanitizer.)
  std::mutex queue_mu;
  std::condition_variable wake_cv;
  std::vector<EventRecord> queue;
  bool sleeping = false;
  bool stop = false;
  // The last delivered batch, kept for take_recycled() (queue_mu).
  std::vector<EventRecord> recycled;
  static constexpr std::size_t kMaxRecycled = 4096;
  bool flush_requested = false;

  std::mutex subs_mu;  // the subscriber list
  std::vector<std::shared_ptr<Subscriber>> subs;
  std::atomic<std::uint64_t> subs_version{0};
  SubscriptionId next_id = 1;

  std::mutex delivery_mu;  // held while a batch is delivered
  std::mutex flush_mu;
  std::condition_variable flushed_cv;
  std::atomic<std::uint64_t> processed{0};  // events delivered or dropped

  std::thread::id dispatcher_id;
  std::thread thread;
};

EventBus::EventBus(LogSink log, std::size_t max_pending) : impl_(std::make_unique<Impl>()) {
  impl_->log = std::move(log);
  impl_->max_pending = max_pending;
  Impl* im = impl_.get();
  std::promise<void> started;
  auto ready = started.get_future();
  im->thread = std::thread([this, im, &started] {
    im->dispatcher_id = std::this_thread::get_id();
    detail::HostCallScope host;  // callbacks run here
    started.set_value();
    std::vector<std::shared_ptr<Subscriber>> local;
    std::uint64_t local_version = ~0ULL;
    std::vector<EventRecord> batch;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(im->queue_mu);
        // Linger up to 1 ms for more events before sleeping: under load the
        // publishers then never pay for a wake-up (one timed wake per ms
        // instead of one futex call per event); an idle bus sleeps until the
        // next publish wakes it, so a lone event is delivered at once.
        if (im->queue.empty() && !im->stop && !im->flush_requested) {
          im->wake_cv.wait_for(lk, std::chrono::milliseconds(1));
        }
        while (im->queue.empty() && !im->stop) {
          im->sleeping = true;
          im->wake_cv.wait(lk);
          im->sleeping = false;
        }
        im->flush_requested = false;
        if (im->queue.empty()) break;  // stopping and drained
        batch.swap(im->queue);
      }
      if (im->subs_version.load() != local_version) {
        std::lock_guard<std::mutex> g(im->subs_mu);
        local = im->subs;
        local_version = im->subs_version.load();
      }
      {
        std::lock_guard<std::mutex> g(im->delivery_mu);
        for (const EventRecord& ev : batch) {
          for (const auto& s : local) {
            if (!s->active.load(std::memory_order_acquire)) continue;
            try {
              s->callback(ev);
            } catch (const std::exception& ex) {
              callback_errors_.fetch_add(1);
              if (im->log) {
                try {
                  im->log(LogLevel::kWarn, std::string("event callback threw: ") + ex.what());
                } catch (...) {
                }
              }
            } catch (...) {
              callback_errors_.fetch_add(1);
            }
          }
        }
      }
      delivered_.fetch_add(batch.size());
      im->processed.fetch_add(batch.size());
      if (batch.size() > Impl::kMaxRecycled) batch.resize(Impl::kMaxRecycled);
      {
        // Kept for a publisher to fill again, unless it has not taken the
        // previous batch yet.
        std::lock_guard<std::mutex> g(im->queue_mu);
        if (im->recycled.empty()) im->recycled.swap(batch);
      }
      batch.clear();
      {
        std::lock_guard<std::mutex> g(im->flush_mu);
      }
      im->flushed_cv.notify_all();
    }
  });
  ready.wait();
}

EventBus::~EventBus() {
  {
    std::lock_guard<std::mutex> g(impl_->queue_mu);
    impl_->stop = true;
  }
  impl_->wake_cv.notify_one();
  if (impl_->thread.joinable()) impl_->thread.join();
}

SubscriptionId EventBus::subscribe(EventCallback callback) {
  auto s = std::make_shared<Subscriber>();
  s->callback = std::move(callback);
  std::lock_guard<std::mutex> g(impl_->subs_mu);
  s->id = impl_->next_id++;
  impl_->subs.push_back(s);
  impl_->subs_version.fetch_add(1);
  return s->id;
}

bool EventBus::unsubscribe(SubscriptionId id) {
  std::shared_ptr<Subscriber> found;
  {
    std::lock_guard<std::mutex> g(impl_->subs_mu);
    for (auto it = impl_->subs.begin(); it != impl_->subs.end(); ++it) {
      if ((*it)->id == id) {
        found = *it;
        impl_->subs.erase(it);
        impl_->subs_version.fetch_add(1);
        break;
      }
    }
  }
  if (!found) return false;
  found->active.store(false, std::memory_order_release);
  if (!on_dispatcher_thread()) {
    // Wait out a batch in progress: afterwards the callback cannot be running.
    std::lock_guard<std::mutex> g(impl_->delivery_mu);
  }
  return true;
}

void EventBus::publish(EventRecord event) {
  bool wake = false;
  {
    std::lock_guard<std::mutex> g(impl_->queue_mu);
    event.sequence = published_.fetch_add(1) + 1;
    if (impl_->queue.size() >= impl_->max_pending) {
      dropped_.fetch_add(1);
      impl_->processed.fetch_add(1);
      return;
    }
    impl_->queue.push_back(std::move(event));
    wake = impl_->sleeping;
  }
  if (wake) impl_->wake_cv.notify_one();
}

std::vector<EventRecord> EventBus::take_recycled() {
  std::vector<EventRecord> out;
  std::lock_guard<std::mutex> g(impl_->queue_mu);
  out.swap(impl_->recycled);
  return out;
}

void EventBus::publish(std::vector<EventRecord>&& events) {
  if (events.empty()) return;
  bool wake = false;
  {
    std::lock_guard<std::mutex> g(impl_->queue_mu);
    if (impl_->queue.empty() && events.size() <= impl_->max_pending) {
      // Nothing waiting: the vector itself becomes the queue (no moves).
      for (auto& event : events) event.sequence = published_.fetch_add(1) + 1;
      impl_->queue.swap(events);
    } else {
      for (auto& event : events) {
        event.sequence = published_.fetch_add(1) + 1;
        if (impl_->queue.size() >= impl_->max_pending) {
          dropped_.fetch_add(1);
          impl_->processed.fetch_add(1);
          continue;
        }
        impl_->queue.push_back(std::move(event));
      }
    }
    wake = impl_->sleeping;
  }
  events.clear();
  if (wake) impl_->wake_cv.notify_one();
}

void EventBus::flush() {
  if (on_dispatcher_thread()) return;
  const std::uint64_t target = published_.load();
  {
    std::lock_guard<std::mutex> g(impl_->queue_mu);  // cut a linger short
    impl_->flush_requested = true;
  }
  impl_->wake_cv.notify_one();
  std::unique_lock<std::mutex> lk(impl_->flush_mu);
  while (impl_->processed.load() < target) {
    impl_->flushed_cv.wait_for(lk, std::chrono::milliseconds(10));
  }
}

bool EventBus::on_dispatcher_thread() const noexcept {
  return std::this_thread::get_id() == impl_->dispatcher_id;
}

std::size_t EventBus::subscriber_count() const {
  std::lock_guard<std::mutex> g(impl_->subs_mu);
  return impl_->subs.size();
}

}  // namespace taskmgr
