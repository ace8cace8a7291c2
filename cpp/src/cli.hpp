// Shared by the command-line programs: one-line errors and exit status 2 on bad input.
#pragma once

#include <cstdio>
#include <exception>
#include <string>

#include "promptseg/error.hpp"

namespace promptseg::cli {

/// Exit status for bad input or bad arguments (as argparse uses).
inline constexpr int kBadInput = 2;

/// ``message`` with line breaks replaced by spaces, so every error is one line.
inline std::string one_line(std::string message) {
  for (char& c : message) {
    if (c == '\n' || c == '\r') {
      c = ' ';
    }
  }
  return message;
}

/// Print "<program>: error: <message>" on stderr and return kBadInput.
inline int fail(const char* program, const std::string& message) {
  std::fprintf(stderr, "%s: error: %s\n", program, one_line(message).c_str());
  return kBadInput;
}

/// Run ``body``; bad input (promptseg::Error) becomes a one-line error with status 2, anything
/// else (out of memory, a bug) a one-line error with status 1.
template <typename Body>
int guarded(const char* program, Body&& body) {
  try {
    return body();
  } catch (const Error& e) {
    return fail(program, e.what());
  } catch (const std::exception& e) {
    fail(program, std::string("internal error: ") + e.what());
    return 1;
  }
}

}  // namespace promptseg::cli
