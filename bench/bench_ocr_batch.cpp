// The OCR batch benchmark (issue 4): one batch of 24 pages, OCRed eight ways
// in one run, each figure beside the physical limit measured in the same run.
//
//   bench_ocr_batch --data DIR --samples DIR [--runs N] [--work DIR]
//                   [--python PY] [--tesserocr SCRIPT] [--skip-unlimited]
//                   [--only KEYS] [--cli PATH] [--cli-args "ARGS"] [--small]
//                   [--max-foreign C]
//   bench_ocr_batch --priority --data DIR [--backlog N]
//   bench_ocr_batch --preprocess --data DIR --samples DIR
//   bench_ocr_batch --orientation --data DIR --samples DIR [--runs N]
//
// The batch: 20 small pages (phototest.tif and eurotext.tif from DIR,
// alternating) and 4 large ones rendered at 300 dpi with text2image from
// the project's sample texts (--samples), placed among the small ones at
// positions 3, 9, 15 and 21. Every configuration OCRs the whole batch with
// two threads (the machine's two cores) and reports pages/s, its ratio to
// L and the mean character error rate against the ground truths:
//
//   L   the physical limit: 2 x the pages/s of one warm engine looping alone
//       over the batch (both cores busy, never idle)
//   a   2 threads, each with its own warm engine, taking pages in order from
//       a shared list; no library in between
//   b   taskmgr: a TaskManager with a pool of 2 warm OCR engines, SQLite
//       store, tasks.queue_ordering largest_first (and, for comparison,
//       fifo); submit all, wait for all
//   bw  as (b) with services.ocr.isolation: process: each engine in a
//       taskmgr-worker child process, pages passed by path
//   c   a fresh engine per page (init, recognise, end), 2 threads
//   d   the tesseract command once per page, 2 at a time (OMP_THREAD_LIMIT=1)
//   e   Python, python3-tesserocr, a thread pool of 2 each holding a warm
//       PyTessBaseAPI (OMP_THREAD_LIMIT=1)
//   u   as (a) with OpenMP left unlimited (what the pool's fix is worth)
//   Ld  the limit for the work the CLI's defaults do: 2 x one taskmgr
//       worker with the library's default OCR settings (preprocessing,
//       orientation auto, words) looping over the batch
//   cli the taskmgr-ocr program (--cli PATH) with its defaults on a folder
//       of the batch's pages (links named p00-..., so that listing order is
//       the batch's), a fresh database per run: two figures, the wall time
//       of the whole process (fork to exit: start, engine initialisation,
//       database, batch, teardown) and the batch time it reports itself
//       (completed / throughput); its exit code must be 0 and every page
//       completed
//   clix the same program with --cli-args ARGS (space-separated options)
//        too: an A/B of an option in the same runs
//   cli0 the same program on an empty folder: its fixed cost alone
//
// --only KEYS (comma-separated) runs those configurations and L (u only if
// named). --small: the batch is the 20 small pages only, no large ones.
// --max-foreign C (default 0.25): a run (one of each configuration) during
// which other processes kept more than C cores busy on average is dropped
// and run again (at most 4 x --runs attempts; 0 keeps every run); the
// report lists the load of the kept and dropped runs.
// Every run repeats the set --runs times (default 3) and reports medians.
// --priority: a backlog of --backlog (100) queued pages, then one page of
// priority 10: reports how long it waited to start, against the median
// time of one page.
// --preprocess: the character error rate of each preprocessing step alone
// (and of the defaults) on the real scans and rendered pages.
// --orientation: what orientation detection (OSD) costs and finds. The
// first-pass mean confidence and the error rate of upright pages and of
// pages turned 90/180/270 degrees with "orientation" off, auto and always;
// then the upright pages (2 scans, 4 large rendered pages) OCRed --runs
// times (default 3; use >= 5) with each mode, the modes interleaved in every
// run, through taskmgr with 1 worker: medians of the seconds per batch and
// of each run's ratio to "off".
#include <taskmgr/taskmgr.hpp>

#include <leptonica/allheaders.h>
#include <omp.h>
#include <tesseract/baseapi.h>

#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

struct Page {
  std::string path;
  std::string truth;
  bool large = false;
};

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Four large pages: each a sample text repeated to fill a US-letter page
// (about 1,000 characters: one page), rendered at 300 dpi (2550x3300) with
// text2image and DejaVu Sans, as taskmgr-ocr renders its samples.
std::vector<Page> render_large_pages(const fs::path& samples, const fs::path& work) {
  std::vector<fs::path> texts;
  for (const auto& e : fs::directory_iterator(samples)) {
    if (e.path().extension() == ".txt") texts.push_back(e.path());
  }
  std::sort(texts.begin(), texts.end());
  if (texts.empty()) {
    std::cerr << "no sample texts in " << samples << "\n";
    std::exit(2);
  }
  std::vector<Page> pages;
  for (int i = 0; i < 4; ++i) {
    std::string text;
    while (text.size() < 1000) {
      text += read_file(texts[static_cast<std::size_t>(i + text.size() / 150) % texts.size()]);
      text += "\n";
    }
    const std::string base = (work / ("large" + std::to_string(i))).string();
    {
      std::ofstream f(base + ".gt.txt");
      f << text;
    }
    if (!fs::exists(base + ".tif")) {
      const std::string cmd =
          "text2image --text='" + base + ".gt.txt' --outputbase='" + base +
          "' --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu"
          " --resolution=300 --ptsize=12 --margin=100 --xsize=2550 --ysize=3300 > /dev/null 2>&1";
      if (std::system(cmd.c_str()) != 0 || !fs::exists(base + ".tif")) {
        std::cerr << "could not render " << base << ".tif with text2image\n";
        std::exit(2);
      }
    }
    pages.push_back({base + ".tif", text, true});
  }
  return pages;
}

std::vector<Page> make_batch(const fs::path& data, const fs::path& samples, const fs::path& work,
                             bool small_only) {
  const Page photo{(data / "phototest.tif").string(), read_file(data / "phototest.txt"), false};
  const Page euro{(data / "eurotext.tif").string(), read_file(data / "eurotext.txt"), false};
  const std::vector<Page> large =
      small_only ? std::vector<Page>{} : render_large_pages(samples, work);
  std::vector<Page> batch;
  std::size_t small = 0, big = 0;
  for (int pos = 0; pos < (small_only ? 20 : 24); ++pos) {
    if (pos % 6 == 3 && big < large.size()) {
      batch.push_back(large[big++]);
    } else {
      batch.push_back(small++ % 2 == 0 ? photo : euro);
    }
  }
  return batch;
}

// OpenMP limited to this thread, as the OCR pool does on its workers.
void limit_openmp() {
  omp_set_max_active_levels(0);
  omp_set_num_threads(1);
}

class Engine {
 public:
  Engine() {
    if (api_.Init(nullptr, "eng", tesseract::OEM_LSTM_ONLY) != 0) {
      std::cerr << "Tesseract Init failed\n";
      std::exit(2);
    }
    api_.SetPageSegMode(tesseract::PSM_AUTO);
  }
  ~Engine() { api_.End(); }
  std::string ocr(const std::string& path) {
    Pix* pix = pixRead(path.c_str());
    if (pix == nullptr) return "";
    api_.SetImage(pix);
    if (pixGetXRes(pix) <= 0) api_.SetSourceResolution(300);
    char* t = api_.GetUTF8Text();
    std::string text = t ? t : "";
    delete[] t;
    api_.Clear();
    pixDestroy(&pix);
    return text;
  }

 private:
  tesseract::TessBaseAPI api_;
};

struct Result {
  double seconds = 0;
  std::vector<std::string> texts;
  double batch_seconds = 0;  // cli: the batch time the program reports
};

double mean_cer(const std::vector<Page>& batch, const std::vector<std::string>& texts) {
  double sum = 0;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    sum += taskmgr::character_error_rate(i < texts.size() ? texts[i] : "", batch[i].truth);
  }
  return sum / static_cast<double>(batch.size());
}

// Two threads take pages in order from a shared list; each calls work(page
// index, thread index). prepare(thread) runs before the clock starts.
Result two_threads(const std::vector<Page>& batch, bool limit_omp,
                   const std::function<void(int)>& prepare,
                   const std::function<std::string(std::size_t, int)>& work) {
  Result r;
  r.texts.resize(batch.size());
  std::atomic<std::size_t> next{0};
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      if (limit_omp) limit_openmp();
      prepare(t);
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      for (std::size_t i; (i = next.fetch_add(1)) < batch.size();) r.texts[i] = work(i, t);
    });
  }
  while (ready.load() < 2) std::this_thread::yield();
  const auto t0 = Clock::now();
  go.store(true);
  for (auto& th : threads) th.join();
  r.seconds = seconds_since(t0);
  return r;
}

Result run_limit(const std::vector<Page>& batch) {
  Result r;
  std::thread th([&] {
    limit_openmp();
    Engine e;
    e.ocr(batch.front().path);  // warm
    const auto t0 = Clock::now();
    for (const auto& p : batch) r.texts.push_back(e.ocr(p.path));
    r.seconds = seconds_since(t0);
  });
  th.join();
  return r;
}

Result run_warm_threads(const std::vector<Page>& batch, bool limit_omp) {
  std::unique_ptr<Engine> engines[2];
  return two_threads(
      batch, limit_omp,
      [&](int t) {
        engines[t] = std::make_unique<Engine>();
        engines[t]->ocr(batch.front().path);
      },
      [&](std::size_t i, int t) { return engines[t]->ocr(batch[i].path); });
}

Result run_fresh_engines(const std::vector<Page>& batch) {
  return two_threads(
      batch, true, [](int) {},
      [&](std::size_t i, int) {
        Engine e;
        return e.ocr(batch[i].path);
      });
}

Result run_cli(const std::vector<Page>& batch, const fs::path& work) {
  const fs::path out = work / "cli";
  fs::create_directories(out);
  return two_threads(
      batch, true, [](int) {},
      [&](std::size_t i, int) {
        const std::string base = (out / std::to_string(i)).string();
        const std::string cmd = "OMP_THREAD_LIMIT=1 tesseract '" + batch[i].path + "' '" + base +
                                "' --oem 1 --psm 3 > /dev/null 2>&1";
        if (std::system(cmd.c_str()) != 0) return std::string();
        return read_file(base + ".txt");
      });
}

Result run_python(const std::vector<Page>& batch, const fs::path& work, const std::string& python,
                  const std::string& script) {
  Result r;
  const fs::path list = work / "pages.txt";
  const fs::path out = work / "py";
  fs::create_directories(out);
  {
    std::ofstream f(list);
    for (const auto& p : batch) f << p.path << "\n";
  }
  const std::string cmd = "OMP_THREAD_LIMIT=1 " + python + " '" + script + "' '" + list.string() +
                          "' '" + out.string() + "' 2";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  char line[256];
  while (std::fgets(line, sizeof line, pipe)) std::sscanf(line, "seconds %lf", &r.seconds);
  if (pclose(pipe) != 0) r.seconds = 0;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    r.texts.push_back(read_file(out / (std::to_string(i) + ".txt")));
  }
  return r;
}

taskmgr::Config taskmgr_config(const fs::path& db, taskmgr::QueueOrdering ordering) {
  taskmgr::Config c;
  c.storage.path = db.string();
  c.executor.worker_threads = 2;
  c.pools.devices["cpu"] = taskmgr::PoolSettings{2, 2, 300};  // 2 warm engines
  c.tasks.queue_ordering = ordering;
  c.tasks.max_queue_size = 10000;
  // The same work as the baselines: Tesseract on the page as decoded.
  c.ocr.preprocess.grayscale = false;
  c.ocr.preprocess.target_dpi = 0;
  return c;
}

std::string result_text(const taskmgr::Task& t) {
  boost::system::error_code ec;
  auto v = boost::json::parse(t.result, ec);
  if (ec || !v.is_object()) return "";
  const auto* text = v.as_object().if_contains("text");
  return text && text->is_string() ? std::string(text->as_string()) : "";
}

Result run_taskmgr(const std::vector<Page>& batch, const fs::path& work,
                   taskmgr::QueueOrdering ordering, int workers = 2, bool isolated = false) {
  const fs::path db = work / "bench.db";
  for (const char* sfx : {"", "-wal", "-shm", ".lock"}) fs::remove(db.string() + sfx);
  Result r;
  auto config = taskmgr_config(db, ordering);
  config.executor.worker_threads = workers;
  config.pools.devices["cpu"] = taskmgr::PoolSettings{workers, workers, 300};
  // The engines in worker processes (taskmgr-worker beside libtaskmgr.so).
  if (isolated) config.services["ocr"].isolation = "process";
  taskmgr::TaskManager tm(config);
  {  // warm both engines (min_instances made them; this runs a page on each)
    std::vector<std::string> ids;
    for (int i = 0; i < workers; ++i) {
      taskmgr::TaskCreateRequest req;
      req.input.path = batch.front().path;
      ids.push_back(tm.create_task(req).id);
      tm.start_task(ids.back());
    }
    for (const auto& id : ids) tm.wait_task(id, std::chrono::minutes(5));
  }
  const auto t0 = Clock::now();
  std::vector<std::string> ids;
  for (const auto& p : batch) {
    taskmgr::TaskCreateRequest req;
    req.input.path = p.path;
    req.options_json = R"({"words":false})";
    ids.push_back(tm.create_task(req).id);
    tm.start_task(ids.back());
  }
  std::vector<taskmgr::Task> done;
  for (const auto& id : ids) done.push_back(*tm.wait_task(id, std::chrono::minutes(10)));
  r.seconds = seconds_since(t0);
  for (const auto& t : done) r.texts.push_back(result_text(t));
  return r;
}

// Ld: one taskmgr worker with the library's default OCR settings (what
// taskmgr-ocr asks for: no task options but its own "source") looping over
// the batch, both engines warm.
Result run_taskmgr_defaults(const std::vector<Page>& batch, const fs::path& work) {
  const fs::path db = work / "bench-defaults.db";
  for (const char* sfx : {"", "-wal", "-shm", ".lock"}) fs::remove(db.string() + sfx);
  taskmgr::Config config = taskmgr::Config::defaults();
  config.storage.path = db.string();
  config.executor.worker_threads = 1;
  config.pools.devices["cpu"] = taskmgr::PoolSettings{1, 1, 300};
  config.tasks.max_queue_size = 10000;
  taskmgr::TaskManager tm(config);
  auto submit = [&](const std::string& path) {
    taskmgr::TaskCreateRequest req;
    req.input.path = path;
    req.start = true;
    return tm.create_task(req).id;
  };
  tm.wait_task(submit(batch.front().path), std::chrono::minutes(5));  // warm
  Result r;
  const auto t0 = Clock::now();
  std::vector<std::string> ids;
  for (const auto& p : batch) ids.push_back(submit(p.path));
  std::vector<taskmgr::Task> done;
  for (const auto& id : ids) done.push_back(*tm.wait_task(id, std::chrono::minutes(10)));
  r.seconds = seconds_since(t0);
  for (const auto& t : done) r.texts.push_back(result_text(t));
  return r;
}

struct Process {
  int status = -1;  // as waitpid says
  std::string output;
  double seconds = 0;  // fork to exit
};

// Runs argv[0] with argv (stdout and stderr into one pipe), timed from the
// fork to the exit seen by waitpid.
Process run_process(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  Process p;
  int fd[2];
  if (::pipe(fd) != 0) return p;
  const auto t0 = Clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fd[1], STDOUT_FILENO);
    ::dup2(fd[1], STDERR_FILENO);
    ::close(fd[0]);
    ::close(fd[1]);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(fd[1]);
  if (pid < 0) {
    ::close(fd[0]);
    return p;
  }
  char buf[4096];
  for (ssize_t n; (n = ::read(fd[0], buf, sizeof buf)) != 0;) {
    if (n > 0)
      p.output.append(buf, static_cast<std::size_t>(n));
    else if (errno != EINTR)
      break;
  }
  ::close(fd[0]);
  while (::waitpid(pid, &p.status, 0) < 0 && errno == EINTR) {
  }
  p.seconds = seconds_since(t0);
  return p;
}

// A number after `label` at the start of a line of the CLI's summary.
double summary_number(const std::string& out, const std::string& label) {
  const auto at = out.find("\n" + label);
  if (at == std::string::npos) return -1;
  return std::strtod(out.c_str() + at + 1 + label.size(), nullptr);
}

// The batch's pages as a folder: links named so that listing order is the
// batch order (p00-large0.tif, p01-phototest.tif, ...).
fs::path cli_folder(const std::vector<Page>& batch, const fs::path& work) {
  const fs::path dir = work / "cli-pages";
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (std::size_t i = 0; i < batch.size(); ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "p%02zu-", i);
    const fs::path target = fs::absolute(batch[i].path);
    fs::create_symlink(target, dir / (name + target.filename().string()));
  }
  return dir;
}

// cli (pages = the batch's size) or cli0 (an empty folder, pages = 0): the
// program with its defaults, a fresh database each run.
Result run_taskmgr_ocr(const std::string& cli, const fs::path& folder, std::size_t pages,
                       const fs::path& work, const std::vector<std::string>& extra = {}) {
  static int n = 0;
  const std::string db = (work / ("cli-" + std::to_string(++n) + ".db")).string();
  auto remove_db = [&] {
    for (const char* sfx : {"", "-wal", "-shm", ".lock"}) fs::remove(db + sfx);
  };
  remove_db();
  std::vector<std::string> args = {cli, "--db", db, "--progress", "lines"};
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(folder.string());
  const Process p = run_process(args);
  remove_db();
  Result r;
  const double completed = summary_number(p.output, "  completed ");
  const double rate = summary_number(p.output, "  throughput ");
  if (!WIFEXITED(p.status) || WEXITSTATUS(p.status) != 0 ||
      completed != static_cast<double>(pages) || (pages > 0 && rate <= 0)) {
    std::fprintf(stderr, "%s: exit status %d, completed %.0f of %zu; its output:\n%s\n",
                 cli.c_str(), p.status, completed, pages, p.output.c_str());
    return r;
  }
  r.seconds = p.seconds;
  r.batch_seconds = pages > 0 ? completed / rate : 0;
  return r;
}

// CPU time on the whole machine and in this process (its waited-for
// children included), in clock ticks: what other processes used is the
// difference.
struct CpuTicks {
  long long busy = 0, own = 0;
};

CpuTicks cpu_ticks() {
  CpuTicks t;
  std::ifstream stat("/proc/stat");
  std::string cpu;
  long long v[8] = {};
  stat >> cpu;
  for (auto& x : v) stat >> x;  // user nice system idle iowait irq softirq steal
  t.busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
  const std::string self = read_file("/proc/self/stat");
  std::istringstream in(self.substr(self.rfind(')') + 2));
  std::string field;
  for (int i = 3; i <= 17 && in >> field; ++i) {
    if (i >= 14) t.own += std::stoll(field);  // utime stime cutime cstime
  }
  return t;
}

// The cores other processes kept busy, on average, between two readings.
double foreign_cores(const CpuTicks& a, const CpuTicks& b, double seconds) {
  const double ticks = static_cast<double>((b.busy - a.busy) - (b.own - a.own));
  return seconds > 0 ? std::max(0.0, ticks / static_cast<double>(::sysconf(_SC_CLK_TCK)) / seconds)
                     : 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Each preprocessing step against the character error rate: the real scans,
// the large rendered pages and a page rendered at 150 dpi, OCRed through
// taskmgr with each step alone and with the defaults.
int run_preprocess(const fs::path& data, const fs::path& samples, const fs::path& work) {
  std::vector<Page> pages = {
      {(data / "phototest.tif").string(), read_file(data / "phototest.txt"), false},
      {(data / "eurotext.tif").string(), read_file(data / "eurotext.txt"), false}};
  for (auto& p : render_large_pages(samples, work)) pages.push_back(p);
  {  // one page at 150 dpi (small and low resolution: what target_dpi is for)
    const std::string base = (work / "low150").string();
    const std::string text = read_file(work / "large0.gt.txt");
    if (!fs::exists(base + ".tif")) {
      const std::string cmd =
          "text2image --text='" + (work / "large0.gt.txt").string() + "' --outputbase='" + base +
          "' --font='DejaVu Sans' --fonts_dir=/usr/share/fonts/truetype/dejavu"
          " --resolution=150 --ptsize=10 --margin=50 --xsize=1275 --ysize=1650 > /dev/null 2>&1";
      if (std::system(cmd.c_str()) != 0) return 2;
      // text2image writes 300 dpi into every TIFF: declare the real 150.
      Pix* pix = pixRead((base + ".tif").c_str());
      if (pix == nullptr) return 2;
      pixSetResolution(pix, 150, 150);
      pixWrite((base + ".tif").c_str(), pix, IFF_TIFF_G4);
      pixDestroy(&pix);
    }
    pages.push_back({base + ".tif", text, true});
  }
  struct Variant {
    const char* name;
    const char* json;
  };
  const Variant variants[] = {
      {"none", R"({"grayscale":false,"target_dpi":0,"deskew":false,"binarize":false})"},
      {"grayscale", R"({"grayscale":true,"target_dpi":0,"deskew":false,"binarize":false})"},
      {"target_dpi 300", R"({"grayscale":false,"target_dpi":300,"deskew":false,"binarize":false})"},
      {"deskew", R"({"grayscale":false,"target_dpi":0,"deskew":true,"binarize":false})"},
      {"binarize", R"({"grayscale":false,"target_dpi":0,"deskew":false,"binarize":true})"},
      {"defaults (grayscale, 300 dpi)",
       R"({"grayscale":true,"target_dpi":300,"deskew":false,"binarize":false})"},
      {"all four", R"({"grayscale":true,"target_dpi":300,"deskew":true,"binarize":true})"},
  };
  const fs::path db = work / "preprocess.db";
  for (const char* sfx : {"", "-wal", "-shm", ".lock"}) fs::remove(db.string() + sfx);
  taskmgr::TaskManager tm(taskmgr_config(db, taskmgr::QueueOrdering::kFifo));
  std::printf("%-30s", "variant \\ page");
  for (const auto& p : pages) std::printf(" %10.10s", fs::path(p.path).stem().c_str());
  std::printf(" %8s %8s\n", "mean", "seconds");
  for (const auto& v : variants) {
    std::vector<std::string> ids;
    const auto t0 = Clock::now();
    for (const auto& p : pages) {
      taskmgr::TaskCreateRequest req;
      req.input.path = p.path;
      req.options_json = std::string(R"({"words":false,"preprocess":)") + v.json + "}";
      ids.push_back(tm.create_task(req).id);
      tm.start_task(ids.back());
    }
    std::printf("%-30s", v.name);
    double sum = 0;
    std::vector<double> cers;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const auto t = *tm.wait_task(ids[i], std::chrono::minutes(10));
      const double c = taskmgr::character_error_rate(result_text(t), pages[i].truth);
      cers.push_back(c);
      sum += c;
    }
    const double secs = seconds_since(t0);
    for (double c : cers) std::printf(" %9.2f%%", 100 * c);
    std::printf(" %7.2f%% %8.2f\n", 100 * sum / static_cast<double>(cers.size()), secs);
  }
  return 0;
}

// A page turned clockwise by quarter turns, written as PNG into `work`.
std::string turned_page(const std::string& path, int quarter_turns, const fs::path& work) {
  const std::string out = (work / (fs::path(path).stem().string() + "-turned" +
                                   std::to_string(quarter_turns * 90) + ".png"))
                              .string();
  if (!fs::exists(out)) {
    Pix* pix = pixRead(path.c_str());
    Pix* turned = pix ? pixRotateOrth(pix, quarter_turns) : nullptr;
    if (turned == nullptr || pixWrite(out.c_str(), turned, IFF_PNG) != 0) {
      std::cerr << "cannot write " << out << "\n";
      std::exit(2);
    }
    pixDestroy(&turned);
    pixDestroy(&pix);
  }
  return out;
}

int run_orientation(const fs::path& data, const fs::path& samples, const fs::path& work, int runs) {
  std::vector<Page> pages = {
      {(data / "phototest.tif").string(), read_file(data / "phototest.txt"), false},
      {(data / "eurotext.tif").string(), read_file(data / "eurotext.txt"), false}};
  for (auto& p : render_large_pages(samples, work)) pages.push_back(p);
  const fs::path db = work / "orientation.db";
  for (const char* sfx : {"", "-wal", "-shm", ".lock"}) fs::remove(db.string() + sfx);
  taskmgr::Config config;
  config.storage.path = db.string();
  config.executor.worker_threads = 1;
  config.pools.devices["cpu"] = taskmgr::PoolSettings{1, 1, 300};  // one warm engine
  config.tasks.max_queue_size = 10000;
  config.ocr.orientation = "auto";  // the OSD engine is made with the instance
  taskmgr::TaskManager tm(config);
  auto run = [&](const std::string& path, const std::string& mode) {
    taskmgr::TaskCreateRequest req;
    req.input.path = path;
    req.options_json = R"({"words":false,"orientation":")" + mode + "\"}";
    const auto id = tm.create_task(req).id;
    tm.start_task(id);
    return *tm.wait_task(id, std::chrono::minutes(10));
  };
  auto field = [](const taskmgr::Task& t, const char* key) {
    boost::system::error_code ec;
    auto v = boost::json::parse(t.result, ec);
    if (ec) return std::string("?");
    const auto& page = v.at("pages").at(0);
    if (std::strcmp(key, "conf") == 0) {
      char b[16];
      std::snprintf(b, sizeof b, "%.0f", page.at("mean_confidence").to_number<double>());
      return std::string(b);
    }
    const auto& o = page.at("orientation");
    if (!o.at("checked").as_bool()) return std::string("-");
    char b[48];
    std::snprintf(b, sizeof b, "%d (%.1f)%s", static_cast<int>(o.at("angle").as_int64()),
                  o.at("confidence").to_number<double>(),
                  o.at("applied").as_bool() ? " turned" : "");
    return std::string(b);
  };
  run(pages[0].path, "always");  // warm
  std::printf("%-22s %5s %10s %9s %9s %9s %-16s %-16s\n", "page", "turn", "conf(off)", "CER off",
              "CER auto", "CER alw.", "auto: OSD", "always: OSD");
  for (const auto& p : pages) {
    for (int q = 0; q < 4; ++q) {
      if (q > 0 && p.path.find("large") != std::string::npos &&
          p.path.find("large0") == std::string::npos && p.path.find("large1") == std::string::npos)
        continue;  // two large pages turned are enough
      const std::string path = q == 0 ? p.path : turned_page(p.path, q, work);
      const auto off = run(path, "off"), autom = run(path, "auto"), always = run(path, "always");
      std::printf("%-22s %5d %10s %8.2f%% %8.2f%% %8.2f%% %-16s %-16s\n",
                  fs::path(p.path).stem().c_str(), q * 90, field(off, "conf").c_str(),
                  100 * taskmgr::character_error_rate(result_text(off), p.truth),
                  100 * taskmgr::character_error_rate(result_text(autom), p.truth),
                  100 * taskmgr::character_error_rate(result_text(always), p.truth),
                  field(autom, "osd").c_str(), field(always, "osd").c_str());
    }
  }
  // Cost on upright pages: each mode over the 6 pages, interleaved per run.
  const char* modes[] = {"off", "auto", "always"};
  std::map<std::string, std::vector<double>> secs, ratio;
  for (int r = 0; r < runs; ++r) {
    std::map<std::string, double> this_run;
    for (int k = 0; k < 3; ++k) {
      const std::string mode = modes[(k + r) % 3];  // rotate the order
      const auto t0 = Clock::now();
      for (const auto& p : pages) run(p.path, mode);
      this_run[mode] = seconds_since(t0);
      secs[mode].push_back(this_run[mode]);
    }
    for (const char* m : modes) ratio[m].push_back(this_run[m] / this_run["off"]);
    std::fprintf(stderr, "run %d: off %.2f s, auto %.2f s, always %.2f s\n", r + 1, this_run["off"],
                 this_run["auto"], this_run["always"]);
  }
  std::printf("\nupright pages (%zu per run), %d runs, medians:\n", pages.size(), runs);
  std::printf("%-8s %10s %14s %12s\n", "mode", "seconds", "ms per page", "x off");
  for (const char* m : modes) {
    std::printf("%-8s %10.2f %14.0f %12.3f\n", m, median(secs[m]),
                1000 * median(secs[m]) / static_cast<double>(pages.size()), median(ratio[m]));
  }
  return 0;
}

int run_priority(const fs::path& data, const fs::path& work, int backlog) {
  const fs::path db = work / "priority.db";
  for (const char* sfx : {"", "-wal", "-shm", ".lock"}) fs::remove(db.string() + sfx);
  auto config = taskmgr_config(db, taskmgr::QueueOrdering::kFifo);
  taskmgr::TaskManager tm(config);
  const std::string page = (data / "phototest.tif").string();
  std::vector<std::string> ids;
  for (int i = 0; i < backlog; ++i) {
    taskmgr::TaskCreateRequest req;
    req.input.path = page;
    ids.push_back(tm.create_task(req).id);
    tm.start_task(ids.back());
  }
  taskmgr::TaskCreateRequest req;
  req.input.path = page;
  req.priority = 10;
  const std::string urgent = tm.create_task(req).id;
  tm.start_task(urgent);
  const auto u = tm.wait_task(urgent, std::chrono::minutes(10));
  std::vector<double> page_times;
  std::size_t started_before = 0;
  for (const auto& id : ids) {
    const auto t = *tm.wait_task(id, std::chrono::minutes(10));
    page_times.push_back(std::chrono::duration<double>(*t.finished_at - *t.started_at).count());
    if (*t.started_at < *u->started_at) ++started_before;
  }
  const double wait = std::chrono::duration<double>(*u->started_at - *u->queued_at).count();
  const double page_time = median(page_times);
  std::printf(
      "priority: backlog of %d queued pages (FIFO among themselves), then one of priority 10\n",
      backlog);
  std::printf(
      "  it waited %.3f s to start; median page time %.3f s (%.2f page-times); "
      "%zu backlog pages started before it (those already running)\n",
      wait, page_time, wait / page_time, started_before);
  return wait <= page_time ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  fs::path data = "../shared/data/ocr", samples = "examples/taskmgr_ocr/samples";
  fs::path work = fs::temp_directory_path() / "taskmgr-bench-ocr";
  std::string python = "/usr/bin/python3", script = "bench/ocr_tesserocr.py";
  std::string cli = "build/release/examples/taskmgr_ocr/taskmgr-ocr";
  int runs = 3, backlog = 100;
  bool priority = false, unlimited = true, preprocess = false, orientation = false;
  bool small_only = false;
  double max_foreign = 0.25;
  std::string only;                   // run only these configurations (keys, comma-separated)
  std::vector<std::string> cli_args;  // clix: the program with these options too
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--data")
      data = next();
    else if (a == "--samples")
      samples = next();
    else if (a == "--work")
      work = next();
    else if (a == "--runs")
      runs = std::stoi(next());
    else if (a == "--python")
      python = next();
    else if (a == "--tesserocr")
      script = next();
    else if (a == "--backlog")
      backlog = std::stoi(next());
    else if (a == "--priority")
      priority = true;
    else if (a == "--preprocess")
      preprocess = true;
    else if (a == "--orientation")
      orientation = true;
    else if (a == "--skip-unlimited")
      unlimited = false;
    else if (a == "--only")
      only = "," + next() + ",";
    else if (a == "--cli")
      cli = next();
    else if (a == "--cli-args") {
      std::istringstream words(next());
      for (std::string w; words >> w;) cli_args.push_back(w);
    } else if (a == "--small")
      small_only = true;
    else if (a == "--max-foreign")
      max_foreign = std::stod(next());
    else {
      std::cerr << "unknown option " << a << "\n";
      return 2;
    }
  }
  fs::create_directories(work);
  if (priority) return run_priority(data, work, backlog);
  if (preprocess) return run_preprocess(data, samples, work);
  if (orientation) return run_orientation(data, samples, work, runs);

  const std::vector<Page> batch = make_batch(data, samples, work, small_only);
  std::printf("batch: %zu pages (", batch.size());
  for (const auto& p : batch)
    std::printf("%s", p.large ? "L" : (p.path.find("photo") != std::string::npos ? "p" : "e"));
  std::printf("; L = large 300 dpi page, p = phototest, e = eurotext), %d runs, medians\n", runs);

  struct Config {
    std::string key, name;
    std::function<Result()> run;
  };
  std::vector<Config> configs = {
      {"L", "physical limit: 2 x one warm engine alone", [&] { return run_limit(batch); }},
      {"a", "2 threads, own warm engines, shared list",
       [&] { return run_warm_threads(batch, true); }},
      {"b", "taskmgr, pool of 2, largest_first",
       [&] { return run_taskmgr(batch, work, taskmgr::QueueOrdering::kLargestFirst); }},
      {"bw", "taskmgr, pool of 2 worker processes, largest_first",
       [&] { return run_taskmgr(batch, work, taskmgr::QueueOrdering::kLargestFirst, 2, true); }},
      {"b'", "taskmgr, pool of 2, fifo",
       [&] { return run_taskmgr(batch, work, taskmgr::QueueOrdering::kFifo); }},
      {"b1", "taskmgr, 1 worker (x L: per-page overhead)",
       [&] { return run_taskmgr(batch, work, taskmgr::QueueOrdering::kFifo, 1); }},
      {"c", "fresh engine per page, 2 threads", [&] { return run_fresh_engines(batch); }},
      {"d", "tesseract command per page, 2 at a time", [&] { return run_cli(batch, work); }},
      {"e", "python3-tesserocr, thread pool of 2",
       [&] { return run_python(batch, work, python, script); }},
      {"Ld", "limit, CLI's OCR defaults: 2 x taskmgr 1 worker",
       [&] { return run_taskmgr_defaults(batch, work); }},
      {"cli", "taskmgr-ocr, its defaults: process wall time",
       [&] { return run_taskmgr_ocr(cli, work / "cli-pages", batch.size(), work); }},
      {"clix", "taskmgr-ocr with --cli-args: process wall time",
       [&] { return run_taskmgr_ocr(cli, work / "cli-pages", batch.size(), work, cli_args); }},
      {"cli0", "taskmgr-ocr on an empty folder (fixed cost)",
       [&] { return run_taskmgr_ocr(cli, work / "cli-empty", 0, work); }},
  };
  if (!only.empty()) {
    configs.erase(std::remove_if(configs.begin(), configs.end(),
                                 [&](const Config& c) {
                                   return c.key != "L" &&
                                          only.find("," + c.key + ",") == std::string::npos;
                                 }),
                  configs.end());
    if (only.find(",u,") == std::string::npos) unlimited = false;
  }
  const bool with_cli = std::any_of(configs.begin(), configs.end(), [](const Config& c) {
    return c.key == "cli" || c.key == "clix" || c.key == "cli0";
  });
  if (with_cli) {
    if (!fs::exists(cli)) {
      std::cerr << "no taskmgr-ocr at " << cli << " (--cli PATH)\n";
      return 2;
    }
    cli = fs::absolute(cli).string();
    cli_folder(batch, work);
    fs::remove_all(work / "cli-empty");
    fs::create_directories(work / "cli-empty");
  }
  std::map<std::string, std::vector<double>> secs;
  std::map<std::string, double> cer;
  std::vector<double> foreign_kept, foreign_dropped;
  int attempts = 0;
  for (int run = 1; run <= runs;) {
    // A run whose set shared the cores with other processes (more than
    // --max-foreign cores on average) is dropped and run again.
    std::map<std::string, double> this_run;
    const CpuTicks before = cpu_ticks();
    const auto t0 = Clock::now();
    for (const auto& c : configs) {
      Result r = c.run();
      if (r.seconds <= 0) {
        std::fprintf(stderr, "%s failed\n", c.key.c_str());
        return 1;
      }
      this_run[c.key] = r.seconds;
      if (c.key == "cli" || c.key == "clix") this_run[c.key + "-b"] = r.batch_seconds;
      if (!r.texts.empty()) cer[c.key] = mean_cer(batch, r.texts);
      std::fprintf(stderr, "run %d %-4s %.2f s", run, c.key.c_str(), r.seconds);
      if (c.key == "cli" || c.key == "clix")
        std::fprintf(stderr, " (batch %.2f s)", r.batch_seconds);
      std::fprintf(stderr, "\n");
    }
    const double foreign = foreign_cores(before, cpu_ticks(), seconds_since(t0));
    ++attempts;
    if (max_foreign > 0 && foreign > max_foreign && attempts < 4 * runs) {
      std::fprintf(stderr, "run %d dropped: other processes used %.2f cores\n", run, foreign);
      foreign_dropped.push_back(foreign);
      continue;
    }
    std::fprintf(stderr, "run %d: other processes used %.2f cores\n", run, foreign);
    foreign_kept.push_back(foreign);
    for (const auto& [key, x] : this_run) secs[key].push_back(x);
    ++run;
  }
  if (unlimited) {  // slow: once
    Result r = run_warm_threads(batch, false);
    secs["u"].push_back(r.seconds);
    cer["u"] = mean_cer(batch, r.texts);
    configs.push_back({"u", "as (a), OpenMP unlimited (once)", nullptr});
  }
  const double n = static_cast<double>(batch.size());
  const double limit = 2 * n / median(secs["L"]);
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& c : configs) {
    rows.emplace_back(c.key, c.name);
    if (c.key == "cli")
      rows.emplace_back("cli-b", "taskmgr-ocr, its defaults: batch time it reports");
    if (c.key == "clix")
      rows.emplace_back("clix-b", "taskmgr-ocr with --cli-args: batch time it reports");
  }
  // b1 and Ld run one worker: compare them with one engine alone (L / 2).
  auto one_worker = [](const std::string& key) { return key == "b1" || key == "Ld"; };
  std::printf("\n%-5s %-50s %8s %8s %7s %9s %8s\n", "", "configuration", "seconds", "pages/s",
              "x L", "x L/run", "mean CER");
  for (const auto& [key, name] : rows) {
    const std::vector<double>& v = secs[key];
    const double s = median(v);
    std::printf("%-5s %-50s %8.2f", key.c_str(), name.c_str(), key == "L" ? s / 2 : s);
    if (key == "cli0") {
      std::printf(" %8s %7s %9s %8s\n", "-", "-", "-", "-");
      continue;
    }
    const double rate = key == "L" ? limit : one_worker(key) ? 2 * n / s : n / s;
    // The median of each run's ratio to the L of the same run.
    std::vector<double> per_run;
    for (std::size_t i = 0; key != "u" && i < v.size() && i < secs["L"].size(); ++i) {
      per_run.push_back(secs["L"][i] / 2 / (key == "L" || one_worker(key) ? v[i] / 2 : v[i]));
    }
    char run_ratio[16] = "-", cer_text[16] = "-";
    if (!per_run.empty()) std::snprintf(run_ratio, sizeof run_ratio, "%.3f", median(per_run));
    if (cer.count(key)) std::snprintf(cer_text, sizeof cer_text, "%.2f%%", 100 * cer[key]);
    std::printf(" %8.3f %7.3f %9s %8s\n", rate, rate / limit, run_ratio, cer_text);
  }
  std::printf(
      "\n(L's seconds: one engine's batch time / 2, the time two never-idle cores would take;"
      "\n x L: from the medians of the seconds; x L/run: the median of each run's ratio to L)\n");
  std::printf("\nper-run seconds (L: one engine, not halved):\n");
  for (const auto& [key, name] : rows) {
    std::printf("  %-5s", key.c_str());
    for (double x : secs[key]) std::printf(" %.2f", x);
    std::printf("\n");
  }
  std::printf("\ncores used by other processes during each kept run:");
  for (double x : foreign_kept) std::printf(" %.2f", x);
  std::printf("\nruns dropped (over --max-foreign %.2f): %zu", max_foreign, foreign_dropped.size());
  for (double x : foreign_dropped) std::printf(" %.2f", x);
  std::printf("\n");
  if (secs.count("cli")) {
    std::vector<double> fixed;
    for (std::size_t i = 0; i < secs["cli"].size(); ++i)
      fixed.push_back(secs["cli"][i] - secs["cli-b"][i]);
    std::printf("\ncli wall - batch (the program's time outside its batch), median %.2f s:",
                median(fixed));
    for (double x : fixed) std::printf(" %.2f", x);
    std::printf("\n");
  }
  return 0;
}
