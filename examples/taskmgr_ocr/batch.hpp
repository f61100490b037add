// taskmgr-ocr: runs a Plan through a TaskManager, exactly once per page.
//
//  * Adopt: the tasks an earlier run left (the manager recovered them when
//    it opened: queued again) are found by their page identity (the "source"
//    option) and waited for; no second task is made for such a page. A page
//    completed before is skipped unless `redo`. Extra unfinished tasks for
//    one page (left by older versions) are cancelled.
//  * Stream: at most `window` pages are queued or running at once; each that
//    ends lets the next one in. A page never waits in the queue for long,
//    whatever the folder's size, and only the pages in flight are in memory.
//  * Account from the database: the summary is read back from the store
//    after the run, so it cannot disagree with it; a store write that failed
//    is reported.
#pragma once

#include <taskmgr/taskmgr.hpp>

#include <atomic>
#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "pages.hpp"

namespace ocrcli {

struct BatchOptions {
  std::size_t window = 8;  // pages queued or running at once
  int priority = 0;
  std::string device;  // "" = any
  std::string output;  // the OCR service's "output" option; "" = its default
  // Word boxes in the result (the json format writes them); without them a
  // page's result is its text and confidence only: less to build and store.
  bool words = true;
  int dpi = 300;  // PDF pages are rendered at this resolution
  // The OCR settings a result depends on (languages, psm, orientation,
  // preprocessing): part of a page's identity, so that a page read with
  // other settings is read again.
  std::string settings;
  // Set (by a signal handler) to stop: no page is submitted any more, the
  // pages in flight are waited for. Pages not submitted stay unfinished.
  const std::atomic<int>* stop = nullptr;
  bool redo = false;  // OCR pages completed before again
};

// How a page ended, as it is called back during the run.
struct PageEnd {
  std::size_t page = 0;  // index into Plan::pages
  taskmgr::Task task;    // ended (completed, failed or cancelled)
  bool before = false;   // completed by an earlier run (not redone)
};

// What the database says after the run, for this run's pages.
struct Summary {
  std::size_t pages = 0;
  std::size_t before = 0;     // completed by an earlier run, not redone
  std::size_t completed = 0;  // completed now (in this run)
  std::size_t failed = 0;
  std::size_t cancelled = 0;
  std::size_t unfinished = 0;   // no ended task in the database (a write failed, or stopped)
  std::size_t refused = 0;      // not accepted as a task (a path that is not UTF-8, a FIFO, ...)
  std::size_t not_started = 0;  // not submitted: the run was stopped (a signal)
  std::size_t adopted = 0;      // tasks of an earlier run this run waited for
  std::size_t duplicates_cancelled = 0;
  std::map<std::string, std::size_t> failures;  // reason -> pages
  std::vector<std::string> problems;            // store errors, disagreements: exit non-zero
};

class Batch {
 public:
  Batch(taskmgr::TaskManager& tm, const Plan& plan, BatchOptions options);
  // Runs every page; `on_end` is called on this thread as each page ends
  // (pages completed before first); `on_wait` about every 200 ms while
  // waiting. Returns what the database holds for the run's pages.
  Summary run(const std::function<void(const PageEnd&)>& on_end,
              const std::function<void(std::size_t ended)>& on_wait);

 private:
  // A task's "source" option: the page identity (page_key) and what the
  // run asks of the page.
  std::string source_for(const Document& d, const Page& p) const;

  taskmgr::TaskManager& tm_;
  const Plan& plan_;
  BatchOptions options_;
};

// The page identity a task was made for ("" if none: not made by taskmgr-ocr).
std::string source_of(const taskmgr::Task& task);

}  // namespace ocrcli
