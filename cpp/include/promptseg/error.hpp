// promptseg C++ host: the one exception type every reader throws.
#pragma once

#include <stdexcept>
#include <string>

namespace promptseg {

/// Bad input (missing or corrupted file, wrong field, unknown prompt).
///
/// The message is one line that names the file and says what was received and what was
/// expected; the command-line programs print it and exit with status 2.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace promptseg
