#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses into fuzz/corpus/, from
the project's own test inputs: the YAML of docs/CONFIGURATION.md and the
test configurations; small PNG, BMP and TIFF pages like those the OCR tests
decode (gray, RGB, bilevel, multi-page) and the bad inputs of the OCR
bad-input test (truncated, wrong magic, a header declaring a huge size);
the option strings and requests of the C ABI tests.

    python3 fuzz/make_corpus.py        # from the repository root
"""

import os
import re
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def write(kind, name, data):
    d = os.path.join(OUT, kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def png(w, h, color=0, fill=255, text_rows=()):
    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
    ch = {0: 1, 2: 3}[color]
    rows = []
    for y in range(h):
        v = 0 if y in text_rows else fill
        rows.append(b"\0" + bytes([v]) * (w * ch))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def bmp(w, h):
    row = (w * 3 + 3) & ~3
    pixels = b"".join(bytes([255, 255, 255] * w) + b"\0" * (row - 3 * w) for _ in range(h))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def tiff(pages):
    """Uncompressed 8-bit gray TIFF with one IFD per (w, h) page."""
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    prev_next = 4
    for w, h in pages:
        data_off = len(out)
        out += bytes([255]) * (w * h)
        if len(out) % 2:
            out += b"\0"
        ifd_off = len(out)
        struct.pack_into("<I", out, prev_next, ifd_off)
        entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                   (273, 4, 1, data_off), (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, w * h)]
        out += struct.pack("<H", len(entries))
        for tag, typ, n, v in entries:
            out += struct.pack("<HHII", tag, typ, n, v)
        prev_next = len(out)
        out += struct.pack("<I", 0)
    return bytes(out)


def main():
    # Configurations: every YAML block of the docs, and the tests' strings.
    docs = open(os.path.join(ROOT, "docs", "CONFIGURATION.md"), encoding="utf-8").read()
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", docs, re.S)):
        write("config", "doc%d.yaml" % i, block)
    for i, y in enumerate([
            "", "tasks:\n  max_queue_size: 17\n",
            "tasks:\n  retry:\n    memory_reduction_factor: 2\n",
            "devices:\n  declared:\n    - {id: \"cuda:0\", kind: gpu, memory_mb: 2000}\n",
            "unknown_section: 1\n", "tasks: [1, 2\n",
            "storage: {path: \":memory:\", retention_days: 1}\n",
            "pools:\n  devices:\n    cpu: {min_instances: 1, max_instances: 2}\n",
            "ocr: {languages: eng, max_pixels: 65536, preprocess: {deskew: true}}\n"]):
        write("config", "test%d.yaml" % i, y)

    # OCR input: "<options>\n<image>".
    opts = ['', '{"words":true}', '{"output":"hocr"}', '{"output":"tsv","psm":6}',
            '{"preprocess":{"grayscale":true,"target_dpi":300,"deskew":true,"binarize":true}}',
            '{"timeout_seconds":5}']
    images = {"gray.png": png(64, 16, text_rows=range(6, 9)), "rgb.png": png(32, 8, color=2),
              "white.bmp": bmp(24, 12), "one.tif": tiff([(40, 10)]),
              "pages.tif": tiff([(40, 10), (20, 20), (16, 8)])}
    for i, (name, data) in enumerate(images.items()):
        write("ocr_input", name, (opts[i % len(opts)] + "\n").encode() + data)
    good = images["gray.png"]
    write("ocr_input", "truncated.png", b"\n" + good[:40])
    write("ocr_input", "empty", b"\n")
    write("ocr_input", "not_image.png", b"\njust some text with an image name")
    write("ocr_input", "huge_header.png", b"\n" + png(64, 16)[:33].replace(
        struct.pack(">II", 64, 16), struct.pack(">II", 100000, 100000)))
    write("ocr_input", "bad_options", b'{"psm": 99, "nope": 1}\n' + good)

    # C ABI strings: yaml \0 service \0 path \0 device \0 options \0 media \0 status/options
    for i, fields in enumerate([
            ["", "", "/data/page.png", "", '{"k":1}', "", "completed"],
            ["tasks: {max_queue_size: 3}", "svc", "", "cpu", "", "image/png", '{"timeout_seconds":1}'],
            ["x: [", "nope", "/data/\xc3\xa9.png", "tpu:0", "{bad", "", "finished"],
            ["", "svc", "/data/a.png", "cuda:0", "[1,2]", "", ""]]):
        write("capi", "req%d" % i, "\0".join(fields).encode("utf-8", "surrogateescape"))


if __name__ == "__main__":
    main()
