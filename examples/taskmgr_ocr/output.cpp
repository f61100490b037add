#include "output.hpp"

#include <unistd.h>

#include <boost/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;
namespace json = boost::json;

namespace ocrcli {
namespace {

json::object parse_result(const taskmgr::Task& t) {
  boost::system::error_code ec;
  json::value v = json::parse(t.result, ec);
  if (ec || !v.is_object()) return {};
  return std::move(v.as_object());
}

std::string string_at(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  return v != nullptr && v->is_string() ? std::string(v->as_string()) : std::string();
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

// Writes `bytes` to `path` whole, or says why not.
std::string write_file(const fs::path& path, const std::string& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return "cannot write " + path.string() + ": " + std::strerror(errno);
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int err = ok ? 0 : errno;
  if (std::fclose(f) != 0 || !ok) {
    return "cannot write " + path.string() + ": " + std::strerror(err != 0 ? err : errno);
  }
  return "";
}

std::string quote(const std::string& s) {
  std::string q = "'";
  for (const char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

}  // namespace

std::string service_output_for(const std::string& format) {
  if (format == "hocr" || format == "alto" || format == "tsv" || format == "pdf") return format;
  return "";
}

std::string base64_decode(const std::string& text) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  out.reserve(text.size() / 4 * 3);
  unsigned bits = 0;
  int nbits = 0;
  for (const char c : text) {
    if (c == '=') break;
    const int v = value(c);
    if (v < 0) throw std::invalid_argument("not base64");
    bits = (bits << 6) | static_cast<unsigned>(v);
    nbits += 6;
    if (nbits >= 8) {
      nbits -= 8;
      out += static_cast<char>((bits >> nbits) & 0xFF);
    }
  }
  return out;
}

OutputWriter::OutputWriter(taskmgr::TaskManager& tm, const Plan& plan, std::string out_dir,
                           std::string format, bool sidecar)
    : tm_(tm),
      plan_(plan),
      out_dir_(std::move(out_dir)),
      format_(std::move(format)),
      sidecar_(sidecar),
      left_(plan.documents.size(), 0),
      pages_of_(plan.documents.size()),
      failed_(plan.documents.size(), false) {
  for (std::size_t i = 0; i < plan.pages.size(); ++i) {
    const Page& p = plan.pages[i];
    ++left_[p.doc];
    if (plan.documents[p.doc].pages > 1) pages_of_[p.doc].push_back(i);
  }
  for (auto& pages : pages_of_) {
    std::sort(pages.begin(), pages.end(), [&](std::size_t a, std::size_t b) {
      return plan.pages[a].number < plan.pages[b].number;
    });
  }
  task_of_.resize(plan.pages.size());
  // Output names: NAME (the file's stem); two inputs with one stem (x.png
  // and x.tif, or a/x.png and b/x.png) keep their extension (x.png.txt);
  // still the same, a number (x.png-2.txt), in the order given.
  std::map<std::string, int> stems, names;
  for (const auto& d : plan.documents) ++stems[fs::path(d.shown).stem().string()];
  for (const auto& d : plan.documents) {
    const fs::path p(d.shown);
    std::string name = p.stem().string();
    if (stems[name] > 1) name = p.filename().string();
    if (const int n = ++names[name]; n > 1) name += "-" + std::to_string(n);
    name_.push_back(name);
  }
}

std::string OutputWriter::page_ended(std::size_t page, const taskmgr::Task& task) {
  const std::uint32_t doc = plan_.pages[page].doc;
  const bool many = !pages_of_[doc].empty();
  if (task.status != taskmgr::TaskStatus::kCompleted) failed_[doc] = true;
  if (many) task_of_[page] = task.id;
  if (--left_[doc] > 0) return "";
  const Document& d = plan_.documents[doc];
  if (failed_[doc]) {
    return many ? d.shown + ": not written: a page of it failed" : std::string();
  }
  std::vector<taskmgr::Task> pages;
  if (!many) {
    pages.push_back(task);
  } else {
    // From the database, one at a time: a long document's results are not
    // all held while it is read.
    for (const std::size_t i : pages_of_[doc]) {
      pages.push_back(tm_.get_task(task_of_[i]));
      std::string().swap(task_of_[i]);
    }
  }
  std::string problem = write(doc, pages);
  if (problem.empty()) ++written_;
  return problem;
}

std::string OutputWriter::write(std::uint32_t doc, const std::vector<taskmgr::Task>& tasks) {
  const Document& d = plan_.documents[doc];
  std::error_code ec;
  fs::create_directories(out_dir_, ec);
  const fs::path base = fs::path(out_dir_) / name_[doc];
  auto with = [&](const char* ext) { return fs::path(base.string() + ext); };
  std::vector<json::object> results;
  results.reserve(tasks.size());
  for (const auto& t : tasks) results.push_back(parse_result(t));
  std::string text;
  for (std::size_t i = 0; i < results.size(); ++i) {
    if (i > 0) text += '\f';
    text += string_at(results[i], "text");
  }
  std::string problem;
  if (format_ == "text" || (format_ == "pdf" && sidecar_)) problem = write_file(with(".txt"), text);
  if (!problem.empty()) return problem;
  if (format_ == "json") {
    if (results.size() == 1 && d.pages <= 1) return write_file(with(".json"), tasks[0].result);
    json::object o;
    o["source"] = d.shown;
    o["text"] = text;
    json::array pages;
    double conf = 0;
    for (auto& r : results) {
      if (const json::value* c = r.if_contains("mean_confidence"); c && c->is_number())
        conf += c->to_number<double>();
      if (json::value* ps = r.if_contains("pages"); ps && ps->is_array()) {
        for (auto& p : ps->as_array()) pages.push_back(std::move(p));
      }
    }
    o["mean_confidence"] = results.empty() ? 0.0 : conf / static_cast<double>(results.size());
    o["pages"] = std::move(pages);
    return write_file(with(".json"), json::serialize(o));
  }
  if (format_ == "tsv") {
    // Tesseract's TSV (as `tesseract x tsv` writes it): its header line, then
    // each page's rows; page_num is the document's page number, left, top,
    // width and height in the source page's pixels.
    std::string body =
        "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\t"
        "conf\ttext\n";
    for (const auto& r : results) {
      if (const json::value* ps = r.if_contains("pages"); ps && ps->is_array()) {
        for (const auto& p : ps->as_array()) {
          if (!p.is_object()) continue;
          std::string t = string_at(p.as_object(), "tsv");
          if (!t.empty() && t.back() != '\n') t += '\n';
          body += t;
        }
      }
    }
    return write_file(with(".tsv"), body);
  }
  if (format_ == "hocr" || format_ == "alto") {
    std::string body;
    int n = 0;
    for (const auto& r : results) {
      if (const json::value* ps = r.if_contains("pages"); ps && ps->is_array()) {
        for (const auto& p : ps->as_array()) {
          if (!p.is_object()) continue;
          ++n;
          if (format_ == "hocr") {
            body += string_at(p.as_object(), "hocr");  // its ids carry the page number
            continue;
          }
          // Tesseract numbers an ALTO page's ids from 0 on each page; in one
          // document they must be unique (xsd:ID): prefixed with the page.
          std::string alto = string_at(p.as_object(), "alto");
          const std::string prefix = " ID=\"p" + std::to_string(n) + "_";
          for (std::size_t at = alto.find(" ID=\""); at != std::string::npos;
               at = alto.find(" ID=\"", at + prefix.size())) {
            alto.replace(at, 5, prefix);
          }
          body += alto;
        }
      }
    }
    const std::string name = xml_escape(fs::path(d.shown).filename().string());
    const std::string software = "taskmgr " + std::string(taskmgr::version());
    if (format_ == "hocr") {
      // ocr-capabilities names every ocr class the pages use (Tesseract's
      // line kinds too: ocr_header, ocr_caption, ocr_textfloat, ...).
      std::set<std::string> classes = {"ocr_page", "ocr_carea", "ocr_par",
                                       "ocr_line", "ocrx_word", "ocrp_wconf"};
      for (std::size_t at = body.find("class='"); at != std::string::npos;
           at = body.find("class='", at)) {
        at += 7;
        const std::size_t end = body.find('\'', at);
        if (end == std::string::npos) break;
        std::istringstream words(body.substr(at, end - at));
        for (std::string c; words >> c;) {
          if (c.rfind("ocr", 0) == 0) classes.insert(c);
        }
      }
      std::string capabilities;
      for (const auto& c : classes) capabilities += (capabilities.empty() ? "" : " ") + c;
      return write_file(
          with(".hocr"),
          "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
          "<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n"
          "    \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n"
          "<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n<head>\n"
          "  <title>" +
              name +
              "</title>\n"
              "  <meta http-equiv=\"Content-Type\" content=\"text/html;charset=utf-8\"/>\n"
              "  <meta name=\"ocr-system\" content=\"" +
              software +
              " (Tesseract)\"/>\n"
              "  <meta name=\"ocr-capabilities\" content=\"" +
              capabilities + "\"/>\n</head>\n<body>\n" + body + "</body>\n</html>\n");
    }
    return write_file(with(".xml"),
                      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                      "<alto xmlns=\"http://www.loc.gov/standards/alto/ns-v3#\" "
                      "xmlns:xlink=\"http://www.w3.org/1999/xlink\" "
                      "xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" "
                      "xsi:schemaLocation=\"http://www.loc.gov/standards/alto/ns-v3# "
                      "http://www.loc.gov/alto/v3/alto-3-0.xsd\">\n"
                      "  <Description>\n    <MeasurementUnit>pixel</MeasurementUnit>\n"
                      "    <sourceImageInformation><fileName>" +
                          name +
                          "</fileName></sourceImageInformation>\n"
                          "    <OCRProcessing ID=\"OCR_0\"><ocrProcessingStep><processingSoftware>"
                          "<softwareName>" +
                          software +
                          " (Tesseract)</softwareName></processingSoftware></ocrProcessingStep>"
                          "</OCRProcessing>\n  </Description>\n  <Layout>\n" +
                          body + "  </Layout>\n</alto>\n");
  }
  if (format_ == "pdf") {
    std::vector<std::string> pdfs;
    for (const auto& r : results) {
      try {
        pdfs.push_back(base64_decode(string_at(r, "pdf_base64")));
      } catch (const std::invalid_argument&) {
        pdfs.emplace_back();
      }
      if (pdfs.back().rfind("%PDF-", 0) != 0) return d.shown + ": not written: a page has no PDF";
    }
    if (pdfs.size() == 1) return write_file(with(".pdf"), pdfs[0]);
    // Pages of one document: joined in page order by pdfunite.
    const fs::path parts = fs::path(out_dir_) / (".taskmgr-parts-" + std::to_string(::getpid()));
    fs::create_directories(parts, ec);
    std::string cmd = "pdfunite";
    for (std::size_t i = 0; i < pdfs.size(); ++i) {
      const fs::path part = parts / ("p" + std::to_string(i) + ".pdf");
      if (const std::string e = write_file(part, pdfs[i]); !e.empty()) {
        fs::remove_all(parts, ec);
        return e;
      }
      cmd += " " + quote(part.string());
    }
    cmd += " " + quote(with(".pdf").string()) + " 2>&1";
    const int rc = std::system(cmd.c_str());
    fs::remove_all(parts, ec);
    if (rc != 0)
      return d.shown + ": not written: pdfunite failed (exit " + std::to_string(rc) + ")";
  }
  return "";
}

}  // namespace ocrcli
