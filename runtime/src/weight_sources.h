#pragma once
/// \file
/// Weight sources: streams of checkpoint tensors for the load pipeline.

#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "formats/checkpoint_files.h"
#include "loadkit/weights.h"

namespace loadkit {

class Module;

/// Every tensor of a validated checkpoint, file by file in data order (or in
/// `order`: every tensor's name once), each read into a host tensor of its own
/// when it is handed out (tensor_io.h's read_tensor: pread on the validated
/// descriptor, then the file checked unchanged), and let go when the next is
/// asked for: one tensor of host memory at a time. Logs a progress line per
/// file on large loads.
std::unique_ptr<WeightStream> safetensors_stream(const safetensors::CheckpointFiles& files,
                                                 std::vector<std::string> order = {});
/// The same tensors, file order, as meta tensors from the headers: nothing is read (validation).
std::unique_ptr<WeightStream> safetensors_header_stream(const safetensors::CheckpointFiles& files);

/// How a checkpoint's data is read for a load, a reload or a kernel-format copy.
struct StreamPlan {
  /// Tensor names in the order to deliver them (every tensor once), or empty: file order.
  std::vector<std::string> order;
  /// With `order`, per tensor: device bytes the consumer holds beside the stream
  /// while that tensor is applied (a reload's rebuilt module), else 0.
  std::vector<uint64_t> reserve;
  /// Device bytes the staged path may read ahead, reserves included; 0: the
  /// largest tensor (one tensor ahead at most).
  uint64_t window_bytes = 0;

  bool operator==(const StreamPlan&) const = default;
};

/// The one place that picks how data reaches `device`: the staged path
/// (staging/staged_stream.h) where staging_enabled(device), else host tensors
/// read one at a time (safetensors_stream). Every load, reload and kernel-format copy opens
/// its data stream here.
std::unique_ptr<WeightStream> open_weight_stream(const safetensors::CheckpointFiles& files, const c10::Device& device,
                                                 const StreamPlan& plan = {});

/// `--load-format dummy`: fills every parameter with small random values
/// (uniform in ±1e-3, seeded) instead of reading a checkpoint; padding rows stay zero.
void initialize_dummy_weights(Module& root, uint64_t seed = 0);

}  // namespace loadkit
