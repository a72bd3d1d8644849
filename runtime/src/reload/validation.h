#pragma once
/// \file
/// The validation pass's streams: a source's tensors as meta stand-ins (same
/// shapes, strides and dtypes, no data: validation neither reads nor copies
/// weights, and a plugin's layout conversions run on meta too), and a record
/// of what went to the loaders in which order (what the staging plan orders).

#include <cstddef>
#include <string>
#include <unordered_map>
#include <vector>

#include "loadkit/weights.h"

namespace loadkit::reload {

/// What a recorded validation saw: tensor names in stream order, and the first module each fed.
struct ValidationRecord {
  std::vector<std::string> names;
  std::unordered_map<std::string, size_t> module_of;  ///< tensor name → index into the records
  std::string current;  ///< the tensor the loaders are working on (while recording)

  void clear() {
    names.clear();
    module_of.clear();
    current.clear();
  }
  /// Called from a loader while `current` is being loaded: it feeds module `m`.
  void feeds(size_t m) {
    if (!current.empty()) module_of.emplace(current, m);
  }
};

/// Another stream's tensors as meta stand-ins.
class MetaStream final : public WeightStream {
 public:
  explicit MetaStream(WeightStream& inner) : inner_(inner) {}
  bool next(NamedWeight& out) override;

 private:
  WeightStream& inner_;
};

/// Passes a stream through, noting each tensor's name in `record` as it goes to the loaders.
class RecordingStream final : public WeightStream {
 public:
  RecordingStream(WeightStream& inner, ValidationRecord& record) : inner_(inner), record_(record) {}
  bool next(NamedWeight& out) override;

 private:
  WeightStream& inner_;
  ValidationRecord& record_;
};

}  // namespace loadkit::reload
