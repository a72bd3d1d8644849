#pragma once
/// \file
/// Between safetensors files and at::Tensor: dtypes and zero-copy views of
/// mapped tensors (reading and writing whole files: loadkit/runtime/tensor_files.h).

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

/// A read-only CPU tensor over the mapped bytes of `info`; keeps `file` mapped while alive.
at::Tensor view_tensor(const std::shared_ptr<const safetensors::SafetensorsFile>& file,
                       const safetensors::TensorInfo& info);

}  // namespace loadkit
