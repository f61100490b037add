// The PostgreSQL store's conversions (src/store/pg.hpp), without a server:
// timestamps to and from PostgreSQL's text, JSONB's text made compact, text
// and JSON the database cannot hold, BYTEA's hex form, and connection
// strings checked without showing their values.
#include <doctest/doctest.h>

#include <random>

#include "store/pg.hpp"
// A C header (shared with test_c_api.c): C casts.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wold-style-cast"
#include "strict_json.h"
#pragma GCC diagnostic pop
#include "taskmgr/taskmgr.hpp"

using namespace taskmgr;
namespace pg = taskmgr::detail::pg;

namespace {
Timestamp at_us(std::int64_t us) {
  return Timestamp(std::chrono::duration_cast<Timestamp::duration>(std::chrono::microseconds(us)));
}
}  // namespace

TEST_CASE("pg timestamps: written as PostgreSQL's text, read back to the microsecond") {
  CHECK(pg::format_timestamp(Timestamp{}) == "1970-01-01 00:00:00.000000");
  CHECK(pg::format_timestamp(at_us(981173106789012)) == "2001-02-03 04:05:06.789012");
  CHECK(pg::format_timestamp(at_us(-1)) == "1969-12-31 23:59:59.999999");
  CHECK(pg::format_timestamp(at_us(951782400000000)) == "2000-02-29 00:00:00.000000");
  // Nanoseconds are dropped (floor), also before the epoch.
  CHECK(pg::format_timestamp(at_us(5) + std::chrono::nanoseconds(999)) ==
        "1970-01-01 00:00:00.000005");
  CHECK(pg::format_timestamp(at_us(-5) - std::chrono::nanoseconds(1)) ==
        "1969-12-31 23:59:59.999994");
  // What the server writes: fractions without trailing zeros, or none.
  CHECK(pg::parse_timestamp("2001-02-03 04:05:06.789012") == at_us(981173106789012));
  CHECK(pg::parse_timestamp("2001-02-03 04:05:06.78") == at_us(981173106780000));
  CHECK(pg::parse_timestamp("2001-02-03 04:05:06") == at_us(981173106000000));
  CHECK(pg::parse_timestamp("1969-12-31 23:59:59.999999") == at_us(-1));
  for (const char* bad : {"", "2001-02-03", "2001-02-03T04:05:06", "2001-02-03 04:05:06.",
                          "2001-02-03 04:05:06.1234567", "2001-13-03 04:05:06",
                          "2001-02-03 04:05:06 BC", "12001-02-03 04:05:06"}) {
    CAPTURE(bad);
    CHECK_FALSE(pg::parse_timestamp(bad).has_value());
  }
  // Round trips over the whole range a time_point holds.
  std::mt19937_64 rng(7);
  for (int i = 0; i < 20000; ++i) {
    const auto us =
        static_cast<std::int64_t>(rng() % 18'000'000'000'000'000ULL) - 9'000'000'000'000'000LL;
    CAPTURE(us);
    const Timestamp t = at_us(us);
    REQUIRE(pg::parse_timestamp(pg::format_timestamp(t)) == t);
    CHECK(pg::to_stored(t + std::chrono::nanoseconds(rng() % 1000)) == t);
  }
}

TEST_CASE("pg JSONB text is made compact without touching strings") {
  CHECK(pg::compact_jsonb(R"({"a": 1, "b": [1, 2, {"c": null}]})") ==
        R"({"a":1,"b":[1,2,{"c":null}]})");
  CHECK(pg::compact_jsonb(R"({"s": "a: b, c \" d, e\\", "t": " "})") ==
        R"({"s":"a: b, c \" d, e\\","t":" "})");
  CHECK(pg::compact_jsonb("{}") == "{}");
  const std::string out = pg::compact_jsonb(R"({"x": "caf\u00e9 ☕", "y": [true, false]})");
  CHECK(strict_json_error(out.data(), out.size()) == -1);
}

TEST_CASE("pg text and JSON the database cannot hold get U+FFFD, the rest is unchanged") {
  CHECK(pg::storable_text("plain café") == "plain café");
  CHECK(pg::storable_text(std::string("a\0b", 3)) ==
        "a\xEF\xBF\xBD"
        "b");
  CHECK(pg::storable_text("bad \xff byte") == "bad \xEF\xBF\xBD byte");
  CHECK(pg::storable_json(R"({"a":"x\u0000y"})") == R"({"a":"x\ufffdy"})");
  // An escaped backslash before "u0000" is text, not the escape.
  CHECK(pg::storable_json(R"({"a":"x\\u0000y"})") == R"({"a":"x\\u0000y"})");
  CHECK(pg::storable_json(R"({"a\u0000":1})") == R"({"a\ufffd":1})");
  CHECK(pg::storable_json(R"({"a":"\u00001"})") == R"({"a":"\ufffd1"})");
}

TEST_CASE("pg BYTEA hex output is read as bytes") {
  CHECK(pg::parse_bytea("\\x") == std::vector<std::uint8_t>{});
  CHECK(pg::parse_bytea("\\x00ff8A") == std::vector<std::uint8_t>{0x00, 0xff, 0x8a});
  CHECK_FALSE(pg::parse_bytea("00ff").has_value());
  CHECK_FALSE(pg::parse_bytea("\\x0").has_value());
  CHECK_FALSE(pg::parse_bytea("\\xzz").has_value());
}

TEST_CASE("pg connection strings are checked without showing their values") {
  CHECK_FALSE(pg::conninfo_problem("postgresql://user:secret@db.example:5432/taskmgr").has_value());
  CHECK_FALSE(pg::conninfo_problem("host=/tmp dbname=taskmgr user=me password=secret").has_value());
  for (const std::string bad :
       {"postgresql://user:s3cr%zzet@db.example/taskmgr", "host='unterminated s3cret",
        "host=db password=s3cret nonsense", "host=db passsword=s3cret",
        "postgresql://u:s3cret@h/db?sslmode=verify&x=s3cret"}) {
    CAPTURE(bad);
    const auto problem = pg::conninfo_problem(bad);
    REQUIRE(problem.has_value());
    CHECK_FALSE(problem->empty());
    CHECK(problem->find("s3cret") == std::string::npos);
  }
  CHECK(pg::quote_ident("my \"schema\"") == "\"my \"\"schema\"\"\"");
}
