#pragma once
/// \file
/// loadkit's one error type and the one place that knows the exit codes.
///
/// Every failure a user can cause is thrown as `loadkit::Error` with a kind;
/// the CLI prints `what()` as one line and exits with `exit_code(kind)`.
/// Messages name the file, tensor or key at fault.
///
/// A message is one line by construction: the names it quotes come from
/// files (a tensor name, a YAML key, a path may hold "\n"), so `Error` writes
/// control characters as `\xNN` instead of trusting every caller to.

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
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

/// `text` with control characters written as `\xNN` (a one-line rendering of untrusted names).
inline std::string printable(std::string_view text) {
  constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  for (unsigned char c : text) {
    if (c >= 0x20 && c != 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += {'\\', 'x', kHex[c >> 4], kHex[c & 15]};
    }
  }
  return out;
}

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(printable(message)), kind_(kind) {}
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
