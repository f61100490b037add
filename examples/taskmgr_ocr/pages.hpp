// taskmgr-ocr: what a run OCRs. The inputs (files and folders) become
// documents, and each document one page or more; every page has an identity
// by which a later run recognises it, and the pages are put in the order
// they are submitted in.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ocrcli {

// A file named on the command line or found in a folder.
struct Document {
  std::string path;        // absolute and lexically normal: what the task reads
  std::string shown;       // as the user named it (or the folder joined with the name)
  bool exists = false;     // a regular file (a symlink to one counts)
  bool special = false;    // exists but is no regular file: a FIFO, socket or device (never read)
  std::uint64_t size = 0;  // bytes
  std::int64_t mtime_ns = 0;  // last modification, ns since the epoch
  bool pdf = false;
  int pages = 1;  // pages of a PDF or multi-page TIFF; 1 for anything else
};

// One task's worth of work: a page of a document.
struct Page {
  std::uint32_t doc = 0;  // index into Plan::documents
  int number = 0;         // 1-based page of a multi-page document; 0: the file as one page
  std::int64_t area = 0;  // pixels (width x height) from the header; 0 when unknown
};

struct Plan {
  std::vector<Document> documents;
  std::vector<Page> pages;  // in submission order (see order_pages)
};

// Lists the inputs: a folder gives its entries but subfolders (not ground
// truths *.txt, not hidden files), sorted by name, a dangling symlink or a
// FIFO included: every one becomes a page, whose task fails with the reason
// when it cannot be read; a file is itself (a missing one too). Reads each document's header for
// its pages and their sizes (PDFs rasterised at `dpi`). Memory: one Document and one Page per page.
Plan list_inputs(const std::vector<std::string>& inputs, int dpi);

// The identity of a page: its resolved path, page number, size and
// modification time. A file that changes is a new page (OCRed again); a
// rename is a new page too. Cheaper than hashing the content of every file
// at every start, and what make and rsync trust.
std::string page_key(const Document& doc, const Page& page);

enum class Order {
  kLargestFirst,  // the largest pages first (ties: by name): both cores stay busy to the end
  kName,          // by file name and page number
};
void order_pages(Plan& plan, Order order);

}  // namespace ocrcli
