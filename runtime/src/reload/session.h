#pragma once
/// \file
/// One reload or update session over the model's records, phase by phase:
///
///   begin()     initialize: every module's kernel tensors taken aside, the
///               load format of transformed modules restored on meta, every
///               parameter's loader wrapped (the wrapper acts by phase)
///   validate()  Phase::Validating: the source through the model's loaders
///               against meta stand-ins — shapes, dtypes, duplicates counted,
///               nothing written
///   apply()     the source through the loaders for real: Phase::Reloading
///               (a validated complete checkpoint: a transformed module is
///               materialised on its first weight and written at once) or
///               Phase::Updating (streamed chunks: its calls are kept until it
///               is complete); a module is processed the moment it is complete
///   apply_by_plan()  Phase::Reloading, a checkpoint laid out as the last reload's
///               (reload_plan.h): that reload's writes replayed, tensor by tensor
///               as the stream delivers them, instead of validate() and apply()
///   apply_planned()  Phase::Updating, a chunk that looks like one applied before
///               (update_plan.h): its validation's element counts checked
///               against this session, then its recorded writes replayed (or,
///               for modules the loaders must see, the loaders without the meta pass)
///   finish()    finalize: attention-like modules processed, untouched ones
///               put back, loaders restored; a module left incomplete fails
///   abort()     any failure: every module put back, the journal restored
///
/// The per-module steps are in module_step.h, the journal in journal.h.

#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "loadkit/runtime/reload_types.h"
#include "loadkit/weights.h"
#include "reload/journal.h"
#include "reload/records.h"
#include "reload/storage_snapshot.h"
#include "reload/reload_plan.h"
#include "reload/update_plan.h"
#include "reload/validation.h"

namespace loadkit {
struct ModelContext;
}

namespace loadkit::reload {

/// What the wrapped loaders do with the weight they are given.
enum class Phase {
  Idle,        ///< no session: the parameters hold the model's own loaders
  Validating,  ///< count against meta stand-ins; write nothing
  Reloading,   ///< apply a validated complete checkpoint, transformed modules written at once
  Updating,    ///< apply streamed chunks, transformed modules' calls kept until complete
};

/// The model's load_weights: streams weights through the parameters' (wrapped) loaders.
using Loader = std::function<void(WeightStream&)>;

class Session {
 public:
  Session(Module& root, const ModelContext& ctx);

  const std::vector<ModuleRecord>& modules() const { return modules_; }
  /// After a fresh load was processed: lets go of the load-format tensors processing replaced
  /// (the records keep their shapes), so a quantized model holds its kernel format only.
  void release_load_format();
  Phase phase() const { return phase_; }
  bool open() const { return phase_ != Phase::Idle; }

  void begin(Phase apply, Rollback rollback);
  /// Runs `stream` through the loaders in Phase::Validating; with `record`, notes the names
  /// in order and the module each fed (for the staging plan). Leaves the session open either way.
  /// With `plan`, notes each loader call's feed in it (update_plan.h).
  void validate(WeightStream& stream, const Loader& load_weights, ValidationRecord* record = nullptr,
                UpdatePlan* plan = nullptr);
  /// Parameters that neither earlier applies nor the last validation cover in full.
  std::vector<std::string> incomplete_after_validation() const;
  /// With `record` (Phase::Reloading, a plan started for the stream's files), notes the loader
  /// calls and their writes in it (reload_plan.h); it stays replayable only if all of them qualify.
  void apply(WeightStream& stream, const Loader& load_weights, ReloadPlan* record = nullptr);
  /// Whether a reload of `files`, delivered in `order` (empty: the files' order), may go by the
  /// last kept reload plan (reload_plan.h 1. and 2.).
  bool fits_reload_plan(const safetensors::CheckpointFiles& files, const std::vector<std::string>& order) const;
  /// Phase::Reloading: `stream`, of files that fit_reload_plan(), applied by the plan's writes.
  void apply_by_plan(WeightStream& stream);
  /// Keeps `plan`, recorded by a reload that succeeded, for the next reload, if it is replayable.
  void keep_reload_plan(std::unique_ptr<ReloadPlan> plan);
  /// Phase::Updating: `chunk` (validated) through the loaders; the writes of plain modules whose
  /// loaders describe them are issued together at the end (loadkit/weight_writes.h). With
  /// `plan` (the one validate() filled), notes those writes in it.
  void apply_chunk(const std::vector<NamedWeight>& chunk, const Loader& load_weights, UpdatePlan* plan);
  /// Phase::Updating: applies `chunk` by the plan of an earlier chunk with its signature, when
  /// there is one and this session's counts allow it as validation would; false (nothing done)
  /// otherwise: the caller takes the full path, which words any error.
  bool apply_planned(const std::vector<NamedWeight>& chunk, const Loader& load_weights);
  /// Keeps the plan of a chunk that took the full path and was applied.
  void keep_plan(std::unique_ptr<UpdatePlan> plan) { plans_.keep(std::move(plan)); }
  ReloadStats finish();
  void abort();

  /// Borrowed::UntilReturn: kept calls that still reference `chunk`'s memory get their own copy.
  void own_borrowed(const std::vector<NamedWeight>& chunk);
  /// The journal of the session in progress or of the last finished one (until the next begin).
  Journal& journal() { return journal_; }
  /// Layers whose kernel tensors this session (the one in progress, or the last) began to write,
  /// in model order, and that still hold what it wrote: after abort() with a journal, none.
  std::vector<std::string> written_modules() const;

 private:
  /// The loader put in place of parameter `i` of module `m` for the session.
  WeightLoader wrap(size_t m, size_t i);
  int64_t validate_one(ModuleRecord& mod, ParamRecord& rec, size_t m, const at::Tensor& loaded, const ShardId& shard);
  int64_t apply_one(ModuleRecord& mod, size_t i, Parameter& param, const at::Tensor& loaded, const ShardId& shard);
  /// Recording a reload: the writes the loader of parameter `i` of `mod` left in writes_ from
  /// `first` on, noted in `plan` (into a rebuilt module's load format: relative to it) and issued.
  void record_reload_writes(ReloadPlan& plan, size_t first, const ModuleRecord& mod, size_t i);
  /// Where a write into parameter `i` of `mod` (one of modules_) is recorded relative to.
  PlanWrite::Into into_param(const ModuleRecord& mod, size_t i) const {
    PlanWrite::Into into;
    into.module = static_cast<uint32_t>(&mod - modules_.data());
    into.param = static_cast<uint32_t>(i);
    return into;
  }
  /// `n` more elements of parameter `i` of `mod` written: running sums, and a plain module done.
  void note_applied(ModuleRecord& mod, size_t i, int64_t n);
  /// The per-module step (module_step.h), the kernel tensors journaled first.
  void process(ModuleRecord& mod);
  /// Loaders restored and the session closed.
  void close();

  Module& root_;
  const ModelContext& ctx_;
  std::vector<ModuleRecord> modules_;
  Phase phase_ = Phase::Idle;
  Phase apply_phase_ = Phase::Idle;
  ValidationRecord* recording_ = nullptr;
  Journal journal_;
  std::optional<StorageSnapshot> before_;
  ReloadStats stats_;
  std::unordered_set<const ModuleRecord*> written_;  ///< see written_modules()
  // While a chunk is validated or applied (Phase::Updating).
  int64_t tensor_ = -1;                             ///< the chunk's tensor the loaders are on
  const std::vector<NamedWeight>* chunk_ = nullptr;  ///< the chunk being applied
  UpdatePlan* planning_ = nullptr;                   ///< the plan being recorded
  bool batching_ = false;                            ///< described writes collected in writes_
  std::vector<WeightWrite> writes_;
  PlanCache plans_;  ///< kept across sessions: the kernel tensors they write stay put
  // While a reload is recorded (apply() with a plan).
  ReloadPlan* reload_recording_ = nullptr;
  const at::Tensor* reload_source_ = nullptr;  ///< the tensor the stream delivered last
  std::unique_ptr<ReloadPlan> reload_plan_;    ///< the last reload's, when replayable
};

}  // namespace loadkit::reload
