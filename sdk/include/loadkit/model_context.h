#pragma once
/// \file
/// What a plugin gets when it builds a model: config, dtype, device, tensor
/// parallel rank, quantization.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/core/TensorOptions.h>

#include <memory>

#include "loadkit/model_config.h"

namespace at {
class Tensor;
}

namespace loadkit {

class QuantConfig;

/// The ranks that hold the shards of one model (a c10d process group behind it).
/// Collectives run in place on tensors of the model's device.
class TensorParallelGroup {
 public:
  virtual ~TensorParallelGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Sums `tensor` over the group, in place.
  virtual void all_reduce(at::Tensor& tensor) = 0;
  /// Concatenates each rank's `tensor` along `dim` in rank order.
  virtual at::Tensor all_gather(const at::Tensor& tensor, int64_t dim) = 0;
};

struct ModelContext {
  ModelConfig config;
  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  int tp_rank = 0;
  int tp_size = 1;
  /// Collectives for tp_size > 1; null when running on one rank.
  std::shared_ptr<TensorParallelGroup> tp_group;
  /// Online quantization of linear layers; null for none.
  std::shared_ptr<QuantConfig> quant;

  c10::TensorOptions options() const { return c10::TensorOptions().dtype(dtype).device(device); }
};

}  // namespace loadkit
