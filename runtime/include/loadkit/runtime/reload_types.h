#pragma once
/// \file
/// The words the host API (engine.h) and the reload engine share: how long an
/// update's tensors stay valid, whether it can be undone, and what a reload
/// phase reports. Torch-free, so that either side includes it without the other.

#include <cstdint>
#include <string>
#include <vector>

namespace loadkit {

/// How long the tensors of an update chunk stay valid (see LoadedModel::update).
enum class Borrowed {
  /// Until finish_update(): the engine may keep references (transformed modules cache their
  /// loader calls until complete). No copy is made.
  UntilFinish,
  /// Until update() returns: the caller reuses the buffers (double-buffered receive). The
  /// engine clones what it must keep past the call, and only that: the tensors cached by
  /// transformed modules that the chunk left incomplete (and by attention-like modules,
  /// processed at the end), on the device they came on.
  UntilReturn,
};

/// Whether a streaming update can be undone (see LoadedModel::begin_update).
enum class Rollback { None, Journal };

/// What one load, reload, update or kernel-format copy did to the model.
///
/// The counts mean the same thing for every operation: a *layer* is a module
/// that owns parameters (a linear layer, a norm, an embedding; a parameter
/// shared by two modules belongs to the first, as in named_parameters()).
struct ReloadStats {
  /// Layers whose kernel tensors the operation wrote — loaded and, where the
  /// layer's processing applies, processed — in its regular pass. A load
  /// counts every layer; a partial update counts the layers it touched; a
  /// kernel-format copy counts the layers whose tensors it copied.
  int layers_processed = 0;
  /// Layers written only once the source had ended, after every other one
  /// (attention-like modules whose processing may read what others produced).
  /// Disjoint from layers_processed. 0 for loads and kernel-format copies.
  int layers_delayed = 0;
  /// Every kernel tensor (parameter and buffer) kept its storage and layout
  /// (data_ptr, sizes, strides, dtype) through the operation.
  bool pointers_stable = true;
  std::vector<std::string> untouched_modules;  ///< layers that received nothing (reloads and updates)
  uint64_t journal_bytes = 0;  ///< host memory the rollback journal held (Rollback::Journal)
  int journaled_modules = 0;   ///< layers whose kernel tensors it copied
  /// Updates: chunks that matched an earlier chunk's plan (same names, shapes, strides, dtypes,
  /// devices) and so skipped the validation pass, their element counts checked instead; of
  /// those, the ones whose recorded writes were replayed without calling the loaders (a
  /// quantized module's kept until it is complete, then processed).
  int chunks_by_plan = 0;
  int chunks_replayed = 0;
  /// Reloads: the checkpoint was laid out as the last recorded reload's (names, dtypes, shapes,
  /// file by file) and that reload's writes were replayed: no validation pass, no loader called.
  bool reload_by_plan = false;
  /// Reloads that rebuild modules: laid out as the last such reload, whose stream order was kept;
  /// the stream opened with it before validation, and validation's own order matched it.
  bool reload_order_kept = false;
};

}  // namespace loadkit
