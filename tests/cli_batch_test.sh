#!/usr/bin/env bash
# taskmgr-ocr on what people feed a batch tool:
#  1. a PDF of two pages rendered by the project goes in; --format pdf gives
#     a searchable PDF with the same pages and page sizes, which poppler
#     opens without a word on stderr, and whose text layer (pdftotext) reads
#     within 0.5 points of CER of the text output; --sidecar writes the text;
#     hocr and alto outputs parse as XML with one page per page (hOCR's
#     metadata and properties checked), tsv is Tesseract's TSV over both pages;
#  2. queue_timeout_seconds: 2 over a folder that takes far longer to OCR:
#     no page fails queue_timeout (the CLI streams, it does not queue all);
#  3. listing 100,000 files: the memory it needs grows by a few hundred
#     bytes per file, nothing more (--list reports the peak);
#  4. a full disk (storage.max_size_mb reached mid-run): exit 3 and the
#     store's message on stderr, never a clean summary; one warning when
#     writes start failing, and close() naming the writes not stored.
#   cli_batch_test.sh TASKMGR_OCR TASKMGR_IMG2PDF
set -euo pipefail
bin=$(realpath "$1")
img2pdf=$(realpath "$2")
samples=$(realpath "$(dirname "$0")/../examples/taskmgr_ocr/samples")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
render() {  # render TEXT_FILE OUTBASE XSIZE YSIZE
  text2image --text="$1" --outputbase="$2" --font='DejaVu Sans' \
    --fonts_dir=/usr/share/fonts/truetype/dejavu --resolution=300 --ptsize=12 --margin=100 \
    --xsize="$3" --ysize="$4" > /dev/null 2>&1
  rm -f "$2.box"
}
cer() {  # cer TEXT_FILE TRUTH_FILE: the character error rate in percent
  python3 - "$1" "$2" << 'EOF'
import sys
def norm(s): return " ".join(s.split())
a, b = (norm(open(f, encoding="utf-8").read()) for f in sys.argv[1:3])
prev = list(range(len(b) + 1))
for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
        cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
print("%.3f" % (100.0 * prev[len(b)] / max(1, len(b))))
EOF
}

echo "== 1. PDF in, searchable PDF out"
mkdir pdf
render "$samples/letter.txt" letter 2550 3300
render "$samples/notes.txt" notes 2550 3300
"$img2pdf" pdf/two.pdf letter.tif notes.tif
cat "$samples/letter.txt" "$samples/notes.txt" > truth.txt
"$bin" --db text.db --progress lines --out text-out pdf > text.log
"$bin" --db pdf.db --progress lines --format pdf --sidecar --out pdf-out pdf > pdf.log
grep -q "completed       2" pdf.log || { cat pdf.log; echo "FAIL: two pages"; exit 1; }
pdfinfo pdf/two.pdf > in.info
pdfinfo pdf-out/two.pdf > out.info 2> out.err
[ ! -s out.err ] || { cat out.err; echo "FAIL: poppler complains about the output PDF"; exit 1; }
[ "$(grep '^Pages:' out.info)" = "$(grep '^Pages:' in.info)" ] || { echo "FAIL: page count"; exit 1; }
pdfinfo -f 1 -l 2 pdf/two.pdf | grep "^Page.*size" > in.sizes
pdfinfo -f 1 -l 2 pdf-out/two.pdf | grep "^Page.*size" > out.sizes
diff in.sizes out.sizes || { echo "FAIL: page sizes differ"; exit 1; }
pdftotext pdf-out/two.pdf layer.txt 2> pdftotext.err
[ ! -s pdftotext.err ] || { cat pdftotext.err; echo "FAIL: pdftotext complains"; exit 1; }
text_cer=$(cer text-out/two.txt truth.txt)
layer_cer=$(cer layer.txt truth.txt)
sidecar_cer=$(cer pdf-out/two.txt truth.txt)
echo "CER: text output $text_cer%, PDF text layer $layer_cer%, sidecar $sidecar_cer%"
python3 -c "import sys; t,l=float('$text_cer'),float('$layer_cer'); sys.exit(0 if abs(l-t) <= 0.5 and t < 2 else 1)" ||
  { echo "FAIL: the text layer reads differently from the text output"; exit 1; }
[ "$sidecar_cer" = "$text_cer" ] || { echo "FAIL: the sidecar is not the text output"; exit 1; }
grep -q $'\f' text-out/two.txt || { echo "FAIL: pages not separated by a form feed"; exit 1; }
for f in hocr alto tsv; do
  "$bin" --db "$f.db" --progress lines --format "$f" --out "$f-out" pdf > "$f.log"
done
python3 - << 'EOF'
import xml.etree.ElementTree as ET
h = ET.parse("hocr-out/two.hocr").getroot()
pages = [e for e in h.iter() if e.get("class") == "ocr_page"]
assert len(pages) == 2, "hocr: %d pages" % len(pages)
a = ET.parse("alto-out/two.xml").getroot()
ns = "{http://www.loc.gov/standards/alto/ns-v3#}"
assert a.tag == ns + "alto", a.tag
assert len(a.findall(".//" + ns + "Page")) == 2, "alto pages"
ids = [e.get("ID") for e in a.iter() if e.get("ID")]
assert len(ids) == len(set(ids)), "alto: duplicate IDs %s" % sorted(set(i for i in ids if ids.count(i) > 1))[:5]
hids = [e.get("id") for e in h.iter() if e.get("id")]
assert len(hids) == len(set(hids)), "hocr: duplicate ids"
# hOCR's required metadata and properties (the hOCR 1.2 spec, as hocr-check
# reads it): ocr-system and ocr-capabilities meta; every ocr class used is
# a declared capability; each ocr_page has image, bbox and ppageno (0, 1);
# every line and word has a bbox inside its page's.
x = "{http://www.w3.org/1999/xhtml}"
meta = {m.get("name"): m.get("content") for m in h.iter(x + "meta")}
assert meta.get("ocr-system", "").startswith("taskmgr"), meta
caps = set(meta.get("ocr-capabilities", "").split())
used = {c for e in h.iter() for c in (e.get("class") or "").split() if c.startswith("ocr")}
assert used <= caps, "hocr: classes not declared in ocr-capabilities: %s" % (used - caps)
def props(e):
    out = {}
    for part in (e.get("title") or "").split(";"):
        k, _, v = part.strip().partition(" ")
        if k: out[k] = v
    return out
for n, page in enumerate(pages):
    p = props(page)
    assert "image" in p and "bbox" in p and "ppageno" in p, p
    assert p["image"].strip('"').endswith("/two.pdf"), p["image"]
    assert int(p["ppageno"]) == n, p["ppageno"]
    px0, py0, px1, py1 = map(int, p["bbox"].split())
    assert (px0, py0) == (0, 0) and px1 > 0 and py1 > 0
    words = [e for e in page.iter() if e.get("class") in ("ocr_line", "ocrx_word")]
    assert len(words) > 20, "page %d: %d lines and words" % (n, len(words))
    for e in words:
        x0, y0, x1, y1 = map(int, props(e)["bbox"].split())
        assert 0 <= x0 <= x1 <= px1 and 0 <= y0 <= y1 <= py1, (x0, y0, x1, y1, px1, py1)
# Tesseract's TSV: its header, 12 columns on every row, both pages' rows
# with page_num 1 and 2, word boxes inside the page (level 1's box).
rows = [l.split("\t") for l in open("tsv-out/two.tsv", encoding="utf-8").read().splitlines()]
assert rows[0] == ["level", "page_num", "block_num", "par_num", "line_num", "word_num", "left",
                   "top", "width", "height", "conf", "text"], rows[0]
assert all(len(r) == 12 for r in rows), [r for r in rows if len(r) != 12][:2]
assert sorted({r[1] for r in rows[1:]}) == ["1", "2"], "tsv page_num"
page_box = {r[1]: (int(r[8]), int(r[9])) for r in rows[1:] if r[0] == "1"}
words = [r for r in rows[1:] if r[0] == "5"]
assert len(words) > 40, len(words)
for r in words:
    w, hh = page_box[r[1]]
    l, t, ww, wh = map(int, r[6:10])
    assert 0 <= l and l + ww <= w and 0 <= t and t + wh <= hh, r
print("hocr, alto and tsv: 2 pages each; hOCR metadata and boxes, TSV columns and pages")
EOF
# A page read before for text is read again for a PDF (its result has none);
# read again for a PDF, nothing is redone.
"$bin" --db text.db --progress lines --format pdf --out pdf-again pdf > again.log
grep -q "pages           2 (0 already done)" again.log || { cat again.log; echo "FAIL: reused text results for a PDF"; exit 1; }
"$bin" --db text.db --progress lines --format pdf --out pdf-again pdf > again2.log
grep -q "pages           2 (2 already done)" again2.log || { cat again2.log; echo "FAIL: redid PDF pages"; exit 1; }
cmp -s <(pdftotext pdf-again/two.pdf -) <(pdftotext pdf-out/two.pdf -) || { echo "FAIL: resumed PDF differs"; exit 1; }

# Two inputs with one name never overwrite each other's output.
mkdir -p dup/a dup/b
echo "Pack my box with five dozen liquor jugs." > small.txt
render small.txt small 1200 300
cp small.tif dup/a/x.tif && cp small.tif dup/a/x.png && cp small.tif dup/b/x.tif
"$bin" --db dup.db --progress lines --out dup-out dup/a dup/b > dup.log
[ "$(ls dup-out | tr '\n' ' ')" = "x.png.txt x.tif-2.txt x.tif.txt " ] ||
  { ls dup-out; echo "FAIL: output names collide"; exit 1; }

echo "== 2. queue_timeout_seconds: 2 over a long folder"
mkdir slow
for l in 1 2 3 4 5 6; do cat "$samples/notes.txt"; done | head -22 > long.txt
render long.txt long 2550 2200  # one page (a longer text would make two)
for i in $(seq -w 1 16); do cp long.tif "slow/page$i.tif"; done
printf 'tasks:\n  queue_timeout_seconds: 2\n' > qt.yaml
start=$(date +%s)
"$bin" --db slow.db --progress lines --config qt.yaml --jobs 1 slow > slow.log
took=$(($(date +%s) - start))
echo "16 pages, one worker, in ${took} s"
grep -q "completed       16" slow.log || { cat slow.log; echo "FAIL: pages failed"; exit 1; }
! grep -q "queue_timeout" slow.log || { echo "FAIL: queue_timeout"; exit 1; }
[ "$took" -gt 4 ] || echo "note: the folder took only ${took} s (meant to take far longer than 2 s)"

echo "== 3. listing 100,000 files"
mkdir many few
(cd many && seq -w 1 100000 | sed 's/$/.png/' | xargs touch)
(cd few && seq -w 1 1000 | sed 's/$/.png/' | xargs touch)
"$bin" --list many | tail -1 > many.txt
"$bin" --list few | tail -1 > few.txt
cat few.txt many.txt
grep -q "^100000 page(s) in 100000 file(s)" many.txt || { echo "FAIL: not every file listed"; exit 1; }
many_kib=$(sed 's/.*peak memory \([0-9]*\) KiB/\1/' many.txt)
few_kib=$(sed 's/.*peak memory \([0-9]*\) KiB/\1/' few.txt)
per_file=$(((many_kib - few_kib) * 1024 / 99000))
echo "listing: ${per_file} bytes per file"
# Under a sanitizer every allocation carries its own bookkeeping (ASan's
# redzones and quarantine): the figure is reported, not held to the bound.
# (ldd's whole output first: with pipefail, `ldd | grep -q` fails when grep
# exits at its first match and ldd, still writing, gets SIGPIPE.)
libs=$(ldd "$bin")
if grep -Eq 'lib(a|t)san' <<< "$libs"; then
  echo "(sanitizer build: the bound is not checked)"
else
  [ "$per_file" -lt 1024 ] || { echo "FAIL: ${per_file} bytes per listed file"; exit 1; }
fi

echo "== 4. a full disk mid-run"
mkdir full
for i in $(seq -w 1 60); do cp long.tif "full/page$i.tif"; done
printf 'storage:\n  max_size_mb: 1\n' > full.yaml
set +e
"$bin" --db full.db --progress lines --config full.yaml --format hocr --out full-out full > full.log 2> full.err
rc=$?
set -e
cat full.err
[ "$rc" -eq 3 ] || { tail -20 full.log; echo "FAIL: exit $rc on a full disk, expected 3"; exit 1; }
grep -q "database or disk is full" full.err || { echo "FAIL: no store message on stderr"; exit 1; }
# The outcomes the database could not take are reported at close (with
# their count and the store's message), and the warning came once.
grep -q "accepted are not in the store" full.err || { echo "FAIL: close did not report the unpersisted writes"; exit 1; }
warnings=$(grep -c "store: writes fail" full.err || true)
[ "$warnings" -eq 1 ] || { echo "FAIL: $warnings 'writes fail' warnings, expected 1"; exit 1; }
echo "cli batch ok"
