#pragma once
/// \file
/// What a plugin tells the user while the host calls it: info lines that the host logs at its
/// own log level (`--log-level`, `loadkit.set_log_level` in Python), never printed by the plugin.
/// Plugins have no logger of their own: spdlog stays inside the runtime (loadkit/runtime/log.h).
///
/// The contract: a note queued during one of the host's calls into a plugin (a model or
/// quantization factory) is logged once, at info level, when that call returns or throws.
/// Notes are per thread, so ranks that run as threads of one process keep their own.

#include <string>
#include <vector>

namespace loadkit {

/// Queues `message` (one line) for the host to log at info level.
void note(std::string message);

/// The notes queued on this thread since the last call, oldest first; the host's side.
std::vector<std::string> take_notes();

}  // namespace loadkit
