#pragma once
/// \file
/// vLLM's sharded-state format: each tensor-parallel rank's
/// kernel-format state dict in `model-rank-{rank}-part-{part}.safetensors`,
/// names as the engine's parameters, so that either program reads the
/// other's files.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "formats/checkpoint_files.h"
#include "reload/kernel_copy.h"

namespace loadkit {

class Module;

constexpr const char* kShardedStatePattern = "model-rank-{rank}-part-{part}.safetensors";

/// The model's state dict as vLLM saves it: every parameter under every name
/// it has (a tied weight under both), then ShardedStateLoader._filter_subtensors:
/// a tensor whose memory another tensor's covers is dropped, and of identical
/// ones the smaller key is kept. In module order.
std::vector<std::pair<std::string, at::Tensor>> sharded_state_dict(const Module& root);

/// `pattern` with {rank} and {part} filled in.
std::string sharded_file_name(const std::string& pattern, int rank, int part);

/// Writes `rank`'s state into `dir` as parts of at most `max_part_bytes`
/// (a tensor larger than that gets a part of its own). Returns the files written.
std::vector<std::string> save_sharded_state(const Module& root, const std::string& dir, int rank,
                                            const std::string& pattern, std::optional<uint64_t> max_part_bytes);

/// What vLLM's save_sharded_state example copies next to the weights: the
/// config and every other metadata file, but no weights and no weight index
/// (it would name files that are not there).
void copy_model_metadata(const std::string& from, const std::string& to);

/// Whether `dir` holds files of `rank` under `pattern`.
bool has_sharded_state(const std::string& dir, int rank, const std::string& pattern);

/// Opens and validates `rank`'s files (part order); an Input error naming the
/// pattern when none match.
safetensors::CheckpointFiles open_sharded_state(const std::string& dir, int rank, const std::string& pattern);

/// Where a sharded-state checkpoint's tensors go (reload/kernel_copy.h copies
/// them): sharded_state_dict()'s names. A tensor smaller than its parameter (a
/// padded one) goes into the leading part of it, with a warning, as vLLM does.
reload::KernelCopyTargets sharded_state_targets(const Module& root);

}  // namespace loadkit
