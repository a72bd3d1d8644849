#include "reload/session.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <unordered_set>

#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/missing_tensors.h"
#include "loadkit/model_context.h"
#include "loadkit/module.h"
#include "loadkit/runtime/log.h"
#include "reload/module_step.h"

namespace loadkit::reload {

namespace {

/// Plain modules: the kernel parameters are the recorded ones, unchanged in shape and dtype.
bool kernel_matches_records(const ModuleRecord& mod) {
  for (const auto& rec : mod.params) {
    Parameter* p = mod.module->find_param(rec.name);
    if (!p || p->data.sizes() != at::IntArrayRef(rec.shape) || p->data.scalar_type() != rec.dtype) return false;
  }
  return true;
}

/// The parameter a module's loaders write during the session: the kernel one for plain
/// modules, the recorded load-format object for transformed ones.
Parameter& active_param(ModuleRecord& mod, size_t i) {
  return mod.transforms ? *mod.params[i].original : mod.module->param(mod.params[i].name);
}

/// Passes a stream through, counting its tensors into `index` (the first is 0).
class CountingStream final : public WeightStream {
 public:
  CountingStream(WeightStream& inner, int64_t& index) : inner_(inner), index_(index) { index_ = -1; }
  bool next(NamedWeight& out) override {
    if (!inner_.next(out)) return false;
    ++index_;
    return true;
  }

 private:
  WeightStream& inner_;
  int64_t& index_;
};

/// Passes a reload's stream through, telling the plan being recorded each tensor that arrives
/// and holding it while the loaders run (it is what the plan's writes are views of).
class PlanRecordingStream final : public WeightStream {
 public:
  PlanRecordingStream(WeightStream& inner, ReloadPlan& plan) : inner_(inner), plan_(plan) {}
  bool next(NamedWeight& out) override {
    current_ = at::Tensor();  // never keeps the previous tensor past its stream's next()
    if (!inner_.next(out)) return false;
    current_ = out.tensor;
    plan_.arrived(out.name);
    return true;
  }
  const at::Tensor& current() const { return current_; }

 private:
  WeightStream& inner_;
  ReloadPlan& plan_;
  at::Tensor current_;
};

/// `w` at once, as copy_weight() / zero_weight() write without a recorder.
void write_now(const WeightWrite& w) {
  if (w.src.defined()) {
    at::Tensor(w.dst).copy_(w.src);
  } else {
    at::Tensor(w.dst).zero_();
  }
}

/// A rebuilt module whose every weight has arrived, to be processed now (attention-like ones wait
/// for finish()): the full path's rule, which the plans' replays follow.
bool due_for_processing(const ModuleRecord& mod) {
  return mod.transforms && !mod.done && !mod.attention_like && mod.applied >= mod.total;
}

void note_shard(ParamRecord& rec, std::string id) {
  if (std::find(rec.shards.begin(), rec.shards.end(), id) == rec.shards.end()) rec.shards.push_back(std::move(id));
}

}  // namespace

Session::Session(Module& root, const ModelContext& ctx) : root_(root), ctx_(ctx), modules_(record_load_format(root)) {}

void Session::release_load_format() {
  for (auto& mod : modules_)
    for (auto& rec : mod.params)
      if (mod.module->find_param(rec.name) != rec.original.get()) rec.original->data = meta_tensor(rec.shape, rec.dtype);
}

// ------------------------------------------------------------ initialize

void Session::begin(Phase apply, Rollback rollback) {
  if (open()) fail(ErrorKind::Usage, "a weight update is already in progress");
  journal_.begin(rollback);  // the previous session's journal, if it was kept, is let go
  stats_ = {};
  written_.clear();
  before_.emplace(root_);
  for (size_t m = 0; m < modules_.size(); ++m) {
    ModuleRecord& mod = modules_[m];
    mod.calls.clear();
    mod.writes.clear();
    mod.total = mod.applied = 0;
    mod.done = false;
    mod.materialized = false;
    mod.transforms = mod.module->transforms_weights() || !kernel_matches_records(mod);
    for (auto& rec : mod.params) {
      rec.applied = rec.validated = 0;
      rec.shards.clear();
      mod.total += rec.expected;
    }
    take_kernel(mod);  // transformed: the load format back, on meta (nothing allocated until complete)
    for (size_t i = 0; i < mod.params.size(); ++i) active_param(mod, i).loader = wrap(m, i);
  }
  apply_phase_ = phase_ = apply;
}

WeightLoader Session::wrap(size_t m, size_t i) {
  return [this, m, i](Parameter& param, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
    ModuleRecord& mod = modules_[m];
    switch (phase_) {
      case Phase::Validating: return validate_one(mod, mod.params[i], m, loaded, shard);
      case Phase::Reloading:
      case Phase::Updating: return apply_one(mod, i, param, loaded, shard);
      case Phase::Idle: break;
    }
    fail(ErrorKind::Other, "the loader of '", mod.params[i].qualified, "' ran outside a reload session");
  };
}

// ------------------------------------------------------------ validate

void Session::validate(WeightStream& stream, const Loader& load_weights, ValidationRecord* record, UpdatePlan* plan) {
  for (auto& mod : modules_)
    for (auto& rec : mod.params) rec.validated = 0;
  if (record) record->clear();
  recording_ = record;
  planning_ = plan;
  phase_ = Phase::Validating;
  auto done = [&] {
    phase_ = apply_phase_;
    recording_ = nullptr;
    planning_ = nullptr;
  };
  try {
    CountingStream counted(stream, tensor_);
    MetaStream meta(counted);
    if (record) {
      RecordingStream recording(meta, *record);
      load_weights(recording);
    } else {
      load_weights(meta);
    }
  } catch (...) {
    done();
    throw;
  }
  done();
  if (record) record->current.clear();
}

int64_t Session::validate_one(ModuleRecord& mod, ParamRecord& rec, size_t m, const at::Tensor& loaded,
                              const ShardId& shard) {
  // The original loader against a meta stand-in: shapes checked, nothing written.
  Parameter standin(meta_tensor(rec.shape, rec.dtype), rec.loader, rec.sharding);
  const int64_t n = rec.loader(standin, loaded, shard);
  if (rec.applied + rec.validated + n > rec.expected)
    fail(ErrorKind::Input, "parameter '", rec.qualified, "' would receive more than its ", rec.expected,
         " elements (a weight given twice, or after its module '", mod.name, "' was complete)");
  rec.validated += n;
  note_shard(rec, shard.str());
  if (recording_) recording_->feeds(m);
  if (planning_) {
    const size_t i = static_cast<size_t>(&rec - mod.params.data());
    planning_->feeds.push_back({static_cast<uint32_t>(m), static_cast<uint32_t>(i), n, shard.str(),
                                mod.transforms ? nullptr : rec.original->data.data_ptr(), mod.transforms});
  }
  return n;
}

std::vector<std::string> Session::incomplete_after_validation() const {
  // Named as the checkpoint names them, as a fresh load does (loadkit/missing_tensors.h).
  const auto* lm = dynamic_cast<const CausalLM*>(&root_);
  const WeightMapping mapping = lm ? lm->weight_mapping() : WeightMapping{};
  std::vector<std::string> missing;
  for (const auto& mod : modules_)
    for (const auto& rec : mod.params)
      if (rec.applied + rec.validated < rec.expected)
        for (auto& tensor : missing_tensors_of(rec.qualified, rec.shards, mapping)) missing.push_back(std::move(tensor));
  std::sort(missing.begin(), missing.end());
  return missing;
}

// ------------------------------------------------------------ apply

void Session::apply(WeightStream& stream, const Loader& load_weights, ReloadPlan* record) {
  if (!record) {
    load_weights(stream);
    return;
  }
  PlanRecordingStream recording(stream, *record);
  reload_recording_ = record;
  reload_source_ = &recording.current();
  auto done = [&] {
    reload_recording_ = nullptr;
    reload_source_ = nullptr;
  };
  try {
    load_weights(recording);
  } catch (...) {
    done();
    throw;
  }
  done();
  record->ended();
}

bool Session::fits_reload_plan(const safetensors::CheckpointFiles& files, const std::vector<std::string>& order) const {
  if (!reload_plan_ || reload_plan_->order != order || !reload_plan_->layout.matches(files)) return false;
  for (const auto& f : reload_plan_->feeds) {
    const ModuleRecord& mod = modules_[f.module];
    if (f.rebuilt ? !mod.transforms || mod.attention_like
                  : mod.transforms || mod.params[f.param].original->data.data_ptr() != f.kernel_ptr)
      return false;
  }
  return true;
}

void Session::apply_by_plan(WeightStream& stream) {
  const ReloadPlan& plan = *reload_plan_;
  NamedWeight w;
  SmallCopies held;  // issued before any write it does not hold, before processing, and at the end
  // Held on CUDA, where a copy's issue costs more than its bytes; a memcpy on the CPU costs its
  // bytes, and holding a tensor there would keep the host stream from reusing its buffer.
  const bool hold_small = ctx_.device.is_cuda();
  size_t k = 0, feed = 0, write = 0;
  try {
    while (stream.next(w)) {
      const size_t count = plan.ends.size();
      if (k >= count || w.name != plan.delivered(k))
        fail(ErrorKind::Other, w.origin, ": tensor '", w.name, "' arrived where the reload plan expects ",
             k < count ? cat("'", plan.delivered(k), "'") : std::string("none"));
      const ReloadPlan::Ends& e = plan.ends[k++];
      const size_t first_feed = feed;
      for (; feed < e.feeds; ++feed) {  // as apply_one() prepares a module for its loaders
        ModuleRecord& mod = modules_[plan.feeds[feed].module];
        if (mod.transforms) {
          if (!mod.materialized) materialize(mod, ctx_.device);  // its load format, written below
        } else if (written_.insert(&mod).second) {
          journal_.keep(mod);  // before its first write
        }
      }
      for (; write < e.writes; ++write) {
        const PlanWrite& pw = plan.writes[write];
        const at::Tensor& param = pw.into ? modules_[pw.into->module].params[pw.into->param].original->data : pw.dst;
        if (hold_small && held.hold(pw, w.tensor, param)) continue;  // else what it held is issued first
        if (!pw.copy_bytes(w.tensor, param)) write_now({pw.destination(param), pw.source(w.tensor)});
      }
      for (size_t f = first_feed; f < e.feeds; ++f) {
        ModuleRecord& mod = modules_[plan.feeds[f].module];
        note_applied(mod, plan.feeds[f].param, plan.feeds[f].n);
        if (due_for_processing(mod)) {
          held.issue();  // writes into its load format
          process(mod);
          ++stats_.layers_processed;
        }
      }
    }
    held.issue();
  } catch (...) {
    // Modules noted as written hold what was written so far, the held writes too (their sources
    // are alive); the error is the one that stopped the stream.
    try {
      held.issue();
    } catch (...) {
    }
    throw;
  }
  if (k != plan.ends.size())
    fail(ErrorKind::Other, "the reload's stream ended after ", k, " of the plan's ", plan.ends.size(), " tensors");
  stats_.reload_by_plan = true;
}

void Session::keep_reload_plan(std::unique_ptr<ReloadPlan> plan) {
  if (plan && plan->replayable) reload_plan_ = std::move(plan);
}

void Session::apply_chunk(const std::vector<NamedWeight>& chunk, const Loader& load_weights, UpdatePlan* plan) {
  chunk_ = &chunk;
  planning_ = plan;
  batching_ = true;
  writes_.clear();
  auto done = [&] {
    chunk_ = nullptr;
    planning_ = nullptr;
    batching_ = false;
    writes_.clear();
  };
  try {
    VectorWeightStream stream(chunk);
    CountingStream counted(stream, tensor_);
    load_weights(counted);
    apply_writes(writes_);  // validated: every write fits its parameter
  } catch (...) {
    done();  // written_ may name a module whose collected writes were dropped: it is at most unchanged
    throw;
  }
  if (plan && plan->writes.empty() && !plan->feeds.empty()) plan->replayable = false;
  done();
}

bool Session::apply_planned(const std::vector<NamedWeight>& chunk, const Loader& load_weights) {
  const UpdatePlan* plan = plans_.find(chunk);
  if (!plan) return false;
  // Validation's checks on element counts, against this session's state (validate_one).
  for (const auto& f : plan->feeds) modules_[f.module].params[f.param].validated = 0;
  for (const auto& f : plan->feeds) {
    ModuleRecord& mod = modules_[f.module];
    ParamRecord& rec = mod.params[f.param];
    if (mod.done) return false;
    if (plan->replayable && (f.rebuilt ? !mod.transforms
                                       : mod.transforms || rec.original->data.data_ptr() != f.kernel_ptr))
      return false;
    rec.validated += f.n;
    if (rec.applied + rec.validated > rec.expected) return false;
  }
  for (const auto& f : plan->feeds) note_shard(modules_[f.module].params[f.param], f.shard);
  ++stats_.chunks_by_plan;
  if (!plan->replayable) {  // a loader that does not describe its writes must run: no meta pass
    apply_chunk(chunk, load_weights, nullptr);
    return true;
  }
  ++stats_.chunks_replayed;
  for (const auto& f : plan->feeds) {
    ModuleRecord& mod = modules_[f.module];
    if (!mod.transforms && written_.insert(&mod).second) journal_.keep(mod);  // rebuilt ones: at process()
  }
  // Writes into kernel storage go now; those into a rebuilt module's load format are kept with it,
  // as its calls would be, until it is complete (module_step.h issues them once it is materialised).
  std::vector<WeightWrite> now;
  for (const auto& w : plan->writes) {
    at::Tensor src = w.tensor < 0 ? at::Tensor() : w.source(chunk[static_cast<size_t>(w.tensor)].tensor);
    if (w.into) {
      modules_[w.into->module].writes.push_back({*w.into, std::move(src)});
    } else {
      now.push_back({w.dst, std::move(src)});
    }
  }
  apply_writes(now);
  for (const auto& f : plan->feeds) {
    ModuleRecord& mod = modules_[f.module];
    note_applied(mod, f.param, f.n);
    if (due_for_processing(mod)) {
      process(mod);
      ++stats_.layers_processed;
    }
  }
  return true;
}

void Session::record_reload_writes(ReloadPlan& plan, size_t first, const ModuleRecord& mod, size_t i) {
  // Issued at once, as the loader would have: a reload frees each tensor at the stream's next().
  const PlanWrite::Into into = into_param(mod, i);
  for (size_t k = first; k < writes_.size(); ++k) {
    const WeightWrite& w = writes_[k];
    PlanWrite pw;
    const bool recorded = mod.transforms ? PlanWrite::record_into(w, *reload_source_, plan.current(), into,
                                                                  mod.params[i].original->data, pw)
                                         : PlanWrite::record(w, *reload_source_, plan.current(), pw);
    if (recorded) {
      plan.writes.push_back(std::move(pw));
    } else {
      plan.replayable = false;
    }
    write_now(w);
  }
  writes_.resize(first);
}

void Session::note_applied(ModuleRecord& mod, size_t i, int64_t n) {
  ParamRecord& rec = mod.params[i];
  const int64_t before = rec.applied;
  rec.applied = std::min(rec.expected, rec.applied + n);
  mod.applied += rec.applied - before;
  if (!mod.transforms && mod.applied >= mod.total && !mod.done) {
    mod.done = true;
    ++stats_.layers_processed;
  }
}

int64_t Session::apply_one(ModuleRecord& mod, size_t i, Parameter& param, const at::Tensor& loaded,
                           const ShardId& shard) {
  ParamRecord& rec = mod.params[i];
  if (mod.done)
    fail(ErrorKind::Input, "a weight for '", rec.qualified, "' arrived after module '", mod.name, "' was complete");
  // Reloading writes a transformed module's load format as its weights come (the plan delivers
  // them together); updating keeps the calls, since their order is unknown and the caller's
  // tensors cost no device memory while kept. Attention-like modules wait for the end either way.
  const bool write_now = mod.transforms && phase_ == Phase::Reloading && !mod.attention_like;
  if (!mod.transforms) {  // the loader writes straight into kernel storage
    journal_.keep(mod);
    written_.insert(&mod);
  }
  if (write_now && !mod.materialized) materialize(mod, ctx_.device);
  // Kernel storage; for transformed modules the materialised load format, or meta (calls kept).
  int64_t n = 0;
  ReloadPlan* const recording = reload_recording_ && reload_recording_->replayable ? reload_recording_ : nullptr;
  // Described writes are collected: an update's into plain modules (issued together), and a
  // recorded reload's into plain modules or a rebuilt module's load format written now (a plan's).
  // An update's into a rebuilt module's load format (on meta: its call is kept) are only noted
  // in the chunk's plan, for a replay to keep instead of the call.
  const bool described = describes_writes(rec.loader, loaded.scalar_type());
  const bool collect = described && ((batching_ && !mod.transforms) || (recording && (!mod.transforms || write_now)));
  if (described && planning_ && mod.transforms && !write_now) {
    const size_t first = writes_.size();
    {
      WriteRecorder recorder(writes_);
      n = rec.loader(param, loaded, shard);  // against the meta load format: views, nothing written
    }
    const PlanWrite::Into into = into_param(mod, i);
    for (size_t k = first; k < writes_.size(); ++k)
      planning_->note_write_into(writes_[k], *chunk_, tensor_, into, rec.original->data);
    writes_.resize(first);
  } else if (collect) {
    const size_t first = writes_.size();
    {
      WriteRecorder recorder(writes_);  // issued together at the end of apply_chunk(), or below
      n = rec.loader(param, loaded, shard);
    }
    if (planning_)
      for (size_t k = first; k < writes_.size(); ++k) planning_->note_write(writes_[k], *chunk_, tensor_);
    if (recording) record_reload_writes(*recording, first, mod, i);
  } else {
    n = rec.loader(param, loaded, shard);
    if (planning_) planning_->replayable = false;
    if (recording) recording->replayable = false;
  }
  if (recording)
    recording->feeds.push_back({static_cast<uint32_t>(&mod - modules_.data()), static_cast<uint32_t>(i), n,
                                std::string(), mod.transforms ? nullptr : rec.original->data.data_ptr(),
                                mod.transforms});
  note_applied(mod, i, n);
  if (!mod.transforms) return n;
  if (!write_now) mod.calls.push_back({i, loaded, shard});
  if (due_for_processing(mod)) {
    process(mod);
    ++stats_.layers_processed;
  }
  return n;
}

void Session::process(ModuleRecord& mod) {
  journal_.keep(mod);  // processing writes into the kernel tensors
  written_.insert(&mod);
  process_into_kernel(mod, ctx_.device);
}

// ------------------------------------------------------------ finalize

ReloadStats Session::finish() {
  std::vector<std::string> partial;
  for (auto& mod : modules_) {
    if (mod.transforms && !mod.done) {
      if (mod.applied == 0) {
        put_back_kernel(mod);
      } else if (mod.applied >= mod.total) {
        process(mod);  // attention-like: after all others
        ++stats_.layers_delayed;
      } else {
        partial.push_back(cat(mod.name, " (", mod.applied, " of ", mod.total, " elements)"));
        put_back_kernel(mod);
      }
    } else if (!mod.transforms && !mod.done && mod.applied > 0) {
      ++stats_.layers_processed;  // partial update of plain weights: the rest keeps its values
    }
    if (mod.applied == 0) stats_.untouched_modules.push_back(mod.name);
  }
  close();
  stats_.pointers_stable = before_->unchanged(root_);
  stats_.journal_bytes = journal_.bytes();
  stats_.journaled_modules = journal_.modules();
  if (!partial.empty()) {
    std::string list;
    for (const auto& p : partial) list += (list.empty() ? "" : ", ") + p;
    fail(ErrorKind::Input, "update left processed modules incomplete, kept unchanged: ", list);
  }
  return stats_;
}

void Session::abort() {
  for (auto& mod : modules_)
    if (!mod.done) put_back_kernel(mod);
  close();
  if (journal_.keeps()) written_.clear();  // every written module is put back below
  journal_.restore();
}

std::vector<std::string> Session::written_modules() const {
  std::vector<std::string> names;
  for (const auto& mod : modules_)
    if (written_.count(&mod)) names.push_back(mod.name);
  return names;
}

void Session::close() {
  for (auto& mod : modules_) restore_loaders(mod);
  phase_ = apply_phase_ = Phase::Idle;
}

void Session::own_borrowed(const std::vector<NamedWeight>& chunk) {
  std::unordered_set<const void*> borrowed;
  for (const auto& w : chunk)
    if (w.tensor.has_storage()) borrowed.insert(w.tensor.storage().unsafeGetStorageImpl());
  uint64_t cloned = 0;
  auto own = [&](at::Tensor& t) {
    if (!t.has_storage() || !borrowed.count(t.storage().unsafeGetStorageImpl())) return;
    t = t.clone();
    cloned += t.nbytes();
  };
  for (auto& mod : modules_) {
    for (KeptCall& call : mod.calls) own(call.loaded);
    for (KeptWrite& write : mod.writes) own(write.src);
  }
  if (cloned) log::debug(cat("kept ", cloned, " bytes of a borrowed chunk for modules it left incomplete"));
}

}  // namespace loadkit::reload
