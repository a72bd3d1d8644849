#pragma once
/// \file
/// Writes safetensors files (torch-free): header padded to 8 bytes, tensors
/// contiguous in the order given, written to a temporary name and renamed so
/// that a crash never leaves a half-written file under the final name.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "formats/safetensors_file.h"

namespace loadkit::safetensors {

struct TensorBlob {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;  ///< numel × itemsize bytes, contiguous
  uint64_t bytes = 0;
};

void write_file(const std::string& path, const std::vector<TensorBlob>& tensors,
                const std::map<std::string, std::string>& metadata = {});

}  // namespace loadkit::safetensors
