#!/usr/bin/env python3
"""A/B rounds of two builds' benchmarks, alternating binaries in the same run.

    bench/ab.py --a OLD/build/release --b NEW/build/release --rounds 7

Each round runs bench_lifecycle (one run of --tasks) and bench_store (one
run of --store-tasks) from build A and from build B, in turn (A first in odd
rounds, B first in even ones), so that the machine's noise falls on both
alike. Prints every run and, per submission mode, the medians and B/A.
"""
import argparse
import re
import statistics
import subprocess
import sys

LIFE = re.compile(r"^\s+(create_task \+ start_task|create_task\(start\)|create_tasks)\s+"
                  r"(\d+) lifecycles/s\s+asio/taskmgr\s+([\d.]+)x")
STORE = re.compile(r"^\s+(.+?)\s+(\d+) lifecycles/s \(([\d.]+) of raw\)\s+call p50\s+([\d.]+) us p99\s+([\d.]+) us")


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out


def lifecycle(build, tasks):
    out = run([f"{build}/bench/bench_lifecycle", "--tasks", str(tasks), "--runs", "1"])
    found = {}
    for line in out.splitlines():
        if line.startswith("median"):
            break
        m = LIFE.match(line)
        if m:
            found[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return found


def store(build, tasks, extra):
    out = run([f"{build}/bench/bench_store", "--tasks", str(tasks), "--runs", "1"] + extra)
    found = {}
    for line in out.splitlines():
        if line.startswith("median"):
            break
        m = STORE.match(line)
        if m:
            found[m.group(1).strip()] = (float(m.group(2)), float(m.group(5)))
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="build directory A (the baseline)")
    p.add_argument("--b", required=True, help="build directory B")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tasks", type=int, default=100000, help="bench_lifecycle --tasks")
    p.add_argument("--store-tasks", type=int, default=20000, help="bench_store --tasks")
    p.add_argument("--store-dir", default=None, help="bench_store --dir")
    p.add_argument("--only", choices=["lifecycle", "store"], default=None)
    args = p.parse_args()
    extra = ["--dir", args.store_dir] if args.store_dir else []
    life = {"A": [], "B": []}
    sto = {"A": [], "B": []}
    for r in range(args.rounds):
        order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
        for side in order:
            build = args.a if side == "A" else args.b
            if args.only != "store":
                l = lifecycle(build, args.tasks)
                life[side].append(l)
                print(f"round {r + 1} {side} lifecycle: " +
                      ", ".join(f"{k} {v[0]:.0f}/s ({v[1]:.1f}x asio)" for k, v in l.items()), flush=True)
            if args.only != "lifecycle":
                s = store(build, args.store_tasks, extra)
                sto[side].append(s)
                print(f"round {r + 1} {side} store: " +
                      ", ".join(f"{k} {v[0]:.0f}/s (p99 {v[1]:.0f} us)" for k, v in s.items()), flush=True)

    def report(title, data, unit_index, label):
        modes = list(data["A"][0].keys()) if data["A"] else []
        print(f"\n{title} (medians of {args.rounds} rounds)")
        for mode in modes:
            a = statistics.median(x[mode][0] for x in data["A"] if mode in x)
            b = statistics.median(x[mode][0] for x in data["B"] if mode in x)
            second_a = statistics.median(x[mode][1] for x in data["A"] if mode in x)
            second_b = statistics.median(x[mode][1] for x in data["B"] if mode in x)
            print(f"  {mode:28s} A {a:9.0f}/s  B {b:9.0f}/s  B/A {b / a:5.2f}   "
                  f"{label}: A {second_a:.1f}  B {second_b:.1f}")

    if life["A"]:
        report("bench_lifecycle lifecycles/s", life, 1, "asio/taskmgr ratio")
    if sto["A"]:
        report("bench_store durable lifecycles/s", sto, 1, "call p99 us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
