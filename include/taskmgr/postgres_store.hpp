// taskmgr: the PostgreSQL store.
//
// open_postgres_store() opens a TaskStore (store.hpp) on a PostgreSQL
// database through libpq, keeping the contract every store keeps: inserts
// durable before they return and all or none; an update committed with its
// events, in call order; reads that see the caller's own writes. The schema
// and how it is migrated, and what happens when writes fail, are in
// docs/STORAGE.md.
//
// One store at a time uses a schema (a second store on the same database
// and schema, in this process or any other, is refused with Error(kBusy)),
// unless they open it shared: then every host's store uses it at once, and
// the managers share one queue (cluster.hpp, docs/SCALING.md).
//
// Thread-safety: every member of the store is safe to call from any thread.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "taskmgr/cluster.hpp"
#include "taskmgr/export.hpp"
#include "taskmgr/store.hpp"

namespace taskmgr {

struct PostgresStoreOptions {
  // The schema taskmgr's tables live in, created when absent; "" = the first
  // schema of the connection's search_path (normally `public`).
  std::string schema;
  // Connections for reads, opened as needed (>= 1): reads never wait for
  // the writer's connection, only for writes queued before them.
  std::size_t read_connections = 2;
  // A statement that runs longer fails (kTimeout); 0 = no limit.
  double statement_timeout_seconds = 30;
  // How long a broken connection is tried again (with backoff, from 50 ms
  // doubling to 2 s) before the write or read that needs it fails (kIoError).
  // Opening tries once.
  double connect_timeout_seconds = 10;
  std::size_t max_batch = 1000;  // most writes committed in one transaction
  // Most failed writes kept for a retry (>= 1): as SqliteStoreOptions::max_backlog.
  std::size_t max_backlog = 100000;
  // A schema that has tables but none of taskmgr's is refused: taskmgr does
  // not create its tables among data it does not know. true: it does, beside
  // them.
  bool allow_other_tables = false;
  AdoptOptions adopt;  // reading a `tasks` table adopted from an earlier application
  // Several hosts share the schema's queue (storage.shared): no store lock;
  // this host is registered in task_hosts, and a task's writes are fenced by
  // its claim. Needs taskmgr's own `tasks` table (an adopted one is
  // refused: kIncompatible).
  bool shared = false;
  ClusterOptions cluster;  // with `shared`
};

// Opens the store on `url`: a "postgresql://" or "postgres://" URL or a
// libpq "key=value ..." string (a password in it is used, never shown:
// describe() and messages name "postgresql://host/db"). Connects, migrates
// the schema (docs/STORAGE.md) and takes the schema's store lock. Throws
// Error: kInvalidArgument (not a connection string, or an option out of
// range), kIoError (the server cannot be reached or refuses the
// connection), kIncompatible (a schema from a newer taskmgr, a `tasks`
// table that cannot be adopted (the message says why), or other tables
// without allow_other_tables: nothing is changed), kBusy (another store
// holds the schema). An unversioned `tasks` table of an earlier application
// is adopted in place (docs/STORAGE.md, "Adopting an existing database").
TASKMGR_API std::shared_ptr<TaskStore> open_postgres_store(const std::string& url,
                                                           PostgresStoreOptions options = {});

// The schema version this build writes (the highest version recorded in
// the table taskmgr_schema).
TASKMGR_API int postgres_schema_version() noexcept;

}  // namespace taskmgr
