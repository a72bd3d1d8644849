#pragma once
/// \file
/// What the reload engine knows about the model: recorded once, right after
/// the model is built and before anything is loaded or processed, so that the
/// load format (every parameter's shape, dtype, weight loader and sharding as
/// built) can be put back around a module on every reload.
///
/// A record also carries the bookkeeping of the session in progress (the
/// fields under "per session"), reset by Session::begin.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "loadkit/module.h"
#include "reload/update_plan.h"

namespace loadkit::reload {

/// One parameter as built (load format), managed by its first owner module.
struct ParamRecord {
  std::string name;       ///< inside its module
  std::string qualified;  ///< from the root
  std::shared_ptr<Parameter> original;  ///< the load-format object, reused by every session
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  WeightLoader loader;  ///< the loader it was built with
  ShardingInfo sharding;
  int64_t expected = 0;  ///< elements a complete checkpoint writes
  // Per session.
  int64_t applied = 0;    ///< elements written
  int64_t validated = 0;  ///< elements the current validation counted
  std::vector<std::string> shards = {};  ///< shards (ShardId::str()) validations saw, to name what is missing
};

/// A loader call a transformed module keeps until all its weights are there (streamed updates).
struct KeptCall {
  size_t param;
  at::Tensor loaded;
  ShardId shard;
};

/// A replayed write into a transformed module's load format that an update keeps until the module
/// is complete, as it keeps calls (update_plan.h): the destination relative to the parameter's
/// tensor, materialised then, and the source, a view of the caller's tensor.
struct KeptWrite {
  PlanWrite::Into into;
  at::Tensor src;
};

/// A module's kernel format as the session found it: the very parameter objects, their
/// tensors (same storage) and its buffers. Processing writes into these; they are put back.
struct KernelTensors {
  std::vector<std::pair<std::string, std::shared_ptr<Parameter>>> objects;
  std::vector<std::pair<std::string, at::Tensor>> data;  ///< each object's tensor, in order
  std::vector<std::pair<std::string, at::Tensor>> buffers;
};

/// A module that owns parameters (a *layer*, see loadkit/runtime/reload_types.h).
struct ModuleRecord {
  std::string name;
  Module* module = nullptr;
  std::vector<ParamRecord> params;
  bool attention_like = false;  ///< processed after all others
  uint64_t load_bytes = 0;      ///< the load format's size on the device
  // Per session.
  bool transforms = false;  ///< processing changes the parameters: load format restored on meta
  KernelTensors kernel;
  std::vector<KeptCall> calls;
  std::vector<KeptWrite> writes;  ///< kept like `calls`, issued after them
  int64_t total = 0;    ///< elements a complete source writes
  int64_t applied = 0;  ///< elements written so far
  bool done = false;          ///< written (and processed) in full: no weight may follow
  bool materialized = false;  ///< load format allocated on the device
};

/// Every module of `root` that owns a parameter no earlier module owns, in named_modules() order.
std::vector<ModuleRecord> record_load_format(Module& root);

/// A tensor of this shape and dtype on the meta device: a load format that holds no memory.
at::Tensor meta_tensor(const std::vector<int64_t>& shape, at::ScalarType dtype);

}  // namespace loadkit::reload
