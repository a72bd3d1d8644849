#pragma once
/// \file
/// What the ranks of a weight sync tell each other: the tensor manifest
/// (names, dtypes, shapes, byte offsets) and every rank's verdict on a step,
/// so that a failure on one rank stops all of them with the same line instead
/// of leaving the others in a collective that can never complete.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "loadkit/error.h"
#include "loadkit/weights.h"

namespace loadkit {

class LoadedModel;
class ProcessGroup;

namespace sync {

struct ManifestEntry {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  ///< broadcast: byte offset in the stream of buckets

  uint64_t bytes() const;
  bool operator==(const ManifestEntry&) const = default;
};

/// "'name' [a, b] float32".
std::string describe(const ManifestEntry& entry);

/// Round-trips through JSON text; `origin` names the sender in parse errors (Input).
std::string encode(const std::vector<ManifestEntry>& entries, uint64_t bucket_bytes = 0);
std::vector<ManifestEntry> decode(const std::string& text, const std::string& origin, uint64_t* bucket_bytes = nullptr);

/// Meta tensors of the entries' shapes and dtypes, for LoadedModel::validate_update.
std::vector<NamedWeight> meta_weights(const std::vector<ManifestEntry>& entries, const std::string& origin);

/// Runs `step` on this rank and tells every member of `group` every outcome.
/// When all succeeded, returns each rank's payload in rank order. When any
/// rank's step threw, every rank throws the lowest failing rank's error (same
/// kind), its message prefixed with `who(rank)`, e.g. "receiver rank 2: ". A
/// rank that failed publishes and leaves at once; the others stop waiting as
/// soon as they see a failure. A collective: every member calls it at the
/// same point (a member that died is waited for until LOADKIT_TP_TIMEOUT, or
/// until the store is found gone).
std::vector<std::string> agree(ProcessGroup& group, const std::function<std::string()>& step,
                               const std::function<std::string(int)>& who);

/// The last step of a sync on a rank that holds `model`: this rank's `failure`, or else its
/// finish_update(), told to every member (agree). When any rank failed, rolls this rank's update
/// back and throws that rank's error; otherwise the update stands and its journal is let go.
void commit_everywhere(LoadedModel& model, ProcessGroup& group, const std::optional<Error>& failure,
                       const std::function<std::string(int)>& who);

}  // namespace sync
}  // namespace loadkit
