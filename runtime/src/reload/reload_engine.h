#pragma once
/// \file
/// In-place reloading: restore each module's load format on the meta device,
/// run the model's own load_weights through wrapped loaders, process a module
/// the moment all its weights have arrived, and copy the results into the
/// original kernel tensors (same storage).
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
///  - pointer stability is measured, not assumed (storage_snapshot.h);
///  - validation never reads or copies weight data (validation.h);
///  - a streaming update may keep a journal (journal.h) that undoes it
///    bit-identically;
///  - a checkpoint laid out exactly as the last reload's (a trainer's next
///    step) replays that reload's recorded writes (reload_plan.h): the layout
///    check stands for validation, and no loader runs.
///
/// The pieces, in the order a reload meets them: records.h (the load format,
/// recorded at build time), session.h (initialize → validate → apply →
/// finalize, one explicit phase at a time), staging_plan.h (the order and
/// memory budget of the applying stream), module_step.h (one module rebuilt
/// into its kernel tensors), journal.h, storage_snapshot.h, and the plans that
/// skip validation and the loaders: reload_plan.h, update_plan.h. Kernel-format
/// copies (no loaders, no processing) are kernel_copy.h.

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "formats/checkpoint_files.h"
#include "loadkit/runtime/reload_types.h"
#include "loadkit/weights.h"
#include "reload/reload_plan.h"
#include "reload/session.h"
#include "weight_sources.h"

namespace loadkit {

class Module;
struct ModelContext;

class ReloadEngine {
 public:
  /// Records every parameter's and buffer's load-format metadata. Call right
  /// after the model is built, before anything is loaded or processed. `ctx`
  /// (the model's device, dtype, quantization) must outlive the engine.
  ReloadEngine(Module& root, const ModelContext& ctx);
  ~ReloadEngine();

  /// Layers the engine tracks: modules that own parameters (reload_types.h).
  int layers() const;

  /// After a fresh load has been processed: lets go of the load-format
  /// tensors that processing replaced (the records keep only their shapes),
  /// so a quantized model holds its kernel format and nothing more.
  void release_load_format();

  using Loader = reload::Loader;  ///< the model's load_weights

  /// Reloads from a complete checkpoint: validates the whole of it first
  /// (nothing is touched if that fails, including a missing weight), then
  /// streams it again into the model. Modules that processing transforms get
  /// their load format materialised when their first weight arrives and
  /// written by their loaders at once (no call is kept), and the applying
  /// stream delivers each such module's weights together (staging_plan.h), so
  /// one module is materialised at a time whatever the files' order.
  ///
  /// A failure while applying (a file that changed while it was read, a processing error) ends
  /// the session with every module not yet written put back. With Rollback::Journal the written
  /// ones are put back too (journal.h: the rank's kernel bytes in host memory); without, they keep
  /// the new weights and `written`, if given, lists them (empty when the model is as before).
  ///
  /// `data`, when given, opens the applying stream for the plan (a tensor-parallel group's
  /// read-once stream, fanout/fanout_stream.h); by default open_weight_stream().
  using DataSource = std::function<std::unique_ptr<WeightStream>(const StreamPlan&)>;
  ReloadStats reload(const safetensors::CheckpointFiles& files, const Loader& load_weights,
                     Rollback rollback = Rollback::None, std::vector<std::string>* written = nullptr,
                     const DataSource& data = {});

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
  /// Between begin_update() and finish_update(), and during reload().
  bool updating() const;
  /// With Rollback::Journal: copies every journaled kernel tensor back (bit-identical, same
  /// storage), during an update (which it ends) or after finish_update() until commit() or the
  /// next begin_update(). Without a journal, during an update: ends it, keeping what was written.
  void rollback();
  /// Lets go of the journal of a finished update (its host memory).
  void commit();

 private:
  /// The stream plan of the last validated reload whose modules are rebuilt (an order only
  /// validation knows), with the layout it was made for. A reload of the same layout opens its
  /// stream with it before validating, so that the readers fill the window meanwhile (the
  /// validation of a MoE model's 1028 tensors took 8 ms on the GPU machine); validation's own
  /// plan is compared with it, and a different one reopens the stream. (None differs: a plan
  /// depends on the layout and on the modules, which a reload does not change.) A reload plan
  /// recorded in this order (reload_plan.h) is replayed on such a stream, with no validation.
  struct KeptStreamPlan {
    reload::CheckpointLayout layout;
    StreamPlan plan;
  };

  const ModelContext& ctx_;
  std::unique_ptr<reload::Session> session_;
  std::optional<KeptStreamPlan> stream_plan_;
};

}  // namespace loadkit
