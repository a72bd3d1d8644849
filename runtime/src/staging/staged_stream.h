#pragma once
/// \file
/// The fast path from safetensors files to a CUDA device (issue 8).
///
/// Reader threads `pread` consecutive pieces of the files into their own
/// pinned buffers (two each, so a read overlaps the previous piece's copy)
/// and copy each piece asynchronously, on the thread's own CUDA stream,
/// into a device tensor that holds the whole checkpoint tensor. The consumer
/// (the model's loaders, on the current stream) gets that device tensor once
/// every piece is queued; its stream waits on the pieces' events, so nothing
/// synchronises per tensor and the loaders' copies into the final parameters
/// are device-to-device. Device memory read ahead is bounded by a window
/// (at least one tensor), which is what a reload's peak extra memory is.
///
/// Why not hand pinned host tensors straight to the loaders: a loader's
/// `copy_` from host memory blocks the consumer per tensor and splits poorly
/// across streams; a device-side copy is ~40x faster than the PCIe transfer
/// and keeps sharding, transposes and dtype casts on the GPU.

#include <c10/core/Device.h>

#include <cstdint>
#include <memory>

#include "formats/checkpoint_files.h"
#include "loadkit/weights.h"

namespace loadkit {

struct StagingOptions {
  int threads = 0;            ///< reader threads; 0: LOADKIT_STAGING_THREADS or min(16, cores)
  uint64_t piece_bytes = 0;   ///< bytes per read and per copy; 0: LOADKIT_STAGING_PIECE_KB or 16 MiB
  uint64_t window_bytes = 0;  ///< device bytes read ahead of the consumer; 0: LOADKIT_STAGING_WINDOW_MB or 512 MiB
};

/// Whether loads onto `device` take the staged path: a CUDA device in a CUDA
/// build, unless LOADKIT_STAGING=0 (the plain mmap path, for comparison).
bool staging_enabled(const c10::Device& device);

/// Every tensor of `files`, file by file in data order, as a device tensor on
/// `device`. A read error names the file and the tensor (Input).
std::unique_ptr<WeightStream> staged_safetensors_stream(const safetensors::CheckpointFiles& files,
                                                        const c10::Device& device, StagingOptions options = {});

}  // namespace loadkit
