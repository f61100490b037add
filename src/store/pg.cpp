// The libpq layer of the PostgreSQL store (pg.hpp).
#include "pg.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "../utf8.hpp"

namespace taskmgr::detail::pg {
namespace {

// Server messages on one line, without the trailing newline.
std::string tidy(std::string s) {
  for (char& c : s) {
    if (c == '\n' || c == '\t' || c == '\r') c = ' ';
  }
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// A DETAIL may quote a whole row ("Failing row contains (...)"): its start
// says enough.
std::string shorten(std::string s, std::size_t max = 240) {
  if (s.size() <= max) return s;
  s.resize(max);
  return to_valid_utf8(s) + "...";
}

bool starts_with(const std::string& s, const char* prefix) {
  return s.compare(0, std::strlen(prefix), prefix) == 0;
}

ErrorCode code_of(const std::string& sqlstate, bool lost) {
  if (lost) return ErrorCode::kIoError;
  if (sqlstate == "40001" || sqlstate == "40P01" || sqlstate == "55P03") return ErrorCode::kBusy;
  if (sqlstate == "57014") return ErrorCode::kTimeout;  // statement timeout, or cancelled
  if (sqlstate == "53200") return ErrorCode::kOutOfMemory;
  if (sqlstate == "23505") return ErrorCode::kInvalidState;  // exists already
  return ErrorCode::kIoError;
}

// Waits until the socket can be read (and, with `write`, written), then
// reads what arrived into libpq's buffer.
void wait_socket(PGconn* c, bool write) {
  const int fd = PQsocket(c);
  if (fd < 0) throw error_of(c, nullptr);
  pollfd p{fd, static_cast<short>(POLLIN | (write ? POLLOUT : 0)), 0};
  int r = 0;
  do {
    r = ::poll(&p, 1, -1);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    throw PgError(ErrorCode::kIoError, "", true,
                  std::string("waiting for the server failed: ") + std::strerror(errno));
  }
  if ((p.revents & (POLLIN | POLLERR | POLLHUP)) != 0 && PQconsumeInput(c) == 0) {
    throw error_of(c, nullptr);
  }
}

// Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian).
std::int64_t days_from_civil(std::int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

void civil_from_days(std::int64_t z, std::int64_t& y, unsigned& m, unsigned& d) {
  z += 719468;
  const std::int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const auto doe = static_cast<unsigned>(z - era * 146097);
  const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  y = static_cast<std::int64_t>(yoe) + era * 400;
  const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const unsigned mp = (5 * doy + 2) / 153;
  d = doy - (153 * mp + 2) / 5 + 1;
  m = mp < 10 ? mp + 3 : mp - 9;
  y += m <= 2;
}

constexpr std::int64_t kMicrosPerDay = 86'400'000'000;

}  // namespace

PgError error_of(PGconn* conn, const PGresult* r, const std::string& context) {
  std::string state, msg;
  if (r != nullptr) {
    if (const char* s = PQresultErrorField(r, PG_DIAG_SQLSTATE)) state = s;
    if (const char* primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY)) {
      msg = primary;
      if (const char* detail = PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL)) {
        msg += " (" + shorten(tidy(detail)) + ")";
      }
    } else {
      msg = PQresultErrorMessage(r);
    }
  }
  if (msg.empty() && conn != nullptr) msg = PQerrorMessage(conn);
  msg = tidy(to_valid_utf8(msg));
  if (msg.empty()) msg = "unknown error";
  // No SQLSTATE: libpq's own failure, not the server's answer (a socket the
  // server closed reads "server closed the connection unexpectedly" while
  // the connection's status may still say OK until the next read): a new
  // connection may succeed.
  const bool lost = conn == nullptr || PQstatus(conn) == CONNECTION_BAD || state.empty() ||
                    starts_with(state, "08") || state == "57P01" || state == "57P02" ||
                    state == "57P03";
  return PgError(code_of(state, lost), state, lost, context.empty() ? msg : context + ": " + msg);
}

std::optional<std::string> conninfo_problem(const std::string& conninfo) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (opts != nullptr) {
    PQconninfoFree(opts);
    return std::nullopt;
  }
  const std::string raw = err != nullptr ? tidy(err) : "out of memory";
  if (err != nullptr) PQfreemem(err);
  // libpq quotes what it found ("invalid integer value "x" for connection
  // option "port""): keep option names and single characters, hide the rest.
  std::set<std::string> keywords;
  if (PQconninfoOption* d = PQconndefaults()) {
    for (PQconninfoOption* o = d; o->keyword != nullptr; ++o) keywords.insert(o->keyword);
    PQconninfoFree(d);
  }
  std::string out;
  std::size_t pos = 0;
  for (;;) {
    const std::size_t open = raw.find('"', pos);
    const std::size_t close = open == std::string::npos ? open : raw.find('"', open + 1);
    if (close == std::string::npos) {
      out.append(raw, pos, std::string::npos);
      break;
    }
    const std::string quoted = raw.substr(open + 1, close - open - 1);
    out.append(raw, pos, open - pos);
    out += '"' + (quoted.size() <= 1 || keywords.count(quoted) != 0 ? quoted : "...") + '"';
    pos = close + 1;
  }
  return to_valid_utf8(out);
}

// ---- Params ------------------------------------------------------------------

Params& Params::text(const std::string& s) {
  Slot slot;
  slot.owned = storable_text(s);
  slots_.push_back(std::move(slot));
  return *this;
}

Params& Params::opt_text(const std::optional<std::string>& s) { return s ? text(*s) : null(); }

Params& Params::text_or_null(const std::string& s) { return s.empty() ? null() : text(s); }

Params& Params::jsonb(const std::string& s) {
  Slot slot;
  slot.owned = storable_text(storable_json(s));
  slots_.push_back(std::move(slot));
  return *this;
}

Params& Params::integer(std::int64_t v) {
  Slot slot;
  slot.owned = std::to_string(v);
  slots_.push_back(std::move(slot));
  return *this;
}

Params& Params::opt_integer(const std::optional<std::int64_t>& v) {
  return v ? integer(*v) : null();
}

Params& Params::boolean(bool v) {
  Slot slot;
  slot.owned = v ? "true" : "false";
  slots_.push_back(std::move(slot));
  return *this;
}

Params& Params::timestamp(Timestamp t) {
  Slot slot;
  slot.owned = format_timestamp(t);
  slots_.push_back(std::move(slot));
  return *this;
}

Params& Params::opt_timestamp(const std::optional<Timestamp>& t) {
  return t ? timestamp(*t) : null();
}

Params& Params::bytes(const std::vector<std::uint8_t>& b) {
  if (b.empty()) return null();
  Slot slot;
  slot.borrowed = reinterpret_cast<const char*>(b.data());
  slot.length = static_cast<int>(b.size());
  slot.format = 1;
  slots_.push_back(std::move(slot));
  return *this;
}

Params& Params::null() {
  Slot slot;
  slot.is_null = true;
  slots_.push_back(std::move(slot));
  return *this;
}

void Params::finish() {
  values_.clear();
  lengths_.clear();
  formats_.clear();
  for (const Slot& s : slots_) {
    values_.push_back(s.is_null ? nullptr : s.borrowed != nullptr ? s.borrowed : s.owned.c_str());
    lengths_.push_back(s.borrowed != nullptr ? s.length : static_cast<int>(s.owned.size()));
    formats_.push_back(s.format);
  }
}

// (Called in any order as a call's arguments: each brings the arrays up to date.)
const char* const* Params::values() {
  if (values_.size() != slots_.size()) finish();
  return values_.empty() ? nullptr : values_.data();
}
const int* Params::lengths() {
  if (lengths_.size() != slots_.size()) finish();
  return lengths_.empty() ? nullptr : lengths_.data();
}
const int* Params::formats() {
  if (formats_.size() != slots_.size()) finish();
  return formats_.empty() ? nullptr : formats_.data();
}

// ---- Conn --------------------------------------------------------------------

Conn::Conn(const std::string& conninfo, int connect_timeout_seconds, const std::string& setup) {
  // Earlier entries are defaults the connection string may override; later
  // ones override it (libpq reads the arrays in order; dbname is expanded).
  const std::string timeout = std::to_string(std::max(2, connect_timeout_seconds));
  // Names this process in pg_stat_activity (and in a busy store's message).
  const std::string app = "taskmgr pid " + std::to_string(::getpid());
  const char* keys[] = {
      "connect_timeout", "keepalives_idle",           "keepalives_interval", "keepalives_count",
      "dbname",          "fallback_application_name", "client_encoding",     nullptr};
  const char* values[] = {timeout.c_str(),  "30",        "10",   "3",
                          conninfo.c_str(), app.c_str(), "UTF8", nullptr};
  conn_ = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
  if (conn_ == nullptr) throw PgError(ErrorCode::kOutOfMemory, "", true, "out of memory");
  if (PQstatus(conn_) != CONNECTION_OK) {
    PgError e = error_of(conn_, nullptr);
    PQfinish(conn_);
    conn_ = nullptr;
    throw PgError(ErrorCode::kIoError, e.sqlstate(), true, e.what());
  }
  // Notices (e.g. "schema ... already exists, skipping") would go to stderr.
  PQsetNoticeProcessor(
      conn_, [](void*, const char*) {}, nullptr);
  try {
    if (!setup.empty()) exec_script(setup);
  } catch (...) {
    PQfinish(conn_);
    conn_ = nullptr;
    throw;
  }
}

Conn::~Conn() {
  if (conn_ != nullptr) PQfinish(conn_);
}

std::string Conn::describe() const {
  const std::string host = PQhost(conn_) != nullptr ? PQhost(conn_) : "";
  const std::string port = PQport(conn_) != nullptr ? PQport(conn_) : "";
  const std::string db = PQdb(conn_) != nullptr ? PQdb(conn_) : "";
  if (!host.empty() && host[0] == '/') {
    return "postgresql:///" + db + "?host=" + host +
           (port.empty() || port == "5432" ? "" : "&port=" + port);
  }
  return "postgresql://" + host + (port.empty() || port == "5432" ? "" : ":" + port) + "/" + db;
}

void Conn::exec_script(const std::string& sql) {
  Result r(PQexec(conn_, sql.c_str()));
  const auto st = PQresultStatus(r.get());
  if (r == nullptr || (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)) {
    throw error_of(conn_, r.get());
  }
}

Result Conn::exec(const std::string& sql) {
  Params none;
  return exec(sql, none);
}

Result Conn::exec(const std::string& sql, Params& p) {
  Result r(
      PQexecParams(conn_, sql.c_str(), p.size(), nullptr, p.values(), p.lengths(), p.formats(), 0));
  const auto st = PQresultStatus(r.get());
  if (r == nullptr || (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)) {
    throw error_of(conn_, r.get());
  }
  return r;
}

void Conn::prepare(const std::string& name, const std::string& sql) {
  if (prepared_.count(name) != 0) return;
  Result r(PQprepare(conn_, name.c_str(), sql.c_str(), 0, nullptr));
  if (r == nullptr || PQresultStatus(r.get()) != PGRES_COMMAND_OK) {
    throw error_of(conn_, r.get(), "preparing " + name);
  }
  prepared_.insert(name);
}

Result Conn::exec_prepared(const std::string& name, const std::string& sql, Params& p) {
  prepare(name, sql);
  Result r(PQexecPrepared(conn_, name.c_str(), p.size(), p.values(), p.lengths(), p.formats(), 0));
  const auto st = PQresultStatus(r.get());
  if (r == nullptr || (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)) {
    throw error_of(conn_, r.get());
  }
  return r;
}

// ---- Pipeline ----------------------------------------------------------------

Pipeline::Pipeline(Conn& conn) : conn_(conn) {
  if (PQsetnonblocking(conn_.get(), 1) != 0 || PQenterPipelineMode(conn_.get()) != 1) {
    throw error_of(conn_.get(), nullptr, "cannot start a pipeline");
  }
  active_ = true;
}

Pipeline::~Pipeline() {
  // After an exception the connection is in the middle of the protocol:
  // its owner drops it. Nothing to do here then.
}

void Pipeline::send(const std::string& sql) {
  if (PQsendQueryParams(conn_.get(), sql.c_str(), 0, nullptr, nullptr, nullptr, nullptr, 0) != 1) {
    throw error_of(conn_.get(), nullptr);
  }
}

void Pipeline::send_prepared(const std::string& name, Params& p) {
  if (PQsendQueryPrepared(conn_.get(), name.c_str(), p.size(), p.values(), p.lengths(), p.formats(),
                          0) != 1) {
    throw error_of(conn_.get(), nullptr);
  }
  // Send as we go (without waiting): a large transaction does not pile up
  // in memory, and the server starts on it at once.
  const int r = PQflush(conn_.get());
  if (r < 0) throw error_of(conn_.get(), nullptr);
  if (r > 0 && PQconsumeInput(conn_.get()) == 0) throw error_of(conn_.get(), nullptr);
}

void Pipeline::sync() {
  if (PQpipelineSync(conn_.get()) != 1) throw error_of(conn_.get(), nullptr);
}

void Pipeline::flush_request() {
  if (PQsendFlushRequest(conn_.get()) != 1) throw error_of(conn_.get(), nullptr);
}

void Pipeline::flush() {
  for (;;) {
    const int r = PQflush(conn_.get());
    if (r == 0) return;
    if (r < 0) throw error_of(conn_.get(), nullptr);
    wait_socket(conn_.get(), /*write=*/true);
  }
}

PGresult* Pipeline::next_raw() {
  for (;;) {
    const int f = PQflush(conn_.get());
    if (f < 0) throw error_of(conn_.get(), nullptr);
    if (PQisBusy(conn_.get()) == 0) return PQgetResult(conn_.get());
    wait_socket(conn_.get(), /*write=*/f > 0);
  }
}

Result Pipeline::result() {
  Result r(next_raw());
  if (r == nullptr || conn_.broken()) throw error_of(conn_.get(), r.get());
  // Each statement's results end with a null.
  Result end(next_raw());
  if (end != nullptr) {
    throw PgError(ErrorCode::kInternal, "", true, "unexpected extra result in a pipeline");
  }
  return r;
}

void Pipeline::expect_sync() {
  Result r(next_raw());
  if (r == nullptr || PQresultStatus(r.get()) != PGRES_PIPELINE_SYNC) {
    if (conn_.broken()) throw error_of(conn_.get(), r.get());
    throw PgError(ErrorCode::kInternal, "", true, "pipeline out of step (no sync point)");
  }
}

void Pipeline::end() {
  if (!active_) return;
  if (PQexitPipelineMode(conn_.get()) != 1 || PQsetnonblocking(conn_.get(), 0) != 0) {
    throw error_of(conn_.get(), nullptr, "cannot end a pipeline");
  }
  active_ = false;
}

// ---- conversions -------------------------------------------------------------

std::string quote_ident(std::string_view name) {
  std::string out = "\"";
  for (char c : name) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

Timestamp to_stored(Timestamp t) {
  return std::chrono::time_point_cast<Timestamp::duration>(
      std::chrono::floor<std::chrono::microseconds>(t));
}

std::string format_timestamp(Timestamp t) {
  const std::int64_t us =
      std::chrono::floor<std::chrono::microseconds>(t).time_since_epoch().count();
  std::int64_t days = us / kMicrosPerDay;
  std::int64_t rem = us % kMicrosPerDay;
  if (rem < 0) {
    rem += kMicrosPerDay;
    --days;
  }
  std::int64_t y = 0;
  unsigned m = 0, d = 0;
  civil_from_days(days, y, m, d);
  const auto secs = rem / 1'000'000;
  char buf[48];
  std::snprintf(buf, sizeof buf, "%04lld-%02u-%02u %02lld:%02lld:%02lld.%06lld",
                static_cast<long long>(y), m, d, static_cast<long long>(secs / 3600),
                static_cast<long long>(secs / 60 % 60), static_cast<long long>(secs % 60),
                static_cast<long long>(rem % 1'000'000));
  return buf;
}

std::optional<Timestamp> parse_timestamp(std::string_view s) {
  // YYYY-MM-DD HH:MM:SS[.f{1,6}]
  auto digits = [&](std::size_t at, std::size_t n, std::int64_t& out) {
    if (at + n > s.size()) return false;
    out = 0;
    for (std::size_t i = at; i < at + n; ++i) {
      if (s[i] < '0' || s[i] > '9') return false;
      out = out * 10 + (s[i] - '0');
    }
    return true;
  };
  std::int64_t y, mo, d, h, mi, sec;
  if (s.size() < 19 || !digits(0, 4, y) || s[4] != '-' || !digits(5, 2, mo) || s[7] != '-' ||
      !digits(8, 2, d) || s[10] != ' ' || !digits(11, 2, h) || s[13] != ':' || !digits(14, 2, mi) ||
      s[16] != ':' || !digits(17, 2, sec)) {
    return std::nullopt;
  }
  std::int64_t us = 0;
  std::size_t pos = 19;
  if (pos < s.size()) {
    if (s[pos] != '.') return std::nullopt;
    ++pos;
    const std::size_t n = s.size() - pos;
    if (n == 0 || n > 6 || !digits(pos, n, us)) return std::nullopt;
    for (std::size_t i = n; i < 6; ++i) us *= 10;
  }
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 59) return std::nullopt;
  const std::int64_t days = days_from_civil(y, static_cast<unsigned>(mo), static_cast<unsigned>(d));
  const std::int64_t total = days * kMicrosPerDay + ((h * 60 + mi) * 60 + sec) * 1'000'000 + us;
  return Timestamp(
      std::chrono::duration_cast<Timestamp::duration>(std::chrono::microseconds(total)));
}

std::optional<std::vector<std::uint8_t>> parse_bytea(std::string_view s) {
  if (s.size() < 2 || s[0] != '\\' || s[1] != 'x' || s.size() % 2 != 0) return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::vector<std::uint8_t> out;
  out.reserve((s.size() - 2) / 2);
  for (std::size_t i = 2; i < s.size(); i += 2) {
    const int hi = nibble(s[i]), lo = nibble(s[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out.push_back(static_cast<std::uint8_t>(hi * 16 + lo));
  }
  return out;
}

std::string compact_jsonb(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      out += c;
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
      out += c;
    } else if (c != ' ' && c != '\n' && c != '\t' && c != '\r') {
      out += c;
    }
  }
  return out;
}

std::string storable_text(std::string_view s) {
  if (s.find('\0') == std::string_view::npos && !invalid_utf8_at(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (char c : s) {
    if (c == '\0') {
      out += "\xEF\xBF\xBD";  // U+FFFD
    } else {
      out += c;
    }
  }
  return to_valid_utf8(out);
}

std::string storable_json(std::string_view s) {
  if (s.find("\\u0000") == std::string_view::npos) return std::string(s);
  std::string out;
  out.reserve(s.size());
  bool in_string = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (!in_string) {
      in_string = c == '"';
      out += c;
    } else if (c == '\\' && i + 1 < s.size()) {
      if (s.compare(i, 6, "\\u0000") == 0) {
        out += "\\ufffd";
        i += 5;
      } else {
        out += c;
        out += s[++i];
      }
    } else {
      in_string = c != '"';
      out += c;
    }
  }
  return out;
}

}  // namespace taskmgr::detail::pg
