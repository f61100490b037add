// How the stores read a `tasks` table they adopted (src/store/task_layout.hpp):
// stored times in their usual forms, columns mapped by name, status words.
#include <doctest/doctest.h>

#include "store/task_layout.hpp"
#include "taskmgr/task.hpp"

using namespace taskmgr;
using namespace taskmgr::detail::store;

namespace {

std::string read_back(std::string_view s) {
  const auto t = parse_stored_time(s);
  return t ? format_timestamp(*t) : "(none)";
}

}  // namespace

TEST_CASE("stored times are read in SQL, ISO 8601 and epoch forms, with their zones") {
  CHECK(read_back("2024-05-01 10:00:00") == "2024-05-01T10:00:00.000Z");  // CURRENT_TIMESTAMP
  CHECK(read_back("2024-05-01 10:00:00.25") == "2024-05-01T10:00:00.250Z");
  CHECK(read_back("2024-05-01 10:00:00.123456") == "2024-05-01T10:00:00.123Z");
  CHECK(read_back("2024-05-01T10:00:00") == "2024-05-01T10:00:00.000Z");  // no zone: UTC
  CHECK(read_back("2024-05-01T10:00:00Z") == "2024-05-01T10:00:00.000Z");
  CHECK(read_back("2024-05-01T12:30:00+02:30") == "2024-05-01T10:00:00.000Z");
  CHECK(read_back("2024-05-01T08:00:00-0200") == "2024-05-01T10:00:00.000Z");
  CHECK(read_back("2024-05-01 10:00:00+00") == "2024-05-01T10:00:00.000Z");  // TIMESTAMPTZ
  CHECK(read_back("2024-05-01 11:00:00.5+01") == "2024-05-01T10:00:00.500Z");
  CHECK(read_back("2024-05-01T10:00") == "2024-05-01T10:00:00.000Z");
  CHECK(read_back("2024-05-01") == "2024-05-01T00:00:00.000Z");
  CHECK(read_back("1714557600") == "2024-05-01T10:00:00.000Z");  // epoch seconds
  CHECK(read_back("1714557600.75") == "2024-05-01T10:00:00.750Z");
  CHECK(read_back("0") == "1970-01-01T00:00:00.000Z");
  CHECK(read_back("1900-02-28 00:00:00") == "1900-02-28T00:00:00.000Z");
  // The microseconds are kept, not only what format_timestamp shows.
  const auto us = parse_stored_time("2001-02-03 04:05:06.789012");
  REQUIRE(us.has_value());
  CHECK(std::chrono::duration_cast<std::chrono::microseconds>(us->time_since_epoch()).count() ==
        981173106789012);
  for (const char* bad :
       {"", "yesterday", "2024-13-01 00:00:00", "2024-05-01 25:00:00", "2024-05-01X10:00:00",
        "2024-05-01 10:00:00 +99", "1.2.3", "1714557600000000"}) {
    CAPTURE(bad);
    CHECK_FALSE(parse_stored_time(bad).has_value());
  }
}

TEST_CASE("an adopted table's columns map by name and type, the others are its extra fields") {
  const TaskLayout l = TaskLayout::of({{"id", "VARCHAR(36)"},
                                       {"type", "VARCHAR(50)"},
                                       {"state", "TEXT"},
                                       {"priority", "TEXT"},  // not a number: an extra
                                       {"input", "BLOB"},
                                       {"created_at", "TIMESTAMP"},
                                       {"completed_at", "BIGINT"},
                                       {"error", "TEXT"},
                                       {"owner", "TEXT"}},
                                      {{"done", TaskStatus::kCompleted}}, "ocr");
  CHECK(l.adopted());
  CHECK(l.column(kService) == "type");
  CHECK(l.column(kStatus) == "state");
  CHECK(l.column(kInputData) == "input");
  CHECK_FALSE(l.has(kInputPath));
  CHECK_FALSE(l.has(kPriority));
  CHECK(l.column(kFinishedAt) == "completed_at");
  CHECK(l.kind(kFinishedAt) == Kind::kEpoch);
  CHECK(l.kind(kCreatedAt) == Kind::kText);
  CHECK(l.column(kFailureMessage) == "error");
  CHECK(l.extra() == std::vector<std::string>{"priority", "owner"});
  CHECK(l.status_of("done") == TaskStatus::kCompleted);
  CHECK(l.status_of("queued") == TaskStatus::kQueued);
  CHECK(l.status_of("unrecognized") == TaskStatus::kUnrecognized);
  CHECK(l.status_of("Done") == TaskStatus::kUnrecognized);
  CHECK(l.status_of(nullptr) == TaskStatus::kUnrecognized);
  CHECK(l.words_for(TaskStatus::kCompleted) == std::vector<std::string>{"completed", "done"});
  Task t;
  l.set_field(t, kStatus, "paused");
  CHECK(t.status == TaskStatus::kUnrecognized);
  CHECK(t.stored_status == "paused");
  l.set_field(t, kCreatedAt, "soon");  // unreadable: kept as an extra field, as stored
  CHECK(t.created_at == Timestamp{});
  CHECK(t.extra.at("created_at") == "soon");
  l.finish(t, false);
  CHECK(t.service == "ocr");

  // taskmgr's own table: not adopted, nothing extra.
  std::vector<Column> own;
  for (const char* c : {"id",
                        "service",
                        "input_path",
                        "input_data",
                        "input_media_type",
                        "options",
                        "priority",
                        "status",
                        "attempt",
                        "batch_size",
                        "failure_reason",
                        "failure_message",
                        "result",
                        "created_at",
                        "queued_at",
                        "started_at",
                        "finished_at",
                        "estimated_memory_mb",
                        "actual_memory_mb",
                        "assigned_device",
                        "service_instance_id",
                        "resource_cleanup_completed"}) {
    const std::string name = c;
    std::string type = "TEXT";
    if (name == "input_data") type = "BLOB";
    if (name == "priority" || name == "attempt" || name == "batch_size" ||
        name.find("memory") != std::string::npos) {
      type = "INTEGER";
    }
    if (name.find("_at") != std::string::npos) type = "TIMESTAMP";
    if (name == "resource_cleanup_completed") type = "BOOLEAN";
    own.push_back({name, type});
  }
  const TaskLayout mine = TaskLayout::of(own, {}, "ocr");
  CHECK_FALSE(mine.adopted());
  CHECK(mine.extra().empty());
  for (std::size_t f = 0; f < own.size(); ++f) CHECK(mine.column(Field(f)) == own[f].name);
  // Without the shared queue's columns (SQLite's own table, PostgreSQL's
  // before schema 4) it is taskmgr's own still; with them (the claim's
  // columns too), as well.
  CHECK_FALSE(mine.has(kRequestedDevice));
  CHECK_FALSE(mine.has(kHost));
  for (const char* c :
       {"requested_device", "run_host", "claimed_by", "claim", "lease_expires_at"}) {
    own.push_back({c, std::string(c) == "claim" ? "BIGINT" : "TEXT"});
  }
  own.push_back({"cancel_requested", "BOOLEAN"});
  const TaskLayout shared = TaskLayout::of(own, {}, "ocr");
  CHECK_FALSE(shared.adopted());
  CHECK(shared.extra().empty());
  CHECK(shared.column(kRequestedDevice) == "requested_device");
  CHECK(shared.column(kHost) == "run_host");
}

TEST_CASE("a status map may not remap taskmgr's own words or map to unrecognized") {
  CHECK_FALSE(status_map_problem({{"done", TaskStatus::kCompleted}}).has_value());
  CHECK(status_map_problem({{"failed", TaskStatus::kCompleted}}).value_or("").find("own") !=
        std::string::npos);
  CHECK(status_map_problem({{"x", TaskStatus::kUnrecognized}}).has_value());
  CHECK(status_map_problem({{"", TaskStatus::kPending}}).has_value());
}
