#pragma once
/// \file
/// The rollback journal of a streamed update (Rollback::Journal): before the
/// session first writes into a module's kernel tensors, a copy of them is kept
/// (host memory for device tensors, pinned: a faster copy back), once per
/// session and module; restore() copies them all back into the same storage,
/// so the model is bit-identical to before and pointers stay put.
///
/// Cost: the touched kernel bytes of this rank in host memory, and one
/// device-to-host copy of each. Without a journal (Rollback::None) keep() does
/// nothing and restore() has nothing to undo.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <unordered_set>
#include <utility>
#include <vector>

#include "loadkit/runtime/reload_types.h"
#include "reload/records.h"

namespace loadkit::reload {

class Journal {
 public:
  /// Starts a session's journal (the previous one is let go).
  void begin(Rollback mode);
  /// Before the first write into `mod`'s kernel tensors in this session: keeps a copy of them.
  void keep(const ModuleRecord& mod);
  /// Copies every kept tensor back, newest first (a tensor kept twice, e.g. shared by two
  /// modules, ends with its oldest copy), then lets go of the copies.
  void restore();
  /// Lets go of the copies (the host memory), keeping nothing to undo.
  void clear();

  /// Whether this session keeps copies (Rollback::Journal).
  bool keeps() const { return mode_ == Rollback::Journal; }
  uint64_t bytes() const { return bytes_; }     ///< host memory the session's copies took
  int modules() const { return modules_; }      ///< modules whose kernel tensors were kept

 private:
  Rollback mode_ = Rollback::None;
  std::vector<std::pair<at::Tensor, at::Tensor>> entries_;  ///< (kernel tensor, its copy), in the order taken
  std::unordered_set<const ModuleRecord*> kept_;
  uint64_t bytes_ = 0;
  int modules_ = 0;
};

}  // namespace loadkit::reload
