#pragma once
/// \file
/// How the commands print: JSON that always parses, lists in one line.

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace loadkit::cli {

/// `value` as the commands print JSON: indented by 2. Names taken from the
/// file system (a model directory, a shard's or a plugin's file name) and from
/// plugins are bytes, not always UTF-8; nlohmann's dump would throw on them,
/// so each byte that is not part of valid UTF-8 is written as U+FFFD (as
/// Python's `errors="replace"` does) and the output is always valid JSON.
std::string json_text(const nlohmann::ordered_json& value);

/// "a, b, c", or "-" for none.
std::string join(const std::vector<std::string>& items);

}  // namespace loadkit::cli
