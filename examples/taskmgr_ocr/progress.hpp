// taskmgr-ocr: the progress display.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

namespace ocrcli {

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
    std::cout << text << "\n" << std::flush;  // a kill loses no line already printed
  }

  // `ended` tasks of this run have ended (pages done before count as done).
  void draw(std::size_t ended) {
    if (!bar_) return;
    const std::size_t done = std::min(total_, base_ + ended);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
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

}  // namespace ocrcli
