#include "staging/pinned_pool.h"

#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "loadkit/error.h"

#if LOADKIT_CUDA
#include <cuda_runtime_api.h>
#endif

namespace loadkit {

namespace {

/// Free buffers by size. Never destroyed: buffers stay pinned until exit (see the header).
struct Pool {
  std::mutex mutex;
  std::multimap<size_t, void*> free;
};

Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void give_back(void* data, size_t size) {
  if (!data) return;
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.free.emplace(size, data);
}

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kSmallPage = 4096;

}  // namespace

bool transparent_huge_pages_on() {
  static const bool on = [] {
    std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string setting;
    std::getline(in, setting);
    return setting.find("[always]") != std::string::npos || setting.find("[madvise]") != std::string::npos;
  }();
  return on;
}

StagingMapping map_staging_memory(size_t bytes, bool advise_huge) {
  StagingMapping m;
  m.bytes = bytes;
  m.mapped = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  // Over-map by one huge page, then trim both ends: the rest starts on a 2 MiB boundary, so every
  // 2 MiB of it can be one huge page.
  const size_t over = m.mapped + kHugePage;
  void* raw = ::mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) fail(ErrorKind::Other, "cannot map ", bytes, " bytes of staging memory: ", std::strerror(errno));
  const auto base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (base + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > base) ::munmap(raw, aligned - base);
  if (const uintptr_t end = base + over, used = aligned + m.mapped; end > used)
    ::munmap(reinterpret_cast<void*>(used), end - used);
  m.data = reinterpret_cast<void*>(aligned);
  m.huge_advised = advise_huge && ::madvise(m.data, m.mapped, MADV_HUGEPAGE) == 0;
  // First touch: one write per small page faults it in (per huge page where the advice took).
  auto* bytes_ptr = static_cast<volatile char*>(m.data);
  for (size_t off = 0; off < m.mapped; off += kSmallPage) bytes_ptr[off] = 0;
  return m;
}

void unmap_staging_memory(const StagingMapping& m) {
  if (m.data) ::munmap(m.data, m.mapped);
}

std::atomic<int64_t>& pinning_nanoseconds() {
  static std::atomic<int64_t> total{0};
  return total;
}

PinnedBuffer::~PinnedBuffer() { give_back(data_, size_); }

PinnedBuffer::PinnedBuffer(PinnedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& other) noexcept {
  if (this != &other) {
    give_back(data_, size_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

PinnedBuffer acquire_pinned(size_t bytes) {
#if LOADKIT_CUDA
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free.find(bytes);
    if (it != p.free.end()) {
      void* data = it->second;
      p.free.erase(it);
      return PinnedBuffer(data, bytes);
    }
  }
  // Pages faulted in up front (huge pages where the kernel allows), then registered: an order of
  // magnitude faster than cudaHostAlloc on the GPU machine (see the header).
  const auto started = std::chrono::steady_clock::now();
  const StagingMapping m = map_staging_memory(bytes, transparent_huge_pages_on());
  void* data = m.data;
  const cudaError_t status = cudaHostRegister(data, bytes, cudaHostRegisterDefault);
  if (status != cudaSuccess) {
    cudaGetLastError();
    unmap_staging_memory(m);
    fail(ErrorKind::Other, "cannot pin ", bytes, " bytes of staging memory: ", cudaGetErrorString(status));
  }
  pinning_nanoseconds().fetch_add(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count());
  return PinnedBuffer(data, bytes);
#else
  fail(ErrorKind::Usage, "pinned staging memory (", bytes, " bytes) needs a CUDA build");
#endif
}

}  // namespace loadkit
