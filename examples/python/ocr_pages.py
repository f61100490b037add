#!/usr/bin/env python3
"""OCR pages through taskmgr from Python (ctypes; no third-party packages).

    TASKMGR_LIBRARY=build/release/src/libtaskmgr.so \\
        python3 examples/python/ocr_pages.py page1.png page2.tif

Prints each event as it happens, each page's text and confidence, and the
metrics. Exit status 1 when a page failed.
"""

import sys

import taskmgr


def main(pages):
    if not pages:
        print(__doc__)
        return 2
    with taskmgr.Manager(database=":memory:", workers=2) as tm:
        events = []

        def on_event(e):  # on the manager's event thread
            events.append(e)
            print("  [event %3d] ..%s %-18s %s"
                  % (e.sequence, e.task_id[-8:], e.event_type, e.details))

        tm.subscribe(on_event)
        tasks = {tm.submit(page, options={"words": False}): page for page in pages}
        failed = 0
        for task_id, page in tasks.items():
            done = tm.wait_task(task_id)
            if done["status"] == "completed":
                result = done["result"]
                print("%s: confidence %.0f\n%s" % (page, result["mean_confidence"],
                                                  result["text"].strip()))
            else:
                failed += 1
                print("%s: %s (%s): %s" % (page, done["status"], done["failure_reason"],
                                           done["failure_message"]))
        tm.flush_events()  # every event delivered
        print("events: %d" % len(events))
        m = tm.metrics()
        print("completed %d, failed %d, average wait %.3f s"
              % (m["counters"]["tasks_completed"], m["counters"]["tasks_failed"],
                 m["average_wait_time"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
