#pragma once
/// \file
/// Page-locked host buffers for the staged readers, pinned once per process
/// and handed to every later stream.
///
/// Pinning is the hidden cost of a fast load: on the GPU machine (H200 hosts)
/// cudaHostAlloc pinned 2.0-2.7 GB/s, so the 512 MiB ring a load used to
/// allocate cost ~0.27 s of a 0.44 s load; registering faulted-in pages with
/// cudaHostRegister ran at 17 GB/s on one machine, 3 GB/s on another and
/// 0.9 GB/s on a third (256 MiB in 0.30 s; the 16 readers' 96 MiB summed
/// 0.25-0.85 s over their threads there, so 8 readers x 2 x 2 MiB pinned in
/// 60 ms), so the ring is kept small (threads x depth x piece). Read-only
/// registration and memfd-backed pages pinned no faster. Buffers come back
/// to the pool when a stream ends, so a reload in the same process (a trainer
/// syncing every step) pins nothing at all. They stay pinned until the process
/// exits (unregistering at exit would race CUDA's own teardown).
///
/// First touch, not registration, is most of the cost (on the GPU machine
/// registering already-touched pages ran at 18.6 GB/s; faulting 4 KiB pages
/// in, 2.5 GB/s). So a new buffer is a 2 MiB-aligned anonymous mapping advised
/// MADV_HUGEPAGE before it is touched, where transparent huge pages are on
/// (`always` or `madvise`): 512 times fewer faults (3.3-4.9 GB/s measured
/// there). Where they are off, or the advice is refused, the same mapping is
/// touched in 4 KiB pages, as before.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace loadkit {

/// One pinned buffer on loan from the pool; returns itself on destruction.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& other) noexcept;
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  friend PinnedBuffer acquire_pinned(size_t bytes);

  PinnedBuffer(void* data, size_t size) : data_(data), size_(size) {}
  void* data_ = nullptr;
  size_t size_ = 0;
};

/// A pinned buffer of exactly `bytes` (reused if one is free, else mapped and
/// registered now; thread-safe). Throws loadkit::Error (Other) if pinning fails.
/// Only in CUDA builds; elsewhere a Usage error.
PinnedBuffer acquire_pinned(size_t bytes);

/// Host memory for a staging buffer, every page touched (faulted in, zero), not yet pinned.
struct StagingMapping {
  void* data = nullptr;       ///< 2 MiB-aligned
  size_t bytes = 0;           ///< as asked
  size_t mapped = 0;          ///< `bytes` rounded up to whole 2 MiB pages
  bool huge_advised = false;  ///< MADV_HUGEPAGE was accepted before the first touch
};

/// Maps and touches `bytes` of anonymous memory, advised MADV_HUGEPAGE first when `advise_huge`
/// (a refused advice falls back to small pages). Throws loadkit::Error (Other) when the mapping fails.
StagingMapping map_staging_memory(size_t bytes, bool advise_huge);
/// Unmaps what map_staging_memory() mapped (buffers of the pool are never unmapped).
void unmap_staging_memory(const StagingMapping& m);
/// Whether transparent huge pages can back an advised mapping here: the kernel's setting
/// (/sys/kernel/mm/transparent_hugepage/enabled) is `always` or `madvise`.
bool transparent_huge_pages_on();

/// Time this process has spent mapping and pinning new buffers, summed over threads.
std::atomic<int64_t>& pinning_nanoseconds();

}  // namespace loadkit
