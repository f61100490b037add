#!/usr/bin/env python3
"""The dashboard (GET /) in a real browser: headless Chromium loads the page
from a running taskmgr-http while OCR tasks flow, and the test reads the
rendered DOM: the CPU device with its memory, the OCR pool, a running task
in the table while it runs, gone once it finished and counted as completed.
It saves a screenshot, and the page logs no console error.

    dashboard_test.py TASKMGR_HTTP OUT_DIR
"""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import zlib

SERVER = sys.argv.pop(1) if len(sys.argv) > 1 else "taskmgr-http"
OUT = sys.argv.pop(1) if len(sys.argv) > 1 else "."

CONFIG = """
devices:
  probe_cpu: false
  probe_nvidia: false
  cpu_memory_mb: 4000
executor:
  worker_threads: 1
"""


def make_png(width, height):
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    raw = b"".join(b"\0" + b"\xff" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DashboardTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        cfg = os.path.join(self.tmp.name, "config.yaml")
        with open(cfg, "w") as f:
            f.write(CONFIG)
        port_file = os.path.join(self.tmp.name, "port")
        self.proc = subprocess.Popen(
            [SERVER, "--port", "0", "--config", cfg, "--db", os.path.join(self.tmp.name, "t.db"),
             "--port-file", port_file],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(self.stop)
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                self.fail("server did not start: " + self.proc.stdout.read())
            time.sleep(0.02)
        with open(port_file) as f:
            self.port = int(f.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.communicate(timeout=120)

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        data = json.loads(res.read().decode("utf-8"))
        conn.close()
        return res.status, data

    def browse(self, name):
        """Loads the dashboard; returns (DOM, console lines)."""
        browser = chromium()
        self.assertIsNotNone(browser, "no chromium: scripts/setup.sh installs it")
        shot = os.path.join(OUT, name + ".png")
        common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                  "--no-first-run", "--user-data-dir=" + os.path.join(self.tmp.name, "profile"),
                  "--window-size=1280,1000", "--virtual-time-budget=4000"]
        url = "http://127.0.0.1:%d/" % self.port
        dom = subprocess.run(common + ["--enable-logging=stderr", "--v=0", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(dom.returncode, 0, dom.stderr[-2000:])
        subprocess.run(common + ["--screenshot=" + shot, url], capture_output=True, timeout=120)
        self.assertTrue(os.path.exists(shot) and os.path.getsize(shot) > 1000, shot)
        console = [l for l in dom.stderr.splitlines() if "CONSOLE" in l]
        return dom.stdout, console

    def table(self, dom, table_id):
        m = re.search(r'<table id="%s">.*?<tbody>(.*?)</tbody>' % table_id, dom, re.S)
        self.assertIsNotNone(m, table_id)
        return m.group(1)

    def test_the_dashboard_shows_devices_pools_and_a_task_running_then_done(self):
        # Three pages on one worker: one runs while the others wait.
        busy = base64.b64encode(make_png(5000, 7000)).decode()
        ids = []
        for _ in range(3):
            status, t = self.request("POST", "/tasks", {"input": {"data_base64": busy}})
            self.assertEqual(status, 201, t)
            ids.append(t["id"])
            self.request("POST", "/tasks/%s/start" % t["id"])
        deadline = time.time() + 60
        while time.time() < deadline:
            if any(self.request("GET", "/tasks/" + i)[1]["status"] == "running" for i in ids):
                break
            time.sleep(0.05)

        dom, console = self.browse("dashboard-running")
        errors = [l for l in console if re.search(r"Uncaught|ERROR|Failed|error", l)]
        self.assertEqual(errors, [], console)
        self.assertIn('id="status" class="ok">ready<', dom)
        devices = self.table(dom, "devices")
        self.assertIn('data-device="cpu"', devices)
        self.assertRegex(devices, r"\d+ / 4000")
        self.assertIn("ocr@cpu", self.table(dom, "pools"))
        running = self.table(dom, "running")
        shown = re.findall(r'data-task="([0-9a-f-]+)"', running)
        self.assertEqual(len(shown), 1, running)
        self.assertIn(shown[0], ids)

        for i in ids:
            deadline = time.time() + 300
            while self.request("GET", "/tasks/" + i)[1]["status"] not in (
                    "completed", "failed", "cancelled"):
                self.assertLess(time.time(), deadline, "task %s did not end" % i)
                time.sleep(0.1)
        dom, console = self.browse("dashboard-done")
        self.assertNotIn("data-task=", self.table(dom, "running"))  # finished: gone
        self.assertRegex(dom, r"completed 3 ")

    def test_recent_failures_are_listed_with_a_delete_button_and_leave_when_deleted(self):
        bad = base64.b64encode(b"this is not an image").decode()
        status, t = self.request("POST", "/tasks", {"input": {"data_base64": bad}, "start": True})
        self.assertEqual(status, 201, t)
        deadline = time.time() + 120
        while self.request("GET", "/tasks/" + t["id"])[1]["status"] != "failed":
            self.assertLess(time.time(), deadline, "the task did not fail")
            time.sleep(0.05)
        dom, console = self.browse("dashboard-failure")
        errors = [l for l in console if re.search(r"Uncaught|ERROR|Failed|error", l)]
        self.assertEqual(errors, [], console)
        failures = self.table(dom, "failures")
        self.assertIn('data-task="%s"' % t["id"], failures)
        self.assertIn("invalid_input", failures)
        self.assertIn('class="delete"', failures)
        self.assertIn('class="retry"', failures)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("DELETE", "/tasks/" + t["id"])
        self.assertEqual(conn.getresponse().status, 204)
        conn.close()
        dom, console = self.browse("dashboard-failure-deleted")
        self.assertNotIn(t["id"], self.table(dom, "failures"))


    def test_pauses_are_listed_with_resume_buttons_and_devices_with_pause_buttons(self):
        dom, console = self.browse("dashboard-unpaused")
        self.assertNotIn("data-pause=", self.table(dom, "paused"))
        self.assertIn('class="pause"', self.table(dom, "devices"))  # each device can be paused
        status, r = self.request("POST", "/pause", {"device": "cpu"})
        self.assertEqual(status, 200, r)
        status, r = self.request("POST", "/pause", {"service": "ocr"})
        self.assertEqual(status, 200, r)
        dom, console = self.browse("dashboard-paused")
        errors = [l for l in console if re.search(r"Uncaught|ERROR|Failed|error", l)]
        self.assertEqual(errors, [], console)
        paused = self.table(dom, "paused")
        self.assertIn('data-pause="device:cpu"', paused)
        self.assertIn('data-pause="service:ocr"', paused)
        self.assertEqual(paused.count('class="resume"'), 2)
        devices = self.table(dom, "devices")
        self.assertIn('class="resume"', devices)  # the paused device offers resume
        self.assertNotIn('class="pause"', devices)

    def test_pools_show_their_sizes_with_resize_buttons(self):
        status, r = self.request("POST", "/pools/resize", {"service": "ocr", "device": "cpu",
                                                            "min_instances": 1,
                                                            "max_instances": 2})
        self.assertEqual(status, 200, r)
        dom, console = self.browse("dashboard-pools")
        errors = [l for l in console if re.search(r"Uncaught|ERROR|Failed|error", l)]
        self.assertEqual(errors, [], console)
        pools = self.table(dom, "pools")
        row = re.search(r'<tr data-pool="ocr@cpu">(.*?)</tr>', pools, re.S)
        self.assertIsNotNone(row, pools)
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
        self.assertEqual(cells[3:5], ["1", "2"], row.group(1))  # min, max
        self.assertIn('class="shrink"', row.group(1))
        self.assertIn('class="grow"', row.group(1))
        self.assertIn("max_instances&quot;:3", row.group(1))  # grow asks for one more


if __name__ == "__main__":
    unittest.main(verbosity=2)
