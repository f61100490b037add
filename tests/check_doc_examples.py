#!/usr/bin/env python3
"""Compiles (and runs) the code examples in the docs, so they stay true.

A fenced block is an example when the line before its fence is a marker:

    <!-- doc-example: c run -->      compile as C99 against libtaskmgr, then run it
    <!-- doc-example: cpp -->        compile as C++17, do not run
    <!-- doc-example: python run --> run with python3 (PYTHONPATH examples/python)
    <!-- doc-example: yaml -->       a configuration: must pass taskmgr's validation

Usage: check_doc_examples.py --cc CC --cxx CXX --include DIR... --lib LIBFILE
       [--flags "-fsanitize=..."] [--python PY] FILE.md...
Each example is built in a temporary folder; a failure prints the block's
file and line with the compiler's or the program's output.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

MARKER = re.compile(r"<!--\s*doc-example:\s*(c|cpp|python|yaml)((?:\s+\w+)*)\s*-->")


CHECKED = {"c", "cpp", "c++", "python", "py", "yaml", "yml"}


def unmarked(path):
    """Code blocks in a checked language with no marker: every example must
    be compiled or run, so an unmarked one is an error."""
    lines = open(path, encoding="utf-8").read().split("\n")
    fence = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            if not fence and line[3:].strip().lower() in CHECKED:
                prev = next((p for p in reversed(lines[:i]) if p.strip()), "")
                if not MARKER.search(prev):
                    yield i + 1, line[3:].strip()
            fence = not fence


def examples(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        m = MARKER.search(lines[i])
        if m and i + 1 < len(lines) and lines[i + 1].startswith("```"):
            start = i + 2
            end = start
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            yield m.group(1), m.group(2).split(), start + 1, "\n".join(lines[start:end]) + "\n"
            i = end
        i += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cc", required=True)
    ap.add_argument("--cxx", required=True)
    ap.add_argument("--include", action="append", default=[])
    ap.add_argument("--lib", required=True)
    ap.add_argument("--flags", default="")
    ap.add_argument("--python", default="python3")
    ap.add_argument("--pythonpath", default="")
    ap.add_argument("--python-env", action="append", default=[],
                    help="KEY=VALUE set for python examples only (e.g. a sanitizer preload)")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    libdir = os.path.dirname(os.path.abspath(a.lib))
    flags = shlex.split(a.flags)
    count = failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for md in a.files:
            for line, lang in unmarked(md):
                failures += 1
                print("FAIL %s:%d (%s): an example with no doc-example marker (compile or run it)"
                      % (md, line, lang))
            for lang, opts, line, code in examples(md):
                count += 1
                where = "%s:%d" % (md, line)
                ext = {"c": ".c", "cpp": ".cpp", "python": ".py", "yaml": ".yaml"}[lang]
                src = os.path.join(tmp, "example%d%s" % (count, ext))
                with open(src, "w", encoding="utf-8") as f:
                    f.write(code)
                env = dict(os.environ)
                if lang == "yaml":
                    opts = opts + ["run"]
                    env["PYTHONPATH"] = a.pythonpath
                    env["TASKMGR_LIBRARY"] = os.path.abspath(a.lib)
                    for kv in a.python_env:
                        k, _, v = kv.partition("=")
                        env[k] = v
                    cmd = [a.python, "-c",
                           "import sys, taskmgr; taskmgr.config_normalize(open(sys.argv[1]).read())",
                           src]
                elif lang == "python":
                    env["PYTHONPATH"] = a.pythonpath
                    env["TASKMGR_LIBRARY"] = os.path.abspath(a.lib)
                    for kv in a.python_env:
                        k, _, v = kv.partition("=")
                        env[k] = v
                    cmd = [a.python, src]
                else:
                    exe = os.path.join(tmp, "example%d" % count)
                    compiler = a.cc if lang == "c" else a.cxx
                    std = "-std=c99" if lang == "c" else "-std=c++17"
                    build = [compiler, std, "-Wall", "-Wextra", "-Werror", *flags,
                             *["-I" + d for d in a.include], src, "-o", exe,
                             "-L" + libdir, "-Wl,-rpath," + libdir, "-ltaskmgr", "-lpthread"]
                    r = subprocess.run(build, capture_output=True, text=True)
                    if r.returncode != 0:
                        failures += 1
                        print("FAIL %s (%s): does not compile\n%s" % (where, lang, r.stderr))
                        continue
                    cmd = [exe]
                if "run" in opts:
                    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env,
                                       timeout=300)
                    if r.returncode != 0:
                        failures += 1
                        print("FAIL %s (%s): exit %d\n%s%s" % (where, lang, r.returncode,
                                                                r.stdout, r.stderr))
                        continue
                print("ok   %s (%s%s)" % (where, lang, ", ran" if "run" in opts else ""))
    if count == 0:
        print("no examples found in " + " ".join(a.files))
        return 1
    print("%d examples, %d failed" % (count, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
