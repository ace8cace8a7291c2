// JSON reader and writer; see promptseg/json.hpp.
#include "promptseg/json.hpp"

#include <cmath>
#include <limits>
#include <locale>
#include <sstream>
#include <utility>

namespace promptseg::json {

const char* type_name(Type type) noexcept {
  switch (type) {
    case Type::Null:
      return "null";
    case Type::Bool:
      return "bool";
    case Type::Number:
      return "number";
    case Type::String:
      return "string";
    case Type::Array:
      return "array";
    case Type::Object:
      return "object";
  }
  return "?";
}

ParseError::ParseError(const std::string& what, std::size_t line, std::size_t column)
    : Error("invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(column) +
            ": " + what),
      line_(line),
      column_(column) {}

// ---------------------------------------------------------------------------------------------
// Value

Value::Value(bool value) : type_(Type::Bool), bool_(value) {}

void Value::set_integer(std::int64_t value) {
  type_ = Type::Number;
  integral_ = true;
  integer_ = value;
  number_ = static_cast<double>(value);
}

void Value::set_unsigned(std::uint64_t value) {
  type_ = Type::Number;
  number_ = static_cast<double>(value);
  if (value <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    integral_ = true;
    integer_ = static_cast<std::int64_t>(value);
  }
}

Value::Value(double value) : type_(Type::Number), number_(value) {}

Value::Value(const char* value) : type_(Type::String), string_(value) {}

Value::Value(std::string value) : type_(Type::String), string_(std::move(value)) {}

Value Value::array() {
  Value v;
  v.type_ = Type::Array;
  return v;
}

Value Value::object() {
  Value v;
  v.type_ = Type::Object;
  return v;
}

void Value::expect(Type wanted) const {
  if (type_ != wanted) {
    throw Error(std::string("expected ") + type_name(wanted) + ", got " + type_name(type_));
  }
}

bool Value::as_bool() const {
  expect(Type::Bool);
  return bool_;
}

double Value::as_double() const {
  expect(Type::Number);
  return number_;
}

std::int64_t Value::as_int() const {
  expect(Type::Number);
  if (integral_) {
    return integer_;
  }
  // 2^63 as a double; every finite double below it in magnitude converts exactly.
  constexpr double kLimit = 9223372036854775808.0;
  if (std::isfinite(number_) && number_ == std::floor(number_) && number_ >= -kLimit &&
      number_ < kLimit) {
    return static_cast<std::int64_t>(number_);
  }
  std::ostringstream out;
  out.imbue(std::locale::classic());
  out.precision(17);
  out << number_;
  throw Error("expected an integer, got " + out.str());
}

const std::string& Value::as_string() const {
  expect(Type::String);
  return string_;
}

std::size_t Value::size() const noexcept {
  return (type_ == Type::Array || type_ == Type::Object) ? items_.size() : 0;
}

const Value& Value::at(std::size_t index) const {
  expect(Type::Array);
  if (index >= items_.size()) {
    throw Error("array index " + std::to_string(index) + " out of range (size " +
                std::to_string(items_.size()) + ")");
  }
  return items_[index];
}

const std::string& Value::key_at(std::size_t index) const {
  expect(Type::Object);
  if (index >= keys_.size()) {
    throw Error("object member " + std::to_string(index) + " out of range (size " +
                std::to_string(keys_.size()) + ")");
  }
  return keys_[index];
}

const Value& Value::value_at(std::size_t index) const {
  expect(Type::Object);
  if (index >= items_.size()) {
    throw Error("object member " + std::to_string(index) + " out of range (size " +
                std::to_string(items_.size()) + ")");
  }
  return items_[index];
}

const Value* Value::find(std::string_view key) const noexcept {
  if (type_ != Type::Object) {
    return nullptr;
  }
  for (std::size_t i = 0; i < keys_.size(); ++i) {
    if (keys_[i] == key) {
      return &items_[i];
    }
  }
  return nullptr;
}

Value& Value::push_back(Value element) {
  expect(Type::Array);
  items_.push_back(std::move(element));
  return items_.back();
}

Value& Value::set(std::string_view key, Value member) {
  expect(Type::Object);
  for (std::size_t i = 0; i < keys_.size(); ++i) {
    if (keys_[i] == key) {
      items_[i] = std::move(member);
      return items_[i];
    }
  }
  keys_.emplace_back(key);
  items_.push_back(std::move(member));
  return items_.back();
}

// ---------------------------------------------------------------------------------------------
// Parser

namespace {

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace

class Parser {
 public:
  Parser(std::string_view text, std::size_t max_depth) : text_(text), max_depth_(max_depth) {}

  Value document() {
    if (text_.substr(0, 3) == "\xEF\xBB\xBF") {
      pos_ = 3;
    }
    skip_whitespace();
    if (pos_ >= text_.size()) {
      fail("empty document");
    }
    Value root = value(0);
    skip_whitespace();
    if (pos_ < text_.size()) {
      fail("unexpected " + describe(text_[pos_]) + " after the document");
    }
    return root;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { fail_at(what, pos_); }

  [[noreturn]] void fail_at(const std::string& what, std::size_t offset) const {
    std::size_t line = 1;
    std::size_t column = 1;
    for (std::size_t i = 0; i < offset && i < text_.size(); ++i) {
      if (text_[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw ParseError(what, line, column);
  }

  static std::string describe(char c) {
    auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7F) {
      return std::string("'") + c + "'";
    }
    static const char* hex = "0123456789ABCDEF";
    return std::string("byte 0x") + hex[u >> 4] + hex[u & 0xF];
  }

  void skip_whitespace() {
    while (pos_ < text_.size()) {
      char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
        break;
      }
      ++pos_;
    }
  }

  Value value(std::size_t depth) {
    if (pos_ >= text_.size()) {
      fail("unexpected end of input, expected a value");
    }
    char c = text_[pos_];
    switch (c) {
      case '{':
        return object(depth + 1);
      case '[':
        return array(depth + 1);
      case '"':
        return Value(string());
      case 't':
        literal("true");
        return Value(true);
      case 'f':
        literal("false");
        return Value(false);
      case 'n':
        literal("null");
        return Value();
      default:
        if (c == '-' || (c >= '0' && c <= '9')) {
          return number();
        }
        fail("unexpected " + describe(c) + ", expected a value");
    }
  }

  void literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) {
      fail("invalid literal, expected '" + std::string(word) + "'");
    }
    pos_ += word.size();
  }

  void check_depth(std::size_t depth) const {
    if (depth > max_depth_) {
      fail("nesting deeper than " + std::to_string(max_depth_) + " levels");
    }
  }

  Value object(std::size_t depth) {
    check_depth(depth);
    Value out = Value::object();
    ++pos_;  // '{'
    skip_whitespace();
    if (pos_ < text_.size() && text_[pos_] == '}') {
      ++pos_;
      return out;
    }
    while (true) {
      skip_whitespace();
      if (pos_ >= text_.size() || text_[pos_] != '"') {
        fail(pos_ >= text_.size() ? "unexpected end of input, expected a member name"
                                  : "unexpected " + describe(text_[pos_]) +
                                        ", expected a member name in double quotes");
      }
      std::string key = string();
      skip_whitespace();
      if (pos_ >= text_.size() || text_[pos_] != ':') {
        fail("expected ':' after member name \"" + key + "\"");
      }
      ++pos_;
      skip_whitespace();
      out.set(key, value(depth));
      skip_whitespace();
      if (pos_ >= text_.size()) {
        fail("unexpected end of input inside an object");
      }
      if (text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (text_[pos_] == '}') {
        ++pos_;
        return out;
      }
      fail("unexpected " + describe(text_[pos_]) + ", expected ',' or '}'");
    }
  }

  Value array(std::size_t depth) {
    check_depth(depth);
    Value out = Value::array();
    ++pos_;  // '['
    skip_whitespace();
    if (pos_ < text_.size() && text_[pos_] == ']') {
      ++pos_;
      return out;
    }
    while (true) {
      skip_whitespace();
      out.items_.push_back(value(depth));
      skip_whitespace();
      if (pos_ >= text_.size()) {
        fail("unexpected end of input inside an array");
      }
      if (text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (text_[pos_] == ']') {
        ++pos_;
        return out;
      }
      fail("unexpected " + describe(text_[pos_]) + ", expected ',' or ']'");
    }
  }

  std::uint32_t hex4() {
    if (pos_ + 4 > text_.size()) {
      fail("truncated \\u escape");
    }
    std::uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_ + i];
      cp <<= 4;
      if (c >= '0' && c <= '9') {
        cp |= static_cast<std::uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        cp |= static_cast<std::uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        cp |= static_cast<std::uint32_t>(c - 'A' + 10);
      } else {
        fail_at("invalid hex digit " + describe(c) + " in \\u escape", pos_ + i);
      }
    }
    pos_ += 4;
    return cp;
  }

  // Copies one raw UTF-8 sequence starting at pos_, rejecting malformed ones.
  void utf8_sequence(std::string& out) {
    auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text_[i]); };
    unsigned char lead = byte(pos_);
    std::size_t length = 0;
    std::uint32_t cp = 0;
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
      cp = lead & 0x1F;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      cp = lead & 0x0F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      cp = lead & 0x07;
    } else {
      fail("invalid UTF-8 " + describe(text_[pos_]) + " in a string");
    }
    if (pos_ + length > text_.size()) {
      fail("truncated UTF-8 sequence in a string");
    }
    for (std::size_t i = 1; i < length; ++i) {
      unsigned char b = byte(pos_ + i);
      if ((b & 0xC0) != 0x80) {
        fail_at("invalid UTF-8 continuation " + describe(text_[pos_ + i]) + " in a string",
                pos_ + i);
      }
      cp = (cp << 6) | (b & 0x3F);
    }
    bool overlong = (length == 3 && cp < 0x800) || (length == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      fail("invalid UTF-8 sequence (overlong, surrogate or above U+10FFFF) in a string");
    }
    out.append(text_.substr(pos_, length));
    pos_ += length;
  }

  std::string string() {
    std::size_t start = pos_;
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) {
        fail_at("unterminated string", start);
      }
      char c = text_[pos_];
      auto u = static_cast<unsigned char>(c);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (u < 0x20) {
        fail("unescaped control character " + describe(c) + " in a string");
      }
      if (u >= 0x80) {
        utf8_sequence(out);
        continue;
      }
      if (c != '\\') {
        out += c;
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= text_.size()) {
        fail_at("unterminated string", start);
      }
      char e = text_[pos_++];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          std::size_t escape_at = pos_ - 2;
          std::uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail_at("lone low surrogate in \\u escape", escape_at);
          }
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (text_.substr(pos_, 2) != "\\u") {
              fail_at("high surrogate in \\u escape not followed by a low surrogate", escape_at);
            }
            pos_ += 2;
            std::uint32_t low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) {
              fail_at("high surrogate in \\u escape not followed by a low surrogate", escape_at);
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          fail_at("invalid escape '\\" + std::string(1, e) + "'", pos_ - 2);
      }
    }
  }

  Value number() {
    std::size_t start = pos_;
    auto digit = [&](std::size_t i) {
      return i < text_.size() && text_[i] >= '0' && text_[i] <= '9';
    };
    if (text_[pos_] == '-') {
      ++pos_;
    }
    if (!digit(pos_)) {
      fail("expected a digit in a number");
    }
    if (text_[pos_] == '0') {
      ++pos_;
      if (digit(pos_)) {
        fail_at("leading zeros are not allowed in a number", start);
      }
    } else {
      while (digit(pos_)) {
        ++pos_;
      }
    }
    bool integral = true;
    if (pos_ < text_.size() && text_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (!digit(pos_)) {
        fail("expected a digit after the decimal point");
      }
      while (digit(pos_)) {
        ++pos_;
      }
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) {
        ++pos_;
      }
      if (!digit(pos_)) {
        fail("expected a digit in the exponent");
      }
      while (digit(pos_)) {
        ++pos_;
      }
    }
    std::string token(text_.substr(start, pos_ - start));
    Value out;
    out.type_ = Type::Number;
    if (integral) {
      // Exact int64 when it fits; otherwise fall through to double.
      bool negative = token[0] == '-';
      std::uint64_t magnitude = 0;
      bool overflow = false;
      for (std::size_t i = negative ? 1 : 0; i < token.size(); ++i) {
        auto d = static_cast<std::uint64_t>(token[i] - '0');
        if (magnitude > (std::numeric_limits<std::uint64_t>::max() - d) / 10) {
          overflow = true;
          break;
        }
        magnitude = magnitude * 10 + d;
      }
      constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      if (!overflow && (magnitude <= kMax || (negative && magnitude == kMax + 1))) {
        out.integral_ = true;
        out.integer_ = negative ? static_cast<std::int64_t>(0 - magnitude)
                                : static_cast<std::int64_t>(magnitude);
        out.number_ = static_cast<double>(out.integer_);
        return out;
      }
    }
    std::istringstream in(token);
    in.imbue(std::locale::classic());
    double d = 0.0;
    in >> d;
    if (in.fail() || !std::isfinite(d)) {
      fail_at("number " + token + " is outside the double range", start);
    }
    out.number_ = d;
    return out;
  }

  std::string_view text_;
  std::size_t max_depth_;
  std::size_t pos_ = 0;
};

Value parse(std::string_view text, std::size_t max_depth) {
  return Parser(text, max_depth).document();
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

void write_string(std::string& out, const std::string& s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (u < 0x20) {
          out += "\\u00";
          out += hex[u >> 4];
          out += hex[u & 0xF];
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

std::string format_double(double d) {
  if (!std::isfinite(d)) {
    return "null";
  }
  std::string text;
  for (int precision = 15; precision <= 17; ++precision) {
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out.precision(precision);
    out << d;
    text = out.str();
    std::istringstream back(text);
    back.imbue(std::locale::classic());
    double r = 0.0;
    back >> r;
    if (r == d) {
      break;
    }
  }
  // Keep it a JSON number that reads back as a float in Python ("1" -> "1.0").
  if (text.find_first_of(".eE") == std::string::npos) {
    text += ".0";
  }
  return text;
}

void write_value(std::string& out, const Value& v, int indent, int level) {
  auto newline = [&](int lvl) {
    if (indent >= 0) {
      out += '\n';
      out.append(static_cast<std::size_t>(indent * lvl), ' ');
    }
  };
  switch (v.type()) {
    case Type::Null:
      out += "null";
      return;
    case Type::Bool:
      out += v.as_bool() ? "true" : "false";
      return;
    case Type::Number:
      out += v.is_integer() ? std::to_string(v.as_int()) : format_double(v.as_double());
      return;
    case Type::String:
      write_string(out, v.as_string());
      return;
    case Type::Array: {
      if (v.size() == 0) {
        out += "[]";
        return;
      }
      out += '[';
      for (std::size_t i = 0; i < v.size(); ++i) {
        if (i > 0) {
          out += indent >= 0 ? "," : ", ";
        }
        newline(level + 1);
        write_value(out, v.at(i), indent, level + 1);
      }
      newline(level);
      out += ']';
      return;
    }
    case Type::Object: {
      if (v.size() == 0) {
        out += "{}";
        return;
      }
      out += '{';
      for (std::size_t i = 0; i < v.size(); ++i) {
        if (i > 0) {
          out += indent >= 0 ? "," : ", ";
        }
        newline(level + 1);
        write_string(out, v.key_at(i));
        out += ": ";
        write_value(out, v.value_at(i), indent, level + 1);
      }
      newline(level);
      out += '}';
      return;
    }
  }
}

}  // namespace

std::string dump(const Value& value, int indent) {
  std::string out;
  write_value(out, value, indent, 0);
  return out;
}

std::vector<std::string> parse_string_list(std::string_view text) {
  Value list = parse(text);
  if (!list.is_array()) {
    throw Error(std::string("expected a JSON list of strings, got ") + type_name(list.type()));
  }
  std::vector<std::string> out;
  out.reserve(list.size());
  for (std::size_t i = 0; i < list.size(); ++i) {
    if (!list.at(i).is_string()) {
      throw Error("expected a JSON list of strings, element " + std::to_string(i) + " is " +
                  type_name(list.at(i).type()));
    }
    out.push_back(list.at(i).as_string());
  }
  return out;
}

}  // namespace promptseg::json
