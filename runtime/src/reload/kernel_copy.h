#pragma once
/// \file
/// Kernel-format tensors copied straight into the model: no loaders, no
/// processing. The one copy behind `reload --no-process` (a checkpoint named
/// as the model's parameters) and sharded state (vLLM's per-rank state dict,
/// sharded_state.h), which differ only in their targets.
///
/// Transactional as every reload: every name, shape and dtype (and, when the
/// copy must be complete, that every target is present) is checked on the
/// headers before the first byte is written.

#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "formats/checkpoint_files.h"
#include "loadkit/runtime/reload_types.h"

namespace loadkit {
class Module;
}

namespace loadkit::reload {

/// Where kernel-format tensors may go, by name.
struct KernelCopyTargets {
  std::vector<std::pair<std::string, at::Tensor>> tensors;  ///< name → the model's kernel tensor (a view of its storage)
  /// What the names are, for "tensor 'x' is not <what>" messages.
  std::string what;
  /// A tensor smaller than its target (no dimension larger, same rank and dtype) goes into
  /// the leading part of it, with a warning (vLLM's sharded_state loader does, for padding).
  bool leading_part_fits = false;
};

/// The model's parameters, each under its first name: what `reload --no-process` reads.
KernelCopyTargets parameter_targets(const Module& root);

/// Copies every tensor of `files` into its target, on `device` (staged where the device takes
/// the staged path). Input errors name the file and the tensor; with `complete`, a target no
/// file holds fails listing every missing name. Counts, as ReloadStats says, the layers whose
/// tensors it wrote, and whether every kernel tensor of `root` kept its storage.
///
/// A failure while copying (a file that changed while it was read) leaves the tensors copied so
/// far in place: `written`, if given, lists their layers. With Rollback::Journal each target is
/// first copied to host memory (the kernel bytes the checkpoint covers) and a failure puts every
/// one back bit-identically; `written` is then empty.
///
/// `window_bytes`: how far the staged path may read ahead (0: the largest tensor, a reload's
/// bound); a fresh load, which has no model memory to protect yet, passes a load's window.
ReloadStats copy_kernel_format(Module& root, const KernelCopyTargets& targets, const safetensors::CheckpointFiles& files,
                               const c10::Device& device, bool complete, Rollback rollback = Rollback::None,
                               std::vector<std::string>* written = nullptr, uint64_t window_bytes = 0);

}  // namespace loadkit::reload
