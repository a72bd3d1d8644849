#pragma once
/// \file
/// How a linear layer stores, processes and applies its weight.
///
/// A method creates the layer's parameters in *load format* (what checkpoint
/// tensors are written into), turns them into *kernel format* in
/// `process_weights_after_loading` — possibly changing shapes and dtypes and
/// adding parameters such as scales — and computes the layer's output from
/// kernel format in `apply`. Reloading depends on this split: it restores the
/// load format, loads, and processes again.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "loadkit/module.h"

namespace loadkit {

class FusedMoEMethod;
class LinearBase;
struct ModelContext;

/// Per-rank sizes of a linear layer's weight ([output, input]).
struct LinearShape {
  int64_t input_size = 0;
  int64_t output_size = 0;
};

class LinearMethod {
 public:
  virtual ~LinearMethod() = default;
  virtual std::string name() const = 0;
  /// Adds the load-format parameter "weight" ([output, input], `ctx.dtype`) to
  /// `layer`, using `loader` and `sharding` for it.
  virtual void create_weights(LinearBase& layer, const LinearShape& shape, WeightLoader loader,
                              ShardingInfo sharding, const ModelContext& ctx) = 0;
  /// True when processing changes the layer's parameters (false for plain weights).
  virtual bool transforms_weights() const = 0;
  /// Converts `layer`'s loaded parameters to kernel format, writing into
  /// `targets` (same names, shapes and dtypes as its own results) when given.
  virtual void process_weights_after_loading(LinearBase& layer, const KernelTargets& targets) = 0;
  /// y = x Wᵀ (+ bias when defined), from kernel format.
  virtual at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) = 0;
};

/// A quantization scheme: picks the method of each linear layer.
class QuantConfig {
 public:
  virtual ~QuantConfig() = default;
  virtual std::string name() const = 0;
  /// The method for a linear layer the plugin marked quantizable.
  virtual std::shared_ptr<LinearMethod> linear_method() = 0;
  /// The method for the routed experts of a FusedMoE layer the plugin marked
  /// quantizable (see layers/fused_moe.h); null: the experts stay unquantized.
  virtual std::shared_ptr<FusedMoEMethod> moe_method() { return nullptr; }
};

/// Plain weights in the model dtype; processing does nothing.
std::shared_ptr<LinearMethod> unquantized_linear_method();

}  // namespace loadkit
