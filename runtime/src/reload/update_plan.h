#pragma once
/// \file
/// A validated update, kept for the next chunk that looks the same: a trainer
/// syncs the same buckets (names, shapes, dtypes, devices, strides) step after
/// step, and name resolution plus the meta pass cost more per tensor than the
/// copy of a small tensor does.
///
/// What a plan holds, recorded while a chunk takes the full path (validation
/// through the loaders, then the loaders for real):
///   - the chunk's signature: every tensor's name, sizes, strides, dtype and
///     device, compared exactly (a hash only picks the candidate);
///   - the validation's feeds: which parameter each loader call went to, with
///     its element count and shard, in order;
///   - when every loader the chunk called describes its writes
///     (loadkit/weight_writes.h), those writes: each source as a view of the
///     chunk's n-th tensor, each destination a view of kernel storage (a plain
///     module) or of a rebuilt module's load format, relative to the
///     parameter's tensor (an update keeps a rebuilt module's calls until it is
///     complete, its load format on meta meanwhile: the views are recorded
///     there, and the loader runs only once, at process time).
///
/// Replaying a plan (Session::apply_planned) skips the validation pass and the
/// loaders: the element counts of every feed are checked against the
/// session's state as validation checks them, and any doubt (a count over, a
/// module done, a plain module now transformed or the other way round, a
/// kernel tensor moved) sends the chunk down the full path, which words the
/// error. Writes into kernel storage are issued at once; those into a rebuilt
/// module's load format are kept with the module, as its calls would be
/// (records.h KeptWrite: a borrowed source is copied as a call's is), and
/// issued into the load format when it is materialised to be processed
/// (module_step.h). A chunk whose signature differs in anything is validated
/// from scratch.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "loadkit/weight_writes.h"
#include "loadkit/weights.h"

namespace loadkit::reload {

/// One tensor of a chunk as a plan matches it.
struct TensorSignature {
  std::string name;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  c10::Device device;
  bool matches(const NamedWeight& w) const;
};

/// One loader call of the validation: `n` elements of parameter `param` of module `module`.
struct PlanFeed {
  uint32_t module, param;
  int64_t n;
  std::string shard;      ///< ShardId::str(), noted as validation notes it
  const void* kernel_ptr;  ///< the parameter's data_ptr when recorded: a moved tensor voids the plan
  /// Into a rebuilt module's load format, materialised afresh each time (kernel_ptr is not compared).
  bool rebuilt = false;
};

/// A recorded write, its source relative to the chunk's `tensor`-th tensor.
struct PlanWrite {
  at::Tensor dst;  ///< kernel storage; undefined when `into` says where the write goes
  /// A write into a rebuilt module's load format, which a reload materialises afresh (module_step.h):
  /// the parameter (module and parameter index of the session's records), and the destination as
  /// a view of its tensor, relative to that tensor's own storage offset.
  struct Into {
    uint32_t module = 0, param = 0;
    int64_t offset = 0;
    std::vector<int64_t> sizes, strides;
    /// The destination in `param_data`, the tensor that parameter holds now.
    at::Tensor view_of(const at::Tensor& param_data) const;
    /// The same destination's first byte, for a contiguous one `nbytes` long (a byte copy's),
    /// without building the view; an Other error when it does not fit param_data's storage.
    void* bytes_of(const at::Tensor& param_data, int64_t nbytes) const;
  };
  std::optional<Into> into;
  int64_t tensor = -1;  ///< -1: a zero write
  bool whole = false;   ///< the source is that tensor itself
  int64_t offset = 0;   ///< storage offset relative to the tensor's own
  std::vector<int64_t> sizes, strides;
  /// A copy of bytes: destination and source contiguous, of one dtype and shape, on one device,
  /// in two storages, `nbytes` long from `offset` elements into the tensor.
  bool byte_copy = false;
  int64_t nbytes = 0;

  /// `w`, made while `from` (the `tensor`-th of its source) was applied; false (`out` unset) when
  /// w's source is not a view of `from` in its element type (a temporary: never replayable).
  static bool record(const WeightWrite& w, const at::Tensor& from, int64_t tensor, PlanWrite& out);
  /// record(), its destination kept as `into` relative to `param_data`, the tensor of parameter
  /// `into.param` of module `into.module` (its other fields are filled in); false also when
  /// w's destination is not a view of `param_data` in its element type.
  static bool record_into(const WeightWrite& w, const at::Tensor& from, int64_t tensor, Into into,
                          const at::Tensor& param_data, PlanWrite& out);
  /// The destination for a plan replayed now: `dst`, or into->view_of(param_data).
  at::Tensor destination(const at::Tensor& param_data) const { return into ? into->view_of(param_data) : dst; }
  /// The source for `from`, a tensor of the recorded one's sizes, strides and dtype (undefined:
  /// a zero write).
  at::Tensor source(const at::Tensor& from) const;
  /// For a byte copy whose `from` is contiguous on the destination's device (destination(param_data),
  /// never built): queues it (device::copy_bytes, no dispatch) and returns true. Otherwise false,
  /// nothing done: write source(from) into destination(param_data) instead.
  bool copy_bytes(const at::Tensor& from, const at::Tensor& param_data) const;
};

/// Replayed byte copies of small tensors that share one source storage (the tensors a staged
/// stream reads into one allocation: a block-fp8 file's scales, stored together), issued together
/// (apply_writes: one `_foreach_copy_`): a copy issued on its own costs ~4 us of host time on the
/// GPU machine whatever its size (bench raw_probe), and a block-fp8 MoE checkpoint has 1002
/// scales, most of them 704 bytes. At most one source storage is held, of at most kHeldBytes, and
/// only until a write of anything else: the stream's window does not count what is held.
class SmallCopies {
 public:
  static constexpr int64_t kSmallBytes = 64 << 10;  ///< a write this small or smaller may be held
  static constexpr int64_t kHeldBytes = 4 << 20;    ///< the largest source storage held

  /// Holds `pw`'s write of `from` into its destination(param_data) when it is a byte copy of at
  /// most kSmallBytes out of a storage of at most kHeldBytes on the destination's device, and
  /// returns true. What is held from another storage is issued first; when it returns false,
  /// everything held has been issued, so the caller's own write comes after them, in the plan's order.
  bool hold(const PlanWrite& pw, const at::Tensor& from, const at::Tensor& param_data);
  /// Issues what is held and lets go of its storage.
  void issue();

 private:
  std::vector<WeightWrite> held_;
};

struct UpdatePlan {
  size_t key = 0;  ///< PlanCache's hash of the signature's names
  std::vector<TensorSignature> signature;
  std::vector<PlanFeed> feeds;
  bool replayable = true;  ///< writes below cover the whole chunk
  std::vector<PlanWrite> writes;

  bool matches(const std::vector<NamedWeight>& chunk) const;
  /// Notes `w`, made by a loader while the chunk's `tensor`-th tensor was applied; clears
  /// `replayable` when its source is not a view of that tensor.
  void note_write(const WeightWrite& w, const std::vector<NamedWeight>& chunk, int64_t tensor);
  /// The same for a write into a rebuilt module's load format, `param_data` (the parameter `into`
  /// names, on meta while the module's calls are kept): its destination noted relative to it.
  void note_write_into(const WeightWrite& w, const std::vector<NamedWeight>& chunk, int64_t tensor,
                       const PlanWrite::Into& into, const at::Tensor& param_data);
};

/// The plans of recent chunks, found by signature. Bounded: a trainer with more distinct buckets
/// than kPlans re-validates (correct, only slower).
class PlanCache {
 public:
  static constexpr size_t kPlans = 512;
  /// The plan whose signature matches `chunk` exactly, or nullptr.
  const UpdatePlan* find(const std::vector<NamedWeight>& chunk) const;
  /// A fresh plan for `chunk` (its signature filled in), not yet in the cache.
  static std::unique_ptr<UpdatePlan> start(const std::vector<NamedWeight>& chunk);
  void keep(std::unique_ptr<UpdatePlan> plan);
  void clear() { plans_.clear(); }

 private:
  static size_t hash(const std::vector<NamedWeight>& chunk);
  std::unordered_multimap<size_t, std::unique_ptr<UpdatePlan>> plans_;
};

}  // namespace loadkit::reload
