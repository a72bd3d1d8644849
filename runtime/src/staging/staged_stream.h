#pragma once
/// \file
/// The fast path from safetensors files to a CUDA device.
///
/// Reader threads `pread` consecutive pieces of the files into a small ring of
/// pinned buffers each (from the process-wide pool: pinned once, see
/// pinned_pool.h) and copy each piece asynchronously, on the thread's own CUDA
/// stream, into a device tensor that holds the whole checkpoint tensor. The
/// consumer (the model's loaders, on the current stream) gets that device
/// tensor once every piece is queued; its stream waits on one event per reader
/// that carried a piece, so nothing synchronises per tensor and the loaders'
/// copies into the final parameters are device-to-device. Device memory read
/// ahead is bounded by a window, which is what a reload's peak extra memory is;
/// a tensor larger than the window is never staged: it comes as a read-only
/// host view of the mapping and its loader copies it from there.
///
/// Why small pieces: a piece that stays in the CPU caches between the read
/// and the DMA is cheaper than one that goes through DRAM twice; on the GPU
/// machine 16 threads read the page cache at 80 GB/s in 1 MiB pieces against
/// 61 GB/s in 8 MiB pieces.
///
/// Why not hand pinned host tensors straight to the loaders: a loader's
/// `copy_` from host memory blocks the consumer per tensor and splits poorly
/// across streams; a device-side copy is ~40x faster than the PCIe transfer
/// and keeps sharding, transposes and dtype casts on the GPU.

#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "formats/checkpoint_files.h"
#include "loadkit/weights.h"

namespace loadkit {

struct StagingOptions {
  int threads = 0;            ///< reader threads; 0: LOADKIT_STAGING_THREADS or min(16, cores)
  uint64_t piece_bytes = 0;   ///< bytes per read and per copy; 0: LOADKIT_STAGING_PIECE_KB or 2 MiB
  int depth = 0;              ///< pinned buffers per reader; 0: LOADKIT_STAGING_DEPTH or 3
  uint64_t window_bytes = 0;  ///< device bytes read ahead of the consumer; 0: LOADKIT_STAGING_WINDOW_MB or 512 MiB
  /// Tensor names in the order to deliver them (every tensor of the files once); empty: file order.
  std::vector<std::string> order;
  /// With `order`, per tensor: device bytes the consumer will hold beside the
  /// stream while that tensor is applied (a reload's materialised module).
  /// Readers then keep read-ahead + the largest such reserve among the tensors
  /// from the consumer's position to the one they stage within the window; a
  /// tensor whose bytes and reserve exceed the window alone is not staged.
  std::vector<uint64_t> reserve;
};

/// LOADKIT_STAGING_WINDOW_MB (MiB), or 512 MiB: how far a load reads ahead.
uint64_t default_window_bytes();

/// Whether loads onto `device` take the staged path: a CUDA device in a CUDA
/// build, unless LOADKIT_STAGING=0 (the plain mmap path, for comparison).
bool staging_enabled(const c10::Device& device);

/// Every tensor of `files` (file by file in data order, or `options.order`),
/// as a device tensor on `device`. A read error names the file and the tensor (Input).
std::unique_ptr<WeightStream> staged_safetensors_stream(const safetensors::CheckpointFiles& files,
                                                        const c10::Device& device, StagingOptions options = {});

}  // namespace loadkit
