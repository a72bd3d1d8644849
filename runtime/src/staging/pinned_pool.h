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

/// Time this process has spent mapping and pinning new buffers, summed over threads.
std::atomic<int64_t>& pinning_nanoseconds();

}  // namespace loadkit
