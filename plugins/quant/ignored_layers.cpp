#include "ignored_layers.h"

#include <algorithm>

#include <loadkit/error.h>
#include <loadkit/quant_method.h>

namespace loadkit::quant {

IgnoredLayers::IgnoredLayers(std::vector<std::string> entries, Rules rules, std::string where)
    : rules_(rules), where_(std::move(where)) {
  for (std::string& entry : entries) {
    if (rules_ == Rules::CompressedTensors && entry.starts_with("re:")) {
      try {
        patterns_.emplace_back(entry.substr(3), std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        fail(ErrorKind::Input, where_, " has '", entry, "', which is not a regular expression (", e.what(), ")");
      }
    } else {
      names_.push_back(std::move(entry));
    }
  }
}

bool IgnoredLayers::matches(const std::string& name) const {
  if (std::find(names_.begin(), names_.end(), name) != names_.end()) return true;
  for (const std::regex& pattern : patterns_)  // re.match: anchored at the start, not at the end
    if (std::regex_search(name, pattern, std::regex_constants::match_continuous)) return true;
  return false;
}

bool IgnoredLayers::all_or_none(const std::string& layer, const std::vector<std::string>& parts) const {
  std::vector<std::string> skipped, kept;
  for (const std::string& part : parts) (matches(part) ? skipped : kept).push_back(part);
  if (!skipped.empty() && !kept.empty()) {
    std::string list;
    for (const std::string& part : skipped) list += (list.empty() ? "" : ", ") + part;
    fail(ErrorKind::Input, where_, " leaves ", list, " unquantized but not the rest of ", layer,
         ": the parts of a fused layer share one tensor and must have the same precision");
  }
  return !skipped.empty();
}

bool IgnoredLayers::skips_linear(const LayerPrefix& layer) const {
  if (layer.name.empty()) return false;
  if (!layer.parts.empty()) return all_or_none(layer.name, layer.parts);
  return matches(layer.name);
}

bool IgnoredLayers::skips_experts(const LayerPrefix& layer) const {
  if (layer.name.empty()) return false;
  if (rules_ == Rules::CompressedTensors) {
    const std::string first = layer.name + ".0.";
    return all_or_none(layer.name, {first + "gate_proj", first + "up_proj", first + "down_proj"});
  }
  for (const std::string& entry : names_)
    if (entry.find("experts") != std::string::npos && entry.find(layer.name) != std::string::npos) return true;
  return false;
}

}  // namespace loadkit::quant
