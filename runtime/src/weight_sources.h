#pragma once
/// \file
/// Weight sources: streams of checkpoint tensors for the load pipeline.

#include <memory>
#include <string>
#include <vector>

#include "formats/checkpoint_files.h"
#include "loadkit/weights.h"

namespace loadkit {

class Module;

/// Every tensor of a validated checkpoint, file by file in data order (or in
/// `order`: every tensor's name once), zero-copy from the mappings. Logs a
/// progress line per file on large loads.
std::unique_ptr<WeightStream> safetensors_stream(const safetensors::CheckpointFiles& files,
                                                 std::vector<std::string> order = {});

/// `--load-format dummy`: fills every parameter with small random values
/// (uniform in ±1e-3, seeded) instead of reading a checkpoint; padding rows stay zero.
void initialize_dummy_weights(Module& root, uint64_t seed = 0);

}  // namespace loadkit
