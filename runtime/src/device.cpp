#include "device.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

#include "loadkit/error.h"

#if LOADKIT_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace loadkit::device {

bool cuda_available() {
#if LOADKIT_CUDA
  return at::hasCUDA() && c10::cuda::device_count() > 0;
#else
  return false;
#endif
}

void reproducible_cpu_math() {
  setenv("MKL_CBWR", "AUTO", /*overwrite=*/0);
  at::set_num_threads(at::get_num_threads());
}

int cuda_device_count() { return cuda_available() ? static_cast<int>(c10::cuda::device_count()) : 0; }

c10::Device parse(const std::string& text) {
  std::optional<c10::Device> device;
  try {
    device = c10::Device(text);
  } catch (const std::exception&) {
    fail(ErrorKind::Usage, "--device: '", text, "' is not cpu, cuda or cuda:N");
  }
  if (device->is_cpu()) return *device;
  if (!device->is_cuda()) fail(ErrorKind::Usage, "--device: '", text, "' is not cpu, cuda or cuda:N");
  if (!cuda_available()) fail(ErrorKind::Usage, "--device ", text, ": no CUDA device is available on this machine");
#if LOADKIT_CUDA
  const int count = c10::cuda::device_count();
  if (!device->has_index()) device = c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(c10::cuda::current_device()));
  if (device->index() >= count)
    fail(ErrorKind::Usage, "--device ", text, ": only ", count, " CUDA device(s) present");
  // The caching allocator (and its statistics) exist only after CUDA's lazy init.
  at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);
#endif
  return *device;
}

void synchronize(const c10::Device& device) {
#if LOADKIT_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

void copy_bytes(const c10::Device& device, void* dst, const void* src, uint64_t n) {
#if LOADKIT_CUDA
  if (device.is_cuda()) {
    const cudaError_t status = cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice,
                                               c10::cuda::getCurrentCUDAStream(device.index()).stream());
    if (status != cudaSuccess) fail(ErrorKind::Other, "CUDA copy of ", n, " bytes failed: ", cudaGetErrorString(status));
    return;
  }
#endif
  // As `copy_` splits a large contiguous copy over the intra-op threads; a small one stays on this one.
  constexpr int64_t kGrain = 1 << 20;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  at::parallel_for(0, static_cast<int64_t>(n), kGrain, [&](int64_t begin, int64_t end) {
    std::memcpy(d + begin, s + begin, static_cast<size_t>(end - begin));
  });
}

void reset_peak(const c10::Device& device) {
#if LOADKIT_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#else
  (void)device;
#endif
}

namespace {
/// The caching allocator's aggregate statistic on `device`: the blocks allocated or the bytes
/// requested, now or at the peak (0 off CUDA).
uint64_t allocator_stat(const c10::Device& device, bool requested, bool peak) {
#if LOADKIT_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto& s = (requested ? stats.requested_bytes
                               : stats.allocated_bytes)[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return static_cast<uint64_t>(peak ? s.peak : s.current);
  }
#endif
  (void)device, (void)requested, (void)peak;
  return 0;
}
}  // namespace

uint64_t allocated_bytes(const c10::Device& device) { return allocator_stat(device, false, false); }
uint64_t peak_allocated_bytes(const c10::Device& device) { return allocator_stat(device, false, true); }
uint64_t requested_bytes(const c10::Device& device) { return allocator_stat(device, true, false); }
uint64_t peak_requested_bytes(const c10::Device& device) { return allocator_stat(device, true, true); }

namespace {
/// A "Key:   N kB" line of /proc/meminfo, in bytes; nullopt if absent.
std::optional<uint64_t> meminfo(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) != 0) continue;
    std::istringstream fields(line.substr(key.size() + 1));
    uint64_t kb = 0;
    if (fields >> kb) return kb * 1024;
  }
  return std::nullopt;
}

std::optional<uint64_t> read_number(const std::string& path) {
  std::ifstream in(path);
  uint64_t value = 0;
  if (in >> value) return value;  // "max" (no limit) does not parse
  return std::nullopt;
}
}  // namespace

uint64_t free_bytes(const c10::Device& device) {
#if LOADKIT_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device.index());
    size_t free = 0, total = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    const int64_t cached = stats.reserved_bytes[aggregate].current - stats.allocated_bytes[aggregate].current;
    return static_cast<uint64_t>(free) + static_cast<uint64_t>(cached > 0 ? cached : 0);
  }
#endif
  if (!device.is_cpu()) return UINT64_MAX;
  auto available = meminfo("MemAvailable");
  if (!available) return UINT64_MAX;
  uint64_t free = *available + meminfo("SwapFree").value_or(0);
  auto limit = read_number("/sys/fs/cgroup/memory.max"), used = read_number("/sys/fs/cgroup/memory.current");
  if (limit && used) free = std::min(free, *limit > *used ? *limit - *used : 0);
  return free;
}

}  // namespace loadkit::device
