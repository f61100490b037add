// Private: the protocol between the host and a worker process (a pooled
// service instance in a child process, taskmgr-worker).
//
// One AF_UNIX stream socket (a socketpair) per worker. A frame is a 4-byte
// little-endian length N, then N bytes: one type byte and a JSON payload
// (at most kMaxFrame bytes; its strings are bytes: invalid UTF-8 is written
// raw and read back unchanged). A frame may carry one file descriptor
// (SCM_RIGHTS, sent with its first byte): a task's input bytes travel in a
// sealed memfd that the worker maps, never through the socket.
//
// host -> worker: kInit (once), kTask, kCancel.
// worker -> host: kReady or kInitFailed (once), then per task kAccepted, any
// number of kStage and kMemory, and one kDone.
//
// Compiled into both the library (the host side) and taskmgr-worker: no
// exported symbols, no dependency beyond POSIX and Boost.JSON.
#pragma once

#include <boost/json.hpp>
#include <cstdint>
#include <string>

namespace taskmgr::worker {

enum class Msg : std::uint8_t {
  kInit = 1,         // {kind, device, library, config_yaml, memory_limit_mb}
  kTask = 2,         // {id, service, options, batch_size, attempt, device, instance,
                     //  estimate_mb, seconds_left, temp_dir, input_path, input_size} (+ memfd)
  kCancel = 3,       // {}: the task was cancelled or ran past its deadline
  kReady = 10,       // {pid, memory_limit}
  kInitFailed = 11,  // {message}
  kStage = 12,       // {name, rss_mb}
  kMemory = 13,      // {rss_mb, reported_mb}
  kDone = 14,        // {result | error{reason, message, retryable, oom, broken}, peak_mb, healthy}
  kAccepted = 15,    // {id}: the worker took the task (a death before is not the task's)
};

inline constexpr std::uint32_t kMaxFrame = 1u << 30;

// A worker's own exit statuses, which the host names.
inline constexpr int kExitProtocol = 70;    // a frame from the host was not the protocol
inline constexpr int kExitLostSocket = 71;  // its socket was closed or broke inside the worker

struct Frame {
  Msg type{};
  boost::json::object body;
  int fd = -1;  // a received descriptor (the receiver owns it), or -1
};

// Writes one frame (and `fd`, when >= 0) whole, retrying on EINTR and short
// writes. Throws std::system_error when the peer is gone (EPIPE: no
// SIGPIPE, the socket is written with MSG_NOSIGNAL).
void send_frame(int sock, Msg type, const boost::json::object& body, int fd = -1);

enum class Read { kFrame, kTimeout, kClosed };

// Waits up to `timeout_ms` (-1: forever) for a frame to start, then reads
// it whole. kClosed: the peer closed the socket or died (also mid-frame).
// Throws std::runtime_error on a frame that is not the protocol (too long,
// not JSON), which means the peer is broken.
Read recv_frame(int sock, int timeout_ms, Frame& out);

// A memfd holding `n` bytes copied from `data`, sealed against writes and
// resizing; -1 with errno set on failure.
int make_sealed_memfd(const char* name, const void* data, std::size_t n);

// The resident set of this process now and its peak since the last reset
// (VmRSS and VmHWM of /proc/self/status), in MB rounded up; -1 unknown.
std::int64_t self_rss_mb();
std::int64_t self_peak_rss_mb();
// Resets VmHWM to the current RSS (/proc/self/clear_refs, 5): false when
// the kernel refuses it.
bool reset_peak_rss();
// VmHWM or VmRSS (`field`) of another process, in kB; -1 unknown.
std::int64_t proc_status_kb(int pid, const char* field);

}  // namespace taskmgr::worker
