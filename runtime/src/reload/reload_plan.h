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
///     file in data order, which is the order the stream delivers them when no
///     module is rebuilt (the only reloads that record a plan);
///   - per tensor, in that order, the loader calls it made (module, parameter,
///     elements, the parameter's storage) and their writes
///     (loadkit/weight_writes.h): destinations as views of kernel storage,
///     sources as views of the tensor.
/// It is kept only when the reload succeeded, the stream came in the layout's
/// order, and every loader call went to a plain module (load format = kernel
/// format) through a loader that described its writes for the tensor it was
/// given, each write's source a view of that tensor.
///
/// Replaying it (Session::apply_by_plan) skips the validation pass and the
/// loaders. What stands for them, and why it suffices:
///   1. the layout compared exactly: names, dtypes and shapes are all a
///      validation sees (it runs on meta stand-ins), and the views a
///      describing loader writes depend on nothing else (weight_writes.h 2.);
///   2. every parameter a call went to still holds the storage it was
///      recorded with, in a module that is still plain;
///   3. each delivered tensor is the one the layout expects there.
/// 1 or 2 failing sends the reload down the full path; 3 failing is a bug
/// (an Other error, the reload undone or its written layers named as for any
/// error). What is read, and how a read error or a file changing mid-stream
/// fails, is the full path's.
///
/// A write whose destination and source are contiguous, of one dtype and
/// shape, on one CUDA device (every write of a plain tensor, a block-fp8
/// weight and its scale) is replayed as a copy of bytes (device::copy_bytes):
/// the same bytes as its `copy_`, without the dispatch and the source's view.
/// Such writes of small tensors that share one staged allocation (a file's
/// scales, stored together) are held and issued as one multi-tensor copy
/// (SmallCopies, update_plan.h), before the next write of another storage and
/// before the reload returns or fails.

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
  /// Per tensor of the layout: where its calls and writes end in `feeds` and `writes`.
  struct Ends {
    size_t feeds = 0, writes = 0;
  };
  std::vector<Ends> ends;
  std::vector<PlanFeed> feeds;    ///< tensor by tensor, in layout order
  std::vector<PlanWrite> writes;  ///< tensor by tensor; `tensor` is the layout index
  bool replayable = true;

  /// A plan to record for `files`: the layout filled in, nothing else yet.
  static std::unique_ptr<ReloadPlan> start(const safetensors::CheckpointFiles& files);
  /// Recording: the stream's next tensor arrived, named `name`; the calls and writes noted from
  /// now on are its. A name out of the layout's order voids the plan.
  void arrived(const std::string& name);
  /// Recording: the stream ended. Short of the layout, the plan is void.
  void ended();
  /// The layout index of the tensor being recorded (the last that arrived).
  int64_t current() const { return static_cast<int64_t>(arrived_) - 1; }

 private:
  void close_current();
  size_t arrived_ = 0;
};

}  // namespace loadkit::reload
