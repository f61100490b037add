#!/usr/bin/env python3
"""Drives examples/http_server (taskmgr-http) over real HTTP on loopback:
every route, the error status codes, and a metrics response that changes as
tasks run. Standard library only.

    http_test.py TASKMGR_HTTP PAGE_DIR_OR_EMPTY
"""

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

SERVER = sys.argv.pop(1) if len(sys.argv) > 1 else "taskmgr-http"
PAGES = sys.argv.pop(1) if len(sys.argv) > 1 else ""

CONFIG = """
devices:
  probe_cpu: false
  probe_nvidia: false
  cpu_memory_mb: 1000
executor:
  worker_threads: 1
tasks:
  max_queue_size: 2
  max_task_memory_mb: 1500
"""

def make_png(width, height):
    """A valid white 8-bit gray PNG (OCR finds no text in it)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + b"\xff" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


TINY_PNG = make_png(200, 60)
# Big enough to keep the one worker busy while the queue fills up.
BUSY_PNG = make_png(2500, 3300)


class HttpServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cfg = os.path.join(cls.tmp.name, "config.yaml")
        with open(cfg, "w") as f:
            f.write(CONFIG)
        port_file = os.path.join(cls.tmp.name, "port")
        cls.proc = subprocess.Popen(
            [SERVER, "--port", "0", "--config", cfg, "--db", os.path.join(cls.tmp.name, "t.db"),
             "--port-file", port_file, "--input-root", PAGES or cls.tmp.name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if cls.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start: " + cls.proc.stdout.read())
            time.sleep(0.02)
        cls.port = int(open(port_file).read())

    @classmethod
    def tearDownClass(cls):
        cls.proc.send_signal(signal.SIGTERM)
        out, _ = cls.proc.communicate(timeout=120)
        cls.tmp.cleanup()
        assert cls.proc.returncode == 0, out
        assert "stopped" in out, out

    def request(self, method, path, body=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        res = conn.getresponse()
        text = res.read().decode()
        conn.close()
        ctype = res.getheader("Content-Type", "")
        return res.status, (json.loads(text) if ctype.startswith("application/json") else text)

    def wait_done(self, task_id, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, t = self.request("GET", "/tasks/" + task_id)
            self.assertEqual(status, 200)
            if t["status"] in ("completed", "failed", "cancelled") and t["resource_cleanup_completed"]:
                return t
            time.sleep(0.05)
        self.fail("task %s did not end" % task_id)

    def test_routes_and_metrics(self):
        status, m0 = self.request("GET", "/tasks/metrics")
        self.assertEqual(status, 200)
        for key in ("active_tasks", "queued_tasks", "memory_by_device", "pool_utilization",
                    "average_wait_time"):
            self.assertIn(key, m0)
        completed0 = m0["counters"]["tasks_completed"]

        # create (bytes as base64) -> 201 pending, with the spec's fields
        status, t = self.request("POST", "/tasks", {
            "service": "ocr", "priority": 3,
            "input": {"data_base64": base64.b64encode(TINY_PNG).decode(), "media_type": "image/png"},
            "options": {"words": True}})
        self.assertEqual(status, 201, t)
        self.assertEqual(t["status"], "pending")
        self.assertEqual(t["assigned_device"], "cpu")
        self.assertGreater(t["estimated_memory_mb"], 0)
        task_id = t["id"]

        status, t = self.request("POST", "/tasks/%s/start" % task_id, {"priority": 5})
        self.assertEqual(status, 202, t)
        self.assertEqual(t["priority"], 5)
        done = self.wait_done(task_id)
        self.assertEqual(done["status"], "completed", done)

        # the dashboard page
        status, page = self.request("GET", "/")
        self.assertEqual(status, 200)
        for part in ("<title>taskmgr</title>", 'id="devices"', 'id="running"', 'id="failures"',
                     'id="chart"', 'fetch("/events"'):
            self.assertIn(part, page)

        # its events and its result
        status, evs = self.request("GET", "/tasks/%s/events" % task_id)
        self.assertEqual(status, 200, evs)
        names = [e["event_type"] for e in evs]
        self.assertEqual(names[0], "created")
        self.assertIn("completed", names)
        status, r = self.request("GET", "/tasks/%s/result" % task_id)
        self.assertEqual(status, 200, r)
        self.assertEqual(r, done["result"])
        status, text = self.request("GET", "/tasks/%s/result?format=text" % task_id)
        self.assertEqual(status, 200, text)
        self.assertEqual(text, done["result"]["text"])
        for path, want in (("/tasks/%s/result?format=docx" % task_id, 400),
                           ("/tasks/%s/result?format=pdf" % task_id, 404),  # not made
                           ("/tasks/%s/result?x=1" % task_id, 400),
                           ("/tasks/01890000-0000-7000-8000-000000000000/result", 404),
                           ("/tasks/01890000-0000-7000-8000-000000000000/events", 404)):
            status, e = self.request("GET", path)
            self.assertEqual(status, want, (path, e))

        status, h = self.request("GET", "/tasks/%s/health" % task_id)
        self.assertEqual(status, 200)
        self.assertEqual(h["status"], "completed")
        for key in ("memory_usage_mb", "processing_time_s", "device", "warnings"):
            self.assertIn(key, h)

        status, m1 = self.request("GET", "/tasks/metrics")
        self.assertEqual(m1["counters"]["tasks_completed"], completed0 + 1)  # it changed

        status, text = self.request("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertIn("# TYPE taskmgr_tasks_completed_total counter", text)
        self.assertIn("taskmgr_tasks_completed_total %d" % (completed0 + 1), text)
        # promtool (Debian's prometheus; scripts/setup.sh installs it) finds
        # nothing to lint in what /metrics serves: base units, _total counters.
        lint = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.assertEqual(lint.returncode, 0, lint.stdout.decode(errors="replace"))
        self.assertIn("taskmgr_device_memory_total_bytes{", text)

        status, lst = self.request("GET", "/tasks?status=completed&limit=5")
        self.assertEqual(status, 200)
        self.assertIn(task_id, [x["id"] for x in lst])
        # a listing leaves results out (they may be large) unless asked
        mine = [x for x in lst if x["id"] == task_id][0]
        self.assertNotEqual(mine.get("result"), done["result"])
        status, lst = self.request("GET", "/tasks?status=completed&limit=5&payloads=1")
        mine = [x for x in lst if x["id"] == task_id][0]
        self.assertEqual(mine["result"], done["result"])
        status, e = self.request("GET", "/tasks?payloads=yes")
        self.assertEqual(status, 400, e)

        # starting twice: 409
        status, e = self.request("POST", "/tasks/%s/start" % task_id)
        self.assertEqual(status, 409, e)
        self.assertEqual(e["error"], "invalid_state")

        # cancel a pending task
        status, t = self.request("POST", "/tasks",
                                 {"input": {"data_base64": base64.b64encode(TINY_PNG).decode()}})
        self.assertEqual(status, 201, t)
        status, t = self.request("POST", "/tasks/%s/cancel" % t["id"])
        self.assertEqual((status, t["status"]), (200, "cancelled"))
        status, e = self.request("GET", "/tasks/%s/result" % t["id"])  # no result: 409
        self.assertEqual((status, e["error"]), (409, "invalid_state"), e)

    def open_events(self, query=""):
        import socket
        s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        s.sendall(("GET /events%s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
                   % query).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            self.assertTrue(chunk, "the stream closed before its header")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertIn(b"content-type: text/event-stream", head.lower())
        return s, rest

    def read_events(self, sock, buf, until, timeout=120):
        """SSE messages (event name, JSON data) until `until(name, data)`."""
        got = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\n\n" in buf:
                block, _, buf = buf.partition(b"\n\n")
                fields = {}
                for line in block.decode("utf-8").split("\n"):
                    if line.startswith(":"):
                        continue  # a heartbeat comment
                    k, _, v = line.partition(": ")
                    fields[k] = v
                if "event" in fields:
                    data = json.loads(fields["data"])
                    self.assertEqual(int(fields["id"]), data["sequence"])
                    self.assertEqual(fields["event"], data["event_type"])
                    got.append((fields["event"], data))
                    if until(fields["event"], data):
                        return got
            chunk = sock.recv(65536)
            self.assertTrue(chunk, "the stream ended")
            buf += chunk
        self.fail("no such event within %s s: %s" % (timeout, got[-5:]))

    def test_streams_that_never_read_do_not_hold_up_those_that_do(self):
        # 40 clients that open the stream and never read (a small receive
        # buffer: the server's writes to them block at once) beside 2 that
        # read: these get every event, in order, and the stalled ones hold
        # the messages shared, not a copy each. (One write a message per
        # stream let the readers fall megabytes behind and be dropped.)
        import socket
        stalled = []
        for _ in range(40):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(30)
            s.connect(("127.0.0.1", self.port))
            s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            stalled.append(s)
        self.addCleanup(lambda: [s.close() for s in stalled])
        readers = [self.open_events() for _ in range(2)]
        for sock, _ in readers:
            self.addCleanup(sock.close)
        created = []
        for _ in range(600):  # ~200 KiB of events: within any stream's share
            status, t = self.upload("", TINY_PNG)
            self.assertEqual(status, 201, t)
            created.append(t["id"])
        last = created[-1]
        for sock, buf in readers:
            got = self.read_events(sock, buf, lambda name, d: d["task_id"] == last)
            seqs = [d["sequence"] for _, d in got]
            self.assertEqual(seqs, sorted(seqs))
            self.assertEqual(len(seqs), len(set(seqs)))
            made = [d["task_id"] for name, d in got if name == "created"]
            self.assertEqual([i for i in made if i in set(created)], created)
        for task_id in created:
            self.request("POST", "/tasks/%s/cancel" % task_id)

    def test_a_stream_s_header_means_it_is_subscribed(self):
        # The header went out before the stream was subscribed: a client
        # that created a task as soon as it had read the header now and then
        # missed that task's created event (CI saw one missing of 600). A
        # second task's event marks where to stop reading, with no timing.
        for _ in range(40):
            sock, buf = self.open_events()
            ids = []
            for _ in range(2):
                status, t = self.upload("", TINY_PNG)
                self.assertEqual(status, 201, t)
                ids.append(t["id"])
            got = self.read_events(sock, buf, lambda n, d: d["task_id"] == ids[1])
            sock.close()
            self.assertIn(("created", ids[0]), [(n, d["task_id"]) for n, d in got])
            for task_id in ids:
                self.request("POST", "/tasks/%s/cancel" % task_id)

    def test_a_stream_s_client_that_leaves_no_longer_counts_as_a_connection(self):
        # It held every stop for the whole drain timeout (10 s): the server
        # counted it open until its session object went, at the next event.
        # The readings go over one kept-alive connection: a connection per
        # reading left the previous one counted now and then (closed by the
        # client, not yet seen closed by the server), which made any fixed
        # baseline race (CI saw 4 where 5 was expected).
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        self.addCleanup(conn.close)

        def connections():
            conn.request("GET", "/health")
            res = conn.getresponse()
            h = json.loads(res.read())
            self.assertEqual(res.status, 200)
            return h["connections"]
        base = connections()
        streams = [self.open_events()[0] for _ in range(3)]
        opened = connections()
        # This connection and the three streams at least; other tests'
        # connections that the server has not yet seen closed may add some.
        self.assertGreaterEqual(opened, 4)
        self.assertGreaterEqual(opened, base + 3 - 1)
        for s in streams:
            s.close()
        # The three leave the count (other lingering ones only ever leave it).
        deadline = time.time() + 30
        now = connections()
        while now > opened - 3 and time.time() < deadline:
            time.sleep(0.05)
            now = connections()
        self.assertLessEqual(now, opened - 3)

    def test_events_stream_as_server_sent_events(self):
        every, b1 = self.open_events()
        status, t = self.request("POST", "/tasks", {
            "input": {"data_base64": base64.b64encode(TINY_PNG).decode()}})
        self.assertEqual(status, 201, t)
        one, b2 = self.open_events("?task_id=" + t["id"])
        status, other = self.request("POST", "/tasks", {
            "input": {"data_base64": base64.b64encode(TINY_PNG).decode()}})
        self.assertEqual(status, 201)
        self.request("POST", "/tasks/%s/start" % t["id"])
        got = self.read_events(every, b1, lambda n, d: n == "completed" and d["task_id"] == t["id"])
        names = [n for n, d in got if d["task_id"] == t["id"]]
        self.assertEqual(names[0], "created")
        self.assertIn("started", names)
        self.assertIn(other["id"], [d["task_id"] for n, d in got])  # every task's
        mine = self.read_events(one, b2, lambda n, d: n == "completed")
        self.assertEqual({d["task_id"] for n, d in mine}, {t["id"]})  # only this one's
        every.close()
        one.close()
        self.wait_done(t["id"])
        status, e = self.request("GET", "/events?bogus=1")
        self.assertEqual((status, e["error"]), (400, "invalid_argument"), e)
        status, e = self.request("POST", "/events")
        self.assertEqual(status, 405, e)

    @unittest.skipUnless(PAGES, "no OCR pages given")
    def test_ocr_a_real_page(self):
        status, t = self.request("POST", "/tasks", {"input": {"path": os.path.join(PAGES, "phototest.tif")}})
        self.assertEqual(status, 201)
        self.request("POST", "/tasks/%s/start" % t["id"])
        done = self.wait_done(t["id"])
        self.assertEqual(done["status"], "completed")
        self.assertIn("quick brown", done["result"]["text"])

    def test_bad_input_failure_is_the_task_s(self):
        status, t = self.request("POST", "/tasks", {"input": {"data_base64": base64.b64encode(b"junk").decode()}})
        self.assertEqual(status, 201)
        self.request("POST", "/tasks/%s/start" % t["id"])
        done = self.wait_done(t["id"])
        self.assertEqual((done["status"], done["failure_reason"]), ("failed", "invalid_input"))

    def test_error_statuses(self):
        cases = [
            ("POST", "/tasks", None, "{not json", 400, "invalid_argument"),
            ("POST", "/tasks", None, "[1,2]", 400, "invalid_argument"),
            ("POST", "/tasks", {"priority": "high"}, None, 400, "invalid_argument"),
            ("POST", "/tasks", {"options": "x"}, None, 400, "invalid_argument"),
            ("POST", "/tasks", {"service": "nope"}, None, 404, "not_found"),
            ("POST", "/tasks", {"device": "cuda:3", "input": {"data_base64": "AAAA"}}, None, 404,
             "not_found"),
            ("POST", "/tasks", {"device": "cpu"}, None, 400, "invalid_argument"),  # no input
            ("POST", "/tasks", {"input": {"data_base64": "***"}}, None, 400, "invalid_argument"),
            ("POST", "/tasks", {"batch_size": 0}, None, 400, "invalid_argument"),
            ("GET", "/tasks/01890000-0000-7000-8000-000000000000", None, None, 404, "not_found"),
            ("GET", "/tasks/01890000-0000-7000-8000-000000000000/health", None, None, 404, "not_found"),
            ("POST", "/tasks/01890000-0000-7000-8000-000000000000/start", None, None, 404, "not_found"),
            ("GET", "/nowhere", None, None, 404, "not_found"),
            ("DELETE", "/tasks/metrics", None, None, 405, "method_not_allowed"),
            ("GET", "/tasks?status=finished", None, None, 400, "invalid_argument"),
            # limit: digits only (-1 was a 500 io_error from the database)
            ("GET", "/tasks?limit=-1", None, None, 400, "invalid_argument"),
            ("GET", "/tasks?limit=1.5", None, None, 400, "invalid_argument"),
            ("GET", "/tasks?limit=0x10", None, None, 400, "invalid_argument"),
            ("GET", "/tasks?limit=1e3", None, None, 400, "invalid_argument"),
            ("GET", "/tasks?limit=", None, None, 400, "invalid_argument"),
            # a path outside the --input-root, or with a NUL: refused alike
            ("POST", "/tasks", {"input": {"path": "/tmp/page\u0000.txt"}}, None, 403,
             "forbidden"),
            ("POST", "/tasks", {"input": {"path": "/etc/passwd"}}, None, 403, "forbidden"),
        ]
        for method, path, body, raw, want, code in cases:
            status, e = self.request(method, path, body, raw)
            self.assertEqual(status, want, (method, path, body, raw, e))
            self.assertEqual(e["error"], code, e)
            self.assertTrue(e["message"], e)

    def upload(self, query, body, ctype="image/png"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": ctype} if ctype is not None else {}
        conn.request("POST", "/tasks" + query, body=body, headers=headers)
        res = conn.getresponse()
        out = json.loads(res.read().decode())
        conn.close()
        return res.status, out

    def test_uploads_are_the_body_with_the_request_in_the_query(self):
        # The body is the bytes, its Content-Type the media type; the query
        # percent-decoded (o%63r is ocr; + a space in options).
        status, t = self.upload("?service=o%63r&priority=-4&batch_size=2&start=true"
                                "&options=%7B%22words%22:+true%7D", TINY_PNG)
        self.assertEqual(status, 201, t)
        self.assertEqual(t["service"], "ocr")
        self.assertEqual(t["priority"], -4)
        self.assertEqual(t["batch_size"], 2)
        self.assertEqual(t["status"], "queued")
        self.assertEqual(t["media_type"] if "media_type" in t else "image/png", "image/png")
        done = self.wait_done(t["id"])
        self.assertEqual(done["status"], "completed", done)
        # A JSON create may say start too.
        status, t = self.request("POST", "/tasks", {
            "input": {"data_base64": base64.b64encode(TINY_PNG).decode()}, "start": True})
        self.assertEqual(status, 201, t)
        self.assertEqual(t["status"], "queued")
        self.wait_done(t["id"])
        # Listing filters are decoded the same way.
        status, listed = self.request("GET", "/tasks?service=o%63r&limit=1")
        self.assertEqual(status, 200)
        self.assertEqual(len(listed), 1)
        for query, body, ctype in (
                ("?colour=red", TINY_PNG, "image/png"),          # unknown parameter
                ("", b"", "image/png"),                          # nothing uploaded
                ("?priority=high", TINY_PNG, "image/png"),
                ("?priority=99999999999", TINY_PNG, "image/png"),
                ("?priority=18446744073709551615", TINY_PNG, "image/png"),
                ("?batch_size=0", TINY_PNG, "image/png"),
                ("?start=maybe", TINY_PNG, "image/png"),
                ("?options=%5B1%5D", TINY_PNG, "image/png"),     # not an object
                ("?options=%7B", TINY_PNG, "image/png"),         # not JSON
                ("?service=%zz", TINY_PNG, "image/png"),         # a malformed escape
                ("?service=%ff", TINY_PNG, "image/png"),         # not UTF-8
                ("?service=a%00b", TINY_PNG, "image/png"),       # a NUL
                ("?service=ocr", TINY_PNG, "application/json"),  # JSON takes no query
        ):
            status, e = self.upload(query, body, ctype)
            self.assertEqual(status, 400, (query, body[:10], ctype, e))
            self.assertEqual(e["error"], "invalid_argument", e)
            self.assertTrue(e["message"], e)
        # An unknown service is a 404, as for JSON.
        status, e = self.upload("?service=nope", TINY_PNG)
        self.assertEqual(status, 404, e)
        # A status filter with an escape that decodes to a bad byte: 400.
        status, e = self.request("GET", "/tasks?status=%c3%28")
        self.assertEqual(status, 400, e)

    def test_listing_pages_back_with_a_cursor(self):
        mine = []
        for _ in range(5):
            status, t = self.upload("?priority=1", TINY_PNG)  # pending
            self.assertEqual(status, 201, t)
            mine.append(t["id"])
        seen, path, pages = [], "/tasks?status=pending&limit=2", 0
        while path is not None and pages < 1000:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.request("GET", path)
            res = conn.getresponse()
            page = json.loads(res.read())
            self.assertEqual(res.status, 200, page)
            link = res.getheader("Link")
            cursor = res.getheader("X-Next-Cursor")
            conn.close()
            self.assertLessEqual(len(page), 2)
            self.assertTrue(all(t["status"] == "pending" for t in page))
            seen += [t["id"] for t in page]
            pages += 1
            if len(page) < 2:
                self.assertIsNone(link)
                path = None
            else:
                self.assertTrue(link.startswith("</tasks?status=pending&limit=2&before="), link)
                self.assertTrue(link.endswith('>; rel="next"'), link)
                self.assertIn("before=" + cursor.split("_")[0] + "_", link)
                path = link[1:link.index(">")]
        self.assertEqual(len(seen), len(set(seen)), "a task was listed twice")
        # Newest first: mine in reverse order of creation, none missing.
        self.assertEqual([i for i in seen if i in mine], list(reversed(mine)))
        # A page without a limit is 100 tasks at most.
        status, page = self.request("GET", "/tasks?status=pending")
        self.assertLessEqual(len(page), 100)
        for bad in ("abc", "_x", "1e3_x", "99999999999999999999_x"):
            status, e = self.request("GET", "/tasks?before=" + bad)
            self.assertEqual(status, 400, (bad, e))
            self.assertEqual(e["error"], "invalid_argument")
        for task_id in mine:
            self.request("POST", "/tasks/%s/cancel" % task_id)

    def test_delete_an_ended_task(self):
        status, t = self.upload("?priority=1", TINY_PNG)  # pending
        self.assertEqual(status, 201, t)
        task_id = t["id"]
        status, e = self.request("DELETE", "/tasks/" + task_id)
        self.assertEqual(status, 409, e)
        self.assertEqual(e["error"], "invalid_state")
        self.assertIn("cancel it", e["message"])
        status, t = self.request("POST", "/tasks/%s/priority" % task_id, {"priority": 6})
        self.assertEqual(status, 200, t)
        self.assertEqual(t["priority"], 6)
        for bad in ({}, {"priority": "high"}, {"priority": 2**40}, {"priority": 1, "x": 2}):
            status, e = self.request("POST", "/tasks/%s/priority" % task_id, bad)
            self.assertEqual(status, 400, (bad, e))
        status, events = self.request("GET", "/tasks/%s/events" % task_id)
        self.assertIn("priority_changed", [x["event_type"] for x in events])
        status, e = self.request("DELETE", "/tasks/%s?force=1" % task_id)
        self.assertEqual(status, 400, e)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("PUT", "/tasks/" + task_id)
        res = conn.getresponse()
        json.loads(res.read())
        self.assertEqual(res.status, 405)
        self.assertEqual(res.getheader("Allow"), "GET, HEAD, DELETE")
        conn.close()
        self.assertEqual(self.request("POST", "/tasks/%s/cancel" % task_id)[0], 200)
        self.wait_done(task_id)
        # Cancelled: it can run again, the same task.
        status, t = self.request("POST", "/tasks/%s/retry" % task_id, {"priority": 2})
        self.assertEqual(status, 202, t)
        self.assertEqual(t["status"], "queued")
        self.assertEqual(t["priority"], 2)
        self.assertEqual(self.wait_done(task_id)["status"], "completed")
        status, e = self.request("POST", "/tasks/%s/retry" % task_id)
        self.assertEqual(status, 409, e)
        status, e = self.request("POST", "/tasks/%s/retry" % task_id, {"prio": 1})
        self.assertEqual(status, 400, e)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("DELETE", "/tasks/" + task_id)
        res = conn.getresponse()
        self.assertEqual(res.status, 204)
        self.assertEqual(res.read(), b"")
        conn.close()
        for method, path in (("GET", "/tasks/" + task_id), ("DELETE", "/tasks/" + task_id),
                             ("GET", "/tasks/%s/events" % task_id)):
            status, e = self.request(method, path)
            self.assertEqual(status, 404, (method, path, e))
            self.assertEqual(e["error"], "not_found")
        status, page = self.request("GET", "/tasks?limit=1000")
        self.assertNotIn(task_id, [x["id"] for x in page])

    def test_pause_and_resume(self):
        status, r = self.request("POST", "/pause", {"service": "ocr"})
        self.addCleanup(self.request, "POST", "/resume", {"service": "ocr"})
        self.assertEqual(status, 200, r)
        self.assertTrue(r["changed"])
        self.assertEqual([(p["scope"], p["name"]) for p in r["paused"]], [("service", "ocr")])
        status, r = self.request("POST", "/pause", {"service": "ocr"})
        self.assertEqual((status, r["changed"]), (200, False))
        status, t = self.upload("?start=1", TINY_PNG)
        self.assertEqual(status, 201, t)
        time.sleep(0.3)
        self.assertEqual(self.request("GET", "/tasks/" + t["id"])[1]["status"], "queued")
        status, health = self.request("GET", "/health")
        self.assertEqual(status, 200, health)  # paused on purpose: still ready
        # Not a shared queue: no cluster to show (501, a JSON error).
        self.assertIs(health["shared"], False)
        status, c = self.request("GET", "/cluster")
        self.assertEqual(status, 501, c)
        self.assertEqual(c["error"], "unsupported", c)
        self.assertIn("storage.shared is off", c["message"])
        self.assertEqual([p["name"] for p in health["paused"]], ["ocr"])
        self.assertEqual([p["name"] for p in self.request("GET", "/paused")[1]], ["ocr"])
        status, h = self.request("GET", "/tasks/%s/health" % t["id"])
        self.assertTrue(any(w.startswith("paused: service 'ocr'") for w in h["warnings"]), h)
        for bad, want in (({"device": "cpu", "service": "ocr"}, 400), ({"device": "cuda:9"}, 404),
                          ({"x": 1}, 400), ({"device": ""}, 400), ({"device": 5}, 400),
                          ({"service": "a\u0000b"}, 400), ({"service": "k" * 101}, 400),
                          ({}, 400), ({"manager": False}, 400), ({"manager": 1}, 400),
                          ({"manager": True, "service": "ocr"}, 400),
                          ({"service": "a\u0085b"}, 400)):
            status, e = self.request("POST", "/pause", bad)
            self.assertEqual(status, want, (bad, e))
            self.assertIn("message", e)
        status, e = self.request("GET", "/pause")
        self.assertEqual(status, 405, e)
        status, e = self.request("POST", "/paused", {})
        self.assertEqual(status, 405, e)
        status, r = self.request("POST", "/resume", {"service": "ocr"})
        self.assertEqual((status, r["changed"], r["paused"]), (200, True, []))
        self.assertEqual(self.wait_done(t["id"])["status"], "completed")
        status, r = self.request("POST", "/resume", {"service": "ocr"})
        self.assertEqual((status, r["changed"]), (200, False))
        # The whole manager is paused by name only: {"manager": true}.
        status, r = self.request("POST", "/pause", {"manager": True})
        self.addCleanup(self.request, "POST", "/resume", {"manager": True})
        self.assertEqual((status, [(p["scope"], p["name"]) for p in r["paused"]]),
                         (200, [("manager", "")]), r)
        status, r = self.request("POST", "/resume", {"manager": True})
        self.assertEqual((status, r["changed"], r["paused"]), (200, True, []))

    def test_resize_pool(self):
        status, r = self.request("POST", "/pools/resize", {"service": "ocr", "device": "cpu",
                                                            "min_instances": 0,
                                                            "max_instances": 1})
        self.assertEqual(status, 200, r)
        previous = r["previous"]
        self.addCleanup(self.request, "POST", "/pools/resize",
                        {"service": "ocr", "device": "cpu",
                         "min_instances": previous["min_instances"],
                         "max_instances": previous["max_instances"]})
        self.assertEqual((r["service"], r["device"], r["min_instances"], r["max_instances"]),
                         ("ocr", "cpu", 0, 1))
        self.assertEqual(set(previous), {"min_instances", "max_instances"})
        status, m = self.request("GET", "/tasks/metrics")
        pool = m["pool_utilization"]["ocr@cpu"]
        self.assertEqual((pool["min"], pool["max"]), (0, 1))
        good = {"service": "ocr", "device": "cpu", "min_instances": 0, "max_instances": 1}
        for bad, want in ((dict(good, service="nope"), 404), (dict(good, device="cuda:9"), 404),
                          (dict(good, min_instances=2), 400), (dict(good, max_instances=0), 400),
                          (dict(good, max_instances=5000), 400),
                          (dict(good, max_instances=2 ** 40), 400),
                          (dict(good, max_instances="2"), 400), (dict(good, extra=1), 400),
                          (dict(good, service="ocr\u0000"), 400),
                          (dict(good, device="cp\u0000u"), 400),
                          ({"service": "ocr", "device": "cpu"}, 400), ({}, 400)):
            status, e = self.request("POST", "/pools/resize", bad)
            self.assertEqual(status, want, (bad, e))
            self.assertIn("message", e)
        status, e = self.request("GET", "/pools/resize")
        self.assertEqual(status, 405, e)
        status, m = self.request("GET", "/tasks/metrics")
        self.assertEqual(m["pool_utilization"]["ocr@cpu"]["max"], 1)  # refusals changed nothing

    def raw(self, data):
        return raw_exchange(self.port, data)

    def test_a_stranger_s_findings_stay_fixed(self):
        # Input bytes are never in a task's JSON: payloads=1 adds results
        # only (it read every stored upload into memory and sent none).
        status, t = self.upload("?start=1", TINY_PNG)
        self.assertEqual(status, 201, t)
        self.wait_done(t["id"])
        status, page = self.request("GET", "/tasks?limit=1000&payloads=1")
        self.assertEqual(status, 200)
        mine = [x for x in page if x["id"] == t["id"]][0]
        self.assertEqual(mine["input"]["bytes"], len(TINY_PNG))
        self.assertNotIn("data", mine["input"])
        self.assertIn("result", mine)
        # Options live in memory with their task: at most 64 KiB.
        big = {"k": "x" * 70000}
        status, e = self.request("POST", "/tasks", {
            "input": {"data_base64": base64.b64encode(TINY_PNG).decode()}, "options": big})
        self.assertEqual(status, 400, e)
        self.assertIn("more than 65536", e["message"])
        # (in a query they cannot come near it: a target is at most 8 KiB, 414)
        # A page is 1 to 1000 tasks.
        for q in ("limit=0", "limit=1001"):
            status, e = self.request("GET", "/tasks?" + q)
            self.assertEqual(status, 400, (q, e))
        # Bytes that are not UTF-8 in a target are not echoed raw: the
        # body parses strictly (raw_exchange decodes UTF-8 strictly).
        status, e = self.raw(b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status, 404, e)
        self.assertIn("\ufffd", e["message"])
        # A NUL in a service or device: 400 naming it (the message was cut).
        status, e = self.request("POST", "/tasks", {
            "service": "ocr\u0000x", "input": {"data_base64": "AAAA"}})
        self.assertEqual(status, 400, e)
        self.assertEqual(e["message"], "service contains a NUL character (byte 3)")
        # A query where a route takes none, or a malformed one on /events.
        for path in ("/health?x=1", "/metrics?x=%zz", "/tasks/metrics?a=b",
                     "/tasks/%s?x=1" % t["id"], "/tasks/%s/events?x=1" % t["id"]):
            status, e = self.request("GET", path)
            self.assertEqual(status, 400, (path, e))
        status, e = self.request("POST", "/tasks/%s/start?priority=1" % t["id"], {})
        self.assertEqual(status, 400, e)
        for q in ("task_id=%zz", "task_id=%ff", "x=1", "task_id=a&task_id=b"):
            status, e = self.raw(("GET /events?%s HTTP/1.1\r\nHost: x\r\n\r\n" % q).encode())
            self.assertEqual(status, 400, (q, e))
        # Base64: padded, padding only at the end, unused bits zero.
        for b64 in ("A", "A===", "QQ==QQ==", "QR==", "QUJD\tRA=="):
            status, e = self.request("POST", "/tasks", {"input": {"data_base64": b64}})
            self.assertEqual(status, 400, (b64, e))
            self.assertIn("not base64", e["message"])
        # Media types and the auth scheme are case-insensitive.
        body = json.dumps({"input": {"data_base64": base64.b64encode(TINY_PNG).decode()}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/tasks", body, {"Content-Type": "APPLICATION/JSON; charset=UTF-8"})
        res = conn.getresponse()
        self.assertEqual(res.status, 201, res.read())
        res.read()
        # 405 says what is allowed; HEAD is a GET without its body.
        conn.request("DELETE", "/tasks/metrics")
        res = conn.getresponse()
        res.read()
        self.assertEqual(res.status, 405)
        self.assertEqual(res.getheader("Allow"), "GET, HEAD")
        conn.request("PUT", "/tasks")
        res = conn.getresponse()
        res.read()
        self.assertEqual(res.getheader("Allow"), "GET, HEAD, POST")
        conn.request("GET", "/health")
        res = conn.getresponse()
        health = json.loads(res.read())
        conn.request("HEAD", "/health")
        res = conn.getresponse()
        self.assertEqual(res.status, 200)
        self.assertGreater(int(res.getheader("Content-Length")), 0)
        self.assertEqual(res.read(), b"")
        conn.close()
        self.assertIn("connections", health)

    def get_raw(self, path, accept=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        res = conn.getresponse()
        body = res.read()
        conn.close()
        return res.status, res.getheader("Content-Type", ""), body

    def test_a_second_stranger_s_findings_stay_fixed(self):
        # A body the server cannot frame is refused and the connection
        # closed: the bytes that follow are never read as a request.
        smuggled = b"GET /tasks?limit=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        for te, want in ((b"gzip", 400), (b"identity", 400), (b"gzip, chunked", 501),
                         (b"chunked, gzip", 400)):
            raw = raw_exchange_all(self.port, b"POST /tasks HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Type: image/png\r\nTransfer-Encoding: " + te +
                                   b"\r\n\r\n" + smuggled)
            self.assertEqual(raw.count(b"HTTP/1.1 "), 1, (te, raw))
            self.assertTrue(raw.startswith(b"HTTP/1.1 %d " % want), (te, raw))
            json.loads(raw.partition(b"\r\n\r\n")[2])
        raw = raw_exchange_all(self.port, b"POST /tasks HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: image/png\r\nContent-Encoding: gzip\r\n"
                               b"Content-Length: 4\r\n\r\nabcd")
        self.assertTrue(raw.startswith(b"HTTP/1.1 415 "), raw)
        raw = raw_exchange_all(self.port, b"POST /tasks HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: image/png\r\nExpect: 200-ok\r\n"
                               b"Content-Length: 4\r\n\r\nabcd")
        self.assertTrue(raw.startswith(b"HTTP/1.1 417 "), raw)
        # Expect: 100-continue gets its go-ahead before the body is sent.
        import socket
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        s.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                  % len(TINY_PNG))
        self.assertEqual(s.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(TINY_PNG)
        answer = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            answer += b
        s.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)
        # HEAD /events: the stream's header alone; the next request on the
        # connection is answered as itself.
        raw = raw_exchange_all(self.port, b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        first, _, rest = raw.partition(b"\r\n\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 200 "), raw)
        self.assertIn(b"text/event-stream", first)
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 "), raw)
        for method in ("POST", "PUT", "DELETE"):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.request(method, "/events")
            res = conn.getresponse()
            json.loads(res.read())
            self.assertEqual(res.status, 405, method)
            self.assertEqual(res.getheader("Allow"), "GET, HEAD", method)
            conn.close()
        status, e = self.request("GET", "/events?task_id=01890000-0000-7000-8000-000000000000")
        self.assertEqual(status, 404, e)
        status, e = self.request("GET", "/events?task_id=")
        self.assertEqual(status, 400, e)
        # A misspelt key is not ignored; application/json is matched exactly.
        status, e = self.request("POST", "/tasks", {"priorty": 5, "input": {"data_base64": "aGk="}})
        self.assertEqual(status, 400, e)
        self.assertIn("priorty", e["message"])
        status, e = self.request("POST", "/tasks", {"input": {"data_base64": "aGk=", "pth": "x"}})
        self.assertEqual(status, 400, e)
        self.assertIn("input.pth", e["message"])
        status, t = self.upload("", b'{"input": {"data_base64": "aGk="}}', "application/jsonx")
        self.assertEqual(status, 201, t)
        self.assertEqual(t["input"]["media_type"], "application/jsonx")  # an upload
        status, t = self.upload("", b'{"input": {"data_base64": "aGk="}}',
                                "Application/JSON; charset=utf-8")
        self.assertEqual(status, 201, t)
        self.assertEqual(t["input"]["bytes"], 2)  # JSON: its input is "hi"
        # Accept by q, and the first type the result has.
        status, t = self.upload("?start=1", TINY_PNG)
        self.assertEqual(status, 201, t)
        self.assertEqual(self.wait_done(t["id"])["status"], "completed")
        path = "/tasks/%s/result" % t["id"]
        for accept, want in (("text/html,application/xhtml+xml,*/*;q=0.8", "application/json"),
                             ("text/plain;q=0.5, application/json;q=0.9", "application/json"),
                             ("application/json;q=0.5, text/plain", "text/plain"),
                             ("application/pdf;q=0.1, application/json;q=0.2", "application/json")):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.request("GET", path, headers={"Accept": accept})
            res = conn.getresponse()
            res.read()
            self.assertEqual(res.status, 200, accept)
            self.assertTrue(res.getheader("Content-Type").startswith(want), (accept, res.getheader("Content-Type")))
            conn.close()
        for bad in ("application/json;q=abc", "application/json;q=1.5", "text/plain;q=-1"):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.request("GET", path, headers={"Accept": bad})
            res = conn.getresponse()
            json.loads(res.read())
            self.assertEqual(res.status, 400, bad)
            conn.close()

    def test_a_result_as_hocr_alto_tsv_or_pdf_by_format_or_accept(self):
        ids = {}
        for output in ("hocr", "alto", "tsv", "pdf"):  # one at a time: max_queue_size 2
            status, t = self.upload(
                "?start=1&options=" + urllib.parse.quote(json.dumps({"output": output})),
                TINY_PNG)
            self.assertEqual(status, 201, t)
            ids[output] = t["id"]
            done = self.wait_done(t["id"])
            self.assertEqual(done["status"], "completed", done)
        cases = [
            ("hocr", None, "application/xhtml+xml", b"<?xml", b"ocr_page"),
            ("hocr", "application/xhtml+xml", "application/xhtml+xml", b"<?xml", b"ocr_page"),
            ("alto", None, "application/xml", b"<?xml", b"<alto "),
            ("alto", "text/xml;q=0.9", "application/xml", b"<?xml", b"</alto>"),
            ("tsv", None, "text/tab-separated-values", b"level\tpage_num", b"\n"),
            ("pdf", None, "application/pdf", b"%PDF-", b"%%EOF"),
            ("pdf", "image/png;q=1, application/pdf", "application/pdf", b"%PDF-", b"%%EOF"),
        ]
        for output, accept, ctype, starts, holds in cases:
            path = "/tasks/%s/result" % ids[output] + ("" if accept else "?format=" + output)
            status, got_type, body = self.get_raw(path, accept)
            self.assertEqual(status, 200, (output, accept, body[:200]))
            self.assertTrue(got_type.startswith(ctype), (output, got_type))
            self.assertTrue(body.startswith(starts), (output, body[:80]))
            self.assertIn(holds, body)
        # JSON by default, and for */*; text by format or Accept.
        status, got_type, body = self.get_raw("/tasks/%s/result" % ids["tsv"], "*/*")
        self.assertEqual((status, got_type), (200, "application/json"))
        self.assertIn("pages", json.loads(body))
        status, got_type, _ = self.get_raw("/tasks/%s/result" % ids["tsv"], "text/plain")
        self.assertEqual((status, got_type), (200, "text/plain; charset=utf-8"))
        # An output the task did not make: 404 saying how to get it.
        status, _, body = self.get_raw("/tasks/%s/result?format=pdf" % ids["hocr"])
        self.assertEqual(status, 404)
        self.assertIn('options {\"output\": \"pdf\"}', json.loads(body)["message"])
        # Only types /result does not serve, or one refused by q=0: 406.
        for accept in ("image/png", "application/json;q=0"):
            status, _, body = self.get_raw("/tasks/%s/result" % ids["tsv"], accept)
            self.assertEqual(status, 406, (accept, body))
            self.assertEqual(json.loads(body)["error"], "not_acceptable")
        status, _, body = self.get_raw("/tasks/%s/result?format=docx" % ids["tsv"])
        self.assertEqual(status, 400)

    @staticmethod
    def png_header(w, h):
        import struct
        import zlib
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + \
            struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return {"input": {"data_base64": base64.b64encode(png).decode()}}

    def test_memory_limit_413_and_no_device_503(self):
        # Headers only: the estimate reads the declared size; nothing is decoded.
        # 14000x14000 (under the 200 Mpx page limit): estimated at ~1,900 MB,
        # over tasks.max_task_memory_mb (1500 MB).
        status, e = self.request("POST", "/tasks", self.png_header(14000, 14000))
        self.assertEqual(status, 413, e)
        self.assertEqual(e["error"], "memory_limit_exceeded")
        # 11000x11000: ~1,200 MB, under the limit but more than the CPU's 1000 MB.
        status, e = self.request("POST", "/tasks", self.png_header(11000, 11000))
        self.assertEqual(status, 503, e)
        self.assertEqual(e["error"], "device_unavailable")
        self.assertIn("cpu", e["message"])

    def test_queue_full_is_429_and_the_task_stays_pending(self):
        # One worker and max_queue_size 2: fill the queue behind a running task.
        # A server of its own, with room for any estimate: the shared one has
        # learned from the other tests' pages, and under TSan (whose shadow
        # memory swells every measured peak) it learned to estimate this page
        # above the CPU's 1000 MB (503 device_unavailable).
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        cfg = os.path.join(tmp.name, "own.yaml")
        with open(cfg, "w") as f:
            f.write(CONFIG.replace("cpu_memory_mb: 1000", "cpu_memory_mb: 64000")
                    .replace("max_task_memory_mb: 1500", "max_task_memory_mb: 64000"))
        proc, port = start_server(tmp.name, ["--config", cfg])

        def stop():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=120)
        self.addCleanup(stop)

        def request(method, path, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            res = conn.getresponse()
            out = json.loads(res.read().decode())
            conn.close()
            return res.status, out
        ids = []
        busy = base64.b64encode(BUSY_PNG).decode()
        for _ in range(5):
            status, t = request("POST", "/tasks", {"input": {"data_base64": busy}})
            self.assertEqual(status, 201, t)
            ids.append(t["id"])
        statuses = [request("POST", "/tasks/%s/start" % i)[0] for i in ids]
        self.assertIn(429, statuses, statuses)
        refused = ids[statuses.index(429)]
        status, e = request("POST", "/tasks/%s/start" % refused)
        # either still full (429) or room again (202): never lost
        self.assertIn(status, (202, 429))
        status, t = request("GET", "/tasks/" + refused)
        self.assertIn(t["status"], ("pending", "queued", "running", "completed"))


class HttpServerFullDiskTest(unittest.TestCase):
    """A database that fills up while the server runs: creates are refused
    with 503 and the store's message, nothing accepted is lost from view, and
    the server exits 3 at shutdown naming the writes it could not store."""

    def test_full_database_refuses_creates_and_exits_3(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        cfg = os.path.join(tmp.name, "config.yaml")
        with open(cfg, "w") as f:
            f.write(CONFIG.replace("max_queue_size: 2", "max_queue_size: 1000")
                    + "storage:\n  max_size_mb: 1\n")
        port_file = os.path.join(tmp.name, "port")
        proc = subprocess.Popen(
            [SERVER, "--port", "0", "--config", cfg, "--db", os.path.join(tmp.name, "full.db"),
             "--port-file", port_file],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def stop():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.addCleanup(stop)
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if proc.poll() is not None or time.time() > deadline:
                self.fail("server did not start: " + proc.stdout.read())
            time.sleep(0.02)
        port = int(open(port_file).read())

        def request(method, path, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            data = json.dumps(body) if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            res = conn.getresponse()
            text = res.read().decode()
            conn.close()
            return res.status, json.loads(text)

        # Fill the database with pending tasks of junk input, in ever smaller
        # pieces, until even a small one is refused.
        ids, refusals = [], []
        for size in (200000, 50000, 10000, 2000, 300):
            for _ in range(200):
                data = base64.b64encode(os.urandom(size)).decode()
                status, body = request("POST", "/tasks", {"input": {"data_base64": data}})
                if status != 201:
                    refusals.append((status, body))
                    break
                ids.append(body["id"])
        self.assertTrue(ids)
        self.assertEqual(len(refusals), 5, refusals)
        for status, body in refusals:
            self.assertEqual(status, 503, body)
            self.assertEqual(body["error"], "io_error", body)
            self.assertIn("full", body["message"], body)
        # Run what was accepted: each fails (junk input), and those outcomes
        # do not fit in the database either.
        for i in ids:
            status, body = request("POST", "/tasks/%s/start" % i)
            self.assertEqual(status, 202, body)
        deadline = time.time() + 120
        while time.time() < deadline:
            ended = [request("GET", "/tasks/" + i)[1]["status"] for i in ids]
            if all(s in ("failed", "pending") for s in ended):
                break
            time.sleep(0.1)
        # get and list agree about every task, full database or not.
        _, listed = request("GET", "/tasks?limit=1000")
        by_id = {t["id"]: t["status"] for t in listed}
        for i in ids:
            self.assertEqual(by_id[i], request("GET", "/tasks/" + i)[1]["status"], i)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 3, out)
        self.assertIn("accepted are not in the store", out)
        self.assertIn("database or disk is full", out)
        self.assertNotIn("stopped", out.splitlines()[-1])


def start_server(tmpdir, extra_args=(), nofile=None):
    """Starts taskmgr-http on a free port; returns (proc, port)."""
    cfg = os.path.join(tmpdir, "config.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    port_file = os.path.join(tmpdir, "port")
    preexec = None
    if nofile is not None:
        import resource

        def preexec():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    proc = subprocess.Popen(
        [SERVER, "--port", "0", "--config", cfg, "--db", os.path.join(tmpdir, "t.db"),
         "--port-file", port_file] + list(extra_args),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)
    deadline = time.time() + 60
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("server did not start: " + proc.stdout.read())
        time.sleep(0.02)
    return proc, int(open(port_file).read())


def raw_exchange_all(port, data, timeout=30):
    """Sends raw bytes and returns every byte the server sends until it
    closes the connection."""
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    try:
        s.sendall(data)
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not b:
                break
            out += b
    finally:
        s.close()
    return out


def raw_exchange(port, data, timeout=30):
    """Sends raw bytes, returns (status, parsed JSON body) of the answer."""
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not b:
                break
            chunks.append(b)
            whole = b"".join(chunks)
            head, sep, body = whole.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                if len(body) >= length:
                    break
        whole = b"".join(chunks)
        head, _, body = whole.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        return status, json.loads(body.decode("utf-8"))
    finally:
        s.close()


class HttpTransportTest(unittest.TestCase):
    """The transport against a hostile or careless client: sizes, malformed
    requests, slow and idle connections, the connection limit, descriptor
    exhaustion, bad command lines. Every error body is JSON."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.proc, cls.port = start_server(
            cls.tmp.name, ["--body-limit-mb", "1", "--header-timeout", "1",
                           "--idle-timeout", "2"])

    @classmethod
    def tearDownClass(cls):
        cls.proc.send_signal(signal.SIGTERM)
        out, _ = cls.proc.communicate(timeout=120)
        cls.tmp.cleanup()
        assert cls.proc.returncode == 0, out

    def get(self, path="/tasks/metrics"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", path)
        res = conn.getresponse()
        res.read()
        conn.close()
        return res.status

    def test_sizes_and_malformed_requests_get_their_status_and_json(self):
        cases = [
            (b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
            (b"GET /tasks/metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n",
             431, "header_fields_too_large"),
            (b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 5000000\r\n\r\n{", 413, "payload_too_large"),
            (b"GARBAGE\r\n\r\n", 400, "bad_request"),
            (b"GET / HTTP/9.9\r\n\r\n", 400, "bad_request"),
            (b"GET /tasks/metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
        ]
        for data, want, code in cases:
            status, e = raw_exchange(self.port, data)
            self.assertEqual(status, want, (data[:60], e))
            self.assertEqual(e["error"], code, e)
            self.assertTrue(e["message"])
        # A body just under the limit is read (and judged by the route).
        body = json.dumps({"input": {"data_base64": "A" * 1000000}}).encode()
        status, e = raw_exchange(self.port, b"POST /tasks HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.assertNotIn(status, (413, 500), e)
        self.assertEqual(self.get(), 200)

    def test_slow_and_idle_connections_are_closed_and_others_are_served(self):
        import socket
        # A client that sends its header one byte at a time, too slowly:
        # closed after --header-timeout, while others are answered.
        slow = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        idle = [socket.create_connection(("127.0.0.1", self.port), timeout=30) for _ in range(20)]
        closed = False
        start = time.time()
        for ch in b"GET /tasks/metrics HTTP/1.1\r\n":
            try:
                slow.sendall(bytes([ch]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            self.assertEqual(self.get(), 200)  # served meanwhile
            time.sleep(0.2)
            if time.time() - start > 20:
                break
        if not closed:
            slow.settimeout(30)
            try:
                closed = slow.recv(1) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        self.assertTrue(closed, "the slow client was not cut off")
        slow.close()
        # The idle ones were closed too (they sent nothing within the timeout).
        for s in idle:
            s.settimeout(30)
            try:
                self.assertEqual(s.recv(1), b"")
            except ConnectionResetError:
                pass
            s.close()

    def test_connections_past_the_limit_get_503_and_the_server_recovers(self):
        import socket
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        # Idle connections are not cut off during the test (header timeout
        # 60 s): the limit alone turns the next one away.
        proc, port = start_server(tmp.name, ["--max-connections", "40",
                                             "--header-timeout", "60"])

        def stop():
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
        self.addCleanup(stop)
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(40)]
        try:
            # The 41st is answered 503 (once the server has counted the 40).
            deadline = time.time() + 30
            while True:
                status, e = raw_exchange(port, b"GET /tasks/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                if status == 503 or time.time() > deadline:
                    break
                time.sleep(0.05)
            self.assertEqual(status, 503, e)
            self.assertEqual(e["error"], "busy")
        finally:
            for s in held:
                s.close()
        deadline = time.time() + 30
        status = None
        while time.time() < deadline:
            status, e = raw_exchange(port, b"GET /tasks/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            if status == 200:
                break
            time.sleep(0.1)
        self.assertEqual(status, 200)

    def test_the_config_file_s_http_section(self):
        import socket
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        cfg = os.path.join(tmp.name, "server.yaml")

        def run_with(section, extra=()):
            with open(cfg, "w") as f:
                f.write(CONFIG + "http:\n" + section)
            return subprocess.run([SERVER, "--config", cfg, "--port", "0"] + list(extra),
                                  capture_output=True, text=True, timeout=60)
        # Refused, naming the key and its line.
        p = run_with("  prot: 8080\n")
        self.assertEqual(p.returncode, 2, p.stderr)
        line = CONFIG.count("\n") + 2
        self.assertIn("http.prot (%s line %d): unknown key" % (cfg, line), p.stderr)
        p = run_with("  port: abc\n")
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("http.port (%s line %d) must be a whole number" % (cfg, line), p.stderr)
        p = run_with("  input_roots: /not-a-list\n")
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("must be a list of directories", p.stderr)
        p = run_with("  address: 0.0.0.0\n")  # public without a token: refused as on the line
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("not a loopback address", p.stderr)
        # A key given twice, a NUL in a value, two http sections: refused
        # (YAML keeps one of the two silently).
        p = run_with("  port: 18150\n  port: 18151\n")
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("http.port (%s line %d): given twice (first at line %d)"
                      % (cfg, line + 1, line), p.stderr)
        p = run_with('  input_roots: ["%s\\0zzz"]\n' % tmp.name)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("contains a NUL byte", p.stderr)
        p = run_with("  port: 18150\nhttp:\n  port: 18151\n")
        self.assertNotEqual(p.returncode, 0, p.stderr)
        self.assertIn("http: given twice", p.stderr)
        # Applied: at most 3 connections from the file (the 4th is busy) ...
        with open(cfg, "w") as f:
            f.write(CONFIG + "http:\n  max_connections: 3\n  header_timeout_seconds: 60\n")
        first, second = os.path.join(tmp.name, "a"), os.path.join(tmp.name, "b")
        os.makedirs(first)
        os.makedirs(second)
        proc, port = start_server(first, ["--config", cfg])

        def stop(p=proc):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=120)
        self.addCleanup(stop)
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        deadline = time.time() + 30
        while True:
            status, e = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            if status == 503 or time.time() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(status, 503, e)
        for s in held:
            s.close()
        stop()
        # ... and the command line wins over the file.
        proc2, port2 = start_server(second, ["--config", cfg, "--max-connections", "50"])
        self.addCleanup(stop, proc2)
        held = [socket.create_connection(("127.0.0.1", port2), timeout=30) for _ in range(10)]
        status, e = raw_exchange(port2, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status, 200, e)
        for s in held:
            s.close()

    def test_bad_command_lines_exit_2_with_a_message(self):
        for args, part in ((["--port", "abc"], "--port must be a whole number"),
                           (["--port", "70000"], "--port must be a whole number"),
                           (["--body-limit-mb", "0"], "--body-limit-mb"),
                           (["--header-timeout", "nan"], "--header-timeout"),
                           (["--bogus"], "unknown option")):
            p = subprocess.run([SERVER] + args, capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 2, (args, p.stderr))
            self.assertIn(part, p.stderr)


class HttpPathsAndAuthTest(unittest.TestCase):
    """input.path only under --input-root, one answer for every refusal;
    a bearer token on every route but /health; no public bind without one."""

    TOKEN = "s3cret-token-0123456789"

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        t = cls.tmp.name
        cls.root = os.path.join(t, "root")
        outside = os.path.join(t, "outside")
        os.makedirs(os.path.join(cls.root, "dir"))
        os.makedirs(outside)
        with open(os.path.join(cls.root, "ok.png"), "wb") as f:
            f.write(TINY_PNG)
        with open(os.path.join(outside, "secret.png"), "wb") as f:
            f.write(TINY_PNG)
        os.symlink(os.path.join(outside, "secret.png"), os.path.join(cls.root, "link.png"))
        os.symlink(os.path.join(cls.root, "ok.png"), os.path.join(cls.root, "inside-link.png"))
        os.mkfifo(os.path.join(cls.root, "fifo.png"))
        cls.outside = outside
        token_file = os.path.join(t, "token")
        with open(token_file, "w") as f:
            f.write(cls.TOKEN + "\n")
        cls.proc, cls.port = start_server(t, ["--input-root", cls.root,
                                              "--token-file", token_file])

    @classmethod
    def tearDownClass(cls):
        cls.proc.send_signal(signal.SIGTERM)
        out, _ = cls.proc.communicate(timeout=120)
        cls.tmp.cleanup()
        assert cls.proc.returncode == 0, out

    def request(self, method, path, body=None, token=TOKEN):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=headers)
        res = conn.getresponse()
        text = res.read().decode("utf-8")
        conn.close()
        return res.status, json.loads(text), res

    def created(self):
        status, m, _ = self.request("GET", "/tasks/metrics")
        self.assertEqual(status, 200)
        return m["counters"]["tasks_created"]

    def test_paths_outside_the_roots_are_refused_alike_and_take_no_task(self):
        before = self.created()
        probes = [
            os.path.join(self.outside, "secret.png"),         # exists, outside
            os.path.join(self.root, "missing.png"),            # missing, inside
            os.path.join(self.root, "dir"),                    # a directory
            os.path.join(self.root, "fifo.png"),               # a FIFO (must not hang)
            os.path.join(self.root, "link.png"),               # a symlink out of the root
            os.path.join(self.root, "..", "outside", "secret.png"),
            "/dev/zero", "/proc/self/environ", "/etc/shadow", "/root", "relative.png",
            os.path.join(self.root, "ok.png") + "\u0000.txt",   # a NUL
            os.path.join(self.root, "dir", "..", "ok.png"),    # '..' even back inside
        ]
        answers = set()
        for p in probes:
            status, e, _ = self.request("POST", "/tasks", {"input": {"path": p}})
            self.assertEqual(status, 403, (p, e))
            answers.add(json.dumps(e, sort_keys=True))
        self.assertEqual(len(answers), 1, answers)  # one answer: nothing learned
        self.assertEqual(self.created(), before)   # no task made, no worker taken
        # Inside the root (also through a symlink that stays inside): read by
        # the server and run.
        for name in ("ok.png", "inside-link.png"):
            status, t, _ = self.request("POST", "/tasks",
                                        {"input": {"path": os.path.join(self.root, name)}})
            self.assertEqual(status, 201, t)
        self.assertEqual(self.created(), before + 2)

    def test_the_token_is_needed_everywhere_but_health(self):
        for token, want in ((None, 401), ("wrong-token-0123456789", 401), ("", 401),
                            (self.TOKEN + "x", 401), (self.TOKEN, 200)):
            status, e, res = self.request("GET", "/tasks/metrics", token=token)
            self.assertEqual(status, want, (token, e))
            if want == 401:
                self.assertEqual(e["error"], "unauthorized")
                self.assertEqual(res.getheader("WWW-Authenticate"), "Bearer")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/")  # the dashboard page holds no data: open
        res = conn.getresponse()
        self.assertEqual(res.status, 200)
        self.assertIn("text/html", res.getheader("Content-Type"))
        res.read()
        conn.close()
        status, e, _ = self.request("GET", "/events", token=None)  # the stream too
        self.assertEqual((status, e["error"]), (401, "unauthorized"), e)
        # The scheme is case-insensitive (RFC 9110); the token is not.
        for header, want in (("bearer " + self.TOKEN, 200), ("BEARER " + self.TOKEN, 200),
                             ("Bearer " + self.TOKEN.upper(), 401),
                             ("Basic " + self.TOKEN, 401), ("Bearer", 401)):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", "/tasks/metrics", headers={"Authorization": header})
            res = conn.getresponse()
            res.read()
            conn.close()
            self.assertEqual(res.status, want, header)
        status, h, _ = self.request("GET", "/health", token=None)
        self.assertEqual(status, 200, h)
        self.assertTrue(h["ready"])
        self.assertEqual(h["status"], "ok")
        self.assertIn("cpu", [d["id"] for d in h["devices"]])

    def test_public_bind_needs_a_token(self):
        p = subprocess.run([SERVER, "--address", "0.0.0.0", "--port", "0"], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("not a loopback address", p.stderr)
        for args, part in ((["--token-file", "/nonexistent"], "cannot read"),
                           (["--input-root", "/nonexistent"], "is not a directory"),
                           (["--address", "not-an-ip"], "--address must be an IP address")):
            p = subprocess.run([SERVER] + args, capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 2, (args, p.stderr))
            self.assertIn(part, p.stderr)


class HttpDescriptorExhaustionTest(unittest.TestCase):
    """Out of descriptors once: the server accepts again when they are free."""

    def test_accepts_again_after_running_out_of_descriptors(self):
        import socket
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        proc, port = start_server(tmp.name, ["--max-connections", "10000"], nofile=96)

        def stop():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=120)
        self.addCleanup(stop)
        held = []
        for _ in range(300):  # far past 96 descriptors
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(0.5)
        for s in held:
            s.close()
        ok = False
        deadline = time.time() + 30
        while time.time() < deadline and not ok:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/tasks/metrics")
                ok = conn.getresponse().status == 200
                conn.close()
            except OSError:
                time.sleep(0.2)
        self.assertTrue(ok, "the server did not accept again")
        self.assertIsNone(proc.poll())


if __name__ == "__main__":
    unittest.main(verbosity=2)
