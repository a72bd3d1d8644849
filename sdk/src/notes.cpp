#include "loadkit/notes.h"

#include <utility>

namespace loadkit {

namespace {
thread_local std::vector<std::string> queued;
}  // namespace

void note(std::string message) { queued.push_back(std::move(message)); }

std::vector<std::string> take_notes() { return std::exchange(queued, {}); }

}  // namespace loadkit
