#pragma once
/// \file
/// Between safetensors files and at::Tensor: dtypes, and tensors read from a
/// validated file (reading and writing whole files: loadkit/runtime/tensor_files.h).

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "formats/safetensors_file.h"
#include "loadkit/runtime/tensor_files.h"  // save_tensors, load_tensors

namespace loadkit {

at::ScalarType to_scalar_type(safetensors::DType dtype);
/// Throws Usage for dtypes safetensors cannot hold.
safetensors::DType to_safetensors_dtype(at::ScalarType type);

/// `info`'s data in a new CPU tensor, read with pread through the descriptor that was validated,
/// then the file checked unchanged (SafetensorsFile::read): an Input error naming the file and
/// the tensor when it was truncated or rewritten since. Costs one tensor of host memory.
at::Tensor read_tensor(const safetensors::SafetensorsFile& file, const safetensors::TensorInfo& info);
/// A meta tensor of `info`'s shape and dtype: its header, no data (validation passes).
at::Tensor meta_tensor_of(const safetensors::TensorInfo& info);

}  // namespace loadkit
