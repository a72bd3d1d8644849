#pragma once
// Checkpoints quantized offline, served by the quant plugin (quant_methods.cpp registers them):
// fp8 under `fp8` when config.json carries a quantization_config (block_fp8.cpp: 128x128 blocks,
// or one scale per tensor through scaled_fp8.cpp), and llm-compressor's fp8 under
// `compressed-tensors` (compressed_tensors.cpp; its experts through scaled_fp8.cpp). Layers the
// checkpoint leaves 16-bit: ignored_layers.h.

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <loadkit/module.h>

namespace loadkit {
class FusedMoEMethod;
class LinearBase;
class LinearMethod;
class QuantConfig;
struct ModelContext;
}  // namespace loadkit

namespace loadkit::quant {

/// {q float8_e4m3fn, scale float32}: a weight quantized as one checkpoint tensor.
using Quantized = std::pair<at::Tensor, at::Tensor>;

/// Quantizes the rows of `w` that are the checkpoint tensors `parts` (q/k/v, gate/up; their sum is
/// w's rows) each with `quantize`: {the q rows, the scales} concatenated in order.
Quantized quantize_each_part(const at::Tensor& w, const std::vector<int64_t>& parts,
                             const std::function<Quantized(const at::Tensor&)>& quantize);

/// Where a weight's scale goes when the weight is quantized on arrival: the scale parameter
/// `name`; `own`, its loader as the method made it (set once the parameter exists); `transforms`,
/// whether the method processes the layer. During an update the host keeps a processing layer's
/// calls and replays them once the layer is complete: the scale reaches the host's loader when
/// the call comes (counted and validated like a checkpoint tensor) and `own` on the replay.
struct ScaleRoute {
  std::string name;
  std::shared_ptr<WeightLoader> own = std::make_shared<WeightLoader>();
  bool transforms = false;
};

/// The loader of an fp8 weight (fp8_arrival.cpp): e4m3 goes to `inner`; a 16/32-bit tensor, when
/// `config` quantizes on arrival, is quantized by `quantizer` (the whole checkpoint tensor, before
/// tensor-parallel narrowing) and its scale written through `route` with the same shard id;
/// anything else is an Input error naming the config (`what`).
WeightLoader arriving_fp8_weight(Module& layer, WeightLoader inner, const QuantConfig* config, ScaleRoute route,
                                 std::function<Quantized(const at::Tensor&, const ShardId&)> quantizer,
                                 std::string what);

/// The config of a model whose `ctx.config` has `quantization_config` with quant_method "fp8":
/// block fp8 with `weight_block_size`, one scale per tensor without. Input error naming the key
/// for a malformed one; Plugin error for a variant this plugin does not serve (static activation
/// scales, another fp8 format).
std::shared_ptr<QuantConfig> make_fp8_checkpoint_config(const ModelContext& ctx);

/// vLLM's Fp8LinearMethod for serialized per-tensor checkpoints (scaled_fp8.cpp); `config` says
/// whether 16-bit weights are quantized as they arrive.
std::shared_ptr<LinearMethod> make_per_tensor_fp8_linear_method(const QuantConfig* config);
/// The loader of a linear layer's fp8 `weight` whose scales are the layer's `weight_scale`, one
/// per tensor (per fused part) or per output channel (scaled_fp8.cpp): e4m3 goes to `inner`; a
/// 16/32-bit tensor, when `config` quantizes on arrival, is quantized and its scale written
/// through `weight_scale`'s loader; anything else is an Input error naming the config (`what`).
WeightLoader scaled_fp8_weight_loader(LinearBase& layer, WeightLoader inner, const QuantConfig* config,
                                      bool per_channel, std::string what);
/// The loader of a per-tensor `weight_scale` [number of parts] of `layer` (scaled_fp8.cpp): a
/// part's shard id writes its one entry, a fused tensor (no shard id) every entry; float32 only.
WeightLoader per_part_scale_loader(LinearBase& layer);
/// fp8 experts with per-tensor or per-channel scales (scaled_fp8.cpp), named `name`.
std::shared_ptr<FusedMoEMethod> make_scaled_fp8_moe_method(const QuantConfig* config, bool per_channel,
                                                           std::string name);
/// y = x Wᵀ (+ bias) from the per-tensor fp8 kernel format (quant_methods.cpp): `w_kn` [K, N]
/// e4m3, the transpose of a contiguous [N, K]; `scale` [1] float32.
at::Tensor fp8_per_tensor_linear(const at::Tensor& x, const at::Tensor& w_kn, const at::Tensor& scale,
                                 const at::Tensor& bias);

/// The config of a model whose `ctx.config` has a compressed-tensors quantization_config. Plugin
/// error naming the group and scheme for anything but fp8 weights (per tensor or channel) with
/// dynamic per-token (or no) activation quantization; Input error for a malformed config.
std::shared_ptr<QuantConfig> make_compressed_tensors_config(const ModelContext& ctx);

}  // namespace loadkit::quant
