#include "reload_engine.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <unordered_map>
#include <unordered_set>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/log.h"

namespace loadkit {

namespace {

/// One parameter as built (load format), managed by its first owner module.
struct ParamRecord {
  std::string name;       ///< inside its module
  std::string qualified;  ///< from the root
  std::shared_ptr<Parameter> original;
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  WeightLoader loader;  ///< the loader it was built with
  ShardingInfo sharding;
  int64_t expected = 0;
  // Per session.
  int64_t applied = 0;
  int64_t validated = 0;
};

struct Call {
  size_t param;
  at::Tensor loaded;
  ShardId shard;
};

struct ModuleRecord {
  std::string name;
  Module* module = nullptr;
  std::vector<ParamRecord> params;
  bool attention_like = false;
  uint64_t load_bytes = 0;  ///< the load format's size on the device
  // Per session.
  bool transforms = false;  ///< processing changes the parameters: load format restored on meta
  std::vector<std::pair<std::string, std::shared_ptr<Parameter>>> kernel_objects;
  std::vector<std::pair<std::string, at::Tensor>> kernel_data;
  std::vector<std::pair<std::string, at::Tensor>> kernel_buffers;
  std::vector<Call> calls;
  int64_t total = 0;
  int64_t applied = 0;
  bool done = false;
  bool materialized = false;  ///< load format allocated on the device
  bool journaled = false;  ///< its kernel tensors are in the journal
};

struct TensorFacts {
  const void* ptr;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool operator==(const TensorFacts&) const = default;
};

TensorFacts facts(const at::Tensor& t) {
  return {t.data_ptr(), t.sizes().vec(), t.strides().vec(), t.scalar_type()};
}

bool same_tensor(const at::Tensor& a, const at::Tensor& b) { return facts(a) == facts(b); }

at::Tensor meta_tensor(const std::vector<int64_t>& shape, at::ScalarType dtype) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
}

/// A stand-in with `t`'s shape, strides and dtype and no data: what validation hands the loaders.
at::Tensor meta_like(const at::Tensor& t) {
  return at::empty_strided(t.sizes(), t.strides(), at::TensorOptions().dtype(t.scalar_type()).device(at::kMeta));
}

/// Another stream's tensors as meta stand-ins: validation neither reads nor copies weight data
/// (a plugin's layout conversions, e.g. a transpose made contiguous, run on meta too).
class MetaStream final : public WeightStream {
 public:
  explicit MetaStream(WeightStream& inner) : inner_(inner) {}
  bool next(NamedWeight& out) override {
    if (!inner_.next(out)) return false;
    out.tensor = meta_like(out.tensor);
    return true;
  }

 private:
  WeightStream& inner_;
};

/// A host copy of `t` for the journal (pinned when it comes from a GPU: a faster copy back).
at::Tensor host_copy(const at::Tensor& t) {
  at::Tensor copy = at::empty(t.sizes(), at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU).pinned_memory(t.is_cuda()));
  copy.copy_(t);
  return copy;
}

/// Passes a stream through, noting each tensor's name as it goes to the loaders.
class RecordingStream final : public WeightStream {
 public:
  RecordingStream(WeightStream& inner, std::string& current, std::vector<std::string>& names)
      : inner_(inner), current_(current), names_(names) {}
  bool next(NamedWeight& out) override {
    if (!inner_.next(out)) return false;
    current_ = out.name;
    names_.push_back(out.name);
    return true;
  }

 private:
  WeightStream& inner_;
  std::string& current_;
  std::vector<std::string>& names_;
};


}  // namespace

struct ReloadEngine::Impl {
  Module& root;
  c10::Device device;
  std::vector<ModuleRecord> modules;
  bool active = false;
  bool validating = false;
  /// Applying a validated reload: transformed modules are materialised on their first weight and
  /// written at once. Streamed updates keep the calls instead (their order is unknown, and the
  /// caller's tensors cost no device memory while kept).
  bool eager = false;
  // What the last validation saw: tensor names in order, and the first module each one fed.
  std::string current_tensor;
  std::vector<std::string> validated_names;
  std::unordered_map<std::string, size_t> tensor_module;
  Rollback rollback_mode = Rollback::None;
  /// (kernel tensor, its copy from before the session), in the order taken.
  std::vector<std::pair<at::Tensor, at::Tensor>> journal;
  ReloadStats stats;
  std::vector<std::pair<std::string, TensorFacts>> pointer_snapshot;

  Impl(Module& r, c10::Device d) : root(r), device(d) {
    std::unordered_set<const Parameter*> seen;
    for (auto& [name, module] : root.named_modules()) {
      ModuleRecord rec;
      rec.name = name;
      rec.module = module;
      rec.attention_like = module->is_attention_like();
      for (const auto& [pname, p] : module->parameters()) {
        if (!seen.insert(p.get()).second) continue;  // managed by its first owner (tied weights)
        rec.params.push_back(ParamRecord{pname, name.empty() ? pname : name + "." + pname, p, p->data.sizes().vec(),
                                         p->data.scalar_type(), p->loader, p->sharding, p->expected_load_numel});
        rec.load_bytes += static_cast<uint64_t>(p->data.numel()) * p->data.element_size();
      }
      if (!rec.params.empty()) modules.push_back(std::move(rec));
    }
  }

  // ------------------------------------------------------------ sessions

  void begin(Rollback rollback) {
    if (active) fail(ErrorKind::Usage, "a weight update is already in progress");
    commit();  // the previous session's journal, if it was kept
    rollback_mode = rollback;
    stats = {};
    pointer_snapshot.clear();
    for (size_t m = 0; m < modules.size(); ++m) {
      ModuleRecord& mod = modules[m];
      Module& module = *mod.module;
      mod.kernel_objects = module.parameters();
      mod.kernel_data.clear();
      for (auto& [name, p] : mod.kernel_objects) {
        mod.kernel_data.emplace_back(name, p->data);
        pointer_snapshot.emplace_back(mod.name + "." + name, facts(p->data));
      }
      mod.kernel_buffers = module.buffers();
      for (auto& [name, b] : mod.kernel_buffers) pointer_snapshot.emplace_back(mod.name + "." + name, facts(b));
      mod.calls.clear();
      mod.total = mod.applied = 0;
      mod.done = false;
      mod.materialized = false;
      mod.journaled = false;
      mod.transforms = module.transforms_weights() || !kernel_matches_records(mod);
      for (auto& rec : mod.params) {
        rec.applied = rec.validated = 0;
        mod.total += rec.expected;
      }
      if (mod.transforms) {
        // Load format back, on the meta device: nothing allocated until the module is complete.
        for (auto& [name, p] : mod.kernel_objects) module.remove_parameter(name);
        for (auto& rec : mod.params) {
          rec.original->data = meta_tensor(rec.shape, rec.dtype);
          module.add_parameter(rec.name, rec.original);
        }
      }
      for (size_t i = 0; i < mod.params.size(); ++i) active_param(mod, i).loader = wrap(m, i);
    }
    active = true;
  }

  /// Plain modules: the kernel parameters are the recorded ones, unchanged in shape and dtype.
  static bool kernel_matches_records(const ModuleRecord& mod) {
    for (const auto& rec : mod.params) {
      Parameter* p = mod.module->find_param(rec.name);
      if (!p || p->data.sizes() != at::IntArrayRef(rec.shape) || p->data.scalar_type() != rec.dtype) return false;
    }
    return true;
  }

  Parameter& active_param(ModuleRecord& mod, size_t i) {
    return mod.transforms ? *mod.params[i].original : mod.module->param(mod.params[i].name);
  }

  WeightLoader wrap(size_t m, size_t i) {
    return [this, m, i](Parameter& param, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
      ModuleRecord& mod = modules[m];
      ParamRecord& rec = mod.params[i];
      if (validating) {
        // The original loader against a meta stand-in: shapes checked, nothing written.
        Parameter standin(meta_tensor(rec.shape, rec.dtype), rec.loader, rec.sharding);
        const int64_t n = rec.loader(standin, loaded, shard);
        if (rec.applied + rec.validated + n > rec.expected)
          fail(ErrorKind::Input, "parameter '", rec.qualified, "' would receive more than its ", rec.expected,
               " elements (a weight given twice, or after its module '", mod.name, "' was complete)");
        rec.validated += n;
        if (!current_tensor.empty()) tensor_module.emplace(current_tensor, m);
        return n;
      }
      if (mod.done)
        fail(ErrorKind::Input, "a weight for '", rec.qualified, "' arrived after module '", mod.name, "' was complete");
      const bool write_now = mod.transforms && eager && !mod.attention_like;
      if (!mod.transforms) journal_module(mod);  // the loader writes straight into kernel storage
      if (write_now && !mod.materialized) materialize(mod);
      // Kernel storage; for transformed modules the materialised load format, or meta (calls kept).
      const int64_t n = rec.loader(param, loaded, shard);
      rec.applied = std::min(rec.expected, rec.applied + n);
      mod.applied = 0;
      for (const auto& r : mod.params) mod.applied += r.applied;
      if (!mod.transforms) {
        if (mod.applied >= mod.total) {
          mod.done = true;
          ++stats.layers_processed;
        }
        return n;
      }
      if (!write_now) mod.calls.push_back({i, loaded, shard});
      if (mod.applied >= mod.total && !mod.attention_like) process(mod);
      return n;
    };
  }

  /// Allocates `mod`'s load-format parameters on the device (their loaders fill them).
  void materialize(ModuleRecord& mod) {
    for (auto& rec : mod.params) rec.original->data = at::empty(rec.shape, at::TensorOptions().dtype(rec.dtype).device(device));
    mod.materialized = true;
  }

  /// Lets go of the load format `materialize` made (parameters that are kernel objects keep theirs).
  void dematerialize(ModuleRecord& mod) {
    for (auto& rec : mod.params)
      if (mod.module->find_param(rec.name) != rec.original.get()) rec.original->data = meta_tensor(rec.shape, rec.dtype);
    mod.materialized = false;
  }

  /// Materializes `mod`'s load format (unless its loaders wrote it already), replays its kept
  /// loads, processes into its kernel tensors, frees.
  void process(ModuleRecord& mod) {
    Module& module = *mod.module;
    journal_module(mod);  // processing writes into the kernel tensors
    if (!mod.materialized) {
      materialize(mod);
      for (const Call& call : mod.calls) {
        ParamRecord& rec = mod.params[call.param];
        rec.loader(*rec.original, call.loaded, call.shard);
      }
    }
    mod.calls.clear();
    KernelTargets targets(mod.kernel_data.begin(), mod.kernel_data.end());
    module.process_weights_after_loading(targets);
    for (auto& [name, kernel] : mod.kernel_data) {
      Parameter* produced = module.find_param(name);
      if (!produced) fail(ErrorKind::Other, "processing module '", mod.name, "' did not produce parameter '", name, "'");
      copy_into(kernel, produced->data, mod.name + "." + name);
    }
    for (auto& [name, kernel] : mod.kernel_buffers)
      if (at::Tensor* produced = module.find_buffer(name)) copy_into(kernel, *produced, mod.name + "." + name);
    place_kernel(mod);
    // Free the load format at once, except parameters that processing kept as they were (a quantized
    // layer's bias): those objects are kernel parameters again, holding kernel storage.
    dematerialize(mod);
    mod.done = true;
    ++stats.layers_processed;
  }

  static void copy_into(at::Tensor& kernel, const at::Tensor& produced, const std::string& name) {
    if (same_tensor(kernel, produced)) return;  // processing wrote in place
    if (kernel.sizes() != produced.sizes() || kernel.scalar_type() != produced.scalar_type())
      fail(ErrorKind::Other, "reprocessing '", name, "' produced ", shape_str(produced.sizes()), " ",
           c10::toString(produced.scalar_type()), ", the kernel tensor is ", shape_str(kernel.sizes()), " ",
           c10::toString(kernel.scalar_type()));
    kernel.copy_(produced);
  }

  /// The module's kernel parameters (the very objects and storage it had) back in place.
  void place_kernel(ModuleRecord& mod) {
    if (!mod.transforms) return;
    Module& module = *mod.module;
    std::vector<std::string> current;
    for (const auto& [name, p] : module.parameters()) current.push_back(name);
    for (const auto& name : current) module.remove_parameter(name);
    for (size_t k = 0; k < mod.kernel_objects.size(); ++k) {
      auto& [name, object] = mod.kernel_objects[k];
      object->data = mod.kernel_data[k].second;
      module.add_parameter(name, object);
    }
    for (auto& [name, b] : mod.kernel_buffers) module.add_buffer(name, b);
  }

  void restore_loaders(ModuleRecord& mod) {
    for (auto& rec : mod.params) {
      rec.original->loader = rec.loader;
      if (Parameter* p = mod.module->find_param(rec.name)) p->loader = rec.loader;
    }
  }

  ReloadStats finish() {
    std::vector<std::string> partial;
    for (auto& mod : modules) {
      if (mod.transforms && !mod.done) {
        if (mod.applied == 0) {
          place_kernel(mod);
        } else if (mod.applied >= mod.total) {
          process(mod);  // attention-like: after all others
          ++stats.layers_delayed;
        } else {
          partial.push_back(cat(mod.name, " (", mod.applied, " of ", mod.total, " elements)"));
          mod.calls.clear();
          place_kernel(mod);
          if (mod.materialized) dematerialize(mod);
        }
      } else if (!mod.transforms && !mod.done && mod.applied > 0) {
        ++stats.layers_processed;  // partial update of plain weights: the rest keeps its values
      }
      if (mod.applied == 0) stats.untouched_modules.push_back(mod.name);
      restore_loaders(mod);
    }
    active = false;
    eager = false;
    stats.pointers_stable = pointers_unchanged();
    if (!partial.empty()) {
      std::string list;
      for (const auto& p : partial) list += (list.empty() ? "" : ", ") + p;
      fail(ErrorKind::Input, "update left processed modules incomplete, kept unchanged: ", list);
    }
    return stats;
  }

  /// Before the first write into `mod`'s kernel tensors in this session: keeps a copy of them.
  void journal_module(ModuleRecord& mod) {
    if (rollback_mode != Rollback::Journal || mod.journaled) return;
    mod.journaled = true;
    auto keep = [&](const at::Tensor& kernel) {
      journal.emplace_back(kernel, host_copy(kernel));
      stats.journal_bytes += kernel.nbytes();
    };
    for (auto& [name, kernel] : mod.kernel_data) keep(kernel);
    for (auto& [name, kernel] : mod.kernel_buffers) keep(kernel);
    ++stats.journaled_modules;
  }

  /// Copies the journal back, newest first (a tensor journaled twice, e.g. shared by two
  /// modules, ends with its oldest copy), then lets go of it.
  void restore_journal() {
    for (auto it = journal.rbegin(); it != journal.rend(); ++it) it->first.copy_(it->second);
    if (!journal.empty()) log::info(cat("rolled back ", stats.journaled_modules, " modules (", journal.size(), " kernel tensors)"));
    commit();
  }

  void commit() {
    journal.clear();
    for (auto& mod : modules) mod.journaled = false;
  }

  /// Ends the session: modules put back as they were where nothing was written (or, with a
  /// journal, everywhere).
  void abort() {
    for (auto& mod : modules) {
      mod.calls.clear();
      if (mod.transforms && !mod.done) place_kernel(mod);
      if (mod.materialized) dematerialize(mod);
      restore_loaders(mod);
    }
    restore_journal();
    active = false;
    eager = false;
  }

  /// Borrowed::UntilReturn: the cached calls that still reference the chunk's memory get their own copy.
  void own_borrowed(const std::vector<NamedWeight>& chunk) {
    std::unordered_set<const void*> borrowed;
    for (const auto& w : chunk)
      if (w.tensor.has_storage()) borrowed.insert(w.tensor.storage().unsafeGetStorageImpl());
    uint64_t cloned = 0;
    for (auto& mod : modules)
      for (Call& call : mod.calls)
        if (call.loaded.has_storage() && borrowed.count(call.loaded.storage().unsafeGetStorageImpl())) {
          call.loaded = call.loaded.clone();
          cloned += call.loaded.nbytes();
        }
    if (cloned) log::debug(cat("kept ", cloned, " bytes of a borrowed chunk for modules it left incomplete"));
  }

  bool pointers_unchanged() {
    std::unordered_map<std::string, TensorFacts> now;
    for (auto& mod : modules) {
      for (const auto& [name, p] : mod.module->parameters()) now.emplace(mod.name + "." + name, facts(p->data));
      for (const auto& [name, b] : mod.module->buffers()) now.emplace(mod.name + "." + name, facts(b));
    }
    for (const auto& [name, before] : pointer_snapshot) {
      auto it = now.find(name);
      if (it == now.end() || !(it->second == before)) {
        log::warn(cat("kernel tensor '", name, "' changed storage or layout during the reload"));
        return false;
      }
    }
    return true;
  }

  std::vector<std::string> incomplete_after_validation() const {
    std::vector<std::string> missing;
    for (const auto& mod : modules)
      for (const auto& rec : mod.params)
        if (rec.applied + rec.validated < rec.expected) missing.push_back(rec.qualified);
    return missing;
  }

  /// Runs `stream` through the model's loaders against meta stand-ins; with `record`, remembers
  /// the tensor names in order and the module each one feeds (for plan()).
  void validate(WeightStream& stream, const Loader& load_weights, bool record = false) {
    for (auto& mod : modules)
      for (auto& rec : mod.params) rec.validated = 0;
    validated_names.clear();
    tensor_module.clear();
    current_tensor.clear();
    validating = true;
    try {
      MetaStream meta(stream);
      if (record) {
        RecordingStream recording(meta, current_tensor, validated_names);
        load_weights(recording);
      } else {
        load_weights(meta);
      }
    } catch (...) {
      validating = false;
      current_tensor.clear();
      throw;
    }
    validating = false;
    current_tensor.clear();
  }

  /// The applying stream's order and memory budget, from the last recorded validation.
  ReloadEngine::ApplyPlan plan() const {
    ReloadEngine::ApplyPlan plan;
    bool any_transformed = false;
    for (const auto& mod : modules) {
      plan.budget = std::max(plan.budget, mod.load_bytes);
      any_transformed = any_transformed || (mod.transforms && !mod.attention_like);
    }
    if (!any_transformed) return plan;
    // Processing a module needs scratch beside it (the quantizer's float32 chunk: at most an
    // eighth of the module's 16-bit load format, within 256 KiB..4 MiB, see plugins/quant): part
    // of what the module holds while it is rebuilt. (Taking it off the whole budget instead left
    // the largest plain tensor, the embedding, outside the window: read from the mapping, it
    // halved an fp8 reload on the GPU machine.)
    auto processing_scratch = [](uint64_t load_bytes) {
      return std::clamp<uint64_t>(load_bytes / 8, 256ull << 10, 4ull << 20);
    };
    // Each transformed module's tensors together, modules in the order their first tensor came.
    constexpr size_t kNone = SIZE_MAX;
    std::unordered_map<size_t, std::vector<const std::string*>> groups;
    std::vector<std::pair<size_t, const std::string*>> sequence;  // (group or kNone, name)
    for (const auto& name : validated_names) {
      auto it = tensor_module.find(name);
      const size_t m = it == tensor_module.end() || !modules[it->second].transforms ? kNone : it->second;
      if (m == kNone) {
        sequence.emplace_back(kNone, &name);
        continue;
      }
      auto& g = groups[m];
      if (g.empty()) sequence.emplace_back(m, nullptr);
      g.push_back(&name);
    }
    for (const auto& [m, name] : sequence) {
      if (m == kNone) {
        plan.order.push_back(*name);
        plan.reserve.push_back(0);
        continue;
      }
      for (const std::string* n : groups[m]) {
        plan.order.push_back(*n);
        plan.reserve.push_back(modules[m].load_bytes + processing_scratch(modules[m].load_bytes));
      }
    }
    return plan;
  }
};

ReloadEngine::ReloadEngine(Module& root, c10::Device device) : impl_(std::make_unique<Impl>(root, device)) {}
ReloadEngine::~ReloadEngine() = default;

void ReloadEngine::release_load_format() {
  for (auto& mod : impl_->modules)
    for (auto& rec : mod.params)
      if (mod.module->find_param(rec.name) != rec.original.get()) rec.original->data = meta_tensor(rec.shape, rec.dtype);
}

ReloadStats ReloadEngine::reload(const StreamFactory& open, const Loader& load_weights) {
  impl_->begin(Rollback::None);
  try {
    impl_->validate(*open(StreamUse::Validate, ApplyPlan{}), load_weights, /*record=*/true);
    fail_if_missing(impl_->incomplete_after_validation());
    const ApplyPlan plan = impl_->plan();
    impl_->eager = true;
    load_weights(*open(StreamUse::Apply, plan));
    return impl_->finish();
  } catch (...) {
    if (impl_->active) impl_->abort();
    throw;
  }
}

void ReloadEngine::begin_update(Rollback rollback) { impl_->begin(rollback); }
bool ReloadEngine::updating() const { return impl_->active; }

void ReloadEngine::update(const std::vector<NamedWeight>& chunk, const Loader& load_weights, Borrowed borrowed) {
  if (!impl_->active) fail(ErrorKind::Usage, "update() without begin_update()");
  VectorWeightStream check(chunk);
  impl_->validate(check, load_weights);  // a bad chunk is rejected whole; earlier chunks stay applied
  VectorWeightStream apply(chunk);
  try {
    load_weights(apply);
    if (borrowed == Borrowed::UntilReturn) impl_->own_borrowed(chunk);
  } catch (...) {
    impl_->abort();
    throw;
  }
}

void ReloadEngine::validate_update(const std::vector<NamedWeight>& planned, const Loader& load_weights, bool complete) {
  if (!impl_->active) fail(ErrorKind::Usage, "validate_update() without begin_update()");
  VectorWeightStream check(planned);
  impl_->validate(check, load_weights);
  if (complete) fail_if_missing(impl_->incomplete_after_validation());
}

void ReloadEngine::rollback() {
  if (impl_->active) {
    impl_->abort();
  } else {
    impl_->restore_journal();
  }
}

void ReloadEngine::commit() { impl_->commit(); }

ReloadStats ReloadEngine::finish_update() {
  if (!impl_->active) fail(ErrorKind::Usage, "finish_update() without begin_update()");
  return impl_->finish();
}

ReloadStats ReloadEngine::copy_kernel_format(const StreamFactory& open, bool complete) {
  std::unordered_map<std::string, Parameter*> params;
  for (auto& [name, p] : impl_->root.named_parameters()) params.emplace(name, p);
  std::unordered_map<std::string, TensorFacts> before;
  for (auto& [name, p] : params) before.emplace(name, facts(p->data));

  auto check = [&](const NamedWeight& w) -> Parameter& {
    auto it = params.find(w.name);
    if (it == params.end())
      fail(ErrorKind::Input, w.origin, ": tensor '", w.name, "' is not a parameter of the model (kernel format)");
    const at::Tensor& data = it->second->data;
    if (w.tensor.sizes() != data.sizes() || w.tensor.scalar_type() != data.scalar_type())
      fail(ErrorKind::Input, w.origin, ": tensor '", w.name, "' is ", shape_str(w.tensor.sizes()), " ",
           c10::toString(w.tensor.scalar_type()), ", the parameter is ", shape_str(data.sizes()), " ",
           c10::toString(data.scalar_type()));
    return *it->second;
  };
  std::unordered_set<std::string> seen;
  {
    auto stream = open(StreamUse::Validate, ApplyPlan{});
    NamedWeight w;
    while (stream->next(w)) {
      check(w);
      if (!seen.insert(w.name).second) fail(ErrorKind::Input, w.origin, ": tensor '", w.name, "' given twice");
    }
  }
  if (complete) {
    std::vector<std::string> missing;
    for (auto& [name, p] : params)
      if (!seen.count(name)) missing.push_back(name);
    fail_if_missing(std::move(missing));
  }
  ReloadStats stats;
  auto stream = open(StreamUse::Apply, ApplyPlan{});
  NamedWeight w;
  while (stream->next(w)) {
    check(w).data.copy_(w.tensor);
    ++stats.layers_processed;
  }
  for (auto& [name, p] : params)
    if (!(facts(p->data) == before.at(name))) stats.pointers_stable = false;
  return stats;
}

}  // namespace loadkit
