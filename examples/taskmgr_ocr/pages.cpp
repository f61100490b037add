#include "pages.hpp"

#include <taskmgr/taskmgr.hpp>

#include <algorithm>
#include <filesystem>
#include <system_error>
#include <tuple>

namespace fs = std::filesystem;

namespace ocrcli {
namespace {

Document document_of(const fs::path& p) {
  Document d;
  d.shown = p.string();
  std::error_code ec;
  d.path = fs::absolute(p, ec).lexically_normal().string();
  if (ec) d.path = p.lexically_normal().string();
  const auto st = fs::status(p, ec);
  d.exists = !ec && fs::is_regular_file(st);
  d.special = !ec && fs::exists(st) && !fs::is_regular_file(st) && !fs::is_directory(st);
  if (d.exists) {
    d.size = fs::file_size(p, ec);
    const auto t = fs::last_write_time(p, ec);
    if (!ec) {
      d.mtime_ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
    }
  }
  return d;
}

void add_document(Plan& plan, Document d, int dpi) {
  const auto index = static_cast<std::uint32_t>(plan.documents.size());
  bool described = false;
  if (d.exists) {
    try {
      // Headers only: the pages and their sizes, nothing decoded.
      const taskmgr::DocumentInfo info = taskmgr::describe_document(d.path, dpi);
      d.pdf = info.media_type == "application/pdf";
      d.pages = static_cast<int>(info.pages.size());
      // A PDF's pages are always numbered (the task renders the page asked
      // for); an image of one page is the file itself.
      const bool numbered = d.pdf || info.pages.size() > 1;
      for (const auto& pg : info.pages) {
        plan.pages.push_back(Page{index, numbered ? pg.page : 0, pg.width * pg.height});
      }
      described = !info.pages.empty();
    } catch (const taskmgr::Error&) {
      // Not a readable image or PDF: one page, whose task fails with the reason.
    }
  }
  if (!described) plan.pages.push_back(Page{index, 0, 0});
  plan.documents.push_back(std::move(d));
}

}  // namespace

Plan list_inputs(const std::vector<std::string>& inputs, int dpi) {
  Plan plan;
  for (const auto& in : inputs) {
    std::error_code ec;
    if (fs::is_directory(in, ec)) {
      std::vector<fs::path> found;
      for (fs::directory_iterator it(in, ec), end; !ec && it != end; it.increment(ec)) {
        const fs::path& p = it->path();
        const std::string name = p.filename().string();
        // Every file but ground truths (*.txt) and hidden files: a file that
        // is no image is reported as a failed page with its reason.
        if (name.empty() || name[0] == '.' || p.extension() == ".txt") continue;
        std::error_code fe;
        if (!it->is_directory(fe)) found.push_back(p);  // broken links and FIFOs too: reported
      }
      std::sort(found.begin(), found.end());
      for (const auto& p : found) add_document(plan, document_of(p), dpi);
    } else {
      add_document(plan, document_of(in), dpi);  // a missing file fails as its own task
    }
  }
  return plan;
}

std::string page_key(const Document& doc, const Page& page) {
  return doc.path + "#" + std::to_string(page.number) + "@" + std::to_string(doc.size) + ":" +
         std::to_string(doc.mtime_ns);
}

void order_pages(Plan& plan, Order order) {
  const auto by_name = [&](const Page& a, const Page& b) {
    return std::tie(plan.documents[a.doc].path, a.number) <
           std::tie(plan.documents[b.doc].path, b.number);
  };
  if (order == Order::kName) {
    std::stable_sort(plan.pages.begin(), plan.pages.end(), by_name);
  } else {
    std::stable_sort(plan.pages.begin(), plan.pages.end(), [&](const Page& a, const Page& b) {
      if (a.area != b.area) return a.area > b.area;
      return by_name(a, b);
    });
  }
}

}  // namespace ocrcli
