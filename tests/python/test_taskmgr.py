"""The C ABI from Python: examples/python/taskmgr.py (ctypes) on the real
library, with the standard library's unittest only.

Environment (set by CTest): TASKMGR_LIBRARY (the built libtaskmgr.so),
PYTHONPATH (examples/python), TASKMGR_OCR_DATA (../shared/data/ocr; the OCR
tests skip with a message when it is absent).
"""

import json
import os
import tempfile
import threading
import time
import unittest

import taskmgr

DATA = os.environ.get("TASKMGR_OCR_DATA", "")
CONFIG = """
devices:
  probe_cpu: false
  probe_nvidia: false
  cpu_memory_mb: 4000
  declared:
    - {id: "cuda:0", kind: gpu, memory_mb: 2000}
executor:
  worker_threads: 2
tasks:
  retry:
    backoff_base_seconds: 0.01
    backoff_jitter: 0
"""


def cer(text, truth):
    """Character error rate, whitespace normalised (as the C++ tests)."""
    a, b = " ".join(text.split()), " ".join(truth.split())
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1] / max(1, len(b))


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.events = []
        self.threads = set()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)
            self.threads.add(threading.get_ident())

    def types(self, task_id=None):
        with self.lock:
            return [e.event_type for e in self.events if task_id in (None, e.task_id)]


@unittest.skipUnless(os.path.isdir(DATA), "shared OCR pages not present (TASKMGR_OCR_DATA=%r)" % DATA)
class OcrThroughPython(unittest.TestCase):
    def setUp(self):
        self.tm = taskmgr.Manager(config_yaml=CONFIG, database=":memory:")

    def tearDown(self):
        self.tm.destroy()

    def test_pages_events_metrics_health(self):
        rec = Recorder()
        sub = self.tm.subscribe(rec)
        ids = {}
        for name in ("phototest.tif", "eurotext.tif"):
            ids[name] = self.tm.create_task(os.path.join(DATA, name), options={"words": True})
            self.assertEqual(self.tm.get_task(ids[name])["status"], "pending")
            self.tm.start_task(ids[name])
        # Bytes from memory work as a path does.
        with open(os.path.join(DATA, "phototest.tif"), "rb") as f:
            ids["bytes"] = self.tm.submit(data=f.read(), media_type="image/tiff")
        for name, task_id in ids.items():
            done = self.tm.wait_task(task_id, timeout=120)
            self.assertEqual(done["status"], "completed", done.get("failure_message"))
            self.assertTrue(done["resource_cleanup_completed"])
            self.assertGreater(done["actual_memory_mb"], 0)
            self.assertEqual(done["assigned_device"], "cpu")
            truth_name = "phototest.txt" if name != "eurotext.tif" else "eurotext.txt"
            with open(os.path.join(DATA, truth_name), encoding="utf-8") as f:
                truth = f.read()
            rate = cer(done["result"]["text"], truth)
            self.assertLessEqual(rate, 0.01 if truth_name == "phototest.txt" else 0.05, name)
            self.assertGreater(done["result"]["mean_confidence"], 80)
            self.assertTrue(done["result"]["pages"][0]["words"])
        self.tm.flush_events()
        got = rec.types(ids["phototest.tif"])
        for t in ("created", "queued", "resource_acquired", "started", "completed",
                  "resource_released", "cleanup_started", "cleanup_completed"):
            self.assertIn(t, got)
        self.assertLess(got.index("created"), got.index("started"))
        self.assertLess(got.index("started"), got.index("cleanup_completed"))
        # Events arrive on the library's event thread, not this one.
        self.assertNotIn(threading.get_ident(), rec.threads)
        self.assertEqual(self.tm.callback_errors, [])

        m = self.tm.metrics()
        for key in ("active_tasks", "queued_tasks", "memory_by_device", "pool_utilization",
                    "average_wait_time"):
            self.assertIn(key, m)
        self.assertEqual(m["counters"]["tasks_completed"], 3)
        self.assertIn("taskmgr_tasks_completed_total 3", self.tm.prometheus())
        h = self.tm.health(ids["phototest.tif"])
        self.assertEqual(h["status"], "completed")
        self.assertEqual(h["device"], "cpu")
        self.assertGreater(h["processing_time_s"], 0)
        stored = [e.event_type for e in self.tm.task_events(ids["phototest.tif"])]
        self.assertEqual(stored[0], "created")
        self.assertEqual(stored[-1], "cleanup_completed")
        self.tm.unsubscribe(sub)
        with self.assertRaises(taskmgr.NotFoundError):
            self.tm.unsubscribe(sub)

    def test_bad_input_is_a_task_failure_not_an_exception(self):
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 7)
            f.flush()
            done = self.tm.wait_task(self.tm.submit(f.name), timeout=60)
        self.assertEqual(done["status"], "failed")
        self.assertEqual(done["failure_reason"], "invalid_input")
        self.assertIn(os.path.basename(f.name), done["failure_message"])
        # The pooled engine still reads the next page right.
        done = self.tm.wait_task(self.tm.submit(os.path.join(DATA, "phototest.tif")), timeout=60)
        self.assertEqual(done["status"], "completed")


class ErrorsThroughPython(unittest.TestCase):
    def setUp(self):
        self.tm = taskmgr.Manager(config_yaml=CONFIG, database=":memory:")

    def tearDown(self):
        self.tm.destroy()

    def test_errors_carry_the_library_message(self):
        with self.assertRaises(taskmgr.NotFoundError) as cm:
            self.tm.get_task("01890000-0000-7000-8000-000000000000")
        self.assertIn("01890000-0000-7000-8000-000000000000", str(cm.exception))
        self.assertEqual(cm.exception.name, "not_found")
        self.assertEqual(cm.exception.status, -2)
        with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
            self.tm.create_task("page.png", options="{not json")
        self.assertIn("JSON", cm.exception.message)
        with self.assertRaises(taskmgr.NotFoundError) as cm:
            self.tm.create_task("page.png", service="nope")
        self.assertIn("nope", str(cm.exception))
        with self.assertRaises(taskmgr.InvalidArgumentError):
            self.tm.list_tasks(status="finished")
        with self.assertRaises(taskmgr.NotFoundError):
            self.tm.set_device_available("cuda:9", False)
        with self.assertRaises(taskmgr.InvalidConfigError) as cm:
            taskmgr.Manager(config_yaml="tasks:\n  max_queue_size: 0\n", database=":memory:")
        self.assertIn("tasks.max_queue_size", str(cm.exception))
        with self.assertRaises(taskmgr.InvalidConfigError) as cm:
            taskmgr.Manager(config_path="/no/such/config.yaml")
        self.assertIn("/no/such/config.yaml", str(cm.exception))
        task = self.tm.create_task("/no/such/page.png")
        self.tm.cancel_task(task)
        with self.assertRaises(taskmgr.InvalidStateError):
            self.tm.start_task(task)
        self.assertIsInstance(taskmgr.version(), str)

    def test_queue_full_and_timeout(self):
        gate = threading.Event()
        tm2 = taskmgr.Manager(config_yaml=CONFIG + "  max_queue_size: 1\n", database=":memory:",
                              workers=1)
        try:
            tm2.register_service("slow", lambda ctx, inst: gate.wait(30) and {"ok": True})
            first = tm2.submit(service="slow")
            while tm2.get_task(first)["status"] != "running":
                time.sleep(0.005)
            second = tm2.submit(service="slow")
            third = tm2.create_task(service="slow")
            with self.assertRaises(taskmgr.QueueFullError) as cm:
                tm2.start_task(third)
            self.assertIn("max_queue_size", str(cm.exception))
            self.assertEqual(tm2.get_task(third)["status"], "pending")
            # submit creates and queues in one step: at a full queue nothing is created.
            before = len(tm2.list_tasks())
            with self.assertRaises(taskmgr.QueueFullError) as cm:
                tm2.submit(service="slow")
            self.assertIn("not created", str(cm.exception))
            self.assertEqual(len(tm2.list_tasks()), before)
            with self.assertRaises(taskmgr.TimeoutError):
                tm2.wait_task(first, timeout=0.05)
            gate.set()
            self.assertEqual(tm2.wait_task(second, timeout=30)["status"], "completed")
            tm2.start_task(third)
            self.assertEqual(tm2.wait_task(third, timeout=30)["result"], {"ok": True})
        finally:
            gate.set()
            tm2.destroy()


class PythonServices(unittest.TestCase):
    def test_oom_on_gpu_falls_back_to_cpu(self):
        seen = []

        def process(ctx, instance):
            seen.append((ctx.device, ctx.attempt, instance))
            if ctx.device.startswith("cuda:"):
                raise taskmgr.OutOfMemory("CUDA out of memory (simulated)")
            ctx.stage("infer")
            return {"device": ctx.device, "bytes": len(ctx.input_data), "opt": ctx.options}

        destroyed = []
        with taskmgr.Manager(config_yaml=CONFIG, database=":memory:", builtin_ocr=False) as tm:
            tm.register_service("model", process, create_instance=lambda d: "engine@" + d,
                                destroy_instance=destroyed.append, memory_base_mb=500)
            rec = Recorder()
            tm.subscribe(rec)
            task = tm.create_task(data=b"abc", service="model", device="cuda:0",
                                  options={"k": 1})
            self.assertEqual(tm.get_task(task)["estimated_memory_mb"], 500)
            tm.start_task(task)
            done = tm.wait_task(task, timeout=30)
            self.assertEqual(done["status"], "completed")
            self.assertEqual(done["assigned_device"], "cpu")
            self.assertEqual(done["result"], {"device": "cpu", "bytes": 3, "opt": {"k": 1}})
            tm.flush_events()
            types = rec.types(task)
            self.assertIn("device_fallback", types)
            self.assertLess(types.index("device_fallback"), types.index("completed"))
            fb = [e for e in rec.events if e.event_type == "device_fallback"][0]
            self.assertEqual((fb.details["from"], fb.details["to"]), ("cuda:0", "cpu"))
            self.assertEqual(seen[0][:2], ("cuda:0", 1))
            self.assertEqual(seen[-1], ("cpu", 2, "engine@cpu"))
            self.assertEqual(tm.metrics()["counters"]["cpu_fallbacks"], 1)
        self.assertIn("engine@cuda:0", destroyed)  # replaced after the OOM
        self.assertIn("engine@cpu", destroyed)     # at close

    def test_service_exceptions_fail_the_task(self):
        def process(ctx, instance):
            if ctx.options.get("bad"):
                raise taskmgr.InvalidInput("no such thing")
            raise ValueError("boom")

        with taskmgr.Manager(config_yaml=CONFIG, database=":memory:", builtin_ocr=False) as tm:
            tm.register_service("svc", process)
            t1 = tm.submit(service="svc", options={"bad": True})
            t2 = tm.submit(service="svc")
            d1, d2 = tm.wait_task(t1, 30), tm.wait_task(t2, 30)
            self.assertEqual((d1["failure_reason"], d1["failure_message"]),
                             ("invalid_input", "no such thing"))
            self.assertEqual(d2["failure_reason"], "processing_error")
            self.assertIn("ValueError: boom", d2["failure_message"])

    def test_callback_may_not_close_and_log_callback(self):
        results = {}
        logs = []
        with taskmgr.Manager(config_yaml=CONFIG, database=":memory:", builtin_ocr=False,
                             log=lambda level, msg: logs.append((level, msg))) as tm:
            def process(ctx, inst):
                if ctx.options.get("oom"):
                    raise taskmgr.OutOfMemory("no room")
                return None

            tm.register_service("svc", process)

            def cb(event):
                if event.event_type == "created" and "close" not in results:
                    try:
                        tm.close()
                        results["close"] = "closed"
                    except taskmgr.InvalidStateError as e:
                        results["close"] = e.message

            tm.subscribe(cb)
            tm.wait_task(tm.submit(service="svc"), 30)
            tm.flush_events()
            self.assertIn("callback", results["close"])
            # Still open: more work runs.
            self.assertEqual(tm.wait_task(tm.submit(service="svc"), 30)["status"], "completed")
            # Out of memory on the CPU: retried, then failed; each attempt logs a warning.
            done = tm.wait_task(tm.submit(service="svc", options={"oom": True}), 30)
            self.assertEqual(done["status"], "failed")
            self.assertIn(done["failure_reason"], ("out_of_memory", "max_attempts_exceeded"))
        warns = [m for level, m in logs if level == "warn"]
        self.assertTrue(any("no room" in m for m in warns), logs)
        self.assertEqual(tm.callback_errors, [])


class CreateWithStartAndMany(unittest.TestCase):
    """create_task(start=True) and create_tasks: one step, all or none."""

    def setUp(self):
        self.gate = threading.Event()
        self.tm = taskmgr.Manager(config_yaml=CONFIG + "  max_queue_size: 2\n",
                                  database=":memory:", workers=1, builtin_ocr=False)
        self.running = threading.Event()

        def process(ctx, inst):
            self.running.set()
            self.gate.wait(30)
            return {"path": ctx.input_path, "bytes": len(ctx.input_data)}

        self.tm.register_service("svc", process)

    def tearDown(self):
        self.gate.set()
        self.tm.destroy()

    def hold_the_worker(self):
        """Starts a task that keeps the one worker until the gate opens."""
        blocker = self.tm.create_task("/data/blocker.png", service="svc", start=True)
        self.assertTrue(self.running.wait(30))
        return blocker

    def test_create_with_start(self):
        blocker = self.hold_the_worker()
        task = self.tm.create_task("/data/a.png", service="svc", device="cpu", start=True)
        self.assertEqual(self.tm.get_task(task)["status"], "queued")
        with self.assertRaises(taskmgr.InvalidStateError):
            self.tm.start_task(task)  # not pending: it was started when created
        self.tm.create_task("/data/b.png", service="svc", start=True)  # the queue is full now
        with self.assertRaises(taskmgr.QueueFullError) as cm:
            self.tm.create_task("/data/c.png", service="svc", start=True)
        self.assertIn("the task was not created", cm.exception.message)
        self.assertEqual(len(self.tm.list_tasks()), 3)  # nothing left pending
        pending = self.tm.create_task("/data/d.png", service="svc")  # start=False: pending
        self.assertEqual(self.tm.get_task(pending)["status"], "pending")
        self.gate.set()
        for t in (blocker, task):
            self.assertEqual(self.tm.wait_task(t, timeout=30)["status"], "completed")
        types = [e.event_type for e in self.tm.task_events(task)]
        self.assertEqual(types[:2], ["created", "queued"])
        self.assertEqual(types[-1], "cleanup_completed")
        self.assertEqual(self.tm.get_task(pending)["status"], "pending")

    def test_create_tasks(self):
        self.assertEqual(self.tm.create_tasks([]), [])
        blocker = self.hold_the_worker()
        ids = self.tm.create_tasks([
            {"input": "/data/0.png", "service": "svc", "start": True},
            {"data": b"abc", "service": "svc", "priority": 4, "options": {"k": 1}},
            {"input": "/data/2.png", "service": "svc", "start": True},
        ])
        self.assertEqual(len(ids), 3)
        self.assertEqual(len(set(ids)), 3)
        self.assertEqual(ids, sorted(ids))  # time-ordered ids, in request order
        got = [self.tm.get_task(i) for i in ids]
        self.assertEqual([t["status"] for t in got], ["queued", "pending", "queued"])
        self.assertEqual(got[0]["input"]["path"], "/data/0.png")
        self.assertEqual(got[1]["priority"], 4)
        self.assertEqual(got[1]["options"], {"k": 1})
        self.assertEqual(got[2]["input"]["path"], "/data/2.png")

        # All or none: the queue is full (2 of 2), so one more that starts
        # refuses the whole batch.
        with self.assertRaises(taskmgr.QueueFullError) as cm:
            self.tm.create_tasks([{"input": "/data/x.png", "service": "svc"}] * 2, start=True)
        self.assertIn("no task was created", cm.exception.message)
        # A bad request is named by its index; nothing is created.
        bad = [{"input": "/data/y.png", "service": "svc"},
               {"input": "/data/z.png", "service": "nope"}]
        with self.assertRaises(taskmgr.NotFoundError) as cm:
            self.tm.create_tasks(bad)
        self.assertIn("request 1: ", cm.exception.message)
        self.assertIn("nope", cm.exception.message)
        with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
            self.tm.create_tasks([{"input": "/data/y.png", "service": "svc"},
                                  {"input": "/data/z.png", "service": "svc", "options": "[1]"}])
        self.assertIn("request 1: ", cm.exception.message)
        with self.assertRaises(TypeError):
            self.tm.create_tasks([{"input": "/data/y.png", "colour": "red"}])
        self.assertEqual(len(self.tm.list_tasks()), 4)

        # `start` given to create_tasks is the default of the requests.
        more = self.tm.create_tasks([{"input": "/data/p%d.png" % i, "service": "svc"}
                                     for i in range(3)])
        self.assertEqual({self.tm.get_task(i)["status"] for i in more}, {"pending"})
        self.gate.set()
        self.tm.wait_idle(timeout=30)
        for t in [blocker, ids[0], ids[2]]:
            self.assertEqual(self.tm.wait_task(t, timeout=30)["status"], "completed")
        for t in [ids[1]] + more:
            self.tm.start_task(t)
            self.assertEqual(self.tm.wait_task(t, timeout=30)["status"], "completed")
        self.assertEqual(self.tm.get_task(ids[1])["result"], {"path": None, "bytes": 3})
        self.assertEqual(self.tm.metrics()["counters"]["tasks_completed"], 7)

if __name__ == "__main__":
    unittest.main(verbosity=2)
