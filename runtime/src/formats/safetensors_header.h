#pragma once
/// \file
/// A safetensors header's JSON read in one pass, entry by entry, with no
/// document built: what `SafetensorsFile::validate` checks.
///
/// Why one SAX pass: a checkpoint reloaded every training step opens its
/// headers every time (a block-fp8 MoE checkpoint has 2000 of its tensors in a
/// few files). A JSON document of the header costs an object of strings per
/// tensor; and nlohmann keeps the last of two equal keys silently, so a
/// document needed a second pass to find a name defined twice. This pass
/// collects each entry's three fields as it reads them (`HeaderEntry`, reused
/// from entry to entry) and hands it over as its object closes.
///
/// Contract:
/// 1. A header that is not JSON is named so (`header is not valid JSON (…)`,
///    nlohmann's message), whatever else is wrong with it: the whole text is
///    read before any other problem is raised.
/// 2. Otherwise the first problem in the header's order is raised: the top
///    level not an object, a name defined twice, `__metadata__` not an object
///    of strings, or what `on_entry` throws for an entry.
/// 3. Within an entry a field given twice counts as its last value (as a JSON
///    document keeps it); fields other than the three are skipped.
/// Every error is an Input error that starts with `origin`.

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace loadkit::safetensors {

/// One tensor's entry as written, before any check.
struct HeaderEntry {
  /// A value of the entry's "shape" array, as JSON numbers are read: an integer without a minus
  /// sign is unsigned (it may exceed INT64_MAX), one with a minus sign signed.
  struct Dim {
    enum class Kind { Unsigned, Signed, NotInteger } kind;
    uint64_t unsigned_value = 0;
    int64_t signed_value = 0;
  };
  std::string name;
  bool is_object = false;  ///< the value is a JSON object (none of the below is set otherwise)
  bool has_dtype = false;  ///< "dtype" is a string, `dtype` its text
  std::string dtype;
  bool has_shape = false;  ///< "shape" is an array, `shape` its values
  std::vector<Dim> shape;
  bool has_offsets = false;  ///< "data_offsets" is an array of two non-negative integers, `offsets` them
  uint64_t offsets[2] = {0, 0};
};

/// Reads `text`, a safetensors header, as the contract above says: calls `on_entry` for every
/// tensor's entry as it closes, in the header's order, and puts `__metadata__`'s strings into
/// `metadata`.
void read_header(std::string_view text, const std::string& origin, std::map<std::string, std::string>& metadata,
                 const std::function<void(const HeaderEntry&)>& on_entry);

}  // namespace loadkit::safetensors
