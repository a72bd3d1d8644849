#pragma once
/// \file
/// Pointer stability, measured in one place: every kernel tensor's storage and
/// layout (data_ptr, sizes, strides, dtype) by qualified name, taken before an
/// operation and compared after it. What every report's `pointers_stable` is.
/// A captured CUDA graph reads these exact addresses: a reload that moved one
/// would leave the graph reading freed memory, so it is checked, not assumed.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace loadkit {
class Module;
}

namespace loadkit::reload {

class StorageSnapshot {
 public:
  /// Every parameter (once, under its first name) and every buffer of `root`.
  explicit StorageSnapshot(const Module& root);
  /// Whether every tensor recorded is still there with the same storage and layout;
  /// logs a warning naming the first that is not.
  bool unchanged(const Module& root) const;

 private:
  struct Facts {
    const void* ptr;
    std::vector<int64_t> sizes, strides;
    c10::ScalarType dtype;
    bool operator==(const Facts&) const = default;
  };
  static std::unordered_map<std::string, Facts> take(const Module& root);
  std::unordered_map<std::string, Facts> facts_;
};

}  // namespace loadkit::reload
