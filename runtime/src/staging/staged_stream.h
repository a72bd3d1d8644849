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
/// a tensor that cannot fit is never staged: it is read whole into a host
/// tensor (pread) and its loader copies it from there (a pageable copy that
/// blocks the consumer's stream: the slow path, counted in the profile).
///
/// The memory bound, and what it is made of. The caller's window W is the
/// bound it promises (a reload passes its largest layer's load-format size);
/// the stream keeps
///
///     staged bytes not yet consumed + the largest reserve in play  <=  W + W / 20
///
/// where a tensor's reserve is what the consumer holds beside the stream while
/// that tensor is applied (a reload's materialised module and its processing
/// scratch), and the reserves in play are those of the tensors from the one
/// being applied to the one being staged. Only one reserve counts, not their
/// sum: a reload's modules come one after another (each one's tensors together)
/// and it frees one module before it materialises the next. The twentieth on
/// top is deliberate: it is the read-ahead that the largest module itself gets.
/// Without it a module as large as the window (a MoE layer's experts, the
/// largest layer of such a model) would reserve the whole window and every one
/// of its tensors would be read on the host (a blocking pageable copy each:
/// a MoE model's fp8 reload ran at 0.15 of its bf16 rate that way); with it,
/// its tensors are staged one after another, ~W/20 ahead of the consumer, while
/// the module is materialised, and a smaller module's processing overlaps the
/// transfer of the next ones. A tensor whose own bytes and reserve exceed
/// W + W/20 is read on the host.
///
/// Why small pieces: a piece that stays in the CPU caches between the read
/// and the DMA is cheaper than one that goes through DRAM twice; on the GPU
/// machine 16 threads read the page cache at 80 GB/s in 1 MiB pieces against
/// 61 GB/s in 8 MiB pieces.
///
/// Why small tensors ride with the one before them: each staged item costs
/// the readers an allocation, an event recorded on the consumer's stream and
/// the mutex, and the consumer a wait per event; a block-fp8 MoE checkpoint
/// has 1002 float32 scales, 960 of them of 704 bytes, stored together (as
/// safetensors.save_file writes a file) or each after its weight. A tensor
/// under 64 KiB that follows another in the file and in the order (same
/// reserve) is read into the same device allocation (one read per piece), up
/// to 2 MiB of such tensors per item, and handed out as a view of it.
///
/// Why not hand pinned host tensors straight to the loaders: a loader's
/// `copy_` from host memory blocks the consumer per tensor and splits poorly
/// across streams; a device-side copy is ~40x faster than the PCIe transfer
/// and keeps sharding, transposes and dtype casts on the GPU.

#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "formats/checkpoint_files.h"
#include "loadkit/weights.h"

namespace loadkit {

struct StagingOptions {
  int threads = 0;            ///< reader threads; 0: LOADKIT_STAGING_THREADS (1 to 64) or 3/4 of the cores, 1 to 16
  uint64_t piece_bytes = 0;   ///< bytes per read and per copy; 0: LOADKIT_STAGING_PIECE_KB or 2 MiB
  int depth = 0;              ///< pinned buffers per reader; 0: LOADKIT_STAGING_DEPTH or 3
  uint64_t window_bytes = 0;  ///< device bytes read ahead of the consumer; 0: LOADKIT_STAGING_WINDOW_MB or 512 MiB
  /// Tensor names in the order to deliver them (every tensor of the files once); empty: file order.
  std::vector<std::string> order;
  /// With `order`, per tensor: device bytes the consumer will hold beside the
  /// stream while that tensor is applied (a reload's materialised module).
  /// Readers then keep read-ahead + the largest such reserve among the tensors
  /// from the consumer's position to the one they stage within the bound above;
  /// a tensor whose bytes and reserve exceed it alone is not staged.
  std::vector<uint64_t> reserve;
};

/// Where a stream's time went: kept for the last stream of the process, logged at
/// debug level when a stream closes. Times are milliseconds of wall time; the
/// readers' are summed over reader threads.
struct StagingProfile {
  uint64_t tensors = 0, staged_bytes = 0;
  uint64_t bypassed_tensors = 0, bypassed_bytes = 0;  ///< read whole on the host: too large beside their reserve
  uint64_t window_bytes = 0, limit_bytes = 0;           ///< W and W + W/20
  int readers = 0;
  double open_ms = 0;           ///< construction to close
  double first_tensor_ms = 0;   ///< construction to the first tensor handed out
  double consumer_wait_ms = 0;  ///< the consumer blocked in next(), waiting for data
  int consumer_waits = 0;       ///< how many next() calls blocked
  double consumer_work_ms = 0;  ///< the consumer between next() calls: loaders, processing (host time)
  double consumer_work_after_reserved_ms = 0;  ///< part of it after tensors with a reserve (quantized modules)
  /// Parts of consumer_work_ms spent in the stream: letting go of the tensor applied last (the
  /// caching allocator's free), and queuing the consumer's waits for the readers' copies.
  double consumer_free_ms = 0, consumer_event_ms = 0;
  std::vector<std::pair<std::string, double>> longest_work;  ///< the longest such gaps (ms), after which tensor
  double read_ms = 0;          ///< readers in pread
  double window_wait_ms = 0;   ///< readers waiting for the consumer to free the window
  double ring_wait_ms = 0;     ///< readers waiting for their pinned buffer's previous copy
  double pinning_ms = 0;       ///< new pinned memory mapped and registered for this stream
  std::chrono::steady_clock::time_point opened_at, closed_at;  ///< where the stream sits in its caller's time
  std::string summary() const;  ///< one line, as logged
};

/// The profile of the process's most recently closed staged stream (empty before the first).
std::optional<StagingProfile> last_staging_profile();

/// LOADKIT_STAGING_WINDOW_MB (MiB), or 512 MiB: how far a load reads ahead.
uint64_t default_window_bytes();

/// Whether loads onto `device` take the staged path: a CUDA device in a CUDA
/// build, unless LOADKIT_STAGING=0 (the plain host path, for comparison).
bool staging_enabled(const c10::Device& device);

/// Every tensor of `files` (file by file in data order, or `options.order`),
/// as a device tensor on `device`. A read error names the file and the tensor (Input).
std::unique_ptr<WeightStream> staged_safetensors_stream(const safetensors::CheckpointFiles& files,
                                                        const c10::Device& device, StagingOptions options = {});

}  // namespace loadkit
