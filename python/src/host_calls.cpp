// The GIL, exit and text rules of host_calls.h.

#include "host_calls.h"

#include <torch/csrc/utils/pybind.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <new>
#include <thread>

namespace loadkit::python {

namespace py = pybind11;

PyObject* escaped_text(const std::string& text) {
  return PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "backslashreplace");
}

PyObject* os_text(const std::string& text) {
  return PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "surrogateescape");
}

void raise(const Failure& failure) {
  py::object type = py::module_::import("loadkit._errors").attr("error_type")(exit_code(failure.kind));
  py::object message = py::reinterpret_steal<py::object>(escaped_text(failure.message));
  if (!message) throw py::error_already_set();
  PyErr_SetObject(type.ptr(), message.ptr());
  throw py::error_already_set();
}

namespace calls {
namespace {

struct State {
  std::mutex mutex;
  std::condition_variable changed;
  int in_flight = 0;
  bool exiting = false;
};

// Never destroyed: parked threads and static destructors at exit must not race on it.
State& state() {
  alignas(State) static unsigned char storage[sizeof(State)];
  static State* s = new (storage) State;
  return *s;
}

}  // namespace

bool enter() {
  State& s = state();
  std::lock_guard lock(s.mutex);
  if (s.exiting) return false;
  ++s.in_flight;
  return true;
}

bool may_return() {
  State& s = state();
  std::lock_guard lock(s.mutex);
  if (!s.exiting) return true;  // shutdown() waits for leave(), which follows the GIL
  --s.in_flight;
  s.changed.notify_all();
  return false;
}

void leave() {
  State& s = state();
  std::lock_guard lock(s.mutex);
  --s.in_flight;
  s.changed.notify_all();
}

void park() {
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}

bool exiting() {
  State& s = state();
  std::lock_guard lock(s.mutex);
  return s.exiting;
}

void shutdown() {
  State& s = state();
  {
    std::lock_guard lock(s.mutex);
    s.exiting = true;
  }
  // Without the GIL: a call that finished before the mark takes it to return.
  Py_BEGIN_ALLOW_THREADS
  {
    std::unique_lock lock(s.mutex);
    s.changed.wait(lock, [&] { return s.in_flight == 0; });
  }
  Py_END_ALLOW_THREADS
}

void after_fork_in_child() {
  // The parent's other threads do not exist here; their calls and a lock one of them may have
  // held at the fork go with them.
  new (&state()) State;
}

}  // namespace calls
}  // namespace loadkit::python
