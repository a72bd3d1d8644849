#pragma once
/// \file
/// loadkit's one error type and the one place that knows the exit codes.
///
/// Every failure a user can cause is thrown as `loadkit::Error` with a kind;
/// the CLI prints `what()` as one line and exits with `exit_code(kind)`.
/// Messages name the file, tensor or key at fault.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace loadkit {

/// What went wrong, as far as the caller's exit code is concerned.
enum class ErrorKind {
  Other = 1,   ///< anything else (internal, out of memory, I/O)
  Usage = 2,   ///< command line, job file or option values
  Input = 3,   ///< bad checkpoint or input: missing file, corrupt header, shape/dtype, unknown or missing weights
  Plugin = 4,  ///< no plugin serves the architecture, ABI mismatch, library failed to open
};

/// The exit code a process reports for an error of this kind.
constexpr int exit_code(ErrorKind kind) { return static_cast<int>(kind); }

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

/// Concatenates anything `operator<<` can print: `cat("tensor '", name, "': ", n, " bytes")`.
template <class... Parts>
std::string cat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

template <class... Parts>
[[noreturn]] void fail(ErrorKind kind, Parts&&... parts) {
  throw Error(kind, cat(std::forward<Parts>(parts)...));
}

}  // namespace loadkit
