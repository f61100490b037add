#include "worker/protocol.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <system_error>

namespace taskmgr::worker {

namespace json = boost::json;

namespace {

void write_all(int sock, const char* p, std::size_t n, int fd) {
  bool fd_sent = fd < 0;
  while (n > 0) {
    ssize_t w;
    if (!fd_sent) {
      iovec iov{const_cast<char*>(p), n};
      alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int))] = {};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = ctrl;
      msg.msg_controllen = sizeof ctrl;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
      w = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
      if (w > 0) fd_sent = true;
    } else {
      w = ::send(sock, p, n, MSG_NOSIGNAL);
    }
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::generic_category(), "writing to the worker socket");
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

// Reads exactly n bytes; false on EOF or a reset connection. The first
// read takes a descriptor sent with the frame, if any.
bool read_all(int sock, char* p, std::size_t n, int* fd) {
  while (n > 0) {
    ssize_t r;
    if (fd != nullptr) {
      iovec iov{p, n};
      alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int))] = {};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = ctrl;
      msg.msg_controllen = sizeof ctrl;
      r = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
      if (r > 0) {
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
          if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
              c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            std::memcpy(fd, CMSG_DATA(c), sizeof(int));
          }
        }
        fd = nullptr;
      }
    } else {
      r = ::recv(sock, p, n, 0);
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == ECONNRESET) return false;
      throw std::system_error(errno, std::generic_category(), "reading the worker socket");
    }
    if (r == 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

std::int64_t status_kb(const char* path, const char* field) {
  std::ifstream in(path);
  std::string line;
  const std::size_t len = std::strlen(field);
  while (std::getline(in, line)) {
    if (line.compare(0, len, field) == 0 && line.size() > len && line[len] == ':') {
      return std::strtoll(line.c_str() + len + 1, nullptr, 10);
    }
  }
  return -1;
}

std::int64_t kb_to_mb(std::int64_t kb) { return kb < 0 ? -1 : (kb + 1023) / 1024; }

}  // namespace

void send_frame(int sock, Msg type, const json::object& body, int fd) {
  const std::string payload = json::serialize(body);
  if (payload.size() + 1 > kMaxFrame) throw std::length_error("worker frame over 1 GiB");
  const auto n = static_cast<std::uint32_t>(payload.size() + 1);
  std::string frame;
  frame.reserve(payload.size() + 5);
  for (int i = 0; i < 4; ++i) frame += static_cast<char>((n >> (8 * i)) & 0xFF);
  frame += static_cast<char>(type);
  frame += payload;
  write_all(sock, frame.data(), frame.size(), fd);
}

Read recv_frame(int sock, int timeout_ms, Frame& out) {
  pollfd p{sock, POLLIN, 0};
  for (;;) {
    const int r = ::poll(&p, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw std::system_error(errno, std::generic_category(), "poll on the worker socket");
    if (r == 0) return Read::kTimeout;
    break;
  }
  unsigned char head[5];
  int fd = -1;
  if (!read_all(sock, reinterpret_cast<char*>(head), sizeof head, &fd)) {
    if (fd >= 0) ::close(fd);
    return Read::kClosed;
  }
  const std::uint32_t n =
      static_cast<std::uint32_t>(head[0]) | (static_cast<std::uint32_t>(head[1]) << 8) |
      (static_cast<std::uint32_t>(head[2]) << 16) | (static_cast<std::uint32_t>(head[3]) << 24);
  if (n == 0 || n > kMaxFrame) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("worker protocol: a frame of " + std::to_string(n) + " bytes");
  }
  std::string payload(n - 1, '\0');
  if (!read_all(sock, payload.data(), payload.size(), nullptr)) {
    if (fd >= 0) ::close(fd);
    return Read::kClosed;
  }
  // Strings are bytes here: a service's message or result that is not
  // UTF-8 must reach the host as it was (and be judged there as it would be
  // in process), so invalid UTF-8 is read back as written (the serializer
  // writes such bytes raw).
  boost::system::error_code ec;
  json::parse_options opts;
  opts.allow_invalid_utf8 = true;
  json::value v = json::parse(payload, ec, {}, opts);
  if (ec || !v.is_object()) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("worker protocol: a frame that is not a JSON object");
  }
  out.type = static_cast<Msg>(head[4]);
  out.body = std::move(v.as_object());
  out.fd = fd;
  return Read::kFrame;
}

int make_sealed_memfd(const char* name, const void* data, std::size_t n) {
  const int fd = ::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -1;
  const char* p = static_cast<const char*>(data);
  std::size_t left = n;
  while (left > 0) {
    const ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      errno = e;
      return -1;
    }
    p += w;
    left -= static_cast<std::size_t>(w);
  }
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0) {
    const int e = errno;
    ::close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

std::int64_t self_rss_mb() { return kb_to_mb(status_kb("/proc/self/status", "VmRSS")); }
std::int64_t self_peak_rss_mb() { return kb_to_mb(status_kb("/proc/self/status", "VmHWM")); }

bool reset_peak_rss() {
  const int fd = ::open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, "5", 1) == 1;
  ::close(fd);
  return ok;
}

std::int64_t proc_status_kb(int pid, const char* field) {
  const std::string path = "/proc/" + std::to_string(pid) + "/status";
  return status_kb(path.c_str(), field);
}

}  // namespace taskmgr::worker
