// Private: the strict JSON the library accepts from a host (task options, a
// service's result) and so can hand back unchanged: RFC 8259 text in valid
// UTF-8 whose numbers are all finite (Boost.JSON reads 1e99999 as infinity,
// which no strict parser reads back).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace taskmgr::detail {

// Why `text` is not such a document ("not valid UTF-8 (byte 12)", "not valid
// JSON (byte 3: syntax error)", "a number out of range (not finite) at
// /a/0"), or nullopt when it is one.
std::optional<std::string> json_document_problem(std::string_view text);

}  // namespace taskmgr::detail
