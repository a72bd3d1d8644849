#pragma once
/// \file
/// The few device facts the runtime needs, with CUDA behind LOADKIT_CUDA so
/// that the rest of the runtime compiles the same with or without it.

#include <c10/core/Device.h>

#include <cstdint>
#include <string>

namespace loadkit::device {

/// "cpu", "cuda", "cuda:N" → a device that exists here (Usage error otherwise).
c10::Device parse(const std::string& text);
bool cuda_available();
/// CUDA devices this process can see (CUDA_VISIBLE_DEVICES applies); 0 without CUDA.
int cuda_device_count();
/// Waits for queued work on `device` (no-op on the CPU).
void synchronize(const c10::Device& device);
/// Caching-allocator statistics (CUDA only; 0 elsewhere).
void reset_peak(const c10::Device& device);
uint64_t allocated_bytes(const c10::Device& device);
uint64_t peak_allocated_bytes(const c10::Device& device);
/// Bytes new tensors on `device` can still get: CUDA: the driver's free memory
/// plus what the caching allocator holds unused; CPU: MemAvailable + free swap,
/// bounded by the cgroup's (v2) limit. UINT64_MAX where unknown.
uint64_t free_bytes(const c10::Device& device);

}  // namespace loadkit::device
