// taskmgr-ocr: batch OCR of files and folders through a TaskManager.
//
//   taskmgr-ocr [options] [FILE|DIR ...]
//
// With no FILE or DIR it renders the sample pages shipped with taskmgr
// (examples/taskmgr_ocr/samples/*.txt, with text2image and DejaVu Sans) into
// ./samples if they are absent, and OCRs them. A page with a ground truth
// beside it (same name, .gt.txt) gets its character error rate reported.
// Pages already completed in the database are not OCRed again (--redo to
// force). Exit code: 0 when every page succeeded, 1 when any failed, 2 on a
// usage or configuration error.
#include <taskmgr/taskmgr.hpp>

#include <unistd.h>

#include <boost/json.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct Options {
  std::string config_path;
  std::string db = "taskmgr.db";
  int workers = 0;
  std::string out_dir;
  std::string format = "text";  // text | json | hocr
  std::string samples_dir = "samples";
  int priority = 0;
  std::string device;     // "" = any
  std::string languages;  // "" = config (eng)
  bool redo = false;
  int progress = -1;      // -1 = a bar on a terminal, plain lines otherwise; 0 = lines; 1 = bar
  std::vector<std::string> inputs;
};

void usage(std::ostream& os) {
  os << "usage: taskmgr-ocr [options] [FILE|DIR ...]\n"
        "  --config FILE     YAML configuration (default: built-in defaults)\n"
        "  --db PATH         task database (default: taskmgr.db in this folder)\n"
        "  --workers N       worker threads (default: config, else the CPU count)\n"
        "  --out DIR         write one result per page into DIR\n"
        "  --format F        result format: text, json or hocr (default text)\n"
        "  --priority N      task priority (default 0)\n"
        "  --device D        run on this device (cpu, cuda:0, ...; default: any that fits)\n"
        "  --languages L     Tesseract languages, e.g. eng or eng+deu (default: config, eng)\n"
        "  --progress MODE   bar, lines or auto (default auto: a bar on a terminal)\n"
        "  --samples DIR     where sample pages are rendered (default samples)\n"
        "  --redo            OCR pages again even if done in the database\n"
        "With no FILE or DIR, renders the sample pages and OCRs them.\n";
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The text of a result document ({"text": ...}).
std::string result_text(const std::string& json) {
  boost::system::error_code ec;
  const auto v = boost::json::parse(json, ec);
  if (ec || !v.is_object() || !v.as_object().contains("text") || !v.at("text").is_string()) return "";
  return std::string(v.at("text").as_string());
}

// Renders the shipped sample texts into `dir` (page.tif + page.gt.txt).
bool render_samples(const fs::path& dir) {
  const fs::path source = fs::path(TASKMGR_SAMPLES_DIR);
  std::error_code ec;
  fs::create_directories(dir, ec);
  bool any = false;
  for (const auto& entry : fs::directory_iterator(source, ec)) {
    if (entry.path().extension() != ".txt") continue;
    const std::string stem = entry.path().stem().string();
    const fs::path tif = dir / (stem + ".tif");
    const fs::path gt = dir / (stem + ".gt.txt");
    any = true;
    if (fs::exists(tif) && fs::exists(gt)) continue;
    fs::copy_file(entry.path(), gt, fs::copy_options::overwrite_existing, ec);
    const std::string cmd = "text2image --text='" + entry.path().string() + "' --outputbase='" +
                            (dir / stem).string() +
                            "' --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu"
                            " --resolution=300 --ptsize=12 --margin=100 --xsize=2550 --ysize=3300"
                            " > /dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0 || !fs::exists(tif)) {
      std::cerr << "taskmgr-ocr: could not render " << tif << " with text2image\n";
      return false;
    }
    fs::remove(dir / (stem + ".box"), ec);
    std::cout << "rendered sample page " << tif.string() << "\n";
  }
  return any;
}

// The progress display: on a terminal, one line redrawn in place
// ("[#####.....] 12/24 pages  3.1 pages/s  ETA 0:04"), with the per-page
// lines printed above it; elsewhere, only the per-page lines.
class Progress {
 public:
  Progress(bool bar, std::size_t total, std::size_t already_done)
      : bar_(bar), total_(total), base_(already_done), t0_(std::chrono::steady_clock::now()) {}

  // A line of its own (a page's result or failure), above the bar.
  void line(const std::string& text) {
    if (bar_ && drawn_) std::cout << "\r\033[K";
    drawn_ = false;
    std::cout << text << "\n";
  }

  // `ended` tasks of this run have ended (pages done before count as done).
  void draw(std::size_t ended) {
    if (!bar_) return;
    const std::size_t done = std::min(total_, base_ + ended);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const double rate = secs > 0 ? static_cast<double>(ended) / secs : 0;
    constexpr int kWidth = 30;
    const int filled = total_ == 0 ? kWidth : static_cast<int>(kWidth * done / total_);
    char eta[32] = "--:--";
    if (rate > 0 && done < total_) {
      const long left = std::lround(static_cast<double>(total_ - done) / rate);
      std::snprintf(eta, sizeof eta, "%ld:%02ld", left / 60, left % 60);
    } else if (done >= total_) {
      std::snprintf(eta, sizeof eta, "0:00");
    }
    char buf[160];
    std::snprintf(buf, sizeof buf, "\r\033[K[%s%s] %zu/%zu pages  %.2f pages/s  ETA %s",
                  std::string(static_cast<std::size_t>(filled), '#').c_str(),
                  std::string(static_cast<std::size_t>(kWidth - filled), '.').c_str(), done, total_,
                  rate, eta);
    std::cout << buf << std::flush;
    drawn_ = true;
  }

  void finish(std::size_t ended) {
    if (!bar_) return;
    draw(ended);
    std::cout << "\n";
    drawn_ = false;
  }

 private:
  bool bar_;
  std::size_t total_, base_;
  std::chrono::steady_clock::time_point t0_;
  bool drawn_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&](const char* what) -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "taskmgr-ocr: " << what << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    try {
      if (a == "--config") opt.config_path = next("--config");
      else if (a == "--db") opt.db = next("--db");
      else if (a == "--workers") opt.workers = std::stoi(next("--workers"));
      else if (a == "--out") opt.out_dir = next("--out");
      else if (a == "--format") opt.format = next("--format");
      else if (a == "--priority") opt.priority = std::stoi(next("--priority"));
      else if (a == "--samples") opt.samples_dir = next("--samples");
      else if (a == "--device") opt.device = next("--device");
      else if (a == "--languages") opt.languages = next("--languages");
      else if (a == "--progress") {
        const std::string m = next("--progress");
        if (m != "bar" && m != "lines" && m != "auto") {
          std::cerr << "taskmgr-ocr: --progress must be bar, lines or auto\n";
          return 2;
        }
        opt.progress = m == "bar" ? 1 : m == "lines" ? 0 : -1;
      }
      else if (a == "--redo") opt.redo = true;
      else if (a == "-h" || a == "--help") {
        usage(std::cout);
        return 0;
      } else if (!a.empty() && a[0] == '-') {
        std::cerr << "taskmgr-ocr: unknown option '" << a << "'\n";
        usage(std::cerr);
        return 2;
      } else {
        opt.inputs.push_back(a);
      }
    } catch (const std::exception&) {
      std::cerr << "taskmgr-ocr: " << a << " needs a number\n";
      return 2;
    }
  }
  if (opt.format != "text" && opt.format != "json" && opt.format != "hocr") {
    std::cerr << "taskmgr-ocr: --format must be text, json or hocr\n";
    return 2;
  }

  taskmgr::Config config;
  try {
    config = opt.config_path.empty() ? taskmgr::Config::defaults()
                                     : taskmgr::Config::from_yaml_file(opt.config_path);
    config.storage.path = opt.db;
    if (opt.workers > 0) config.executor.worker_threads = opt.workers;
    if (!opt.languages.empty()) config.ocr.languages = opt.languages;
    config.tasks.max_queue_size = std::max(config.tasks.max_queue_size, 100000);
    config.validate();
  } catch (const taskmgr::Error& e) {
    std::cerr << "taskmgr-ocr: " << e.what() << "\n";
    return 2;
  }

  if (opt.inputs.empty()) {
    if (!render_samples(opt.samples_dir)) {
      std::cerr << "taskmgr-ocr: no sample pages to render\n";
      return 2;
    }
    opt.inputs.push_back(opt.samples_dir);
  }
  std::vector<fs::path> pages;
  for (const auto& in : opt.inputs) {
    std::error_code ec;
    if (fs::is_directory(in, ec)) {
      std::vector<fs::path> found;
      for (const auto& e : fs::directory_iterator(in, ec)) {
        // Every file but ground truths (*.txt): a file that is no image is
        // reported as a failed page with its reason, not skipped silently.
        if (e.is_regular_file() && e.path().extension() != ".txt") found.push_back(e.path());
      }
      std::sort(found.begin(), found.end());
      pages.insert(pages.end(), found.begin(), found.end());
    } else {
      pages.emplace_back(in);  // a missing file fails as its own task, with its reason
    }
  }

  try {
    taskmgr::TaskManager tm(config);
    std::cout << "taskmgr " << taskmgr::version() << ": " << pages.size() << " page(s), "
              << "database " << opt.db << "\n";
    // Resume: pages completed before are not OCRed again.
    std::map<std::string, taskmgr::Task> done_before;
    if (!opt.redo) {
      taskmgr::TaskFilter f;
      f.status = taskmgr::TaskStatus::kCompleted;
      f.service = "ocr";
      for (auto& t : tm.list_tasks(f)) done_before[t.input.path] = std::move(t);
    }
    std::vector<std::pair<fs::path, std::string>> submitted;
    std::size_t skipped = 0;
    for (const auto& p : pages) {
      const std::string path = fs::absolute(p).lexically_normal().string();
      if (done_before.count(path)) {
        ++skipped;
        submitted.emplace_back(p, done_before[path].id);
        continue;
      }
      taskmgr::TaskCreateRequest r;
      r.service = "ocr";
      r.input.path = path;
      r.priority = opt.priority;
      r.device = opt.device;
      if (opt.format == "hocr") r.options_json = "{\"output\":\"hocr\"}";
      const taskmgr::Task t = tm.create_task(r);
      tm.start_task(t.id);
      submitted.emplace_back(p, t.id);
    }
    if (skipped > 0) std::cout << skipped << " page(s) already done in " << opt.db << ": not redone\n";

    const auto t0 = std::chrono::steady_clock::now();
    const bool bar = opt.progress == 1 || (opt.progress == -1 && ::isatty(STDOUT_FILENO));
    Progress progress(bar, submitted.size(), skipped);
    // Ended tasks are counted from the events as they happen (any order);
    // the per-page lines below come in submission order.
    std::atomic<std::size_t> ended{0};
    tm.subscribe([&ended](const taskmgr::EventRecord& e) {
      if (e.event == taskmgr::TaskEvent::kCompleted || e.event == taskmgr::TaskEvent::kFailed ||
          e.event == taskmgr::TaskEvent::kCancelled) {
        ended.fetch_add(1);
      }
    });
    int failed = 0, done = 0;
    std::map<std::string, int> failures;
    double cer_sum = 0;
    int cer_n = 0;
    for (const auto& [page, id] : submitted) {
      std::optional<taskmgr::Task> t;
      if (done_before.count(fs::absolute(page).lexically_normal().string())) {
        t = tm.get_task(id);
      } else {
        while (!(t = tm.wait_task(id, std::chrono::milliseconds(bar ? 200 : 1000)))) {
          progress.draw(ended.load());
        }
      }
      ++done;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!t || t->status != taskmgr::TaskStatus::kCompleted) {
        ++failed;
        const std::string reason = t ? std::string(taskmgr::to_string(t->failure_reason)) : "timeout";
        ++failures[reason];
        progress.line("[" + std::to_string(done) + "/" + std::to_string(submitted.size()) +
                      "] FAILED " + page.string() + ": " + reason + ": " +
                      (t ? t->failure_message : ""));
        progress.draw(ended.load());
        continue;
      }
      std::string line = "[" + std::to_string(done) + "/" + std::to_string(submitted.size()) + "] " +
                         page.string();
      const std::string text = result_text(t->result);
      fs::path gt = page;
      gt.replace_extension(".gt.txt");
      if (fs::exists(gt)) {
        const double c = taskmgr::character_error_rate(text, slurp(gt));
        cer_sum += c;
        ++cer_n;
        char buf[32];
        std::snprintf(buf, sizeof buf, " CER %.2f%%", c * 100);
        line += buf;
      }
      if (done_before.count(fs::absolute(page).lexically_normal().string())) {
        progress.line(line + " (done before)");
      } else {
        char rate[64];
        std::snprintf(rate, sizeof rate, " (%.2f pages/s)", elapsed > 0 ? done / elapsed : 0.0);
        progress.line(line + rate);
      }
      progress.draw(ended.load());
      if (!opt.out_dir.empty()) {
        fs::create_directories(opt.out_dir);
        const std::string ext = opt.format == "json" ? ".json" : opt.format == "hocr" ? ".hocr.json" : ".txt";
        std::ofstream(fs::path(opt.out_dir) / (page.stem().string() + ext))
            << (opt.format == "text" ? text : t->result);
      }
    }
    tm.flush_events();  // every task has ended: let the bar see every ending event
    progress.finish(ended.load());
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const taskmgr::TaskMetrics m = tm.get_task_metrics();
    std::cout << "\nsummary\n"
              << "  pages           " << submitted.size() << " (" << skipped << " already done)\n"
              << "  completed       " << (submitted.size() - static_cast<std::size_t>(failed)) << "\n"
              << "  failed          " << failed << "\n";
    for (const auto& [reason, n] : failures) std::cout << "    " << reason << "  " << n << "\n";
    std::printf("  throughput      %.2f pages/s\n", secs > 0 ? (submitted.size() - skipped) / secs : 0.0);
    std::printf("  average wait    %.3f s\n", m.average_wait_time);
    if (cer_n > 0) std::printf("  mean CER        %.2f%% over %d page(s) with ground truth\n", cer_sum / cer_n * 100, cer_n);
    for (const auto& [dev, mem] : m.memory_by_device) {
      std::cout << "  peak task memory on " << dev << ": " << mem.peak_task_mb << " MB\n";
    }
    std::cout << "  retries         " << m.retries << "\n"
              << "  cpu fallbacks   " << m.cpu_fallbacks << "\n";
    return failed == 0 ? 0 : 1;
  } catch (const taskmgr::Error& e) {
    std::cerr << "taskmgr-ocr: " << e.what() << "\n";
    return 2;
  }
}
