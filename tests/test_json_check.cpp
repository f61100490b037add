// The strict text the library accepts from hosts and so can hand back:
// UTF-8 validation and repair, strict JSON documents with finite numbers.
#include <doctest/doctest.h>

#include <stdexcept>
#include <string>

#include "json_check.hpp"
#include "taskmgr/error_handler.hpp"
#include "utf8.hpp"

using namespace taskmgr;
using namespace taskmgr::detail;

TEST_CASE("invalid_utf8_at: the first byte of a sequence RFC 3629 does not allow") {
  CHECK(!invalid_utf8_at(""));
  CHECK(!invalid_utf8_at("plain ascii"));
  CHECK(!invalid_utf8_at("\xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf"));
  CHECK(invalid_utf8_at("a\xff") == 1u);
  CHECK(invalid_utf8_at("ab\xc0\xaf") == 2u);           // overlong '/'
  CHECK(invalid_utf8_at("\xed\xa0\x80") == 0u);         // a surrogate
  CHECK(invalid_utf8_at("xyz\xf4\x90\x80\x80") == 3u);  // above U+10FFFF
  CHECK(invalid_utf8_at("\xe2\x82") == 0u);             // cut short
  CHECK(invalid_utf8_at("ok\xc3\x28") == 2u);           // bad continuation
}

TEST_CASE("to_valid_utf8 replaces each bad byte with U+FFFD and keeps the rest") {
  CHECK(to_valid_utf8("fine \xc3\xa9") == "fine \xc3\xa9");
  CHECK(to_valid_utf8("a\xff"
                      "b") ==
        "a\xef\xbf\xbd"
        "b");
  CHECK(to_valid_utf8("\xc3\x28\xff") == "\xef\xbf\xbd(\xef\xbf\xbd");
  CHECK(!invalid_utf8_at(to_valid_utf8("\xed\xa0\x80\xf4\x90\x80\x80 tail")));
}

TEST_CASE("json_document_problem: strict JSON in UTF-8 with finite numbers, or why not") {
  CHECK(!json_document_problem("{}"));
  CHECK(!json_document_problem("[1, 2.5, -3e10, \"\\u00e9\", null, true]"));
  CHECK(!json_document_problem("\"just a string\""));
  CHECK(!json_document_problem("{\"a\":1.7976931348623157e308}"));
  const auto inf = json_document_problem("{\"a\":{\"b/c\":[0, 1e99999]}}");
  REQUIRE(inf);
  CHECK(*inf == "a number out of range (not finite) at /a/b~1c/1");
  const auto big = json_document_problem(std::string("[1") + std::string(400, '0') + "]");
  REQUIRE(big);  // an integer of 401 digits is read as a double: infinity
  CHECK(big->find("not finite") != std::string::npos);
  const auto utf = json_document_problem("{\"k\":\"\xff\"}");
  REQUIRE(utf);
  CHECK(*utf == "not valid UTF-8 (byte 6)");
  const auto cut = json_document_problem("{\"a\":");
  REQUIRE(cut);
  CHECK(cut->find("not valid JSON (byte 5") == 0);
  CHECK(json_document_problem("[1] trailing"));
  CHECK(json_document_problem("{\"a\":NaN}"));
  CHECK(json_document_problem("{\"a\":Infinity}"));
  CHECK(json_document_problem("{'a':1}"));
  CHECK(json_document_problem("{\"a\":1,}"));
  CHECK(json_document_problem("// comment\n{}"));
  CHECK(json_document_problem("\"\\udc00\""));  // a lone surrogate escape
  CHECK(json_document_problem(""));
}

TEST_CASE("a failure message from host code is handed on as valid UTF-8") {
  const auto f = TaskErrorHandler::classify(
      std::make_exception_ptr(std::runtime_error("bad \xc3\x28 bytes \xff")));
  CHECK(!invalid_utf8_at(f.message));
  CHECK(f.message == "bad \xef\xbf\xbd( bytes \xef\xbf\xbd");
}
