#pragma once
/// \file
/// What a host (the CLI, the Python module) reports for the exception in
/// flight: its kind, hence its exit code, and one line of message. libtorch's
/// errors lose their C++ backtrace here, so no host ever shows one.

#include <string>

#include "loadkit/error.h"

namespace loadkit {

struct Failure {
  ErrorKind kind = ErrorKind::Other;
  std::string message;  ///< one line, no backtrace
};

/// Classifies the exception being handled: loadkit::Error keeps its kind;
/// c10 errors, std::bad_alloc and other std::exceptions are Other. Call only
/// inside a catch block.
Failure current_failure() noexcept;

}  // namespace loadkit
