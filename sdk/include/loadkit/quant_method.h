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
#include <vector>

#include "loadkit/module.h"

namespace loadkit {

class CausalLM;
class FusedMoEMethod;
class LinearBase;
struct ModelContext;

/// The layer a quantization method is asked for (vLLM's `prefix`): its module name
/// as the checkpoint names it (`model.layers.0.self_attn.o_proj`, or
/// `model.layers.1.mlp.experts` for a FusedMoE layer) and, for a fused layer,
/// its parts' names in order (`model.layers.0.self_attn.q_proj`, `.k_proj`,
/// `.v_proj` for `...qkv_proj`; empty when the layer is not fused). An empty
/// `name`: a layer being built, before it has a place in a model (the SDK asks
/// again with its name once the model is built: `assign_quant_methods`).
struct LayerPrefix {
  std::string name;
  std::vector<std::string> parts;
};

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
///
/// Per-layer choice (a checkpoint that leaves some layers 16-bit: block fp8's
/// `ignored_layers`, compressed-tensors' `ignore`): each layer's method is asked
/// for with the layer's name, twice — once while the layer is built (empty
/// name: answer the method most layers get) and once the model is built
/// (`assign_quant_methods`), when the answer is final. Return the same object
/// for the same method: a layer whose answer did not change keeps its
/// parameters. A fused layer whose parts would get different methods cannot be
/// served (its parts share one tensor): throw an Input error naming the layer
/// and the config file, as vLLM refuses it.
class QuantConfig {
 public:
  virtual ~QuantConfig() = default;
  virtual std::string name() const = 0;
  /// The method for the linear layer `layer`, which the plugin marked
  /// quantizable; `unquantized_linear_method()` to leave it in the model dtype.
  virtual std::shared_ptr<LinearMethod> linear_method(const LayerPrefix& layer) = 0;
  /// The method for the routed experts of the FusedMoE layer `layer`, which the
  /// plugin marked quantizable (see layers/fused_moe.h); null: the experts stay
  /// unquantized.
  virtual std::shared_ptr<FusedMoEMethod> moe_method(const LayerPrefix& layer) {
    (void)layer;
    return nullptr;
  }

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

/// Asks `model`'s quantization config (`ctx.quant`; nothing to do when null)
/// for the method of every quantizable linear and FusedMoE layer by its name,
/// and rebuilds the parameters of each layer whose method changes (still
/// before anything is loaded). A fused layer's part names come from the
/// model's stacked weight mapping (`qkv_proj` ← `q_proj`, `k_proj`, `v_proj`).
/// The host calls it right after the architecture factory returns, before it
/// records the load format; errors are the config's (Input for a fused layer
/// whose parts disagree).
void assign_quant_methods(CausalLM& model, const ModelContext& ctx);

}  // namespace loadkit
