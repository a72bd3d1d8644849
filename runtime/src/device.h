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

/// The same CPU results from the same weights, run after run (docs/reliability.md,
/// "Reproducibility"). MKL, left to itself, picks at run time how many threads a GEMM uses
/// (MKL_DYNAMIC, on unless torch.set_num_threads was called) and runs kernels whose results
/// are not guaranteed to repeat (its conditional numerical reproducibility is off). This pins
/// both: MKL_CBWR=AUTO (this CPU's own fastest kernels with a deterministic split of the work)
/// unless the user set MKL_CBWR, and a fixed thread count (at::set_num_threads, which also
/// turns MKL's dynamic adjustment off). Call once at process start, before the first torch
/// operation (MKL reads MKL_CBWR on its first call) and while the process has one thread
/// (it sets an environment variable): the CLI's main does, and so do the test binaries.
void reproducible_cpu_math();
/// Waits for queued work on `device` (no-op on the CPU).
void synchronize(const c10::Device& device);
/// `n` bytes from `src` to `dst`, both memory of `device`: on CUDA one cudaMemcpyAsync queued on
/// the device's current stream (where `copy_` would queue it, without its dispatch and checks),
/// on the CPU memcpy (over the intra-op threads from 1 MiB on, as `copy_`). The two must not overlap.
void copy_bytes(const c10::Device& device, void* dst, const void* src, uint64_t n);
/// Caching-allocator statistics (CUDA only; 0 elsewhere).
void reset_peak(const c10::Device& device);
uint64_t allocated_bytes(const c10::Device& device);
uint64_t peak_allocated_bytes(const c10::Device& device);
/// The same in the bytes asked for: allocated_bytes less the allocator's rounding (blocks of 512
/// bytes, and a cached block handed out whole when less than 1 MiB of it would be left over).
uint64_t requested_bytes(const c10::Device& device);
uint64_t peak_requested_bytes(const c10::Device& device);
/// Bytes new tensors on `device` can still get: CUDA: the driver's free memory
/// plus what the caching allocator holds unused; CPU: MemAvailable + free swap,
/// bounded by the cgroup's (v2) limit. UINT64_MAX where unknown.
uint64_t free_bytes(const c10::Device& device);

}  // namespace loadkit::device
