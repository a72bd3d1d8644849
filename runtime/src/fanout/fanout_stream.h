#pragma once
/// \file
/// Reading a checkpoint once for a whole tensor-parallel group: each rank
/// reads a disjoint share of the tensors from storage (fanout_plan.h says
/// which, balanced by bytes), and each share is broadcast over the group's
/// process group to every rank, one round of at most `round_bytes` at a time.
/// Each rank's consumer then gets every tensor of the checkpoint, whole, as
/// if it had read it itself — a host tensor on a Gloo group, a device tensor
/// on NCCL — and its loaders narrow what its shard needs, exactly as from
/// disk. Storage (page cache, disk, network file system) serves each byte once
/// instead of once per rank.
///
/// Contracts:
///  - Collective: every member opens the stream over the same checkpoint (the
///    same tensors, names and sizes: checked first, through the store; a rank
///    that differs is an Other error on every rank, before any transfer) and
///    reads it to the end in the same order, or fails.
///  - Memory: a round's buffer on the group's device (round_bytes, or the one
///    tensor larger than that) while its tensors are consumed; a tensor the
///    consumer keeps keeps its round's buffer. On NCCL, the owner also stages
///    its share of a round in pinned host memory.
///  - Failure: a read that fails on its owner (a file truncated or changed
///    after it was validated, an I/O error) is still followed by that round's
///    broadcasts, with the owner's segment marked failed, so no rank waits in
///    a collective that will never come. Every rank then throws from next():
///    the owner its own error, naming the file and the tensor, the others the
///    same kind with "rank R: " and that message (through the store). A
///    consumer applying a reload aborts it as for any read error (the reload's
///    transactional machinery: journal, written_modules).
///  - A rank that leaves without finishing the stream (its consumer threw)
///    makes the others' next broadcast fail, or time out (LOADKIT_TP_TIMEOUT).

#include <cstdint>
#include <memory>

#include "formats/checkpoint_files.h"
#include "loadkit/weights.h"
#include "weight_sources.h"

namespace loadkit {

class ProcessGroup;

struct FanoutStats {
  uint64_t bytes_read = 0;  ///< tensor bytes this rank read from storage
  size_t tensors_read = 0;
};

/// Every tensor of `files`, in `plan.order` (empty: file order), read once across `group` as the
/// header says. Rounds hold at most `plan.window_bytes` (0: default_window_bytes()). `stats`, if
/// given, must outlive the stream and is filled as it goes.
std::unique_ptr<WeightStream> fanout_stream(const safetensors::CheckpointFiles& files, ProcessGroup& group,
                                            const StreamPlan& plan, FanoutStats* stats = nullptr);

}  // namespace loadkit
