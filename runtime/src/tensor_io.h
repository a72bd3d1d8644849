#pragma once
/// \file
/// Between safetensors files and at::Tensor: zero-copy views of mapped
/// tensors, and writing tensors out.

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "formats/safetensors_file.h"

namespace loadkit {

at::ScalarType to_scalar_type(safetensors::DType dtype);
/// Throws Usage for dtypes safetensors cannot hold.
safetensors::DType to_safetensors_dtype(at::ScalarType type);

/// A read-only CPU tensor over the mapped bytes of `info`; keeps `file` mapped while alive.
at::Tensor view_tensor(const std::shared_ptr<const safetensors::SafetensorsFile>& file,
                       const safetensors::TensorInfo& info);

/// Writes `tensors` (any device; copied to contiguous CPU first) to a safetensors file.
void save_tensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors);

/// Reads every tensor of a safetensors file into memory (owned copies).
std::vector<std::pair<std::string, at::Tensor>> load_tensors(const std::string& path);

}  // namespace loadkit
