#pragma once
/// \file
/// Trainer → engine weight sync (as verl does it): three sources, all through
/// the model's one reload engine (LoadedModel::begin_update / update /
/// finish_update), so every weight goes through the model's own loaders (each
/// rank narrows its tensor-parallel shard), quantized modules are rebuilt in
/// place, and every kernel tensor keeps its storage (captured CUDA graphs stay
/// valid).
///
///  - In memory: a trainer hands (name, tensor) buckets, CPU or GPU, to
///    LoadedModel::update() itself. Plain weights are copied once, straight
///    into kernel storage; validation runs on meta stand-ins (no data read or
///    copied). Buffers reused between buckets: update(chunk, Borrowed::UntilReturn).
///  - FSDP-sharded: sync_fsdp_shards() — each trainer rank holds a dim-0 shard
///    of every tensor; the ranks gather one layer at a time and feed it to the
///    update, so the peak extra memory is one layer's full tensors.
///  - Broadcast: send_weights() on one rank, receive_weights() on the others —
///    a manifest first (validated whole by every receiver before any weight is
///    written), then double-buffered buckets.
///
/// Transactional broadcast, and what it costs: receivers keep a rollback
/// journal (Rollback::Journal): before the update first writes into a module's
/// kernel tensors, those are copied to host memory; if the sender dies, a
/// transfer fails or any receiver fails, every receiver copies them all back
/// (bit-identical, same storage) and fails with one line naming the sender
/// rank and the bucket. Cost per receiver: host memory equal to its own kernel
/// bytes (its tensor-parallel shard of the model, in kernel format) and one
/// device-to-host copy of them per update (at each module's first write, while
/// the next bucket is in transfer). The alternative — hold every bucket until the
/// last one arrived — would need the full, unsharded update in memory on every
/// receiver and give up overlapping transfer with application.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "loadkit/runtime/engine.h"
#include "loadkit/weights.h"

namespace loadkit {

class ProcessGroup;

// ------------------------------------------------------------------ FSDP

/// One tensor as an FSDP2 trainer rank holds it: `Shard(0)`, torch.chunk's layout.
struct LocalShard {
  std::string name;                 ///< checkpoint name, e.g. "model.layers.0.mlp.up_proj.weight"
  at::Tensor local;                 ///< this rank's rows (fsdp_shard_rows), any device; may have 0 rows
  std::vector<int64_t> full_shape;  ///< the whole tensor's shape (at least 1-D)
};

/// Rows [begin, begin + count) of a `rows`-row tensor on `rank` of `world`
/// (torch.chunk / FSDP2 Shard(0)): chunk = ceil(rows / world), the last
/// shard(s) smaller, possibly empty.
struct ShardRows {
  int64_t begin = 0;
  int64_t count = 0;
  int64_t chunk = 0;  ///< rows every rank's shard is padded to for the all-gather
};
ShardRows fsdp_shard_rows(int64_t rows, int world, int rank);

/// The group a tensor is gathered with: its name up to and including its first
/// numeric path component ("model.layers.7.mlp.up_proj.weight" → "model.layers.7."),
/// or, without one, the whole name (each such tensor on its own).
std::string layer_of(const std::string& name);

struct FsdpSyncOptions {
  bool complete = true;               ///< every weight of the model must be in the list
  Rollback rollback = Rollback::None; ///< Journal: a failed gather leaves the model as it was
};

/// Collective over `trainers` (every member calls it with its own shards, in
/// the same order; colocated: the trainer ranks are the processes that hold
/// `model`, at tensor-parallel size 1 or the group's size). First every rank
/// checks its shards (rows as fsdp_shard_rows says) and validates the whole
/// list against its model on meta tensors, and the ranks compare their lists
/// (names, full shapes, dtypes): any difference or failure stops every rank
/// with the same one-line error naming the tensor, before anything is
/// gathered or written. Then, layer by layer (layer_of, in list order):
/// all-gather each tensor (padded to the chunk, gathered, narrowed: a view),
/// update the model with the layer, free it. Peak extra memory: one layer's
/// full tensors (plus the padding of short shards). Returns the model's report.
const LoadReport& sync_fsdp_shards(LoadedModel& model, ProcessGroup& trainers, const std::vector<LocalShard>& shards,
                                   const FsdpSyncOptions& options = {});

// ------------------------------------------------------------- broadcast

struct BroadcastOptions {
  uint64_t bucket_bytes = 256ull << 20;  ///< sender: bucket size (a larger tensor spans buckets)
  int sender = 0;                        ///< the sender's rank in the sync group
  bool complete = true;                  ///< receivers: every weight of the model must be sent
  /// Called after bucket `index` (of `count`) was sent (sender) or applied (receiver).
  std::function<void(int index, int count)> on_bucket;
};

/// What one side of a broadcast moved.
struct BroadcastReport {
  uint64_t bytes = 0;  ///< tensor bytes
  size_t tensors = 0;
  int buckets = 0;
  double seconds = 0;           ///< manifest to final agreement
  double transfer_seconds = 0;  ///< first bucket started to last bucket done
  double gb_per_s() const { return transfer_seconds > 0 ? static_cast<double>(bytes) / transfer_seconds / 1e9 : 0.0; }
};

/// Sender side, collective over `sync` (the sender and every receiver): sends
/// the manifest, learns whether every receiver accepts it (Input error naming
/// the receiver and tensor if not), then streams `weights` (checkpoint names,
/// any device) in buckets over sync's backend (Gloo: CPU buffers, NCCL: this
/// GPU's), packing bucket k+1 while bucket k is in flight. Ends once every
/// receiver has applied the update (or throws the first receiver's failure).
/// The tensors must stay unchanged until it returns.
BroadcastReport send_weights(ProcessGroup& sync, const std::vector<NamedWeight>& weights,
                             const BroadcastOptions& options = {});

/// Receiver side: receives the manifest, validates the whole update against
/// `model` (its own tensor-parallel shard) before any weight is written, then
/// applies bucket k while bucket k+1 is in transfer. Transactional: see the
/// file comment. Returns the model's report of the update.
const LoadReport& receive_weights(LoadedModel& model, ProcessGroup& sync, const BroadcastOptions& options = {});

}  // namespace loadkit
