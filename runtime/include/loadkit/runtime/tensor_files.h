#pragma once
/// \file
/// Tensors to and from safetensors files, for a host that holds weights in
/// memory (a trainer, a test, a benchmark): read a checkpoint directory as the
/// tensors an update takes, write results (logits) out. Every file is read with
/// the same validation as a load: a bad header is an Input error naming the file.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "loadkit/weights.h"

namespace loadkit {

/// Every tensor of a Hugging Face checkpoint directory (one `.safetensors` file
/// or an index), in file order, as owned CPU tensors named as the checkpoint
/// names them: what LoadedModel::update() takes.
std::vector<NamedWeight> read_checkpoint(const std::string& dir);

/// Every tensor of one safetensors file, as owned CPU tensors.
std::vector<std::pair<std::string, at::Tensor>> load_tensors(const std::string& path);

/// Writes `tensors` (any device; copied to contiguous CPU first) to a safetensors file.
void save_tensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors);

}  // namespace loadkit
