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
///
/// The hooks below follow plugin.h's contract (errors, threading, lifetime);
/// each says when it is called.

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
  /// `layer`, using `loader` and `sharding` for it. Called once per layer while
  /// the model is built (in the architecture factory's call).
  virtual void create_weights(LinearBase& layer, const LinearShape& shape, WeightLoader loader,
                              ShardingInfo sharding, const ModelContext& ctx) = 0;
  /// True when processing changes the layer's parameters (false for plain
  /// weights). Must not change over the layer's life: a reload reads it to
  /// decide whether to restore the load format around the layer.
  virtual bool transforms_weights() const = 0;
  /// Converts `layer`'s loaded parameters to kernel format, writing into
  /// `targets` (same names, shapes and dtypes as its own results) when given.
  ///
  /// Called once after a fresh load (no targets), and again on every reload or
  /// update that rewrites the layer: the host has put the load format back
  /// (the same parameter names, shapes and dtypes `create_weights` made) and
  /// loaded it, and passes the kernel tensors of the previous processing as
  /// `targets`. Writing into them keeps their storage — captured CUDA graphs
  /// stay valid, and no second copy of the layer is allocated; results made
  /// elsewhere are copied into them by the host. May throw `loadkit::Error`
  /// (or a libtorch error); the host then restores the layer's kernel tensors.
  virtual void process_weights_after_loading(LinearBase& layer, const KernelTargets& targets) = 0;
  /// y = x Wᵀ (+ bias when defined), from kernel format. Called by the layer's
  /// forward, one call at a time per model.
  virtual at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) = 0;
  /// Device bytes that `process_weights_after_loading` allocates for a layer
  /// of `shape`, beyond its load-format parameters and its `targets`, at most
  /// at any one time (e.g. a float32 scratch chunk).
  ///
  /// A reload reads ahead within a budget and sets this much aside next to a
  /// module being rebuilt, so that its extra device memory stays within its
  /// bound (the largest layer's load-format size, plus this). A method that
  /// allocates more than it says makes a reload exceed that bound by the
  /// difference (the report's `peak_extra_device_bytes` shows it). Called
  /// while a reload is planned, before any weight is read; must not throw.
  /// Default: 0, processing that allocates nothing. (Appended last: the other
  /// hooks keep their vtable slots.)
  virtual uint64_t process_scratch_bytes(const LinearShape& shape, const ModelContext& ctx) const {
    (void)shape;
    (void)ctx;
    return 0;
  }
};

/// A quantization scheme: picks the method of each linear layer. Made by the
/// plugin's `QuantFactory` (plugin.h) once per load and owned by the model's
/// context; the methods it hands out may be shared by every layer of that
/// model, so they keep no per-layer state of their own.
class QuantConfig {
 public:
  virtual ~QuantConfig() = default;
  virtual std::string name() const = 0;
  /// The method for a linear layer the plugin marked quantizable.
  virtual std::shared_ptr<LinearMethod> linear_method() = 0;
  /// The method for the routed experts of a FusedMoE layer the plugin marked
  /// quantizable (see layers/fused_moe.h); null: the experts stay unquantized.
  virtual std::shared_ptr<FusedMoEMethod> moe_method() { return nullptr; }

  /// Quantize-on-arrival, for methods that load pre-quantized weights (block
  /// fp8): whether their loaders take a 16/32-bit weight and quantize it as it
  /// arrives (a trainer's bf16 weights synced into an fp8 model), or refuse it
  /// (Input: a checkpoint whose config declares the quantization must hold
  /// quantized weights). The host sets it before every load (off), reload (on
  /// when the source declares no quantization) and update (on); methods read it
  /// in their loaders. Methods that quantize online ignore it.
  void set_quantize_on_arrival(bool on) { quantize_on_arrival_ = on; }
  bool quantize_on_arrival() const { return quantize_on_arrival_; }

 private:
  bool quantize_on_arrival_ = false;
};

/// Plain weights in the model dtype; processing does nothing.
std::shared_ptr<LinearMethod> unquantized_linear_method();

}  // namespace loadkit
