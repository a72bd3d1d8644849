#include "loadkit/runtime/failure.h"

#include <c10/util/Exception.h>

#include <exception>
#include <new>

namespace loadkit {

namespace {
/// Messages never carry a newline (or what follows it: c10's context lines) onto the terminal.
std::string one_line(std::string message) {
  if (auto nl = message.find('\n'); nl != std::string::npos) message.resize(nl);
  return message;
}
}  // namespace

Failure current_failure() noexcept {
  try {
    try {
      throw;
    } catch (const Error& e) {
      return {e.kind(), one_line(e.what())};
    } catch (const c10::OutOfMemoryError& e) {
      return {ErrorKind::Other, one_line(std::string("out of memory: ") + e.what_without_backtrace())};
    } catch (const c10::Error& e) {
      return {ErrorKind::Other, one_line(e.what_without_backtrace())};
    } catch (const std::bad_alloc&) {
      return {ErrorKind::Other, "out of host memory"};
    } catch (const std::exception& e) {
      return {ErrorKind::Other, one_line(e.what())};
    } catch (...) {
      return {ErrorKind::Other, "unknown failure"};
    }
  } catch (...) {  // copying a message ran out of memory: a short string needs no allocation
    return {ErrorKind::Other, "out of memory"};
  }
}

}  // namespace loadkit
