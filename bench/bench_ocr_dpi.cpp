// The rescale rule against the page's resolution (docs/OCR.md,
// "Resolution"): pages rendered at 72, 100, 150, 200 and 300 dpi, each
// tagged with its true resolution, tagged 72 (many writers' default), and
// untagged, plus the real scans; each OCRed three ways through taskmgr:
//
//   old   the rule before: believe any tag, rescale by min(4, 300 / tag)
//         when it is under 300 (forced here with preprocess.scale)
//   new   the library's default (a believable tag as before; a 72/96 or
//         missing tag: the text's measured size decides)
//   none  no rescaling (preprocess.target_dpi 0)
//
//   bench_ocr_dpi --samples DIR [--data DIR] [--work DIR] [--runs N]
//                 [--dpis 72,100,150,200,300] [--ptsizes 10,12]
//
// Pages: as many pages as there are sample texts (--samples, *.txt), each
// all the texts one after the other (starting at a different one), rendered
// by text2image with DejaVu Sans at each point size and dpi on a US-letter
// page (margin half an inch), then written as PNG three times: tagged with
// the true dpi, tagged 72, and without a pHYs chunk (untagged). --data adds phototest.tif (a 200
// dpi scan, tagged 200) and eurotext.tif as they are, tagged 72 and untagged. Orientation detection
// is off (a page read badly at its size would otherwise run OSD too: the rule's cost alone is
// measured). One worker, one warm engine; the three rules take turns on each page (their order
// rotated from run to run) in each of --runs runs (default 3). Reported per page kind: the mean CER
// of each rule, the median seconds per page of each, the medians over runs of new / none and old /
// none (ratios measured in the same run), and what the new rule decided.
#include <taskmgr/taskmgr.hpp>

#include <leptonica/allheaders.h>

#include <boost/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

// A PNG's bytes without its pHYs chunk: no resolution at all (Leptonica
// writes 300 ppi for a Pix whose resolution is 0).
std::string without_phys(const std::string& png) {
  std::string out = png.substr(0, 8);
  for (std::size_t at = 8; at + 12 <= png.size();) {
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(png[i]); };
    const std::size_t len =
        (std::size_t{byte(at)} << 24) | (byte(at + 1) << 16) | (byte(at + 2) << 8) | byte(at + 3);
    if (png.compare(at + 4, 4, "pHYs") != 0) out += png.substr(at, len + 12);
    at += len + 12;
  }
  return out;
}

// `source` written as PNG tagged `dpi` (0: untagged).
fs::path tagged_png(const fs::path& source, int dpi, const fs::path& out) {
  Pix* pix = pixRead(source.string().c_str());
  if (pix == nullptr) {
    std::cerr << "cannot read " << source << "\n";
    std::exit(2);
  }
  pixSetResolution(pix, dpi, dpi);
  l_uint8* data = nullptr;
  size_t size = 0;
  if (pixWriteMemPng(&data, &size, pix, 0) != 0) std::exit(2);
  std::string png(reinterpret_cast<const char*>(data), size);
  lept_free(data);
  pixDestroy(&pix);
  write_file(out, dpi == 0 ? without_phys(png) : png);
  return out;
}

struct Page {
  std::string kind;  // the row: "150 dpi, tagged 72"
  int tag = 0;       // the tag in the file (0: none)
  fs::path path;
  std::string truth;
};

struct Outcome {
  double seconds = 0;
  double cer = 0;
  std::string decision;  // "dpi (source) x scale"
};

Outcome run(taskmgr::TaskManager& tm, const Page& page, const std::string& options) {
  taskmgr::TaskCreateRequest req;
  req.input.path = page.path.string();
  req.options_json = options;
  const auto t0 = Clock::now();
  const taskmgr::Task created = tm.create_task(req);
  tm.start_task(created.id);
  const auto done = tm.wait_task(created.id, std::chrono::minutes(30));
  Outcome o;
  o.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!done || done->status != taskmgr::TaskStatus::kCompleted) {
    std::cerr << page.path << " " << options << ": "
              << (done ? done->failure_message : std::string("still running")) << "\n";
    std::exit(1);
  }
  const auto r = boost::json::parse(done->result).as_object();
  o.cer = taskmgr::character_error_rate(r.at("text").as_string(), page.truth);
  const auto& p = r.at("pages").as_array().at(0).as_object();
  char buf[96];
  std::snprintf(buf, sizeof buf, "%d %s x%.2f", static_cast<int>(p.at("dpi").as_int64()),
                std::string(p.at("dpi_source").as_string()).c_str(),
                p.at("preprocess").at("scale").to_number<double>());
  o.decision = buf;
  return o;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stoi(item));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  fs::path samples, data, work = fs::temp_directory_path() / "taskmgr-bench-dpi";
  int runs = 3;
  std::vector<int> dpis = {72, 100, 150, 200, 300};
  std::vector<int> ptsizes = {10, 12};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--samples")
      samples = next();
    else if (a == "--data")
      data = next();
    else if (a == "--work")
      work = next();
    else if (a == "--runs")
      runs = std::max(1, std::stoi(next()));
    else if (a == "--dpis")
      dpis = parse_list(next());
    else if (a == "--ptsizes")
      ptsizes = parse_list(next());
    else {
      std::cerr << "usage: bench_ocr_dpi --samples DIR [--data DIR] [--work DIR] [--runs N] "
                   "[--dpis 72,100,150,200,300] [--ptsizes 10,12]\n";
      return 2;
    }
  }
  if (samples.empty()) {
    std::cerr << "--samples DIR is required (examples/taskmgr_ocr/samples)\n";
    return 2;
  }
  fs::create_directories(work);
  std::vector<fs::path> texts;
  for (const auto& e : fs::directory_iterator(samples)) {
    if (e.path().extension() == ".txt") texts.push_back(e.path());
  }
  std::sort(texts.begin(), texts.end());
  if (texts.empty()) {
    std::cerr << "no sample texts in " << samples << "\n";
    return 2;
  }

  // The pages, grouped by kind (each kind: one page per sample text).
  std::vector<std::string> kinds;
  std::vector<Page> pages;
  auto add = [&](Page p) {
    if (std::find(kinds.begin(), kinds.end(), p.kind) == kinds.end()) kinds.push_back(p.kind);
    pages.push_back(std::move(p));
  };
  std::vector<std::pair<fs::path, std::string>> page_texts;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    std::string text;
    for (std::size_t k = 0; k < texts.size(); ++k) text += read_file(texts[(i + k) % texts.size()]);
    const fs::path path = work / ("page" + std::to_string(i) + ".txt");
    write_file(path, text);
    page_texts.emplace_back(path, text);
  }
  for (const int pt : ptsizes) {
    for (const int dpi : dpis) {
      for (std::size_t i = 0; i < page_texts.size(); ++i) {
        const std::string base = (work / ("page" + std::to_string(i) + "-" + std::to_string(pt) +
                                          "pt-" + std::to_string(dpi)))
                                     .string();
        if (!fs::exists(base + ".tif")) {
          const std::string cmd =
              "text2image --text='" + page_texts[i].first.string() + "' --outputbase='" + base +
              "' --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu --resolution=" +
              std::to_string(dpi) + " --ptsize=" + std::to_string(pt) +
              " --margin=" + std::to_string(dpi / 2) + " --xsize=" + std::to_string(dpi * 85 / 10) +
              " --ysize=" + std::to_string(dpi * 11) + " > /dev/null 2>&1";
          if (std::system(cmd.c_str()) != 0 || !fs::exists(base + ".tif")) {
            std::cerr << "could not render " << base << ".tif with text2image\n";
            return 2;
          }
        }
        const std::string& truth = page_texts[i].second;
        const std::string d = std::to_string(pt) + " pt, " + std::to_string(dpi) + " dpi";
        add({d + ", tagged " + std::to_string(dpi), dpi,
             tagged_png(base + ".tif", dpi, base + "-tag" + std::to_string(dpi) + ".png"), truth});
        if (dpi != 72) {
          add({d + ", tagged 72", 72, tagged_png(base + ".tif", 72, base + "-tag72.png"), truth});
        }
        add({d + ", untagged", 0, tagged_png(base + ".tif", 0, base + "-untagged.png"), truth});
      }
    }
  }
  if (!data.empty()) {
    for (const char* name : {"phototest", "eurotext"}) {
      const fs::path tif = data / (std::string(name) + ".tif");
      const std::string truth = read_file(data / (std::string(name) + ".txt"));
      Pix* pix = pixRead(tif.string().c_str());
      if (pix == nullptr) {
        std::cerr << "cannot read " << tif << "\n";
        return 2;
      }
      const int own = pixGetXRes(pix);
      pixDestroy(&pix);
      add({std::string(name) + ", tagged " + std::to_string(own) + " (its own)", own, tif, truth});
      add({std::string(name) + ", tagged 72", 72,
           tagged_png(tif, 72, work / (std::string(name) + "-tag72.png")), truth});
      add({std::string(name) + ", untagged", 0,
           tagged_png(tif, 0, work / (std::string(name) + "-untagged.png")), truth});
    }
  }

  taskmgr::Config config;
  config.storage.path = ":memory:";
  config.executor.worker_threads = 1;
  config.pools.devices["cpu"] = taskmgr::PoolSettings{1, 1, 300};
  config.tasks.max_queue_size = 10000;
  taskmgr::TaskManager tm(config);
  const char* rules[] = {"old", "new", "none"};
  auto options_for = [](const char* rule, int tag) -> std::string {
    const std::string base = R"({"words":false,"orientation":"off","preprocess":)";
    if (std::string(rule) == "new") return base + "{}}";
    if (std::string(rule) == "old" && tag > 0 && tag < 300) {
      return base + R"({"scale":)" + std::to_string(std::min(4.0, 300.0 / tag)) + "}}";
    }
    return base + R"({"target_dpi":0}})";
  };
  run(tm, pages.front(), options_for("none", 0));  // warm the engine

  // seconds[kind][rule][run] summed over the kind's pages; cer[kind][rule]
  std::map<std::string, std::map<std::string, std::vector<double>>> seconds, cer;
  std::map<std::string, std::vector<std::string>> decisions;
  for (int r = 0; r < runs; ++r) {
    std::map<std::string, std::map<std::string, double>> this_run;
    for (const Page& page : pages) {
      for (int k = 0; k < 3; ++k) {
        const char* rule = rules[(k + r) % 3];
        const Outcome o = run(tm, page, options_for(rule, page.tag));
        this_run[page.kind][rule] += o.seconds;
        if (r == 0) {
          cer[page.kind][rule].push_back(o.cer);
          if (std::string(rule) == "new") decisions[page.kind].push_back(o.decision);
        }
      }
    }
    for (const auto& [kind, by_rule] : this_run) {
      for (const auto& [rule, s] : by_rule) seconds[kind][rule].push_back(s);
    }
    std::cerr << "run " << r + 1 << " of " << runs << " done\n";
  }

  std::printf(
      "| page (%zu pages each) | CER old | CER new | CER none | s/page old | s/page new | s/page "
      "none | new / none | old / none | new: dpi (source) x scale |\n",
      texts.size());
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (const std::string& kind : kinds) {
    double n = static_cast<double>(cer[kind]["new"].size());
    auto mean = [&](const char* rule) {
      double s = 0;
      for (double c : cer[kind][rule]) s += c;
      return 100 * s / n;
    };
    auto per_page = [&](const char* rule) { return median(seconds[kind][rule]) / n; };
    auto ratio = [&](const char* rule) {
      std::vector<double> q;
      for (std::size_t i = 0; i < seconds[kind][rule].size(); ++i) {
        q.push_back(seconds[kind][rule][i] / seconds[kind]["none"][i]);
      }
      return median(q);
    };
    std::string decided;
    for (const auto& d : decisions[kind]) decided += (decided.empty() ? "" : "; ") + d;
    std::printf("| %s | %.2f%% | %.2f%% | %.2f%% | %.3f | %.3f | %.3f | %.2f | %.2f | %s |\n",
                kind.c_str(), mean("old"), mean("new"), mean("none"), per_page("old"),
                per_page("new"), per_page("none"), ratio("new"), ratio("old"), decided.c_str());
  }
  return 0;
}
