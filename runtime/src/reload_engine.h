#pragma once
/// \file
/// In-place reloading (DESIGN §7): restore each module's load format on the
/// meta device, run the model's own load_weights through wrapped loaders,
/// process a module the moment all its weights have arrived, and copy the
/// results into the original kernel tensors (same storage).
///
/// Beyond vLLM's layerwise reload:
///  - transactional: a checkpoint is first run through the same loaders
///    against meta tensors (names, shard shapes, dtypes, duplicates,
///    completeness) and only then applied; a failed validation leaves every
///    tensor as it was;
///  - modules whose processing changes nothing (plain weights) are written
///    straight into their kernel tensors: no staging copy at all;
///  - quantization writes into the kernel tensors in place (KernelTargets),
///    so a layer costs its load-format size in extra memory, then is freed;
///  - pointer stability is measured, not assumed;
///  - validation never reads or copies weight data: the loaders see meta
///    stand-ins of the given tensors (same shapes, strides and dtypes);
///  - a streaming update may keep a journal (Rollback::Journal): before the
///    first write into a module's kernel tensors in the session, a copy of
///    them is kept (host memory for device tensors: the touched kernel bytes
///    of this rank, once per session, one device-to-host copy each); an
///    abort or rollback() copies them all back into the same storage, so
///    the model is bit-identical to before and pointers stay put.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "loadkit/runtime/engine.h"  // Borrowed, Rollback
#include "loadkit/weights.h"

namespace loadkit {

class Module;

struct ReloadStats {
  int layers_processed = 0;  ///< modules that received weights and were written
  int layers_delayed = 0;    ///< modules processed only at the end (attention-like)
  bool pointers_stable = true;
  std::vector<std::string> untouched_modules;  ///< modules that received nothing
  uint64_t journal_bytes = 0;  ///< host memory the rollback journal held (Rollback::Journal)
  int journaled_modules = 0;   ///< modules whose kernel tensors it copied
};


class ReloadEngine {
 public:
  /// Records every parameter's and buffer's load-format metadata. Call right
  /// after the model is built, before anything is loaded or processed.
  ReloadEngine(Module& root, c10::Device device);
  ~ReloadEngine();

  /// After a fresh load has been processed: lets go of the load-format
  /// tensors that processing replaced (the records keep only their shapes),
  /// so a quantized model holds its kernel format and nothing more.
  void release_load_format();

  /// What a stream is opened for: validation looks at names, shapes and dtypes
  /// only (no data is read); applying reads the data (the staged fast path).
  enum class StreamUse { Validate, Apply };
  /// How to open the applying stream, worked out from the validation.
  struct ApplyPlan {
    /// Tensor names to deliver in this order (each transformed module's weights
    /// together), or empty: as validated.
    std::vector<std::string> order;
    /// With `order`: per tensor, the load-format bytes of the transformed module
    /// it feeds (materialised beside the stream while it is applied) and the
    /// processing scratch, else 0.
    std::vector<uint64_t> reserve;
    /// Device bytes the stream and the materialised module may hold together:
    /// the largest layer's load-format size, the reload's memory bound.
    uint64_t budget = 0;
  };
  using StreamFactory = std::function<std::unique_ptr<WeightStream>(StreamUse, const ApplyPlan&)>;
  using Loader = std::function<void(WeightStream&)>;  ///< the model's load_weights

  /// Reloads from a complete checkpoint: validates the whole of `open()`'s
  /// stream first (nothing is touched if it fails, including a missing
  /// weight), then streams it again into the model. Modules that processing
  /// transforms get their load format materialised when their first weight
  /// arrives and written by their loaders at once (no call is kept), and the
  /// applying stream delivers each such module's weights together, so one
  /// module is materialised at a time whatever the files' order.
  ReloadStats reload(const StreamFactory& open, const Loader& load_weights);

  /// Streaming form for trainers: chunks are validated one by one and
  /// applied; a module may be completed by a later chunk. A partial update is
  /// allowed; the stats list the modules that received nothing. A chunk that
  /// fails validation is rejected whole and the session goes on; a failure
  /// while applying aborts the session (with a journal: everything undone).
  void begin_update(Rollback rollback = Rollback::None);
  void update(const std::vector<NamedWeight>& chunk, const Loader& load_weights,
              Borrowed borrowed = Borrowed::UntilFinish);
  /// Checks a whole planned update (tensors may be on the meta device) against the model
  /// through its loaders without writing or keeping anything: names, shard shapes, dtypes,
  /// duplicates and, when `complete`, that nothing is missing. Call right after begin_update().
  void validate_update(const std::vector<NamedWeight>& planned, const Loader& load_weights, bool complete);
  ReloadStats finish_update();
  bool updating() const;
  /// With Rollback::Journal: copies every journaled kernel tensor back (bit-identical, same
  /// storage), during an update (which it ends) or after finish_update() until commit() or the
  /// next begin_update(). Without a journal, during an update: ends it, keeping what was written.
  void rollback();
  /// Lets go of the journal of a finished update (its host memory).
  void commit();

  /// Copies kernel-format tensors (named as the model's parameters) straight
  /// in, no loaders, no processing. Validates every name, shape and dtype (and,
  /// when `complete`, that every parameter is present) before writing.
  ReloadStats copy_kernel_format(const StreamFactory& open, bool complete);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loadkit
