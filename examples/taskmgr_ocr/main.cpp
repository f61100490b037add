// taskmgr-ocr: batch OCR of files and folders through a TaskManager.
//
//   taskmgr-ocr [options] [FILE|DIR ...]
//
// With no FILE or DIR it renders the sample pages shipped with taskmgr
// (examples/taskmgr_ocr/samples/*.txt, with text2image and DejaVu Sans) into
// ./samples if they are absent, and OCRs them. A page with a ground truth
// beside it (same name, .gt.txt) gets its character error rate reported.
// Each page is OCRed exactly once across runs on one database, whatever
// kills a run (pages.hpp: identity; batch.hpp: adopt, stream, account).
// Exit code: 0 when every page succeeded, 1 when any failed, 2 on a usage
// or configuration error, 3 when the database could not record the run.
#include <taskmgr/taskmgr.hpp>

#include <unistd.h>

#include <boost/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "batch.hpp"
#include "output.hpp"
#include "pages.hpp"
#include "progress.hpp"

namespace fs = std::filesystem;

namespace {

// SIGINT or SIGTERM: the first stops the run (no more pages submitted,
// the pages in flight finish, the summary is printed); a second one ends
// the process at once (the default action, restored by the first).
std::atomic<int> g_stop{0};

extern "C" void on_stop_signal(int signo) {
  g_stop.store(signo);
  std::signal(signo, SIG_DFL);
}

struct Options {
  std::string config_path;
  std::string db = "taskmgr.db";
  int workers = 0;
  int queue_ahead = -1;  // pages queued beyond one per worker; -1: the default
  std::string out_dir;
  std::string format = "text";  // text | json | hocr | alto | tsv | pdf
  bool sidecar = false;
  std::string samples_dir = "samples";
  int priority = 0;
  std::string device;     // "" = any
  std::string languages;  // "" = config (eng)
  ocrcli::Order order = ocrcli::Order::kLargestFirst;
  int dpi = 0;  // 0 = ocr.pdf_dpi (300)
  bool redo = false;
  bool list_only = false;
  bool print_config = false;
  bool db_given = false;
  int progress = -1;  // -1 = a bar on a terminal, plain lines otherwise; 0 = lines; 1 = bar
  std::vector<std::string> inputs;
};

void usage(std::ostream& os) {
  os << "usage: taskmgr-ocr [options] [FILE|DIR ...]\n"
        "  --config FILE     YAML configuration (default: built-in defaults)\n"
        "  --db PATH         task database (default: taskmgr.db in this folder)\n"
        "  --jobs N          pages OCRed at once: worker threads (default: config, else the\n"
        "                    CPU count); --workers N is the same\n"
        "  --order O         largest (default: the largest pages first, so no core idles at\n"
        "                    the end) or name (by file name and page)\n"
        "  --out DIR         write one output per input file into DIR\n"
        "  --format F        text, json, hocr, alto, tsv or pdf (a searchable PDF: the page\n"
        "                    images with an invisible text layer; default text)\n"
        "  --sidecar         with --format pdf: also the text, as NAME.txt\n"
        "  --dpi N           resolution PDF pages are rasterised at (72..1200; default\n"
        "                    ocr.pdf_dpi, 300)\n"
        "  --priority N      task priority (default 0)\n"
        "  --device D        run on this device (cpu, cuda:0, ...; default: any that fits)\n"
        "  --languages L     Tesseract languages, e.g. eng or eng+deu (default: config, eng)\n"
        "  --progress MODE   bar, lines or auto (default auto: a bar on a terminal)\n"
        "  --samples DIR     where sample pages are rendered (default samples)\n"
        "  --queue-ahead N   pages kept queued beyond one per worker, so that a worker\n"
        "                    that ends finds its next page waiting (default: one per two\n"
        "                    workers; 0 when tasks.queue_timeout_seconds is under 60)\n"
        "  --redo            OCR pages again even if done in the database\n"
        "  --list            list the pages and their order, OCR nothing\n"
        "  --print-config    print the configuration in force (YAML, every key) and exit\n"
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
  if (ec || !v.is_object() || !v.as_object().contains("text") || !v.at("text").is_string())
    return "";
  return std::string(v.at("text").as_string());
}

// Peak resident memory of this process, in KiB (VmHWM).
long peak_rss_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atol(line.c_str() + 6);
  }
  return -1;
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
    if (fs::exists(tif, ec) && fs::exists(gt, ec)) continue;
    fs::copy_file(entry.path(), gt, fs::copy_options::overwrite_existing, ec);
    const std::string cmd = "text2image --text='" + entry.path().string() + "' --outputbase='" +
                            (dir / stem).string() +
                            "' --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu"
                            " --resolution=300 --ptsize=12 --margin=100 --xsize=2550 --ysize=3300"
                            " > /dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0 || !fs::exists(tif, ec)) {
      std::cerr << "taskmgr-ocr: could not render " << tif << " with text2image\n";
      return false;
    }
    fs::remove(dir / (stem + ".box"), ec);
    std::cout << "rendered sample page " << tif.string() << "\n";
  }
  return any;
}

int parse_args(int argc, char** argv, Options& opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&](const char* what) -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(std::string(what) + " needs a value");
      return argv[++i];
    };
    auto number = [&](const char* what) {
      const std::string v = next(what);
      std::size_t used = 0;
      int n = 0;
      try {
        n = std::stoi(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != v.size())
        throw std::invalid_argument(std::string(what) + " needs a number, got '" + v + "'");
      return n;
    };
    if (a == "--config") {
      opt.config_path = next("--config");
    } else if (a == "--db") {
      opt.db = next("--db");
      opt.db_given = true;
    } else if (a == "--workers" || a == "--jobs") {
      opt.workers = number(a.c_str());
      if (opt.workers < 1) throw std::invalid_argument(a + " must be at least 1");
    } else if (a == "--out") {
      opt.out_dir = next("--out");
    } else if (a == "--format") {
      opt.format = next("--format");
      if (opt.format != "text" && opt.format != "json" && opt.format != "hocr" &&
          opt.format != "alto" && opt.format != "tsv" && opt.format != "pdf")
        throw std::invalid_argument("--format must be text, json, hocr, alto, tsv or pdf");
    } else if (a == "--sidecar") {
      opt.sidecar = true;
    } else if (a == "--dpi") {
      opt.dpi = number("--dpi");
      if (opt.dpi < 72 || opt.dpi > 1200)
        throw std::invalid_argument("--dpi must be in [72, 1200], got " + std::to_string(opt.dpi));
    } else if (a == "--order") {
      const std::string o = next("--order");
      if (o != "largest" && o != "name")
        throw std::invalid_argument("--order must be largest or name");
      opt.order = o == "name" ? ocrcli::Order::kName : ocrcli::Order::kLargestFirst;
    } else if (a == "--priority") {
      opt.priority = number("--priority");
    } else if (a == "--samples") {
      opt.samples_dir = next("--samples");
    } else if (a == "--device") {
      opt.device = next("--device");
    } else if (a == "--languages") {
      opt.languages = next("--languages");
    } else if (a == "--progress") {
      const std::string m = next("--progress");
      if (m != "bar" && m != "lines" && m != "auto")
        throw std::invalid_argument("--progress must be bar, lines or auto");
      opt.progress = m == "bar" ? 1 : m == "lines" ? 0 : -1;
    } else if (a == "--queue-ahead") {
      opt.queue_ahead = number("--queue-ahead");
      if (opt.queue_ahead < 0 || opt.queue_ahead > 10000)
        throw std::invalid_argument("--queue-ahead must be in [0, 10000], got " +
                                    std::to_string(opt.queue_ahead));
    } else if (a == "--redo") {
      opt.redo = true;
    } else if (a == "--list") {
      opt.list_only = true;
    } else if (a == "--print-config") {
      opt.print_config = true;
    } else if (a == "-h" || a == "--help") {
      usage(std::cout);
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      throw std::invalid_argument("unknown option '" + a + "'");
    } else {
      opt.inputs.push_back(a);
    }
  }
  if (opt.format == "pdf" && opt.out_dir.empty())
    throw std::invalid_argument("--format pdf needs --out DIR (where the PDFs go)");
  if (opt.sidecar && opt.format != "pdf")
    throw std::invalid_argument("--sidecar goes with --format pdf (the text beside the PDF)");
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    if (const int rc = parse_args(argc, argv, opt); rc >= 0) return rc;
  } catch (const std::invalid_argument& e) {
    std::cerr << "taskmgr-ocr: " << e.what() << "\n";
    usage(std::cerr);
    return 2;
  }

  taskmgr::Config config;
  try {
    config = opt.config_path.empty() ? taskmgr::Config::defaults()
                                     : taskmgr::Config::from_yaml_file(opt.config_path);
    // --db, else the configuration's storage.path, else ./taskmgr.db.
    if (opt.db_given || opt.config_path.empty()) config.storage.path = opt.db;
    opt.db = config.storage.path;
    if (opt.workers > 0) config.executor.worker_threads = opt.workers;
    if (config.executor.worker_threads <= 0) {
      config.executor.worker_threads =
          std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    }
    if (!opt.languages.empty()) config.ocr.languages = opt.languages;
    if (opt.dpi == 0) opt.dpi = config.ocr.pdf_dpi;
    // A batch will use every worker: its engines are made when the manager
    // opens, not by the first pages (unless the configuration says).
    if (!config.pools.devices.count("cpu") && config.pools.defaults.min_instances == 0) {
      taskmgr::PoolSettings cpu = config.pools.defaults;
      cpu.min_instances = config.executor.worker_threads;
      config.pools.devices["cpu"] = cpu;
    }
    // The order the batch is submitted in is also the queue's: the few pages
    // waiting are taken largest first too.
    config.tasks.queue_ordering = opt.order == ocrcli::Order::kLargestFirst
                                      ? taskmgr::QueueOrdering::kLargestFirst
                                      : taskmgr::QueueOrdering::kFifo;
    config.validate();
  } catch (const taskmgr::Error& e) {
    std::cerr << "taskmgr-ocr: " << e.what() << "\n";
    return 2;
  }
  // One page running per worker and one queued per two workers: a worker
  // that ends finds the next page waiting, and a queued page waits about
  // half a page-time, whatever the folder's size (queue_timeout_seconds
  // keeps its meaning). With a queue timeout under a minute, which a page
  // may take, no page is queued ahead: one is submitted when a worker is
  // free, and waits only for that worker to take it.
  const auto workers = static_cast<std::size_t>(config.executor.worker_threads);
  const std::size_t ahead = opt.queue_ahead >= 0 ? static_cast<std::size_t>(opt.queue_ahead)
                            : config.tasks.queue_timeout_seconds < 60.0
                                ? 0
                                : std::max<std::size_t>(1, workers / 2);
  const std::size_t window = workers + ahead;
  config.tasks.max_queue_size =
      std::max<int>(config.tasks.max_queue_size, static_cast<int>(window));
  if (opt.print_config) {
    std::cout << config.to_yaml();
    return 0;
  }

  if (opt.inputs.empty()) {
    if (!render_samples(opt.samples_dir)) {
      std::cerr << "taskmgr-ocr: no sample pages to render\n";
      return 2;
    }
    opt.inputs.push_back(opt.samples_dir);
  }
  ocrcli::Plan plan = ocrcli::list_inputs(opt.inputs, opt.dpi);
  ocrcli::order_pages(plan, opt.order);
  if (opt.format == "pdf" && std::system("command -v pdfunite > /dev/null 2>&1") != 0 &&
      std::any_of(plan.documents.begin(), plan.documents.end(),
                  [](const ocrcli::Document& d) { return d.pages > 1; })) {
    std::cerr << "taskmgr-ocr: --format pdf joins the pages of a document with pdfunite, which "
                 "is not installed (Debian: apt-get install poppler-utils)\n";
    return 2;
  }
  if (opt.list_only) {
    for (const auto& p : plan.pages) {
      const auto& d = plan.documents[p.doc];
      std::cout << d.shown;
      if (p.number > 0) std::cout << " page " << p.number;
      std::cout << "\n";
    }
    std::cout << plan.pages.size() << " page(s) in " << plan.documents.size()
              << " file(s); peak memory " << peak_rss_kib() << " KiB\n";
    return 0;
  }

  if (!opt.out_dir.empty()) {
    // Where the outputs go must take them, before any page is read.
    std::error_code ec;
    fs::create_directories(opt.out_dir, ec);
    const fs::path probe = fs::path(opt.out_dir) / (".taskmgr-probe-" + std::to_string(::getpid()));
    std::FILE* f = ec ? nullptr : std::fopen(probe.c_str(), "w");
    if (f == nullptr) {
      std::cerr << "taskmgr-ocr: --out " << opt.out_dir << ": cannot write there: "
                << (ec ? ec.message() : std::string(std::strerror(errno))) << "\n";
      return 2;
    }
    std::fclose(f);
    fs::remove(probe, ec);
  }

  // From here a first SIGINT/SIGTERM stops the run gracefully, also while
  // the manager opens and warms its engines (then no page is started).
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  try {
    taskmgr::TaskManager tm(config);
    if (!opt.device.empty()) {
      std::string known;
      bool found = false;
      for (const auto& dev : tm.devices()) {
        known += (known.empty() ? "" : ", ") + dev.id;
        found = found || dev.id == opt.device;
      }
      if (!found) {
        std::cerr << "taskmgr-ocr: --device " << opt.device
                  << ": no such device (devices: " << known << ")\n";
        return 2;
      }
    }
    std::cout << "taskmgr " << taskmgr::version() << ": " << plan.pages.size() << " page(s), "
              << "database " << opt.db << "\n";
    const bool bar = opt.progress == 1 || (opt.progress == -1 && ::isatty(STDOUT_FILENO));
    ocrcli::BatchOptions bo;
    bo.window = window;
    bo.priority = opt.priority;
    bo.device = opt.device;
    bo.redo = opt.redo;
    bo.dpi = opt.dpi;
    bo.stop = &g_stop;
    bo.output = ocrcli::service_output_for(opt.format);
    bo.words = opt.format == "json";
    {
      const taskmgr::OcrConfig& o = config.ocr;
      const taskmgr::PreprocessConfig& p = o.preprocess;
      bo.settings = o.languages + ";psm" + std::to_string(o.page_segmentation_mode) + ";" +
                    o.orientation + ";pre" + std::to_string(p.grayscale) +
                    std::to_string(p.binarize) + std::to_string(p.deskew) + "," +
                    std::to_string(p.target_dpi);
    }
    ocrcli::Batch batch(tm, plan, bo);
    std::optional<ocrcli::OutputWriter> writer;
    if (!opt.out_dir.empty()) writer.emplace(tm, plan, opt.out_dir, opt.format, opt.sidecar);
    std::size_t not_written = 0;

    const auto t0 = std::chrono::steady_clock::now();
    std::size_t shown = 0, before = 0, completed_now = 0;
    double cer_sum = 0;
    int cer_n = 0;
    ocrcli::Progress progress(bar, plan.pages.size(), 0);
    const auto on_end = [&](const ocrcli::PageEnd& e) {
      const ocrcli::Page& p = plan.pages[e.page];
      const ocrcli::Document& d = plan.documents[p.doc];
      std::string name = d.shown;
      if (p.number > 0) name += " page " + std::to_string(p.number);
      const std::string count =
          "[" + std::to_string(++shown) + "/" + std::to_string(plan.pages.size()) + "] ";
      if (e.before) ++before;
      if (writer) {
        if (const std::string why = writer->page_ended(e.page, e.task); !why.empty()) {
          ++not_written;
          progress.line("OUTPUT " + why);
        }
      }
      if (e.task.status != taskmgr::TaskStatus::kCompleted) {
        progress.line(count + "FAILED " + name + ": " +
                      std::string(e.task.status == taskmgr::TaskStatus::kCancelled
                                      ? "cancelled"
                                      : taskmgr::to_string(e.task.failure_reason)) +
                      ": " + e.task.failure_message +
                      (e.before ? " (in an earlier run; --redo tries it again)" : ""));
        progress.draw(shown - before);
        return;
      }
      if (!e.before) ++completed_now;
      std::string line = count + name;
      const std::string text = result_text(e.task.result);
      fs::path gt = d.shown;
      gt.replace_extension(".gt.txt");
      std::error_code gt_ec;  // (a name near NAME_MAX has no room for ".gt.txt": no truth)
      if (d.pages <= 1 && fs::exists(gt, gt_ec)) {
        const double c = taskmgr::character_error_rate(text, slurp(gt));
        cer_sum += c;
        ++cer_n;
        char buf[32];
        std::snprintf(buf, sizeof buf, " CER %.2f%%", c * 100);
        line += buf;
      }
      if (e.before) {
        progress.line(line + " (done before)");
      } else {
        const double secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        char rate[64];
        std::snprintf(rate, sizeof rate, " (%.2f pages/s)",
                      secs > 0 ? static_cast<double>(completed_now) / secs : 0.0);
        progress.line(line + rate);
      }
      progress.draw(shown - before);
    };
    bool told = false;
    const ocrcli::Summary s = batch.run(on_end, [&](std::size_t) {
      progress.draw(shown - before);
      if (g_stop.load() != 0 && !told) {
        told = true;
        progress.line("stopping (signal " + std::to_string(g_stop.load()) +
                      "): the pages in flight finish; again to quit at once");
      }
    });
    progress.finish(shown - before);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const taskmgr::TaskMetrics m = tm.get_task_metrics();
    std::cout << "\nsummary (from " << opt.db << ")\n"
              << "  pages           " << s.pages << " (" << s.before << " already done)\n"
              << "  completed       " << s.completed << "\n"
              << "  failed          " << s.failed << "\n";
    for (const auto& [reason, n] : s.failures) std::cout << "    " << reason << "  " << n << "\n";
    if (s.cancelled > 0) std::cout << "  cancelled       " << s.cancelled << "\n";
    if (s.unfinished > 0) std::cout << "  unfinished      " << s.unfinished << "\n";
    if (s.refused > 0) std::cout << "  not accepted    " << s.refused << " (no task made)\n";
    if (s.not_started > 0)
      std::cout << "  not started     " << s.not_started << " (stopped; run again to go on)\n";
    if (s.adopted > 0)
      std::cout << "  resumed         " << s.adopted << " (tasks of an interrupted run)\n";
    std::printf("  throughput      %.2f pages/s (completed pages)\n",
                secs > 0 ? static_cast<double>(s.completed) / secs : 0.0);
    std::printf("  average wait    %.3f s\n", m.average_wait_time);
    if (cer_n > 0)
      std::printf("  mean CER        %.2f%% over %d page(s) with ground truth\n",
                  cer_sum / cer_n * 100, cer_n);
    for (const auto& [dev, mem] : m.memory_by_device) {
      std::cout << "  peak task memory on " << dev << ": " << mem.peak_task_mb << " MB\n";
    }
    if (writer) {
      std::cout << "  written         " << writer->documents_written() << " file(s) in "
                << opt.out_dir;
      if (not_written > 0) std::cout << " (" << not_written << " not written)";
      std::cout << "\n";
    }
    std::cout << "  retries         " << m.retries << "\n"
              << "  cpu fallbacks   " << m.cpu_fallbacks << "\n";
    std::cout.flush();
    for (const auto& problem : s.problems) {
      std::cerr << "taskmgr-ocr: error: " << problem << "\n";
    }
    // Closing flushes the database: writes it still could not take are a
    // failed run (exit 3), whatever the pages did.
    try {
      tm.close();
    } catch (const taskmgr::Error& e) {
      if (e.code() != taskmgr::ErrorCode::kUnpersisted) throw;
      std::cerr << "taskmgr-ocr: error: " << e.what() << "\n";
      return 3;
    }
    if (!s.problems.empty()) return 3;
    if (g_stop.load() != 0) return 128 + g_stop.load();  // as the signal would have
    return s.failed == 0 && s.cancelled == 0 && s.unfinished == 0 && s.refused == 0 &&
                   not_written == 0
               ? 0
               : 1;
  } catch (const taskmgr::Error& e) {
    std::cerr << "taskmgr-ocr: " << e.what() << "\n";
    return e.code() == taskmgr::ErrorCode::kInvalidConfig ? 2 : 3;
  } catch (const std::exception& e) {  // not the library's: still a message, not an abort
    std::cerr << "taskmgr-ocr: error: " << e.what() << "\n";
    return 3;
  }
}
