"""The C ABI from Python: examples/python/taskmgr.py (ctypes) on the real
library, with the standard library's unittest only.

Environment (set by CTest): TASKMGR_LIBRARY (the built libtaskmgr.so),
PYTHONPATH (examples/python), TASKMGR_OCR_DATA (../shared/data/ocr; the OCR
tests skip with a message when it is absent).
"""

import json
import os
import subprocess
import sys
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

    def test_page_resolution_and_source_coordinates(self):
        # phototest.tif says 200 dpi (believed; over 0.6 of target_dpi 300,
        # so read as it is); forced to 1.5x, it is still reported at its own
        # size and resolution, word boxes and hOCR on its pixels.
        path = os.path.join(DATA, "phototest.tif")
        for options, scale in (({"output": "hocr"}, 1.0),
                               ({"output": "hocr", "preprocess": {"scale": 1.5}}, 1.5)):
            done = self.tm.wait_task(self.tm.submit(path, options=options), timeout=120)
            self.assertEqual(done["status"], "completed", done.get("failure_message"))
            page = done["result"]["pages"][0]
            self.assertEqual((page["width"], page["height"]), (640, 480))
            self.assertEqual(page["dpi"], 200)
            self.assertEqual(page["dpi_source"], "file")
            self.assertEqual(page["preprocess"], {"scale": scale, "rotated": 0, "deskew_degrees": 0})
            self.assertGreater(len(page["words"]), 20)
            for w in page["words"]:
                x, y, width, height = w["box"]
                self.assertTrue(0 <= x and x + width <= 640 and 0 <= y and y + height <= 480, w)
            self.assertIn("bbox 0 0 640 480", page["hocr"])

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
        # database_url: the PostgreSQL store (tests/test_postgres_store.cpp
        # opens one); checked before any connection, its password never shown.
        with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
            taskmgr.Manager(database=":memory:", database_url="postgresql:///db")
        self.assertIn("database_url", str(cm.exception))
        with self.assertRaises(taskmgr.InvalidConfigError) as cm:
            taskmgr.Manager(database_url="postgresql://u:s3cr%zzet@/db")
        self.assertIn("storage.url", str(cm.exception))
        self.assertNotIn("s3cr", str(cm.exception))
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
            tm2.register_service("slow", lambda ctx, inst: gate.wait(30) and {"ok": True},
                                 input_optional=True)
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


class DescribeDocument(unittest.TestCase):
    PDF = (b"%PDF-1.4\n1 0 obj <</Type/Catalog/Pages 2 0 R>> endobj\n"
           b"2 0 obj <</Type/Pages/Kids[3 0 R 4 0 R]/Count 2>> endobj\n"
           b"3 0 obj <</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>> endobj\n"
           b"4 0 obj <</Type/Page/Parent 2 0 R/MediaBox[0 0 842 595]>> endobj\n"
           b"trailer <</Root 1 0 R/Size 5>>\n%%EOF\n")

    def test_pages_of_a_pdf_and_errors(self):
        with tempfile.TemporaryDirectory() as d:
            pdf = os.path.join(d, "doc.pdf")
            with open(pdf, "wb") as f:
                f.write(self.PDF)
            info = taskmgr.describe_document(pdf)
            self.assertEqual(info["media_type"], "application/pdf")
            self.assertEqual(info["pages"], [{"page": 1, "width": 2550, "height": 3300},
                                             {"page": 2, "width": 3508, "height": 2479}])
            self.assertEqual(taskmgr.describe_document(pdf, dpi=72)["pages"][0]["width"], 612)
            with self.assertRaises(taskmgr.NotFoundError) as cm:
                taskmgr.describe_document(os.path.join(d, "missing.pdf"))
            self.assertIn("missing.pdf", str(cm.exception))
            junk = os.path.join(d, "junk.pdf")
            with open(junk, "wb") as f:
                f.write(b"%PDF-1.4\n" + b"\x07" * 100)
            with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
                taskmgr.describe_document(junk)
            self.assertIn("junk.pdf", str(cm.exception))
            with self.assertRaises(taskmgr.InvalidArgumentError):
                taskmgr.describe_document(pdf, dpi=50)
            with self.assertRaises(TypeError):
                taskmgr.describe_document(pdf, dpi=300.0)
            with self.assertRaises(TypeError):
                taskmgr.describe_document(None)
            # A NUL would end the C string early (another file described);
            # a str that is no UTF-8 (os.listdir's surrogate escapes) is an
            # InvalidArgumentError too, not a UnicodeEncodeError.
            with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
                taskmgr.describe_document(pdf + "\0junk")
            self.assertIn("NUL", str(cm.exception))
            with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
                taskmgr.describe_document(os.path.join(d, "bad\udcff.pdf"))
            self.assertIn("UTF-8", str(cm.exception))
            # /dev/zero is no regular file: refused at once, not read forever.
            with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
                taskmgr.describe_document("/dev/zero")
            self.assertIn("not a regular file", str(cm.exception))


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
            tm.register_service("svc", process, input_optional=True)
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

            tm.register_service("svc", process, input_optional=True)

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

EXIT_WHILE_EVENTS_FLOW = r"""
import sys, threading, time
import taskmgr

tm = taskmgr.Manager(config_yaml=sys.argv[1], database=":memory:", builtin_ocr=False,
                     log=lambda level, message: None)
tm.register_service("echo", lambda ctx, instance: {"ok": True})
seen = []
tm.subscribe(lambda e: seen.append(e.event_type))

def pump():
    try:
        while True:
            tm.create_task(data=b"x", service="echo", start=True)
            time.sleep(0.0005)
    except taskmgr.TaskmgrError:
        pass  # closed at exit

threading.Thread(target=pump, daemon=True).start()
while len(seen) < 300:
    time.sleep(0.005)
sys.exit(0)
"""


class InterpreterExit(unittest.TestCase):
    def test_exit_while_events_flow(self):
        """Issue 15, item 2: a script that ends while a Manager is open and
        events, log lines and tasks flow exits cleanly (it aborted with
        "FATAL: exception not rethrown", 5 of 5 runs)."""
        for run in range(5):
            p = subprocess.run([sys.executable, "-c", EXIT_WHILE_EVENTS_FLOW, CONFIG, "exit"],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 0, f"run {run}: {p.stderr[-2000:]}")
            self.assertNotIn("FATAL", p.stderr)


CTRL_C_DURING_WAIT = r"""
import os, signal, sys, threading
import taskmgr

release = threading.Event()
tm = taskmgr.Manager(config_yaml=sys.argv[1], database=":memory:", builtin_ocr=False)
tm.register_service("blocks", lambda ctx, instance: release.wait() and {"done": True})
task = tm.create_task(data=b"x", service="blocks", start=True)
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    if sys.argv[2] == "task":
        tm.wait_task(task)  # no timeout: the task ends only after the interrupt
    else:
        tm.wait_idle()
    print("returned without an interrupt")
except KeyboardInterrupt:
    print("interrupted while", tm.get_task(task)["status"])
release.set()
print("then", tm.wait_task(task, timeout=60)["status"])
tm.destroy()
"""


class CtrlC(unittest.TestCase):
    def test_ctrl_c_interrupts_waits_without_timeout(self):
        """Issue 15, item 9: SIGINT during wait_task()/wait_idle() with no
        timeout raises KeyboardInterrupt while the task still runs (it took
        effect only when the C call returned: here, never)."""
        for what in ("task", "idle"):
            p = subprocess.run([sys.executable, "-c", CTRL_C_DURING_WAIT, CONFIG, what],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            self.assertIn("interrupted while running", p.stdout)
            self.assertIn("then completed", p.stdout)


class PythonAsAPythonUserExpects(unittest.TestCase):
    """Issue 15, item 10."""

    def manager(self):
        return taskmgr.Manager(config_yaml=CONFIG, database=":memory:", builtin_ocr=False)

    def test_integer_arguments_are_checked_not_wrapped(self):
        with self.manager() as tm:
            tm.register_service("echo", lambda ctx, inst: None)
            for bad in (2**31, -2**31 - 1, 2**64):
                with self.assertRaises(ValueError):
                    tm.create_task(data=b"x", service="echo", priority=bad)
                with self.assertRaises(ValueError):
                    tm.create_task(data=b"x", service="echo", batch_size=bad)
            with self.assertRaises(TypeError):
                tm.create_task(data=b"x", service="echo", priority=1.5)
            self.assertEqual(tm.list_tasks(), [])  # nothing was created
            t = tm.get_task(tm.create_task(data=b"x", service="echo", priority=-2**31))
            self.assertEqual(t["priority"], -2**31)  # the ends themselves are fine
            pending = tm.create_task(data=b"x", service="echo")
            with self.assertRaises(ValueError):
                tm.start_task(pending, priority=2**31)
            with self.assertRaises(ValueError):
                tm.start_task(pending, batch_size=2**32 + 3)
            with self.assertRaises(TypeError):
                tm.start_task(pending, priority=2.7)
            with self.assertRaises(ValueError):
                tm.list_tasks(limit=-1)
            self.assertEqual(tm.get_task(pending)["status"], "pending")
        for bad, error in ((2**32, ValueError), (-1, ValueError), (1.9, TypeError)):
            with self.assertRaises(error):
                taskmgr.Manager(config_yaml=CONFIG, database=":memory:", workers=bad)

    def test_callables_are_checked(self):
        with self.manager() as tm:
            with self.assertRaises(TypeError):
                tm.subscribe(42)
            with self.assertRaises(TypeError):
                tm.register_service("echo", "not a function")
            with self.assertRaises(TypeError):
                tm.register_service("echo", lambda c, i: None, create_instance=3)

    def test_keyboard_interrupt_in_a_service_cancels_its_task(self):
        def process(ctx, inst):
            raise KeyboardInterrupt

        with self.manager() as tm:
            tm.register_service("interrupted", process)
            t = tm.wait_task(tm.create_task(data=b"x", service="interrupted", start=True), 60)
            self.assertEqual(t["status"], "cancelled")
            self.assertEqual(t["failure_reason"], "cancelled")
            self.assertIn("KeyboardInterrupt", t["failure_message"])

    def test_callback_errors_are_bounded_and_in_the_metrics(self):
        def bad(event):
            raise RuntimeError("boom")

        with self.manager() as tm:
            tm.register_service("echo", lambda ctx, inst: None)
            tm.subscribe(bad)
            ids = [tm.create_task(data=b"x", service="echo", start=True) for _ in range(30)]
            for i in ids:
                tm.wait_task(i, 60)
            tm.flush_events()
            self.assertGreater(tm.callback_error_count, 100)  # 8 events per task
            self.assertEqual(len(tm.callback_errors), 100)  # the last 100 kept
            self.assertIsInstance(tm.callback_errors[-1], RuntimeError)
            counted = tm.metrics()["counters"]["callback_errors"]
            self.assertGreaterEqual(counted, tm.callback_error_count)

    def test_del_frees_a_manager_with_subscriptions_and_services(self):
        import gc
        import weakref
        gc.disable()  # freed by reference counting alone: no cycle
        try:
            tm = self.manager()
            tm.register_service("echo", lambda ctx, inst: None,
                                supports_device=lambda d, k: True)
            tm.subscribe(lambda e: None)
            alive = weakref.ref(tm)
            del tm
            self.assertIsNone(alive())
        finally:
            gc.enable()



class NoInput(unittest.TestCase):
    def test_a_task_with_no_input_is_refused_at_create(self):
        """Issue 15, item 6: a request with no input at all is refused by
        create_task (it was accepted and failed later), unless the service
        declares its tasks need none."""
        with taskmgr.Manager(config_yaml=CONFIG, database=":memory:") as tm:
            tm.register_service("needs", lambda ctx, inst: {"ok": True})
            tm.register_service("free", lambda ctx, inst: {"ok": True}, input_optional=True)
            for service in ("ocr", "needs"):
                with self.assertRaises(taskmgr.InvalidArgumentError) as e:
                    tm.create_task(service=service, start=True)
                self.assertIn("needs an input", str(e.exception))
                with self.assertRaises(taskmgr.InvalidArgumentError):
                    tm.create_task(service=service, data=b"")  # empty bytes: no input either
            self.assertEqual(tm.list_tasks(), [])  # nothing was created
            done = tm.wait_task(tm.create_task(service="free", start=True), 60)
            self.assertEqual(done["status"], "completed")
            done = tm.wait_task(tm.create_task(service="needs", data=b"x", start=True), 60)
            self.assertEqual(done["status"], "completed")



class Storage(unittest.TestCase):
    def test_full_database_close_and_destroy_raise_unpersisted(self):
        """A database that fills up: creates are refused (IoError, the
        store's message), close() and destroy() raise UnpersistedError naming
        the writes not stored, destroy still frees the manager, and every
        task whose create returned is in the database afterwards."""
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "full.db")
            tm = taskmgr.Manager(config_yaml=CONFIG + "storage:\n  max_size_mb: 1\n",
                                 database=db, builtin_ocr=False, log=lambda level, msg: None)
            tm.register_service("big", lambda ctx, inst: {"text": "x" * 50000},
                                input_optional=True)
            # Made while there is room, started once there is none: its
            # writes (a 50 KB result) cannot be stored, whatever the last
            # task before the refusal left (the file's free pages decide
            # whether its writes went in: CI saw both).
            late = tm.create_task(service="big")
            # One task at a time (a sanitizer build is slow: never a full
            # queue), each waited for, until the file cannot take another.
            ids, refused = [late], None
            for _ in range(2000):
                try:
                    ids.append(tm.create_task(service="big", start=True))
                except taskmgr.IoError as e:
                    refused = e
                    break
                self.assertEqual(tm.wait_task(ids[-1], 60)["status"], "completed")
            self.assertIsNotNone(refused, "the database never filled up")
            self.assertIn("full", str(refused))
            self.assertTrue(ids)
            tm.start_task(late)
            self.assertEqual(tm.wait_task(late, 60)["status"], "completed")
            with self.assertRaises(taskmgr.UnpersistedError) as e:
                tm.close()
            self.assertIn("not in the store", str(e.exception))
            # Reads still answer after close, from memory where the file lags.
            self.assertEqual(tm.get_task(ids[-1])["status"], "completed")
            with self.assertRaises(taskmgr.UnpersistedError):
                tm.destroy()
            with self.assertRaises(taskmgr.InvalidStateError):
                tm.get_task(ids[0])  # destroyed: freed, not leaked
            tm.destroy()  # idempotent
            # Nothing accepted is lost: every task is in the file (those
            # whose outcome was not stored run again at the next open).
            with taskmgr.Manager(config_yaml=CONFIG, database=db, builtin_ocr=False,
                                 log=lambda level, msg: None) as again:
                stored = {t["id"] for t in again.list_tasks()}
                self.assertTrue(set(ids) <= stored, set(ids) - stored)

    def test_adopted_table_extra_columns_through_the_c_abi(self):
        """An earlier application's tasks table (made here with sqlite3) is
        adopted: its own columns come back in "extra", its old status word is
        read through storage.adopt.status_map, its tasks run, and a word the
        map does not know is "unrecognized" with the word kept."""
        import sqlite3
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "legacy.db")
            c = sqlite3.connect(db)
            c.executescript("""
                CREATE TABLE tasks (id VARCHAR(36) PRIMARY KEY, type TEXT, status TEXT,
                                    created_at TIMESTAMP, user_id INTEGER, note TEXT);
                INSERT INTO tasks VALUES ('old-1', 'echo', 'waiting', '2024-05-01 10:00:00', 7,
                                          'caf\u00e9');
                INSERT INTO tasks VALUES ('old-2', 'echo', 'on_hold', '2024-05-01 10:00:01', 8,
                                          NULL);
            """)
            c.commit()
            c.close()
            cfg = CONFIG + "storage:\n  adopt:\n    status_map: {waiting: pending, done: completed}\n"
            with taskmgr.Manager(config_yaml=cfg, database=db, builtin_ocr=False,
                                 log=lambda level, msg: None) as tm:
                tm.register_service("echo", lambda ctx, inst: {"ok": True}, input_optional=True)
                old = tm.get_task("old-1")
                self.assertEqual(old["status"], "pending")
                self.assertEqual(old["extra"], {"user_id": "7", "note": "caf\u00e9"})
                self.assertEqual(old["created_at"], "2024-05-01T10:00:00.000Z")
                held = tm.get_task("old-2")
                self.assertEqual((held["status"], held["stored_status"]), ("unrecognized", "on_hold"))
                self.assertEqual(held["extra"], {"user_id": "8"})
                tm.start_task("old-1")
                self.assertEqual(tm.wait_task("old-1", 30)["status"], "completed")
                with self.assertRaises(taskmgr.InvalidStateError) as e:
                    tm.start_task("old-2")
                self.assertIn("'on_hold'", str(e.exception))
                listed = {t["id"]: t for t in tm.list_tasks()}
                self.assertEqual(listed["old-1"]["extra"]["note"], "caf\u00e9")
            c = sqlite3.connect(db)
            self.assertEqual(c.execute("SELECT status, user_id, note FROM tasks WHERE id = 'old-1'")
                             .fetchone(), ("completed", 7, "caf\u00e9"))
            c.close()


class PagingAndDelete(unittest.TestCase):
    """list_tasks_page / iter_tasks walk every task once, newest first;
    delete_task removes an ended task and refuses others."""

    def test_pages_and_delete(self):
        with taskmgr.Manager(config_yaml=CONFIG, database=":memory:", builtin_ocr=False) as tm:
            gate = threading.Event()
            tm.register_service("svc", lambda ctx, inst: gate.wait(30) and {"ok": True},
                                input_optional=True)
            gate.set()
            ids = [tm.create_task(service="svc", start=True) for _ in range(23)]
            tm.wait_idle(60)
            for t in ids:
                self.assertEqual(tm.wait_task(t, 60)["status"], "completed")
            page, cursor = tm.list_tasks_page(limit=10)
            self.assertEqual([t["id"] for t in page], ids[::-1][:10])
            self.assertIsNotNone(cursor)
            self.assertTrue(all(t["result"] is None for t in page))  # results only when asked
            page, _ = tm.list_tasks_page(limit=10, before=cursor, results=True)
            self.assertEqual([t["id"] for t in page], ids[::-1][10:20])
            self.assertEqual(page[0]["result"], {"ok": True})
            self.assertEqual([t["id"] for t in tm.iter_tasks(page_size=4)], ids[::-1])
            self.assertEqual(len(list(tm.iter_tasks(status="pending"))), 0)
            with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
                tm.list_tasks_page(before="not-a-cursor")
            self.assertIn("not-a-cursor", str(cm.exception))
            with self.assertRaises(taskmgr.InvalidArgumentError):
                tm.list_tasks_page(limit=10001)
            with self.assertRaises(ValueError):
                tm.list_tasks_page(limit=-1)
            # A NUL would end the C string early: "id\0junk" named the task
            # "id" (a stranger deleted a task so); refused instead.
            for bad in (ids[0] + "\0junk", "\udcff"):
                with self.assertRaises(taskmgr.InvalidArgumentError):
                    tm.delete_task(bad)
                with self.assertRaises(taskmgr.InvalidArgumentError):
                    tm.set_task_priority(bad, 1)
            with self.assertRaises(taskmgr.InvalidArgumentError):
                tm.list_tasks_page(before=cursor + "\0garbage")
            with self.assertRaises(taskmgr.InvalidArgumentError):
                tm.list_tasks_page(status="completed\0x")
            with self.assertRaises(TypeError):
                tm.list_tasks_page(before=5)
            # The same for every other text the binding passes as a C string
            # (a stranger's "cpu\0junk" device and options were truncated
            # and accepted).
            for call in (lambda: tm.retry_task(ids[0], device="cpu\0junk"),
                         lambda: tm.retry_task(ids[0], options='{"a":1}\0junk'),
                         lambda: tm.create_task(service="svc", device="cpu\0x"),
                         lambda: tm.create_task(service="svc\0x"),
                         lambda: tm.create_task(service="svc", data=b"x", media_type="a\0b"),
                         lambda: tm.set_device_available("cpu\0x", True)):
                with self.assertRaises(taskmgr.InvalidArgumentError) as cm:
                    call()
                self.assertIn("NUL", str(cm.exception))
            self.assertEqual(tm.get_task(ids[0])["status"], "completed")  # untouched

            tm.delete_task(ids[0])
            with self.assertRaises(taskmgr.NotFoundError):
                tm.get_task(ids[0])
            with self.assertRaises(taskmgr.NotFoundError):
                tm.delete_task(ids[0])
            gate.clear()
            held = tm.create_task(service="svc", start=True)
            waiting = tm.create_task(service="svc")
            tm.set_task_priority(waiting, 4)
            self.assertEqual(tm.get_task(waiting)["priority"], 4)
            with self.assertRaises(ValueError):
                tm.set_task_priority(waiting, 2**31)
            with self.assertRaises(taskmgr.InvalidStateError):
                tm.set_task_priority(ids[1], 4)  # ended
            tm.cancel_task(waiting)
            with self.assertRaises(taskmgr.InvalidStateError) as cm:
                tm.delete_task(held)
            self.assertIn("cancel it", str(cm.exception))
            gate.set()
            self.assertEqual(tm.wait_task(held, 30)["status"], "completed")
            tm.delete_task(held)
            tm.retry_task(waiting, priority=1)  # cancelled: it runs now
            self.assertEqual(tm.wait_task(waiting, 30)["status"], "completed")
            self.assertEqual(tm.get_task(waiting)["priority"], 1)
            with self.assertRaises(taskmgr.InvalidStateError):
                tm.retry_task(waiting)  # completed
            tm.delete_task(waiting)
            self.assertEqual(len(tm.list_tasks()), 22)


class Pauses(unittest.TestCase):
    """pause/resume a service, a device or the manager: held tasks stay
    queued, the pause survives a reopen of the database, resume runs them;
    each change is a manager-level event (task_id "")."""

    def test_pause_survives_reopen_and_resume_runs_in_order(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "p.db")
            order = []
            yaml = CONFIG

            def run(ctx, inst):
                order.append(ctx.task_id)
                return {"ok": True}

            rec = Recorder()
            with taskmgr.Manager(config_yaml=yaml, database=db, builtin_ocr=False,
                                 workers=1) as tm:
                tm.subscribe(rec)
                tm.register_service("svc", run, input_optional=True)
                self.assertTrue(tm.pause(service="svc"))
                self.assertFalse(tm.pause(service="svc"))
                ids = [tm.create_task(service="svc", priority=p, start=True) for p in (0, 3, 1)]
                [paused] = tm.paused()
                self.assertEqual((paused["scope"], paused["name"]), ("service", "svc"))
                self.assertTrue(paused["since"].endswith("Z"))
                self.assertEqual([tm.get_task(t)["status"] for t in ids], ["queued"] * 3)
                health = tm.health(ids[0])
                self.assertTrue(any(w.startswith("paused: service 'svc'") for w in health["warnings"]))
                self.assertEqual(tm.metrics()["paused"], [paused])
                tm.flush_events()
                self.assertIn(("", "paused"), [(e.task_id, e.event_type) for e in rec.events])
                for bad in ({"device": "cuda:9"},):
                    with self.assertRaises(taskmgr.NotFoundError):
                        tm.pause(**bad)
                with self.assertRaises(taskmgr.InvalidArgumentError):
                    tm.pause(device="cpu", service="svc")
                with self.assertRaises(taskmgr.InvalidArgumentError):
                    tm.pause(service="a\0b")
                with self.assertRaises(taskmgr.InvalidArgumentError):
                    tm.pause(service="")
            self.assertEqual(order, [])
            with taskmgr.Manager(config_yaml=yaml, database=db, builtin_ocr=False,
                                 workers=1) as tm:
                tm.subscribe(rec)
                tm.register_service("svc", run, input_optional=True)
                self.assertEqual(tm.paused(), [paused])
                self.assertEqual([tm.get_task(t)["status"] for t in ids], ["queued"] * 3)
                self.assertTrue(tm.resume(service="svc"))
                self.assertFalse(tm.resume(service="svc"))
                for t in ids:
                    self.assertEqual(tm.wait_task(t, 60)["status"], "completed")
                self.assertEqual(order, [ids[1], ids[2], ids[0]])
                self.assertEqual(tm.paused(), [])
                tm.flush_events()
                resumed = [e for e in rec.events if e.event_type == "resumed"]
                self.assertEqual(len(resumed), 1)
                self.assertEqual(resumed[0].task_id, "")
                self.assertEqual(resumed[0].details["name"], "svc")
                self.assertGreaterEqual(resumed[0].details["paused_s"], 0)


class ResizePool(unittest.TestCase):
    """resize_pool: a smaller max holds further starts back while tasks run,
    a larger one lets them start; the previous sizes come back; each resize
    is a manager-level event; mistakes raise the matching error."""

    def test_resize_limits_concurrency_and_reports(self):
        lock = threading.Lock()
        gate = threading.Event()
        state = {"inside": 0, "most": 0}

        def run(ctx, inst):
            with lock:
                state["inside"] += 1
                state["most"] = max(state["most"], state["inside"])
            gate.wait(60)
            with lock:
                state["inside"] -= 1
            return {"ok": True}

        rec = Recorder()
        with taskmgr.Manager(config_yaml=CONFIG, database=":memory:", builtin_ocr=False,
                             workers=3) as tm:
            tm.subscribe(rec)
            tm.register_service("svc", run, input_optional=True)
            before = tm.resize_pool("svc", "cpu", 0, 1)
            self.assertEqual(before, {"min_instances": 0, "max_instances": 3})
            ids = [tm.create_task(service="svc", device="cpu", start=True) for _ in range(4)]
            deadline = time.time() + 30
            while time.time() < deadline and state["inside"] < 1:
                time.sleep(0.01)
            time.sleep(0.2)
            self.assertEqual(state["inside"], 1)  # max 1: one runs
            self.assertEqual(tm.resize_pool("svc", "cpu", 0, 3)["max_instances"], 1)
            deadline = time.time() + 30
            while time.time() < deadline and state["inside"] < 3:
                time.sleep(0.01)
            self.assertEqual(state["inside"], 3)  # max 3: two more at once
            gate.set()
            for t in ids:
                self.assertEqual(tm.wait_task(t, 60)["status"], "completed")
            self.assertEqual(state["most"], 3)
            pool = tm.metrics()["pool_utilization"]["svc@cpu"]
            self.assertEqual((pool["min"], pool["max"]), (0, 3))
            with self.assertRaises(taskmgr.NotFoundError):
                tm.resize_pool("nope", "cpu", 0, 1)
            with self.assertRaises(taskmgr.NotFoundError):
                tm.resize_pool("svc", "cuda:9", 0, 1)
            with self.assertRaises(taskmgr.InvalidArgumentError):
                tm.resize_pool("svc", "cpu", 2, 1)
            with self.assertRaises(taskmgr.InvalidArgumentError):
                tm.resize_pool(None, "cpu", 0, 1)
            with self.assertRaises(TypeError):
                tm.resize_pool("svc", "cpu", 0, 1.5)
            tm.flush_events()
            resized = [e for e in rec.events if e.event_type == "pool_resized"]
            self.assertEqual([(e.task_id, e.details["previous_max_instances"],
                               e.details["max_instances"]) for e in resized],
                             [("", 3, 1), ("", 1, 3)])


if __name__ == "__main__":
    unittest.main(verbosity=2)
