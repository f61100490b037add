
#include <atomic>
#include <boost/json.hpp>
#include <condition_variable>
#include <future>
#include <thread>

#include "taskmgr/events.hpp"

#include "forced_unwind.hpp"
#include "host_call.hpp"
#include "sync.hpp"

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
using Subscribers = std::vector<std::shared_ptr<Subscriber>>;
}  // namespace

struct EventBus::Impl {
  Impl(LogSink l, std::size_t max) : log(std::move(l)), max_pending(max) {}

  // The dispatcher thread's loop.
  void run() REQUIRES(!queue_mu, !subs_mu, !delivery_mu, !flush_mu);
  // Waits for events and swaps them into `batch` (empty). False when
  // stopping and everything was delivered.
  bool take_batch(std::vector<EventRecord>& batch) REQUIRES(!queue_mu);
  // Calls every active subscriber for each event; catches what they throw.
  void deliver(const std::vector<EventRecord>& batch, const Subscribers& local)
      REQUIRES(!delivery_mu);

  // Fixed at construction.
  const LogSink log;
  const std::size_t max_pending;

  // Published, not yet taken by the dispatcher. A mutex-guarded vector that
  // the dispatcher swaps out whole: one short lock per publish, one per
  // batch. (Boost.Lockfree's queue was measured no faster here and its
  // freelist is reported as racy by ThreadSanitizer.)
  detail::Mutex queue_mu;
  std::condition_variable wake_cv;  // waits on queue_mu
  std::vector<EventRecord> queue GUARDED_BY(queue_mu);
  bool sleeping GUARDED_BY(queue_mu) = false;
  bool stop GUARDED_BY(queue_mu) = false;
  // The last delivered batch, kept for take_recycled().
  std::vector<EventRecord> recycled GUARDED_BY(queue_mu);
  static constexpr std::size_t kMaxRecycled = 4096;
  bool flush_requested GUARDED_BY(queue_mu) = false;

  detail::Mutex subs_mu;  // the subscriber list
  Subscribers subs GUARDED_BY(subs_mu);
  std::atomic<std::uint64_t> subs_version{0};
  SubscriptionId next_id GUARDED_BY(subs_mu) = 1;

  // Whether a batch is being delivered, for unsubscribe() to wait it out.
  // Callbacks run with no lock of the bus held: this is a flag, not a lock
  // held across the batch.
  detail::Mutex delivery_mu;
  std::condition_variable delivery_cv;  // waits on delivery_mu
  bool delivering GUARDED_BY(delivery_mu) = false;
  std::uint64_t batches_done GUARDED_BY(delivery_mu) = 0;

  detail::Mutex flush_mu;
  std::condition_variable flushed_cv;       // waits on flush_mu
  std::atomic<std::uint64_t> processed{0};  // events delivered or dropped

  std::atomic<std::uint64_t> published{0};
  std::atomic<std::uint64_t> delivered{0};
  std::atomic<std::uint64_t> dropped{0};
  std::atomic<std::uint64_t> callback_errors{0};
  std::atomic<std::uint64_t> dispatch_errors{0};

  std::thread::id dispatcher_id;  // set before the constructor returns
  std::thread thread;
};

bool EventBus::Impl::take_batch(std::vector<EventRecord>& batch) {
  detail::MutexLock lk(queue_mu);
  // Linger up to 1 ms for more events before sleeping: under load the
  // publishers then never pay for a wake-up (one timed wake per ms
  // instead of one futex call per event); an idle bus sleeps until the
  // next publish wakes it, so a lone event is delivered at once.
  if (queue.empty() && !stop && !flush_requested) {
    wake_cv.wait_for(lk.native(), std::chrono::milliseconds(1));
  }
  while (queue.empty() && !stop) {
    sleeping = true;
    wake_cv.wait(lk.native());
    sleeping = false;
  }
  flush_requested = false;
  if (queue.empty()) return false;  // stopping and drained
  batch.swap(queue);
  return true;
}

void EventBus::Impl::deliver(const std::vector<EventRecord>& batch, const Subscribers& local) {
  {
    detail::MutexLock g(delivery_mu);
    delivering = true;
  }
  // Ends the batch for unsubscribe() on every path, a thread's cancellation
  // included.
  struct Done {
    Impl& im;
    ~Done() {
      {
        detail::MutexLock g(im.delivery_mu);
        im.delivering = false;
        ++im.batches_done;
      }
      im.delivery_cv.notify_all();
    }
  } done{*this};
  for (const EventRecord& ev : batch) {
    for (const auto& s : local) {
      if (!s->active.load(std::memory_order_acquire)) continue;
      try {
        TASKMGR_HOST_CALL("EventBus dispatcher: event callback");
        s->callback(ev);
      } catch (const std::exception& ex) {
        callback_errors.fetch_add(1);
        if (log) {
          try {
            const std::string message = std::string("event callback threw: ") + ex.what();
            TASKMGR_HOST_CALL("EventBus dispatcher: LogSink");
            log(LogLevel::kWarn, message);
          } catch (...) {
            ::taskmgr::detail::rethrow_if_forced_unwind();
          }
        }
      } catch (...) {
        ::taskmgr::detail::rethrow_if_forced_unwind();
        callback_errors.fetch_add(1);
      }
    }
  }
}

void EventBus::Impl::run() {
  Subscribers local;
  std::uint64_t local_version = ~0ULL;
  std::vector<EventRecord> batch;
  bool pending = false;  // `batch` holds events taken and not yet delivered
  for (;;) {
    try {
      if (!pending) {
        batch.clear();
        if (!take_batch(batch)) break;
        pending = true;
      }
      if (subs_version.load() != local_version) {
        Subscribers fresh;
        {
          detail::MutexLock g(subs_mu);
          fresh = subs;
          local_version = subs_version.load();
        }
        // The old list goes outside the lock: it may hold the last
        // reference to an unsubscribed callback, whose captures are the
        // host's to destroy.
        local.swap(fresh);
      }
      deliver(batch, local);
      pending = false;
      delivered.fetch_add(batch.size());
      processed.fetch_add(batch.size());
      if (batch.size() > kMaxRecycled) batch.resize(kMaxRecycled);
      {
        // Kept for a publisher to fill again, unless it has not taken the
        // previous batch yet.
        detail::MutexLock g(queue_mu);
        if (recycled.empty()) recycled.swap(batch);
      }
      batch.clear();
      { detail::MutexLock g(flush_mu); }
      flushed_cv.notify_all();
    } catch (...) {
      ::taskmgr::detail::rethrow_if_forced_unwind();
      // Outside any callback (e.g. bad_alloc copying the subscriber list):
      // the dispatcher keeps running, and a batch not yet delivered is
      // tried again. The pause keeps a lasting failure from spinning.
      dispatch_errors.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
}

EventBus::EventBus(LogSink log, std::size_t max_pending)
    : impl_(std::make_unique<Impl>(std::move(log), max_pending)) {
  Impl* im = impl_.get();
  std::promise<void> started;
  auto ready = started.get_future();
  im->thread = std::thread([im, &started] {
    im->dispatcher_id = std::this_thread::get_id();
    detail::HostCallScope host;  // callbacks run here
    started.set_value();
    im->run();
  });
  ready.wait();
}

EventBus::~EventBus() {
  {
    detail::MutexLock g(impl_->queue_mu);
    impl_->stop = true;
  }
  impl_->wake_cv.notify_one();
  if (impl_->thread.joinable()) impl_->thread.join();
}

SubscriptionId EventBus::subscribe(EventCallback callback) {
  auto s = std::make_shared<Subscriber>();
  s->callback = std::move(callback);
  Impl& im = *impl_;
  detail::MutexLock g(im.subs_mu);
  s->id = im.next_id++;
  im.subs.push_back(s);
  im.subs_version.fetch_add(1);
  return s->id;
}

bool EventBus::unsubscribe(SubscriptionId id) {
  Impl& im = *impl_;
  std::shared_ptr<Subscriber> found;
  {
    detail::MutexLock g(im.subs_mu);
    for (auto it = im.subs.begin(); it != im.subs.end(); ++it) {
      if ((*it)->id == id) {
        found = *it;
        im.subs.erase(it);
        im.subs_version.fetch_add(1);
        break;
      }
    }
  }
  if (!found) return false;
  found->active.store(false, std::memory_order_release);
  if (!on_dispatcher_thread()) {
    // Wait out a batch in progress: afterwards the callback cannot be
    // running. Only that batch: later ones see the subscriber inactive.
    detail::MutexLock g(im.delivery_mu);
    const std::uint64_t batch = im.batches_done;
    while (im.delivering && im.batches_done == batch) im.delivery_cv.wait(g.native());
  }
  return true;
}

void EventBus::publish(EventRecord event) {
  Impl& im = *impl_;
  bool wake = false;
  {
    detail::MutexLock g(im.queue_mu);
    event.sequence = im.published.fetch_add(1) + 1;
    if (im.queue.size() >= im.max_pending) {
      im.dropped.fetch_add(1);
      im.processed.fetch_add(1);
      return;
    }
    im.queue.push_back(std::move(event));
    wake = im.sleeping;
  }
  if (wake) im.wake_cv.notify_one();
}

std::vector<EventRecord> EventBus::take_recycled() {
  Impl& im = *impl_;
  std::vector<EventRecord> out;
  detail::MutexLock g(im.queue_mu);
  out.swap(im.recycled);
  return out;
}

void EventBus::publish(std::vector<EventRecord>&& events) {
  if (events.empty()) return;
  Impl& im = *impl_;
  bool wake = false;
  {
    detail::MutexLock g(im.queue_mu);
    if (im.queue.empty() && events.size() <= im.max_pending) {
      // Nothing waiting: the vector itself becomes the queue (no moves).
      for (auto& event : events) event.sequence = im.published.fetch_add(1) + 1;
      im.queue.swap(events);
    } else {
      for (auto& event : events) {
        event.sequence = im.published.fetch_add(1) + 1;
        if (im.queue.size() >= im.max_pending) {
          im.dropped.fetch_add(1);
          im.processed.fetch_add(1);
          continue;
        }
        im.queue.push_back(std::move(event));
      }
    }
    wake = im.sleeping;
  }
  events.clear();
  if (wake) im.wake_cv.notify_one();
}

void EventBus::flush() {
  if (on_dispatcher_thread()) return;
  Impl& im = *impl_;
  const std::uint64_t target = im.published.load();
  {
    detail::MutexLock g(im.queue_mu);  // cut a linger short
    im.flush_requested = true;
  }
  im.wake_cv.notify_one();
  detail::MutexLock lk(im.flush_mu);
  while (im.processed.load() < target) {
    im.flushed_cv.wait_for(lk.native(), std::chrono::milliseconds(10));
  }
}

bool EventBus::on_dispatcher_thread() const noexcept {
  return std::this_thread::get_id() == impl_->dispatcher_id;
}

std::uint64_t EventBus::published() const noexcept { return impl_->published.load(); }
std::uint64_t EventBus::delivered() const noexcept { return impl_->delivered.load(); }
std::uint64_t EventBus::dropped() const noexcept { return impl_->dropped.load(); }
std::uint64_t EventBus::callback_errors() const noexcept { return impl_->callback_errors.load(); }
std::uint64_t EventBus::dispatch_errors() const noexcept { return impl_->dispatch_errors.load(); }

std::size_t EventBus::subscriber_count() const {
  Impl& im = *impl_;
  detail::MutexLock g(im.subs_mu);
  return im.subs.size();
}

}  // namespace taskmgr
