// promptseg C++ host: a small, self-contained JSON reader and writer (RFC 8259).
//
// Enough for manifest.json and safetensors headers: objects (member order kept; a repeated
// name keeps the last value, as Python's json module does), arrays, strings with every escape
// including \uXXXX surrogate pairs (decoded to UTF-8; raw UTF-8 is validated), numbers
// (integers that fit int64 stay exact), true/false/null. Parsing and printing ignore the C
// locale (the decimal point is always '.').
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "promptseg/error.hpp"

namespace promptseg::json {

enum class Type { Null, Bool, Number, String, Array, Object };

/// "null", "bool", "number", "string", "array" or "object".
const char* type_name(Type type) noexcept;

/// A malformed document; the message gives the line and column.
class ParseError : public Error {
 public:
  ParseError(const std::string& what, std::size_t line, std::size_t column);
  std::size_t line() const noexcept { return line_; }
  std::size_t column() const noexcept { return column_; }

 private:
  std::size_t line_;
  std::size_t column_;
};

/// One JSON value. Objects keep their members in document order.
class Value {
 public:
  Value() = default;  ///< null
  Value(std::nullptr_t) {}
  Value(bool value);
  /// Any integer type; an unsigned value above INT64_MAX is stored as a double.
  template <typename T,
            std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  Value(T value) {
    if constexpr (std::is_signed_v<T>) {
      set_integer(static_cast<std::int64_t>(value));
    } else {
      set_unsigned(static_cast<std::uint64_t>(value));
    }
  }
  Value(double value);
  Value(const char* value);
  Value(std::string value);

  static Value array();
  static Value object();

  Type type() const noexcept { return type_; }
  bool is_null() const noexcept { return type_ == Type::Null; }
  bool is_bool() const noexcept { return type_ == Type::Bool; }
  bool is_number() const noexcept { return type_ == Type::Number; }
  /// A number written without fraction or exponent that fits int64 (or built from an int).
  bool is_integer() const noexcept { return type_ == Type::Number && integral_; }
  bool is_string() const noexcept { return type_ == Type::String; }
  bool is_array() const noexcept { return type_ == Type::Array; }
  bool is_object() const noexcept { return type_ == Type::Object; }

  // Typed access; each throws promptseg::Error("expected <type>, got <type>") on a mismatch.
  bool as_bool() const;
  double as_double() const;
  /// An integer, or a number with an exact int64 value such as 2.0.
  std::int64_t as_int() const;
  const std::string& as_string() const;

  /// Elements of an array or member values of an object; 0 for anything else.
  std::size_t size() const noexcept;
  /// Element i of an array (throws when out of range or not an array).
  const Value& at(std::size_t index) const;
  /// Member i of an object: its name and its value.
  const std::string& key_at(std::size_t index) const;
  const Value& value_at(std::size_t index) const;
  /// The member called ``key``, or nullptr when absent or when this is not an object.
  const Value* find(std::string_view key) const noexcept;

  // Building (used by the programs that print JSON).
  Value& push_back(Value element);                 ///< array append; returns the element
  Value& set(std::string_view key, Value member);  ///< object insert or replace

 private:
  void expect(Type wanted) const;
  void set_integer(std::int64_t value);
  void set_unsigned(std::uint64_t value);

  Type type_ = Type::Null;
  bool bool_ = false;
  bool integral_ = false;
  std::int64_t integer_ = 0;
  double number_ = 0.0;
  std::string string_;
  std::vector<std::string> keys_;  // objects only, parallel to items_
  std::vector<Value> items_;       // array elements or object member values

  friend class Parser;
};

/// Parse a complete document (a leading UTF-8 BOM and surrounding whitespace are allowed).
///
/// Throws ParseError on malformed input, on nesting deeper than ``max_depth`` and on numbers
/// outside the double range.
Value parse(std::string_view text, std::size_t max_depth = 512);

/// Serialize; ``indent`` < 0 gives one line, otherwise that many spaces per level. Doubles are
/// printed with the fewest digits that read back to the same double; NaN and infinities (not
/// JSON) are written as null. Strings are written as UTF-8 with control characters escaped.
std::string dump(const Value& value, int indent = -1);

/// Read a string that must hold a JSON list of strings (safetensors metadata values).
std::vector<std::string> parse_string_list(std::string_view text);

}  // namespace promptseg::json
