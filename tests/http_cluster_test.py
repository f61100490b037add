#!/usr/bin/env python3
"""Two taskmgr-http servers share one queue (storage.shared) on the throwaway
PostgreSQL cluster that tests/with_postgres.sh starts (TASKMGR_TEST_PG_URL):
GET /cluster on either lists both hosts; tasks uploaded to one are run by
whichever claims them, and either server answers for them; controls on a
task neither holds (start, priority, cancel) change the shared row; a
server killed with SIGKILL is shown "lost" once its lease ran out, and its
running task is rescued and completed by the other. The dashboard, in
headless Chromium, shows the cluster's hosts (a lost one in red) with no
console error; its screenshot goes to OUT_DIR. Standard library only.

    with_postgres.sh python3 http_cluster_test.py TASKMGR_HTTP [OUT_DIR]
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
PG_URL = os.environ.get("TASKMGR_TEST_PG_URL", "")

CONFIG = """
storage:
  url: "{url}"
  shared: true
  postgres:
    schema: {schema}
  cluster:
    host_name: {name}
    lease_seconds: 2
    heartbeat_seconds: 0.5
    poll_seconds: 0.5
devices:
  probe_cpu: false
  probe_nvidia: false
  cpu_memory_mb: 4000
executor:
  worker_threads: 1
"""


def make_png(width, height):
    """A valid white 8-bit gray PNG (OCR finds no text in it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + b"\xff" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


TINY_PNG = make_png(200, 60)
# Keeps a worker busy for seconds.
BUSY_PNG = make_png(2500, 3300)


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


class Server:
    def __init__(self, tmp, name, schema):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        cfg = os.path.join(self.dir, "config.yaml")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(url=PG_URL, name=name, schema=schema))
        port_file = os.path.join(self.dir, "port")
        self.proc = subprocess.Popen(
            [SERVER, "--port", "0", "--config", cfg, "--port-file", port_file],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while not read(port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start: " + self.proc.stdout.read())
            time.sleep(0.02)
        self.port = int(read(port_file))

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = json.dumps(body) if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, out

    def kill(self):
        self.proc.kill()
        self.proc.communicate(timeout=60)


def upload(start=True, png=TINY_PNG):
    return {"service": "ocr", "start": start,
            "input": {"data_base64": base64.b64encode(png).decode(), "media_type": "image/png"}}


class ClusterTest(unittest.TestCase):
    def setUp(self):
        self.assertTrue(PG_URL, "TASKMGR_TEST_PG_URL is not set: run through tests/with_postgres.sh")
        self.tmp = tempfile.TemporaryDirectory()
        self.servers = []
        # A schema of each test's own (the store makes it).
        self.schema = "c_" + self._testMethodName[5:30]

    def tearDown(self):
        for s in self.servers:
            if s.proc.poll() is None:
                s.kill()
        self.tmp.cleanup()

    def wait(self, server, task_id, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, t = server.request("GET", "/tasks/" + task_id)
            self.assertEqual(status, 200, t)
            if t["status"] in ("completed", "failed", "cancelled"):
                return t
            time.sleep(0.05)
        self.fail("task %s did not end" % task_id)

    def hosts(self, server):
        status, c = server.request("GET", "/cluster")
        self.assertEqual(status, 200, c)
        return c

    def test_two_servers_share_one_queue(self):
        a = Server(self.tmp.name, "alpha", self.schema)
        self.servers.append(a)
        b = Server(self.tmp.name, "beta", self.schema)
        self.servers.append(b)
        status, h = a.request("GET", "/health")
        self.assertEqual(status, 200, h)
        self.assertIs(h["shared"], True)

        # Both hosts are in the cluster view of either, alive.
        deadline = time.time() + 30
        while time.time() < deadline:
            c = self.hosts(b)
            alive = sorted(x["host_name"] for x in c["hosts"] if x["state"] == "alive")
            if alive == ["alpha", "beta"]:
                break
            time.sleep(0.1)
        self.assertEqual(alive, ["alpha", "beta"], c)
        self.assertIn(c["host_id"], [x["id"] for x in c["hosts"]])
        for x in c["hosts"]:
            for key in ("id", "pid", "started_at", "heartbeat_at", "lease_seconds", "closed_at",
                        "lost", "claimed", "running", "report"):
                self.assertIn(key, x)

        # Tasks uploaded to A, read from B: all complete, each by one host.
        ids = []
        for i in range(8):
            status, t = a.request("POST", "/tasks", upload())
            self.assertEqual(status, 201, t)
            ids.append(t["id"])
        for i in ids:
            t = self.wait(b, i)
            self.assertEqual(t["status"], "completed", t)
            self.assertIn(t["host"], ("alpha", "beta"))
            status, evs = b.request("GET", "/tasks/%s/events" % i)
            self.assertEqual(status, 200)
            self.assertEqual([e["event_type"] for e in evs].count("completed"), 1, evs)

        # Controls on a task neither holds: a pending one, through B.
        status, t = a.request("POST", "/tasks", upload(start=False))
        self.assertEqual(status, 201, t)
        pid = t["id"]
        status, t = b.request("POST", "/tasks/%s/priority" % pid, {"priority": 4})
        self.assertEqual((status, t.get("priority")), (200, 4), t)
        status, t = b.request("POST", "/tasks/%s/start" % pid)
        self.assertEqual(status, 202, t)
        self.assertEqual(self.wait(a, pid)["status"], "completed")
        status, e = b.request("POST", "/tasks/%s/start" % pid)
        self.assertEqual((status, e["error"]), (409, "invalid_state"), e)
        status, t = a.request("POST", "/tasks", upload(start=False))
        status, _ = b.request("POST", "/tasks/%s/cancel" % t["id"])
        self.assertEqual(status, 200)
        self.assertEqual(self.wait(a, t["id"])["status"], "cancelled")

        # B dies while it runs a long task: A shows it lost once its lease
        # ran out, rescues the task and completes it.
        a.stop()
        status, t = b.request("POST", "/tasks", upload(png=BUSY_PNG))
        self.assertEqual(status, 201, t)
        busy = t["id"]
        deadline = time.time() + 60
        while time.time() < deadline and b.request("GET", "/tasks/" + busy)[1]["status"] != "running":
            time.sleep(0.02)
        self.assertEqual(b.request("GET", "/tasks/" + busy)[1]["status"], "running")
        b.kill()
        a = Server(self.tmp.name, "alpha-again", self.schema)
        self.servers.append(a)
        t = self.wait(a, busy)
        self.assertEqual(t["status"], "completed", t)
        self.assertEqual(t["host"], "alpha-again")
        self.assertEqual(t["attempt"], 2)
        status, evs = a.request("GET", "/tasks/%s/events" % busy)
        retried = [e for e in evs if e["event_type"] == "retried"]
        self.assertEqual([e["details"]["reason"] for e in retried], ["host_lost"], evs)
        c = self.hosts(a)
        beta = [x for x in c["hosts"] if x["host_name"] == "beta"]
        self.assertEqual([x["state"] for x in beta], ["lost"], c)
        closed = [x for x in c["hosts"] if x["host_name"] == "alpha"]
        self.assertEqual([x["state"] for x in closed], ["closed"], c)
        a.stop()


    def browse(self, server, name):
        """The dashboard of `server` in headless Chromium: (DOM, console lines)."""
        browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                        if shutil.which(n)), None)
        self.assertIsNotNone(browser, "no chromium: scripts/setup.sh installs it")
        shot = os.path.join(OUT, name + ".png")
        common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--user-data-dir=" + os.path.join(self.tmp.name, "profile"),
                  "--window-size=1280,1000", "--virtual-time-budget=4000"]
        url = "http://127.0.0.1:%d/" % server.port
        dom = subprocess.run(common + ["--enable-logging=stderr", "--v=0", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(dom.returncode, 0, dom.stderr[-2000:])
        subprocess.run(common + ["--screenshot=" + shot, url], capture_output=True, timeout=120)
        self.assertTrue(os.path.exists(shot) and os.path.getsize(shot) > 1000, shot)
        return dom.stdout, [l for l in dom.stderr.splitlines() if "CONSOLE" in l]

    def test_the_dashboard_shows_the_cluster(self):
        a = Server(self.tmp.name, "alpha", self.schema)
        self.servers.append(a)
        b = Server(self.tmp.name, "beta", self.schema)
        self.servers.append(b)
        deadline = time.time() + 30
        while len([x for x in self.hosts(a)["hosts"] if x["state"] == "alive"]) < 2:
            self.assertLess(time.time(), deadline)
            time.sleep(0.1)
        dom, console = self.browse(a, "dashboard-cluster")
        errors = [l for l in console if re.search(r"Uncaught|ERROR|Failed|error", l)]
        self.assertEqual(errors, [], console)
        self.assertRegex(dom, r'<section id="cluster-section" class="wide" style="">',
                         "the cluster section is hidden")
        m = re.search(r'<table id="cluster">.*?<tbody>(.*?)</tbody>', dom, re.S)
        self.assertIsNotNone(m, dom[-3000:])
        rows = m.group(1)
        self.assertIn("alpha (this one)", rows)
        self.assertIn(">beta<", rows)
        self.assertEqual(len(re.findall(r"<td>alive</td>", rows)), 2, rows)
        # B dies: shown lost (in red) once its lease ran out.
        b.kill()
        deadline = time.time() + 30
        while not any(x["state"] == "lost" for x in self.hosts(a)["hosts"]):
            self.assertLess(time.time(), deadline)
            time.sleep(0.1)
        dom, _ = self.browse(a, "dashboard-cluster-lost")
        rows = re.search(r'<table id="cluster">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
        self.assertRegex(rows, r'<tr data-host="beta/[^"]+" class="lost">')
        a.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
