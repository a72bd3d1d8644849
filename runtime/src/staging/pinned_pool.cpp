#include "staging/pinned_pool.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "loadkit/error.h"

#if LOADKIT_CUDA
#include <cuda_runtime_api.h>
#include <sys/mman.h>
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

}  // namespace

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
  // Pages mapped and faulted in by the kernel up front, then registered: an order of magnitude
  // faster than cudaHostAlloc on the GPU machine (see the header).
  const auto started = std::chrono::steady_clock::now();
  void* data = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (data == MAP_FAILED) fail(ErrorKind::Other, "cannot map ", bytes, " bytes of staging memory: ", std::strerror(errno));
  const cudaError_t status = cudaHostRegister(data, bytes, cudaHostRegisterDefault);
  if (status != cudaSuccess) {
    cudaGetLastError();
    ::munmap(data, bytes);
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
