// taskmgr-img2pdf: writes an image-only PDF (a "scanned" document, no text
// layer) with one page per input image, each page the image's size at its
// resolution (or --dpi N when given, or when the image has none: 300).
//
//   taskmgr-img2pdf [--dpi N] OUT.pdf IMAGE...
//
// Every page of a multi-page TIFF is a page. Exit status 0 on success, 2 on
// bad usage, 1 when an image cannot be read or the PDF written.
#include <leptonica/allheaders.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

int usage() {
  std::fprintf(stderr, "usage: taskmgr-img2pdf [--dpi N] OUT.pdf IMAGE...\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int dpi = 0;
  int i = 1;
  if (i + 1 < argc && std::strcmp(argv[i], "--dpi") == 0) {
    char* end = nullptr;
    const long v = std::strtol(argv[i + 1], &end, 10);
    if (*end != '\0' || v < 1 || v > 10000) return usage();
    dpi = static_cast<int>(v);
    i += 2;
  }
  if (argc - i < 2) return usage();
  const char* out = argv[i++];
  setMsgSeverity(L_SEVERITY_ERROR);
  Pixa* pixa = pixaCreate(0);
  for (; i < argc; ++i) {
    l_int32 format = 0;
    if (findFileFormat(argv[i], &format) != 0) {
      std::fprintf(stderr, "taskmgr-img2pdf: cannot read %s\n", argv[i]);
      pixaDestroy(&pixa);
      return 1;
    }
    Pixa* pages = L_FORMAT_IS_TIFF(format) ? pixaReadMultipageTiff(argv[i]) : nullptr;
    if (pages == nullptr) {
      Pix* pix = pixRead(argv[i]);
      if (pix != nullptr) {
        pages = pixaCreate(1);
        pixaAddPix(pages, pix, L_INSERT);
      }
    }
    if (pages == nullptr || pixaGetCount(pages) == 0) {
      std::fprintf(stderr, "taskmgr-img2pdf: cannot read %s\n", argv[i]);
      pixaDestroy(&pages);
      pixaDestroy(&pixa);
      return 1;
    }
    pixaJoin(pixa, pages, 0, -1);
    pixaDestroy(&pages);
  }
  for (l_int32 k = 0; k < pixaGetCount(pixa); ++k) {
    Pix* pix = pixaGetPix(pixa, k, L_CLONE);
    if (dpi > 0 || pixGetXRes(pix) <= 0)
      pixSetResolution(pix, dpi > 0 ? dpi : 300, dpi > 0 ? dpi : 300);
    pixDestroy(&pix);
  }
  // Resolution 0: each page at its own image's resolution.
  const l_int32 rc = pixaConvertToPdf(pixa, 0, 1.0, L_DEFAULT_ENCODE, 0, "taskmgr-img2pdf", out);
  pixaDestroy(&pixa);
  if (rc != 0) {
    std::fprintf(stderr, "taskmgr-img2pdf: cannot write %s\n", out);
    return 1;
  }
  return 0;
}
