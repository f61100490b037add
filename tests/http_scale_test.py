#!/usr/bin/env python3
"""taskmgr-http at the scale an attacker or a busy day brings, on loopback:

- 2,000 idle connections, then 1,000 slow ones (one header byte per second):
  another client is served all along, and the idle and slow connections are
  closed by the header timeout;
- 10,000 pending tasks with 1 MiB uploads: the server's resident memory stays
  flat (the input bytes wait in the store, not in memory), and listing them
  does not read them.

Latencies are measured and printed, never judged (a shared machine); a hang
shows as a failed request. Standard library only.

    http_scale_test.py TASKMGR_HTTP
"""

import base64
import http.client
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SERVER = sys.argv.pop(1) if len(sys.argv) > 1 else "taskmgr-http"
TASKS = int(os.environ.get("TASKMGR_HTTP_SCALE_TASKS", "10000"))

CONFIG = """
devices:
  probe_cpu: false
  probe_nvidia: false
  cpu_memory_mb: 4000
executor:
  worker_threads: 1
"""

NOFILE = 8192


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))


def start_server(tmpdir, extra_args=()):
    cfg = os.path.join(tmpdir, "config.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    port_file = os.path.join(tmpdir, "port")
    proc = subprocess.Popen(
        [SERVER, "--port", "0", "--config", cfg, "--db", os.path.join(tmpdir, "t.db"),
         "--port-file", port_file] + list(extra_args),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=raise_nofile)
    def port():
        try:
            with open(port_file) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""
    deadline = time.time() + 60
    while not port():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("server did not start: " + proc.stdout.read())
        time.sleep(0.02)
    return proc, int(port())


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


class Prober(threading.Thread):
    """GET /health on a fresh connection every 50 ms; keeps the latencies."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.latencies = []
        self.failures = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/health")
                res = conn.getresponse()
                res.read()
                conn.close()
                if res.status != 200:
                    self.failures.append("status %d" % res.status)
            except OSError as e:
                self.failures.append(repr(e))
            self.latencies.append(time.perf_counter() - t0)
            self.stop.wait(0.05)

    def summary(self):
        ms = [x * 1000 for x in self.latencies]
        return "%d requests: median %.1f ms, p99 %.1f ms, max %.1f ms" % (
            len(ms), statistics.median(ms), percentile(ms, 99), max(ms))


def closed_by_peer(sock):
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except BlockingIOError:
        return False


class ScaleTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        raise_nofile()

    def test_idle_then_slow_connections_do_not_starve_others_and_are_timed_out(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        header_timeout = 12
        proc, port = start_server(tmp.name, ["--max-connections", "5000",
                                             "--header-timeout", str(header_timeout)])

        def stop():
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
            self.assertEqual(proc.returncode, 0, out)
        self.addCleanup(stop)
        prober = Prober(port)
        prober.start()
        self.addCleanup(prober.stop.set)
        before = list(prober.latencies)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2000)]
        opened_idle = time.time()
        slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(1000)]
        for s in slow:
            s.setblocking(False)
        opened_slow = time.time()
        print("\n2,000 idle connections opened; 1,000 slow ones %.1f s later" %
              (opened_slow - opened_idle), flush=True)
        # One header byte per second on each slow connection, until the
        # server closes it (the header timeout), or 3 timeouts have passed.
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200
        sent = [0] * len(slow)
        closed = [False] * len(slow)
        deadline = opened_slow + 3 * header_timeout + 10
        while not all(closed) and time.time() < deadline:
            for i, s in enumerate(slow):
                if closed[i]:
                    continue
                try:
                    s.send(request[sent[i]:sent[i] + 1])
                    sent[i] += 1
                except (BrokenPipeError, ConnectionResetError):
                    closed[i] = True
                    continue
                except BlockingIOError:
                    pass
                if closed_by_peer(s):
                    closed[i] = True
            time.sleep(1.0)
        slow_closed_after = time.time() - opened_slow
        # The idle ones sent nothing: closed by the same timeout.
        idle_closed = 0
        for s in idle:
            s.settimeout(3 * header_timeout)
            if closed_by_peer(s):
                idle_closed += 1
        prober.stop.set()
        prober.join()
        during = prober.latencies[len(before):]
        print("other client during the run: " + prober.summary(), flush=True)
        print("slow connections closed within %.1f s (header timeout %d s); bytes sent by the "
              "slowest: %d" % (slow_closed_after, header_timeout, max(sent)), flush=True)
        for s in idle + slow:
            s.close()
        self.assertEqual(prober.failures, [])
        self.assertGreater(len(during), 20)
        self.assertTrue(all(closed), "%d slow connections were not closed" %
                        closed.count(False))
        self.assertEqual(idle_closed, len(idle))
        # Served again at once.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()

    def test_memory_stays_flat_with_many_pending_uploads(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        proc, port = start_server(tmp.name)

        def stop():
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=300)
            self.assertEqual(proc.returncode, 0, out)
        self.addCleanup(stop)
        payload = bytearray(os.urandom(1 << 20))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        def create(i):
            payload[:8] = i.to_bytes(8, "little")  # each task's own bytes
            if i % 10 == 0:  # as JSON with base64, the spec's form
                body = json.dumps({"service": "ocr", "input": {
                    "data_base64": base64.b64encode(bytes(payload)).decode(),
                    "media_type": "image/png"}})
                conn.request("POST", "/tasks", body, {"Content-Type": "application/json"})
            else:  # as an upload: the body is the bytes
                conn.request("POST", "/tasks?service=ocr", bytes(payload),
                             {"Content-Type": "image/png"})
            res = conn.getresponse()
            data = res.read()
            self.assertEqual(res.status, 201, data[:300])
            return json.loads(data)

        warm = max(1, TASKS // 20)
        t0 = time.time()
        first = create(0)
        for i in range(1, warm):
            create(i)
        base = rss_mb(proc.pid)
        peak = base
        for i in range(warm, TASKS):
            create(i)
            if i % 250 == 0:
                peak = max(peak, rss_mb(proc.pid))
        peak = max(peak, rss_mb(proc.pid))
        took = time.time() - t0
        print("\n%d pending tasks of 1 MiB each in %.0f s: server RSS %.0f MB after %d, peak %.0f "
              "MB after (+%.0f MB)" % (TASKS, took, base, warm, peak, peak - base), flush=True)
        # Before the inputs were kept in the store, each pending task held
        # its bytes (and more) in memory: 10,000 tasks were ~10 GB.
        self.assertLess(peak - base, 64)
        # A listing reads how tasks stand, not their bytes: every page of
        # them (1,000 a page, also with payloads=1: results, never inputs).
        t1 = time.time()
        listed, path = 0, "/tasks?status=pending&limit=1000&payloads=1"
        while path:
            conn.request("GET", path)
            res = conn.getresponse()
            page = json.loads(res.read())
            self.assertEqual(res.status, 200, page)
            self.assertTrue(all(t["input"]["bytes"] == 1 << 20 for t in page))
            listed += len(page)
            link = res.getheader("Link")
            path = link[1:link.index(">")] if link else None
        self.assertEqual(listed, TASKS)
        after_list = rss_mb(proc.pid)
        print("after listing them in pages of 1,000 (%.1f s): %.0f MB" %
              (time.time() - t1, after_list), flush=True)
        self.assertLess(after_list - base, 96)
        # The bytes are in the store: a task run now gets its own input (here
        # not a readable image: its failure names it).
        conn.request("POST", "/tasks/%s/start" % first["id"], "{}",
                     {"Content-Type": "application/json"})
        res = conn.getresponse()
        res.read()
        self.assertEqual(res.status, 202)
        deadline = time.time() + 120
        while time.time() < deadline:
            conn.request("GET", "/tasks/" + first["id"])
            t = json.loads(conn.getresponse().read())
            if t["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.1)
        self.assertEqual(t["status"], "failed", t)
        self.assertEqual(t["failure_reason"], "invalid_input", t)
        conn.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
