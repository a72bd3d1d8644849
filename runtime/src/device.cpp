#include "device.h"

#include <ATen/Context.h>

#include "loadkit/error.h"

#if LOADKIT_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace loadkit::device {

bool cuda_available() {
#if LOADKIT_CUDA
  return at::hasCUDA() && c10::cuda::device_count() > 0;
#else
  return false;
#endif
}

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

void reset_peak(const c10::Device& device) {
#if LOADKIT_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#else
  (void)device;
#endif
}

namespace {
#if LOADKIT_CUDA
c10::CachingAllocator::Stat allocated(const c10::Device& device) {
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
}
#endif
}  // namespace

uint64_t allocated_bytes(const c10::Device& device) {
#if LOADKIT_CUDA
  if (device.is_cuda()) return static_cast<uint64_t>(allocated(device).current);
#endif
  (void)device;
  return 0;
}

uint64_t peak_allocated_bytes(const c10::Device& device) {
#if LOADKIT_CUDA
  if (device.is_cuda()) return static_cast<uint64_t>(allocated(device).peak);
#endif
  (void)device;
  return 0;
}

}  // namespace loadkit::device
