#pragma once
/// \file
/// A reload kept for the next checkpoint laid out the same way: a server or an
/// RL loop reloads checkpoints that one trainer wrote the same way step after
/// step, and for a MoE model in block fp8 (2030 tensors, half of them 704-byte
/// scales) resolving the names and running the loaders, on meta stand-ins and
/// then for real, cost the consumer more host time than the transfer took
/// (README.md, "Benchmarks", has the profile).
///
/// What a plan holds, recorded while a reload takes the full path:
///   - the checkpoint's layout: every tensor's name, dtype and shape, file by
///     file in data order;
///   - the order the stream delivered the tensors in: the layout's, or, when
///     modules are rebuilt (online quantization), each such module's tensors
///     together (staging_plan.h), kept with the layout by the engine
///     (reload_engine.h) and given to the next reload's stream;
///   - per tensor, in that order, the loader calls it made (module, parameter,
///     elements, the parameter's storage) and their writes
///     (loadkit/weight_writes.h): destinations as views of kernel storage or,
///     for a rebuilt module, of its load format (relative to the parameter's
///     tensor, which every reload materialises afresh); sources as views of
///     the tensor.
/// It is kept only when the reload succeeded, the stream came in the recorded
/// order, and every loader call went through a loader that described its
/// writes for the tensor it was given, each write's source a view of that
/// tensor, and either to a plain module (load format = kernel format) or to a
/// rebuilt one that the full path wrote at once (not an attention-like module,
/// which waits for the others).
///
/// Replaying it (Session::apply_by_plan) skips the validation pass and the
/// loaders. What stands for them, and why it suffices:
///   1. the layout and the order compared exactly: names, dtypes and shapes
///      are all a validation sees (it runs on meta stand-ins), and the views a
///      describing loader writes depend on nothing else (weight_writes.h 2.);
///   2. every parameter a call went to still holds the storage it was
///      recorded with, in a module that is still plain, or belongs to a
///      module that is still rebuilt (its load format has the recorded shapes
///      and dtypes: records.h);
///   3. each delivered tensor is the one the order expects there.
/// 1 or 2 failing sends the reload down the full path; 3 failing is a bug
/// (an Other error, the reload undone or its written layers named as for any
/// error). What is read, and how a read error or a file changing mid-stream
/// fails, is the full path's; so are a rebuilt module's steps: materialised
/// at its first tensor, processed into its kernel tensors once complete
/// (module_step.h), put back if the reload fails first.
///
/// A write whose destination and source are contiguous, of one dtype and
/// shape, on one device, in two storages (every write of a plain tensor, a
/// block-fp8 weight and its scale, an expert into its module's load format)
/// is replayed as a copy of bytes (device::copy_bytes): the same bytes as its
/// `copy_`, without the dispatch and the views (a destination in a rebuilt
/// module is found by offset, its bounds checked as a view's would be). On
/// CUDA, such writes of small tensors that share one staged allocation (a
/// file's scales, stored together) are held and issued as one multi-tensor
/// copy (SmallCopies, update_plan.h), before the next write of another
/// storage, before a module is processed and before the reload returns or
/// fails.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "formats/checkpoint_files.h"
#include "reload/update_plan.h"

namespace loadkit::reload {

/// A checkpoint's layout: every tensor's name, dtype and shape, file by file in data order. It is
/// all that a validation on meta stand-ins sees of a checkpoint, and so all that the plans below
/// depend on.
struct CheckpointLayout {
  struct Tensor {
    std::string name;
    safetensors::DType dtype;
    std::vector<int64_t> shape;
  };
  std::vector<Tensor> tensors;

  static CheckpointLayout of(const safetensors::CheckpointFiles& files);
  /// Whether `files` has exactly this layout.
  bool matches(const safetensors::CheckpointFiles& files) const;
};

struct ReloadPlan {
  CheckpointLayout layout;
  /// The names in the order the stream delivered them, when not the layout's: a reload that
  /// rebuilds modules reads each one's tensors together (staging_plan.h), and a replay must get
  /// them in that order again.
  std::vector<std::string> order;
  /// Per tensor in delivery order: where its calls and writes end in `feeds` and `writes`.
  struct Ends {
    size_t feeds = 0, writes = 0;
  };
  std::vector<Ends> ends;
  std::vector<PlanFeed> feeds;    ///< tensor by tensor, in delivery order
  std::vector<PlanWrite> writes;  ///< tensor by tensor; `tensor` is the delivery index
  bool replayable = true;

  /// A plan to record for `files` delivered in `order` (empty: the files' order): the layout
  /// filled in, nothing else yet.
  static std::unique_ptr<ReloadPlan> start(const safetensors::CheckpointFiles& files,
                                           std::vector<std::string> order = {});
  /// The name of the `k`-th tensor delivered.
  const std::string& delivered(size_t k) const { return order.empty() ? layout.tensors[k].name : order[k]; }
  /// Recording: the stream's next tensor arrived, named `name`; the calls and writes noted from
  /// now on are its. A name out of the layout's order voids the plan.
  void arrived(const std::string& name);
  /// Recording: the stream ended. Short of the layout, the plan is void.
  void ended();
  /// The delivery index of the tensor being recorded (the last that arrived).
  int64_t current() const { return static_cast<int64_t>(arrived_) - 1; }

 private:
  void close_current();
  size_t arrived_ = 0;
};

}  // namespace loadkit::reload
