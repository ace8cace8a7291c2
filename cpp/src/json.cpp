// JSON helpers around nlohmann/json; see promptseg/json.hpp.
#include "promptseg/json.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace promptseg::json {

namespace {

/// nlohmann's message without its "[json.exception.<kind>.<id>] " prefix and, for parse
/// errors, without its own "parse error at line L, column C: " lead (we compute the position).
std::string reason(const nlohmann::json::exception& e) {
  std::string what = e.what();
  if (std::size_t close = what.find("] "); what.rfind("[json.exception.", 0) == 0 &&
                                           close != std::string::npos) {
    what.erase(0, close + 2);
  }
  if (what.rfind("parse error", 0) == 0) {
    if (std::size_t colon = what.find(": "); colon != std::string::npos) {
      what.erase(0, colon + 2);
    }
  }
  return what;
}

}  // namespace

ParseError::ParseError(const std::string& what, std::size_t line, std::size_t column)
    : Error(line == 0 ? "invalid JSON: " + what
                      : "invalid JSON at line " + std::to_string(line) + ", column " +
                            std::to_string(column) + ": " + what),
      line_(line),
      column_(column) {}

const char* type_name(const Value& value) noexcept { return value.type_name(); }

Value parse(std::string_view text) {
  try {
    return Value::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte: 1-based count of characters read, the offending one included (end of input
    // counts as one past the last character).
    const std::size_t offset = std::min<std::size_t>(e.byte > 0 ? e.byte - 1 : 0, text.size());
    std::size_t line = 1;
    std::size_t line_start = 0;
    for (std::size_t i = 0; i < offset; ++i) {
      if (text[i] == '\n') {
        ++line;
        line_start = i + 1;
      }
    }
    throw ParseError(reason(e), line, offset - line_start + 1);
  } catch (const nlohmann::json::exception& e) {
    throw ParseError(reason(e), 0, 0);  // out_of_range.406: a number beyond the double range
  }
}

const Value* find(const Value& object, const std::string& key) {
  if (!object.is_object()) {
    return nullptr;
  }
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

std::optional<std::int64_t> exact_integer(const Value& value) noexcept {
  if (value.is_number_unsigned()) {
    const auto u = value.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return std::nullopt;
    }
    return static_cast<std::int64_t>(u);
  }
  if (value.is_number_integer()) {
    return value.get<std::int64_t>();
  }
  if (value.is_number_float()) {
    const double d = value.get<double>();
    // [-2^63, 2^63): both bounds are exact doubles.
    if (std::isfinite(d) && d == std::floor(d) && d >= -9223372036854775808.0 &&
        d < 9223372036854775808.0) {
      return static_cast<std::int64_t>(d);
    }
  }
  return std::nullopt;
}

std::string dump(const Value& value, int indent) {
  return value.dump(indent, ' ', false, Value::error_handler_t::replace);
}

std::vector<std::string> parse_string_list(std::string_view text) {
  const Value list = parse(text);
  if (!list.is_array()) {
    throw Error(std::string("expected a JSON list of strings, got ") + type_name(list));
  }
  std::vector<std::string> out;
  out.reserve(list.size());
  for (std::size_t i = 0; i < list.size(); ++i) {
    if (!list[i].is_string()) {
      throw Error("expected a JSON list of strings, element " + std::to_string(i) + " is " +
                  type_name(list[i]));
    }
    out.push_back(list[i].get<std::string>());
  }
  return out;
}

}  // namespace promptseg::json
