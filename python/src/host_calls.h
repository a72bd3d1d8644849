#pragma once
/// \file
/// How the extension calls into loadkit from Python without ever taking the
/// host process down or freezing its other threads.
///
/// 1. The GIL is released for every call into the runtime (`without_gil`) —
///    also for cheap ones like `report`, because they wait for the model's
///    lock, which a reload holds for seconds.
/// 2. Nothing under a model's lock needs the GIL: the lock is only ever taken
///    inside `without_gil`, and every Python-owned object a call hands to the
///    runtime (the caller's tensors, whose storage may belong to a numpy array
///    or carry a Python object) is also held by the extension and released
///    only after the lock, with the GIL (see Engine in bindings.cpp).
/// 3. Interpreter exit: a thread that is inside a call when the interpreter
///    shuts down (a daemon thread in `reload`) must not come back into Python:
///    CPython would end it with pthread_exit, whose unwinding through C++
///    frames ends in std::terminate. An atexit handler (`shutdown`) therefore
///    marks the process as exiting and waits, without the GIL, until every
///    call in flight has either returned into Python or parked: a call that
///    finishes after the mark never takes the GIL again and sleeps until the
///    process is gone. Calls made after the mark fail at once. Exit thus waits
///    for the runtime work in flight (a reload completes) and never for Python.
/// 4. Text: loadkit's messages may quote bytes that are not UTF-8 (a path, a
///    tensor name from a file); they become Python text with
///    `backslashreplace` (always printable), paths with `surrogateescape`
///    (what os.fsdecode gives, so they round-trip through os.fsencode).

#include <Python.h>

#include <exception>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "loadkit/runtime/failure.h"

namespace loadkit::python {

/// Raises loadkit's Python exception for `failure` (loadkit._errors maps its kind to a class)
/// and unwinds to pybind11. Needs the GIL.
[[noreturn]] void raise(const Failure& failure);

/// Python text of UTF-8-ish bytes: invalid bytes as \xNN escapes.
PyObject* escaped_text(const std::string& text);
/// Python text of a path or name as the OS gave it: invalid bytes as surrogates (os.fsdecode).
PyObject* os_text(const std::string& text);

/// Bookkeeping of the calls that are running without the GIL (rule 3 above).
namespace calls {
/// With the GIL: counts a call as in flight; false once the interpreter is exiting.
bool enter();
/// Without the GIL, the work done: true when the caller may take the GIL back; false when the
/// interpreter is exiting (the caller parks and never returns).
bool may_return();
/// With the GIL again: the call is no longer in flight.
void leave();
/// Never returns: the thread sleeps until the process ends.
[[noreturn]] void park();
/// Whether the interpreter is exiting (work that has not started yet is refused).
bool exiting();
/// atexit: refuse new calls, wait (without the GIL) for those in flight to return or park.
void shutdown();
/// In a child after fork(): no call of the parent's threads is in flight here.
void after_fork_in_child();
}  // namespace calls

/// Runs `work` without the GIL (rules 1 and 3); a failure becomes loadkit's Python exception,
/// one line, no C++ backtrace. The message is taken while whatever threw (a plugin's code
/// included) is still loaded. Call with the GIL held.
template <class Work>
auto without_gil(Work&& work) -> decltype(work()) {
  using Result = decltype(work());
  if (!calls::enter()) raise({ErrorKind::Other, "loadkit: the interpreter is exiting; no new call is started"});
  PyThreadState* state = PyEval_SaveThread();
  std::optional<Failure> failure;
  std::conditional_t<std::is_void_v<Result>, bool, std::optional<Result>> result{};
  try {
    if constexpr (std::is_void_v<Result>) {
      work();
    } else {
      result.emplace(work());
    }
  } catch (...) {
    failure = current_failure();
  }
  // Not through a destructor (pybind11's gil_scoped_release): taking the GIL back is where an
  // exiting interpreter would end this thread, so it must be decided here.
  if (!calls::may_return()) calls::park();
  PyEval_RestoreThread(state);
  calls::leave();
  if (failure) raise(*failure);
  if constexpr (!std::is_void_v<Result>) return std::move(*result);
}

}  // namespace loadkit::python
