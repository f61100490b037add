// PostgreSQL tests: a fresh schema on the throwaway cluster that
// tests/with_postgres.sh starts (TASKMGR_TEST_PG_URL), and a connection of
// the test's own to it. A test that cannot reach the server fails: it never
// skips.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "store/pg.hpp"
#include "taskmgr/taskmgr.hpp"

namespace taskmgr::test {

// The cluster's URL; fails the test when it is not set.
inline std::string pg_test_url() {
  const char* url = std::getenv("TASKMGR_TEST_PG_URL");
  REQUIRE_MESSAGE(url != nullptr,
                  "TASKMGR_TEST_PG_URL is not set: run this test through tests/with_postgres.sh "
                  "(ctest does)");
  return url;
}

// A schema of its own for one test case ("t_<random>"), empty, dropped at
// the end with everything in it.
class PgSchema {
 public:
  PgSchema() : url_(pg_test_url()), name_("t_" + generate_task_id().substr(24)) {
    // Named apart from the store's connections ("taskmgr pid N"), which
    // tests find (and terminate) by name.
    conn_ = std::make_unique<detail::pg::Conn>(
        url_ + (url_.find('?') == std::string::npos ? "?" : "&") + "application_name=taskmgr-test",
        10, "SET client_min_messages = warning");
    exec("CREATE SCHEMA " + name_);
    exec("SET search_path TO " + name_);
  }
  ~PgSchema() {
    try {
      detail::pg::Conn c(url_, 10, "SET client_min_messages = warning");
      c.exec_script("DROP SCHEMA IF EXISTS " + name_ + " CASCADE");
    } catch (...) {
      // the cluster goes with the test run anyway
    }
  }
  PgSchema(const PgSchema&) = delete;
  PgSchema& operator=(const PgSchema&) = delete;

  const std::string& url() const { return url_; }
  const std::string& name() const { return name_; }
  PostgresStoreOptions options() const {
    PostgresStoreOptions o;
    o.schema = name_;
    return o;
  }
  std::shared_ptr<TaskStore> open() const { return open_postgres_store(url_, options()); }

  // SQL through the test's own connection (search_path: this schema).
  void exec(const std::string& sql) { conn_->exec_script(sql); }
  std::string text(const std::string& sql) {
    detail::pg::Result r = conn_->exec(sql);
    REQUIRE(PQntuples(r.get()) >= 1);
    return PQgetisnull(r.get(), 0, 0) ? "" : PQgetvalue(r.get(), 0, 0);
  }
  std::int64_t scalar(const std::string& sql) { return std::stoll(text(sql)); }
  detail::pg::Conn& conn() { return *conn_; }

 private:
  std::string url_;
  std::string name_;
  std::unique_ptr<detail::pg::Conn> conn_;
};

}  // namespace taskmgr::test
