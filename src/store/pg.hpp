// Private to the PostgreSQL store: a thin layer over libpq. A connection
// (Conn) with its session settings and its prepared statements, results
// that free themselves, parameters with their formats, errors with their
// SQLSTATE, pipelines (many statements sent before any result is read), and
// the conversions of our values to and from PostgreSQL's text formats.
// libpq's types stay in src/: no public header includes <libpq-fe.h>.
#pragma once

#include <libpq-fe.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "taskmgr/error.hpp"
#include "taskmgr/task.hpp"

namespace taskmgr::detail::pg {

// A failure of the database or of the connection to it.
class PgError : public Error {
 public:
  PgError(ErrorCode code, std::string sqlstate, bool connection_lost, const std::string& message)
      : Error(code, message), sqlstate_(std::move(sqlstate)), connection_lost_(connection_lost) {}
  // "23505", ...; "" when the failure is the client's (no server answer).
  const std::string& sqlstate() const noexcept { return sqlstate_; }
  // The connection is gone (or unusable): a new one may succeed.
  bool connection_lost() const noexcept { return connection_lost_; }
  // A serialization failure or a deadlock: the transaction may be run again.
  bool transaction_conflict() const noexcept {
    return sqlstate_ == "40001" || sqlstate_ == "40P01";
  }
  // The database refused the data (class 22: a value it cannot hold; class
  // 23: a constraint): running the same statement again cannot succeed.
  bool data_refused() const noexcept {
    return sqlstate_.size() == 5 &&
           (sqlstate_.compare(0, 2, "22") == 0 || sqlstate_.compare(0, 2, "23") == 0);
  }

 private:
  std::string sqlstate_;
  bool connection_lost_;
};

struct ResultDeleter {
  void operator()(PGresult* r) const noexcept { PQclear(r); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

// Statement parameters. Text values are passed as PostgreSQL text: a NUL
// byte or invalid UTF-8 (which a text column cannot hold) becomes U+FFFD.
// Values are copied or borrowed: a borrowed one (bytes) must outlive the
// statement's sending.
class Params {
 public:
  Params& text(const std::string& s);
  Params& opt_text(const std::optional<std::string>& s);
  Params& text_or_null(const std::string& s);  // "" = NULL
  // A JSON document for a JSONB column: as text(), and the escape \u0000
  // (which JSONB cannot hold) becomes \ufffd.
  Params& jsonb(const std::string& s);
  Params& integer(std::int64_t v);
  Params& opt_integer(const std::optional<std::int64_t>& v);
  Params& boolean(bool v);
  Params& timestamp(Timestamp t);
  Params& opt_timestamp(const std::optional<Timestamp>& t);
  Params& bytes(const std::vector<std::uint8_t>& b);  // BYTEA, binary; empty = NULL (borrowed)
  Params& null();

  int size() const noexcept { return static_cast<int>(slots_.size()); }
  // Arrays for PQexecParams and its kin (in any order), valid until the
  // next change.
  const char* const* values();
  const int* lengths();
  const int* formats();

 private:
  struct Slot {
    std::string owned;
    const char* borrowed = nullptr;
    int length = 0;
    int format = 0;  // 0 text, 1 binary
    bool is_null = false;
  };
  void finish();
  std::vector<Slot> slots_;
  std::vector<const char*> values_;
  std::vector<int> lengths_, formats_;
};

// One connection with its session set up (session_setup()). Not
// thread-safe: its owner uses it from one thread at a time.
class Conn {
 public:
  // Connects (one attempt). `conninfo` is a postgresql:// URL or key=value
  // string; `setup` is run once connected (SET ...). Throws PgError
  // (connection_lost) when the server cannot be reached or refuses us.
  Conn(const std::string& conninfo, int connect_timeout_seconds, const std::string& setup);
  ~Conn();
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  PGconn* get() noexcept { return conn_; }
  bool broken() const noexcept { return PQstatus(conn_) != CONNECTION_OK; }
  // The server process serving this connection.
  int backend_pid() const noexcept { return PQbackendPID(conn_); }
  // "postgresql://host:port/db" (or "postgresql:///db?host=/socket/dir") of this
  // connection, with no user or password.
  std::string describe() const;

  // Runs `sql` (no parameters, may hold several statements). Throws PgError.
  void exec_script(const std::string& sql);
  // Runs one statement with parameters (unnamed). Throws PgError.
  Result exec(const std::string& sql, Params& params);
  Result exec(const std::string& sql);
  // Runs the statement named `name`, prepared from `sql` on its first use on
  // this connection. Throws PgError.
  Result exec_prepared(const std::string& name, const std::string& sql, Params& params);
  void prepare(const std::string& name, const std::string& sql);

 private:
  PGconn* conn_ = nullptr;
  std::set<std::string> prepared_;
};

// Many statements sent at once, their results read afterwards (libpq's
// pipeline mode): one round trip for a whole transaction. The connection is
// non-blocking meanwhile; whatever the server sends while we send is read
// into libpq's buffer, so that neither side waits on the other. Leaving the
// scope ends the pipeline mode when every result was read; otherwise (an
// exception) the connection is left for its owner to drop.
class Pipeline {
 public:
  explicit Pipeline(Conn& conn);
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  void send(const std::string& sql);  // no parameters
  void send_prepared(const std::string& name, Params& params);
  void sync();  // a sync point: the server answers what came before it
  // Asks the server to send the answers it has so far, without a sync point
  // (which would end an implicit transaction).
  void flush_request();
  void flush();  // sends everything buffered
  // The next statement's result: TUPLES_OK or COMMAND_OK, or throws the
  // statement's PgError (a statement skipped after an earlier failure
  // throws "aborted"). Waits for it.
  Result result();
  // The next sync point's answer.
  void expect_sync();
  // Leaves pipeline mode (every result read).
  void end();

 private:
  PGresult* next_raw();  // waits; nullptr ends a statement's results
  Conn& conn_;
  bool active_ = false;
};

// Our code and message for a failed result (or the connection's message
// when `r` is null).
PgError error_of(PGconn* conn, const PGresult* r, const std::string& context = "");

// Why libpq cannot parse `conninfo` (a URL or key=value string), or nullopt
// when it can. The message quotes option names and punctuation, never
// values: a password in the string is not shown.
std::optional<std::string> conninfo_problem(const std::string& conninfo);

// 'identifier' quoted for SQL ("my schema" -> "\"my schema\"").
std::string quote_ident(std::string_view name);

// Timestamps as PostgreSQL's TIMESTAMP text ("2026-11-28 01:02:03.456789",
// UTC): microseconds, earlier nanoseconds dropped (floor). parse_timestamp
// reads what the server writes (DateStyle ISO); nullopt when it is not that.
std::string format_timestamp(Timestamp t);
std::optional<Timestamp> parse_timestamp(std::string_view s);
// A timestamp as the store keeps it: floored to microseconds.
Timestamp to_stored(Timestamp t);

// BYTEA's hex output ("\\x0a0b") as bytes; nullopt when it is not that.
std::optional<std::vector<std::uint8_t>> parse_bytea(std::string_view s);

// JSONB's text output ({"a": 1, "b": [1, 2]}) made compact as the other
// stores write JSON ({"a":1,"b":[1,2]}): the one space JSONB writes after
// each ':' and ',' outside strings goes.
std::string compact_jsonb(std::string_view s);

// Text a TEXT value can hold: NUL and invalid UTF-8 bytes become U+FFFD.
std::string storable_text(std::string_view s);
// A JSON document JSONB can hold: the escape \u0000 becomes \ufffd.
std::string storable_json(std::string_view s);

}  // namespace taskmgr::detail::pg
