// promptseg C++ host: JSON through nlohmann/json (vendored in cpp/third_party/nlohmann_json).
//
// Values are nlohmann::ordered_json: objects keep their members in document order, and a
// repeated name keeps the last value (at the position of the first), as Python's json module
// does. This header adds what the readers need on top: parse errors as promptseg::Error with
// line and column, exact int64 access that also takes 2.0, printing that never throws, and the
// type names used in messages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "promptseg/error.hpp"

namespace promptseg::json {

/// One JSON value (object members in document order).
using Value = nlohmann::ordered_json;

/// A malformed document; the message reads "invalid JSON at line L, column C: <what>".
class ParseError : public Error {
 public:
  ParseError(const std::string& what, std::size_t line, std::size_t column);
  std::size_t line() const noexcept { return line_; }
  std::size_t column() const noexcept { return column_; }

 private:
  std::size_t line_;
  std::size_t column_;
};

/// "null", "boolean", "number", "string", "array" or "object".
const char* type_name(const Value& value) noexcept;

/// Parse a complete document (a leading UTF-8 BOM and surrounding whitespace are allowed).
///
/// Throws ParseError on malformed input (including invalid UTF-8 in strings and numbers outside
/// the double range).
Value parse(std::string_view text);

/// The member called ``key`` of an object, or nullptr when absent or not an object.
const Value* find(const Value& object, const std::string& key);

/// The exact int64 value of a number: an integer that fits, or a float with an integral value
/// such as 2.0 (JSON Schema's "integer"); nullopt for anything else.
std::optional<std::int64_t> exact_integer(const Value& value) noexcept;

/// Serialize; ``indent`` < 0 gives one line, otherwise that many spaces per level. Doubles are
/// printed so that they read back to the same double; NaN and infinities (not JSON) become
/// null; strings are written as UTF-8 with invalid bytes replaced by U+FFFD.
std::string dump(const Value& value, int indent = -1);

/// Read a string that must hold a JSON list of strings (safetensors metadata values).
std::vector<std::string> parse_string_list(std::string_view text);

}  // namespace promptseg::json
