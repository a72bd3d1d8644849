// The FSDP-sharded source (verl's dtensor_weight_loader, without its
// per-architecture copies): every trainer rank holds a dim-0 shard of every
// tensor; the ranks agree on the list, then gather one layer at a time
// through c10d all-gather and feed it to the model's update.

#include <ATen/ATen.h>

#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "caller_tensor.h"
#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/weight_sync.h"
#include "sync/sync_protocol.h"

namespace loadkit {

ShardRows fsdp_shard_rows(int64_t rows, int world, int rank) {
  ShardRows s;
  s.chunk = (rows + world - 1) / world;
  s.begin = std::min<int64_t>(rows, s.chunk * rank);
  s.count = std::min<int64_t>(rows, s.begin + s.chunk) - s.begin;
  return s;
}

std::string layer_of(const std::string& name) {
  size_t start = 0;
  while (start < name.size()) {
    size_t end = name.find('.', start);
    if (end == std::string::npos) break;  // the last component names a tensor, not a layer
    const bool numeric = end > start && std::all_of(name.begin() + start, name.begin() + end, ::isdigit);
    if (numeric) return name.substr(0, end + 1);
    start = end + 1;
  }
  return name;
}

namespace {

const char* kOrigin = "FSDP shard gather";

std::string trainer(int rank) { return cat("trainer rank ", rank, ": "); }

/// This rank's shard list as the ranks compare it: names, full shapes, dtypes.
std::vector<sync::ManifestEntry> manifest_of(const std::vector<LocalShard>& shards) {
  std::vector<sync::ManifestEntry> out;
  for (const auto& s : shards) out.push_back({s.name, s.local.scalar_type(), s.full_shape, 0});
  return out;
}

/// Shards that fit torch.chunk's layout for (rank, world), no name twice.
void check_shards(const std::vector<LocalShard>& shards, int world, int rank) {
  std::unordered_set<std::string> names;
  for (const auto& s : shards) {
    if (!names.insert(s.name).second) fail(ErrorKind::Input, kOrigin, ": tensor '", s.name, "' is given twice");
    if (!s.local.defined()) fail(ErrorKind::Input, kOrigin, ": tensor '", s.name, "' has no local shard");
    require_plain_data(s.local, kOrigin, s.name);
    if (s.full_shape.empty())
      fail(ErrorKind::Input, kOrigin, ": tensor '", s.name, "' is 0-d: a dim-0 shard needs at least one dimension");
    const ShardRows rows = fsdp_shard_rows(s.full_shape[0], world, rank);
    std::vector<int64_t> expected = s.full_shape;
    expected[0] = rows.count;
    if (s.local.sizes() != at::IntArrayRef(expected))
      fail(ErrorKind::Input, kOrigin, ": tensor '", s.name, "' of ", shape_str(s.full_shape), " has a local shard of ",
           shape_str(s.local.sizes()), " on rank ", rank, " of ", world, ", dim-0 sharding (torch.chunk) gives ",
           shape_str(expected));
  }
}

/// The first difference between rank `r`'s list and rank 0's, or "".
std::string difference(const std::vector<sync::ManifestEntry>& base, const std::vector<sync::ManifestEntry>& other,
                       int r) {
  for (size_t i = 0; i < std::max(base.size(), other.size()); ++i) {
    if (i >= other.size()) return cat("trainer rank ", r, " lacks ", sync::describe(base[i]), " that trainer rank 0 has");
    if (i >= base.size()) return cat("trainer rank ", r, " has ", sync::describe(other[i]), " that trainer rank 0 lacks");
    if (!(base[i] == other[i]))
      return cat("trainer rank ", r, " has ", sync::describe(other[i]), " where trainer rank 0 has ",
                 sync::describe(base[i]), " (tensor ", i + 1, " of the list)");
  }
  return "";
}

/// Every rank's list must equal rank 0's: every rank compares all of them and fails the same way.
void agree_on_lists(ProcessGroup& trainers, const std::vector<sync::ManifestEntry>& mine) {
  const auto all = sync::agree(trainers, [&] { return sync::encode(mine); }, trainer);
  const auto base = sync::decode(all[0], trainer(0) + kOrigin);
  for (int r = 1; r < static_cast<int>(all.size()); ++r) {
    const std::string diff = difference(base, sync::decode(all[r], trainer(r) + kOrigin), r);
    if (!diff.empty()) fail(ErrorKind::Input, kOrigin, ": the trainer ranks' shard lists differ: ", diff);
  }
}

/// `shard`'s rows as bytes [chunk, row bytes] on `device`, zero-padded to the chunk (a view of the
/// local tensor when it is already there, contiguous and a full chunk).
at::Tensor padded_rows(const LocalShard& shard, const ShardRows& rows, const c10::Device& device) {
  const int64_t row_elems = c10::multiply_integers(shard.full_shape.begin() + 1, shard.full_shape.end());
  at::Tensor bytes = shard.local.to(device).contiguous().reshape({rows.count, row_elems}).view(at::kByte);
  if (rows.count == rows.chunk) return bytes;
  at::Tensor padded = at::zeros({rows.chunk, bytes.size(1)}, bytes.options());
  padded.narrow(0, 0, rows.count).copy_(bytes);
  return padded;
}

/// Gathers the tensors `indices` of one layer (all at once, asynchronously) and updates the model
/// with them; they are freed on return unless a module still incomplete keeps them.
void gather_and_update(LoadedModel& model, ProcessGroup& trainers, const std::vector<LocalShard>& shards,
                       const std::vector<size_t>& indices) {
  const int world = trainers.size(), rank = trainers.rank();
  const c10::Device device = trainers.device();
  std::vector<at::Tensor> inputs, outputs;  // both alive until their collective is done
  std::vector<ProcessGroup::Pending> pending;
  for (size_t i : indices) {
    const LocalShard& shard = shards[i];
    if (c10::multiply_integers(shard.full_shape) == 0) {  // nothing to gather (and backends dislike 0 bytes)
      inputs.emplace_back();
      outputs.emplace_back();
      pending.emplace_back();
      continue;
    }
    const ShardRows rows = fsdp_shard_rows(shard.full_shape[0], world, rank);
    inputs.push_back(padded_rows(shard, rows, device));
    outputs.push_back(at::empty({world * rows.chunk, inputs.back().size(1)}, inputs.back().options()));
    pending.push_back(trainers.all_gather(outputs.back(), inputs.back(), cat("'", shard.name, "'")));
  }
  std::vector<NamedWeight> full;
  for (size_t k = 0; k < indices.size(); ++k) {
    pending[k].wait();
    const LocalShard& shard = shards[indices[k]];
    if (!outputs[k].defined()) {
      full.push_back({shard.name, at::empty(shard.full_shape, shard.local.options().device(device)), kOrigin});
      continue;
    }
    // Rank r's rows start at r * chunk: the first `rows` rows are the tensor (a view).
    at::Tensor rows = outputs[k].narrow(0, 0, shard.full_shape[0]);
    full.push_back({shard.name, rows.view(shard.local.scalar_type()).view(shard.full_shape), kOrigin});
  }
  inputs.clear();
  model.update(full);  // Borrowed::UntilFinish: nobody reuses these buffers
}

}  // namespace

const LoadReport& sync_fsdp_shards(LoadedModel& model, ProcessGroup& trainers, const std::vector<LocalShard>& shards,
                                   const FsdpSyncOptions& options) {
  const int world = trainers.size(), rank = trainers.rank();
  const auto mine = manifest_of(shards);
  // 1. The lists: the same on every rank, or every rank fails naming the first difference.
  agree_on_lists(trainers, mine);
  // 2. Each rank's shards and its model's verdict on the whole list, before anything moves.
  bool began = false;
  try {
    sync::agree(
        trainers,
        [&] {
          check_shards(shards, world, rank);
          model.begin_update(options.rollback);
          began = true;
          model.validate_update(sync::meta_weights(mine, kOrigin), options.complete);
          return std::string();
        },
        trainer);
  } catch (...) {
    if (began) model.rollback_update();
    throw;
  }

  // 3. Layer by layer, in list order; a failure here is told to the others in step 4.
  std::vector<std::string> order;
  std::unordered_map<std::string, std::vector<size_t>> layers;
  for (size_t i = 0; i < shards.size(); ++i) {
    auto [it, added] = layers.try_emplace(layer_of(shards[i].name));
    if (added) order.push_back(it->first);
    it->second.push_back(i);
  }
  std::optional<Error> failure;
  for (const auto& layer : order) {
    try {
      gather_and_update(model, trainers, shards, layers.at(layer));
    } catch (const std::exception& e) {
      const ErrorKind kind = dynamic_cast<const Error*>(&e) ? static_cast<const Error&>(e).kind() : ErrorKind::Other;
      failure.emplace(kind, cat(kOrigin, ": layer '", layer, "': ", failure_message(e)));
      break;
    }
  }
  // 4. Every rank applied everything, or (with a journal) every rank undoes it.
  try {
    sync::commit_everywhere(model, trainers, failure, trainer);
  } catch (const Error& e) {
    fail(e.kind(), e.what(), options.rollback == Rollback::Journal ? "; every rank's model is as before the sync" : "");
  }
  return model.report();
}

}  // namespace loadkit
