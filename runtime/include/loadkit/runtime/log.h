#pragma once
/// \file
/// loadkit's logging, backed by spdlog in one translation unit so that no
/// torch translation unit includes spdlog (torch ships its own fmt).
/// Everything goes to stderr; stdout is for command output.

#include <string>
#include <string_view>

namespace loadkit::log {

enum class Level { trace, debug, info, warn, error };

/// "trace" … "error"; anything else is a Usage error naming the value.
Level parse_level(std::string_view name);
void set_level(Level level);
bool enabled(Level level);

void trace(const std::string& message);
void debug(const std::string& message);
void info(const std::string& message);
void warn(const std::string& message);
void error(const std::string& message);

}  // namespace loadkit::log
