#!/usr/bin/env python3
"""GET /events under load: clients that never read beside clients that do.

For each taskmgr-http binary given, one after the other in the same run:
start it on a fresh database, open STALLED event streams that never read
(a 4 KiB receive buffer: the server's writes to them block at once) and
READERS streams that read as fast as they can, then create tasks (uploads,
started: each task's events, from created to cleanup_completed, about
eight) from 4 clients for SECONDS. Prints,
per binary: the events published, what each reader received and whether it
was dropped (the server closes a stream that falls too far behind), and the
server's resident memory at the end (docs/PERFORMANCE.md, "taskmgr-http").

    python3 bench/sse_fanout.py SECONDS STALLED READERS BINARY...
"""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c63f80f0000010101001bb6ee560000000049454e44ae426082")
PRODUCERS = 4
CONFIG = """devices:
  probe_cpu: false
  probe_nvidia: false
  cpu_memory_mb: 4000
tasks:
  max_queue_size: 1000000
"""


def start(binary, work):
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    port_file = os.path.join(work, "port")
    proc = subprocess.Popen([binary, "--port", "0", "--config", cfg, "--db",
                             os.path.join(work, "t.db"), "--port-file", port_file],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            with open(port_file) as f:
                text = f.read().strip()
            if text:
                return proc, int(text)
        except FileNotFoundError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(binary + " did not start")
        time.sleep(0.02)


def stream(port, rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    return s


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(binary, seconds, stalled_n, readers_n):
    work = tempfile.mkdtemp()
    proc, port = start(binary, work)
    try:
        stalled = [stream(port, 4096) for _ in range(stalled_n)]
        stop = threading.Event()
        results = {}

        def reader(i):
            s = stream(port)
            s.settimeout(1)
            n, tail, dropped = 0, b"", False
            while True:
                try:
                    chunk = s.recv(1 << 20)
                except socket.timeout:
                    if stop.is_set():
                        break
                    continue
                if not chunk:
                    dropped = True
                    break
                n += len(chunk)
                tail = (tail + chunk)[-4096:]
            ids = re.findall(rb"\nid: (\d+)", tail)
            results[i] = (n, dropped, int(ids[-1]) if ids else 0)
            s.close()
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers_n)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        end = time.time() + seconds

        def produce():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while time.time() < end:
                c.request("POST", "/tasks?start=1", body=PNG, headers={"Content-Type": "image/png"})
                c.getresponse().read()
            c.close()
        producers = [threading.Thread(target=produce) for _ in range(PRODUCERS)]
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        # The newest event's sequence: the last task's created event.
        conn.request("GET", "/tasks?limit=1")
        last = json.loads(conn.getresponse().read())[0]["id"]
        conn.request("GET", "/tasks/%s/events" % last)
        newest = json.loads(conn.getresponse().read())[-1]["sequence"]
        time.sleep(5)  # the readers catch up (and the last tasks end)
        memory = rss_kb(proc.pid)
        stop.set()
        for t in threads:
            t.join()
        for s in stalled:
            s.close()
        print("%s: %d stalled, %d readers, %d s: %d events when the producers stopped, "
              "server RSS %.0f MB"
              % (binary, stalled_n, readers_n, seconds, newest, memory / 1024))
        for i in sorted(results):
            n, dropped, last_id = results[i]
            print("  reader %d: %s, %.1f MB received, last event %d"
                  % (i, "DROPPED" if dropped else "kept", n / 1e6, last_id))
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main():
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    seconds, stalled, readers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for binary in sys.argv[4:]:
        run(binary, seconds, stalled, readers)


if __name__ == "__main__":
    main()
