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
/// control characters as `\xNN` instead of trusting every caller to. It is
/// also bounded: past `Error::kMaxMessageBytes` the rest is replaced by
/// "… (N bytes more)" (a config with 100000 layers must not make a 27 MB line).
///
/// Why `Error` is exported and has an out-of-line destructor: an exception
/// thrown by plugin code carries pointers to its type's vtable and typeinfo,
/// and may still be in flight, or caught, after the plugin's library was
/// unloaded (the CLI catches a failed load's error in `main`, after the
/// registry that held the plugin is gone). Emitted inline, both would live
/// in the plugin and dangle. With default visibility and the key function
/// (the destructor) defined in libloadkit_sdk (sdk/src/error.cpp), every
/// library — every plugin included — refers to the SDK's one copy. A type
/// that derives from `Error` and may be thrown across a plugin boundary must
/// do the same; a plugin must never let an exception type of its own escape.

#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

/// Marks what a plugin must find in libloadkit_sdk rather than copy into
/// itself (plugins are built with hidden visibility).
#define LOADKIT_SDK_API __attribute__((visibility("default")))

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
LOADKIT_SDK_API std::string printable(std::string_view text);

class LOADKIT_SDK_API Error : public std::runtime_error {
 public:
  /// Longest message kept, in bytes of its one-line rendering; longer ones end in "… (N bytes more)".
  static constexpr std::size_t kMaxMessageBytes = 4096;

  Error(ErrorKind kind, const std::string& message);
  /// Out of line: the key function that places the vtable and typeinfo in libloadkit_sdk.
  ~Error() override;
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
