#!/usr/bin/env python3
"""Baseline (e) of bench_ocr_batch: the usual Python way to OCR a batch with
Tesseract: Debian's python3-tesserocr, a thread pool of N, each thread with
its own warm PyTessBaseAPI (tesserocr releases the GIL while recognising).

    ocr_tesserocr.py LIST_FILE OUT_DIR [THREADS]

LIST_FILE has one image path per line. The engines are initialised before
the clock starts. Writes OUT_DIR/<index>.txt per page and prints
"seconds <wall time of the batch>".
"""

import concurrent.futures
import os
import sys
import threading
import time

import tesserocr


def main():
    pages = [p for p in open(sys.argv[1]).read().split("\n") if p]
    out_dir = sys.argv[2]
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    local = threading.local()
    ready = threading.Barrier(threads + 1)

    def warm():
        local.api = tesserocr.PyTessBaseAPI(lang="eng", psm=tesserocr.PSM.AUTO,
                                            oem=tesserocr.OEM.LSTM_ONLY)
        ready.wait()

    def ocr(item):
        index, path = item
        api = local.api
        api.SetImageFile(path)
        text = api.GetUTF8Text()
        with open(os.path.join(out_dir, "%d.txt" % index), "w", encoding="utf-8") as f:
            f.write(text)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(warm)
        ready.wait()  # every thread holds a warm engine
        t0 = time.perf_counter()
        list(pool.map(ocr, enumerate(pages)))
        seconds = time.perf_counter() - t0
    print("seconds %.6f" % seconds)


if __name__ == "__main__":
    main()
