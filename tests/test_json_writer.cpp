// The private JSON writer of event details: every value kind, and strings
// that need escaping, checked by parsing the output back with Boost.JSON.
#include <doctest/doctest.h>

#include <boost/json.hpp>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "json_writer.hpp"

using taskmgr::detail::json_object;
using taskmgr::detail::JsonValue;

TEST_CASE("json_writer: every kind of value parses back to what was written") {
  const std::string text = "plain";
  const std::optional<std::int64_t> some = 42, none;
  const std::string out = json_object({{"s", text},
                                       {"i", -17},
                                       {"big", std::numeric_limits<std::int64_t>::min()},
                                       {"d", 0.25},
                                       {"whole", 3.0},
                                       {"nan", std::numeric_limits<double>::quiet_NaN()},
                                       {"t", true},
                                       {"f", false},
                                       {"n", nullptr},
                                       {"some", some},
                                       {"none", none},
                                       {"raw", JsonValue::raw("[1,{\"a\":2}]")},
                                       {"empty_raw", JsonValue::raw("")}});
  const auto v = boost::json::parse(out).as_object();
  CHECK(v.at("s").as_string() == "plain");
  CHECK(v.at("i").as_int64() == -17);
  CHECK(v.at("big").as_int64() == std::numeric_limits<std::int64_t>::min());
  CHECK(v.at("d").as_double() == 0.25);
  CHECK(v.at("whole").is_double());  // "3.0", not the integer 3
  CHECK(v.at("nan").is_null());
  CHECK(v.at("t").as_bool());
  CHECK_FALSE(v.at("f").as_bool());
  CHECK(v.at("n").is_null());
  CHECK(v.at("some").as_int64() == 42);
  CHECK(v.at("none").is_null());
  CHECK(v.at("raw").as_array().size() == 2);
  CHECK(v.at("empty_raw").is_null());
  CHECK(json_object({}) == "{}");
}

TEST_CASE("json_writer: strings with quotes, backslashes and control characters are escaped") {
  const std::string cases[] = {
      "",
      "\"",
      "\\",
      "a\"b\\c",
      "line1\nline2\r\n\ttab",
      std::string("nul\0byte", 8),
      "\x01\x1f\x7f end",
      "ends with quote\"",
      "\"starts with quote",
      "caf\xc3\xa9 \xe2\x82\xac",  // UTF-8 passes through
      std::string(300, 'x') + "\"" + std::string(300, 'y'),
  };
  for (const std::string& s : cases) {
    const std::string out = json_object({{"message", s}});
    const auto v = boost::json::parse(out).as_object();
    CHECK_MESSAGE(std::string(v.at("message").as_string()) == s, out);
    for (char c : out) CHECK(static_cast<unsigned char>(c) >= 0x20);  // no raw control char
  }
}

TEST_CASE("json_writer: durations are written to the microsecond and stay JSON doubles") {
  struct Case {
    double in;
    const char* text;
  };
  const Case cases[] = {
      {0.0, "0.0"},         {2.5, "2.5"},       {1.0, "1.0"},     {0.000125, "0.000125"},
      {1.2e-5, "0.000012"}, {3.0000004, "3.0"}, {-0.25, "-0.25"}, {86400.000001, "86400.000001"}};
  for (const auto& c : cases) {
    const std::string out = json_object({{"s", JsonValue::seconds(c.in)}});
    CHECK(out == std::string("{\"s\":") + c.text + "}");
    CHECK(boost::json::parse(out).as_object().at("s").is_double());
  }
  // Out of range for the fixed form: the general one; NaN and infinity: null.
  CHECK(boost::json::parse(json_object({{"s", JsonValue::seconds(3e15)}})).at("s").as_double() ==
        3e15);
  CHECK(boost::json::parse(
            json_object({{"s", JsonValue::seconds(std::numeric_limits<double>::infinity())}}))
            .at("s")
            .is_null());
}

TEST_CASE(
    "json_writer: a captured object writes what json_object writes, after its sources are gone") {
  using taskmgr::detail::CapturedObject;
  CapturedObject c;
  std::string expected;
  {
    std::string device = "cuda:0";
    std::string message = "quote \" backslash \\ newline \n";
    const std::optional<std::int64_t> some = 7, none;
    const std::initializer_list<taskmgr::detail::JsonField> fields = {
        {"device", device}, {"message", message},  // escaped when written
        {"d", -2.5},        {"sec", JsonValue::seconds(0.000125)},
        {"ok", true},       {"some", some},
        {"none", none},     {"raw", JsonValue::raw("[1,2]")}};
    expected = json_object(fields);
    REQUIRE(c.capture(fields));
    device.assign("overwritten!");  // the capture holds its own copy
    message.clear();
  }
  CHECK(c.str() == expected);
  // Copies and moves keep their text (views are rebuilt from offsets).
  CapturedObject copy = c;
  CapturedObject moved = std::move(copy);
  CHECK(moved.str() == expected);
  std::string reused = "an existing string with room";
  moved.assign_to(reused);
  CHECK(reused == expected);
  CHECK(boost::json::parse(expected).as_object().at("device").as_string() == "cuda:0");
  CapturedObject empty;
  REQUIRE(empty.capture({}));
  CHECK(empty.str() == "{}");
}

TEST_CASE("json_writer: a capture that does not fit is refused whole") {
  using taskmgr::detail::CapturedObject;
  CapturedObject c;
  const std::string long_text(CapturedObject::kTextCapacity + 1, 'x');
  CHECK_FALSE(c.capture({{"message", long_text}}));
  const std::string half(CapturedObject::kTextCapacity / 2 + 1, 'y');
  CHECK_FALSE(c.capture({{"a", half}, {"b", half}}));  // together over the capacity
  CHECK_FALSE(c.capture({{"1", 1},
                         {"2", 2},
                         {"3", 3},
                         {"4", 4},
                         {"5", 5},
                         {"6", 6},
                         {"7", 7},
                         {"8", 8},
                         {"9", 9}}));  // more fields than kMaxFields
  const std::string fits(CapturedObject::kTextCapacity, 'z');
  REQUIRE(c.capture({{"message", fits}}));  // exactly the capacity
  CHECK(c.str() == json_object({{"message", fits}}));
}
