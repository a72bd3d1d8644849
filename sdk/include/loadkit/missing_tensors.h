#pragma once
/// \file
/// What a load or an update did not get, named as the checkpoint names it.
///
/// A parameter knows the shards it received (`Parameter::loaded_shards` on a
/// load, the reload session's own count on a reload); the weight mapping knows
/// which checkpoint tensor fills which shard. Both the load's check
/// (causal_lm.h) and the reload engine's name what is missing through this one
/// function, so a user sees the same name whichever path found the gap.

#include <string>
#include <vector>

namespace loadkit {

struct WeightMapping;

/// The checkpoint tensors parameter `param` (its name from the root) lacks, given the shards
/// (`ShardId::str()`) it received: an expert's `...experts.3.gate_proj.weight` rather than
/// `...experts.w13_weight`; when some of a fused parameter's shards came, the others'
/// tensors (`self_attn.k_proj.weight` rather than `self_attn.qkv_proj.weight`); otherwise
/// `param` itself (it may come fused in the checkpoint too, as Phi3's qkv_proj does).
std::vector<std::string> missing_tensors_of(const std::string& param, const std::vector<std::string>& received_shards,
                                            const WeightMapping& mapping);

}  // namespace loadkit
