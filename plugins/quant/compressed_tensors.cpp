// compressed-tensors fp8 (llm-compressor's FP8 / FP8_DYNAMIC): `quant_method: "compressed-tensors"`
// whose config_groups quantize Linear weights to 8-bit floats, per tensor or per output channel,
// with dynamic per-token activations (or none: weight-only).
//
// Parameters, as vLLM's CompressedTensorsW8A8Fp8 names them:
//   weight        float8_e4m3fn [N, K]
//   weight_scale  float32, per channel [N, 1] (sharded with the weight's rows), or per tensor
//                 [number of fused parts] (one per q/k/v or gate/up checkpoint tensor, the same
//                 on every rank)
// w = float32(weight) × its row's (or its part's) scale. Load format is kernel format: a reload
// writes straight into the tensors the forward reads. The forward dequantizes to the activations'
// dtype (every device). A 16-bit weight synced in (quantize-on-arrival) is quantized as the
// fixture script's reference does (scaled_fp8.cpp's file comment).
//
// Anything else — other bit widths or types, group/block strategies, static activation scales,
// packed formats — is a Plugin error naming the group and the scheme. Layers that `ignore` names
// (or matches, `re:` entries) load 16-bit (ignored_layers.h). Routed experts: scaled_fp8.cpp
// (vLLM's CompressedTensorsW8A8Fp8MoEMethod).

#include "prequantized.h"

#include "ignored_layers.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include <loadkit/error.h>
#include <loadkit/layers/fused_moe.h>
#include <loadkit/layers/linear.h>
#include <loadkit/model_context.h>
#include <loadkit/quant_method.h>

namespace loadkit::quant {

namespace {

void check_float32(const at::Tensor& loaded) {
  if (loaded.scalar_type() != at::kFloat)
    fail(ErrorKind::Input, "weight_scale must be float32, got ", c10::toString(loaded.scalar_type()));
}

class Fp8LinearMethod final : public LinearMethod {
 public:
  Fp8LinearMethod(const QuantConfig* config, bool per_channel) : config_(config), per_channel_(per_channel) {}
  std::string name() const override { return "compressed-tensors"; }
  bool transforms_weights() const override { return false; }

  void create_weights(LinearBase& layer, const LinearShape& shape, WeightLoader loader, ShardingInfo sharding,
                      const ModelContext& ctx) override {
    layer.add_parameter("weight", at::empty({shape.output_size, shape.input_size}, ctx.options().dtype(at::kFloat8_e4m3fn)),
                        scaled_fp8_weight_loader(layer, std::move(loader), config_, per_channel_,
                                                 "compressed-tensors fp8"),
                        sharding);
    if (per_channel_) {
      // One scale per output row: the rows shard as the weight's (block_loader in units of 1 x K).
      WeightLoader rows = layer.block_loader(1, shape.input_size);
      const bool row_parallel = sharding.input_dim >= 0 && shape.input_size * ctx.tp_size != shape.input_size &&
                                layer.output_parts().size() == 1 && layer.type_name() == "RowParallelLinear";
      WeightLoader scale_loader = [rows, row_parallel](Parameter& p, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
        check_float32(loaded);
        if (row_parallel) {  // every rank holds every output row
          check_shape(loaded, p.data.sizes(), "per-channel weight_scale");
          p.data.copy_(loaded);
          return p.data.numel();
        }
        return rows(p, loaded, shard);
      };
      layer.add_parameter("weight_scale", at::empty({shape.output_size, 1}, ctx.options().dtype(at::kFloat)),
                          std::move(scale_loader), sharding);
      return;
    }
    // One scale per fused part (its shard id's entry).
    const int64_t parts = static_cast<int64_t>(layer.output_parts().size());
    layer.add_parameter("weight_scale", at::empty({parts}, ctx.options().dtype(at::kFloat)), per_part_scale_loader(layer));
  }

  void process_weights_after_loading(LinearBase&, const KernelTargets&) override {}

  at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) override {
    const at::Tensor& q = layer.param("weight").data;
    const at::Tensor& s = layer.param("weight_scale").data;
    at::Tensor rows = s;
    if (!per_channel_) {
      const auto parts = layer.output_parts();
      rows = s.repeat_interleave(at::tensor(parts, at::kLong).to(s.device()), 0, q.size(0)).unsqueeze(1);
    }
    return at::linear(x, (q.to(at::kFloat) * rows).to(x.scalar_type()), bias);
  }

 private:
  const QuantConfig* config_;
  bool per_channel_;
};

/// fp8 linear layers and experts (scaled_fp8.cpp), except those the checkpoint's `ignore` leaves
/// 16-bit (ignored_layers.h).
class CompressedTensorsConfig final : public QuantConfig {
 public:
  CompressedTensorsConfig(bool per_channel, IgnoredLayers ignored)
      : ignored_(std::move(ignored)),
        linear_(std::make_shared<Fp8LinearMethod>(this, per_channel)),
        moe_(make_scaled_fp8_moe_method(this, per_channel, "compressed-tensors")) {}
  std::string name() const override { return "compressed-tensors"; }
  std::shared_ptr<LinearMethod> linear_method(const LayerPrefix& layer) override {
    return ignored_.skips_linear(layer) ? unquantized_linear_method() : linear_;
  }
  std::shared_ptr<FusedMoEMethod> moe_method(const LayerPrefix& layer) override {
    return ignored_.skips_experts(layer) ? nullptr : moe_;
  }

 private:
  IgnoredLayers ignored_;
  std::shared_ptr<LinearMethod> linear_;
  std::shared_ptr<FusedMoEMethod> moe_;
};

/// "8-bit float, strategy S" and the rest of a weights/input_activations object, for messages.
std::string scheme_of(const ModelConfig& q) {
  return cat(q.get_int("num_bits", 0), "-bit ", q.get_string("type", "?"), ", strategy ", q.get_string("strategy", "?"),
             q.get_bool("dynamic", false) ? ", dynamic" : ", static");
}

}  // namespace

std::shared_ptr<QuantConfig> make_compressed_tensors_config(const ModelContext& ctx) {
  if (!ctx.config.is_object("quantization_config"))
    fail(ErrorKind::Usage, "compressed-tensors loads checkpoints quantized by llm-compressor: ",
         ctx.config.origin(), " has no quantization_config");
  const ModelConfig qc = ctx.config.get_object("quantization_config");
  const std::string& file = qc.origin();
  if (const std::string format = qc.get_string("format", "float-quantized");
      format != "float-quantized" && format != "naive-quantized")
    fail(ErrorKind::Plugin, file, ": key '", qc.qualified("format"), "' is '", format,
         "': only float-quantized fp8 compressed-tensors checkpoints are supported");
  if (!qc.is_object("config_groups"))
    fail(ErrorKind::Input, file, ": key '", qc.qualified("config_groups"), "' must be an object of quantization groups");
  const ModelConfig groups = qc.get_object("config_groups");
  std::optional<bool> per_channel;
  for (const std::string& name : groups.keys()) {
    const ModelConfig g = groups.get_object(name);
    const ModelConfig w = g.get_object("weights");
    const std::string strategy = w.get_string("strategy", "tensor");
    const bool fp8 = w.get_int("num_bits", 0) == 8 && w.get_string("type", "") == "float" &&
                     (strategy == "tensor" || strategy == "channel") && !w.get_bool("dynamic", false) &&
                     w.get_bool("symmetric", true);
    if (!fp8)
      fail(ErrorKind::Plugin, file, ": ", g.qualified("weights"), " is ", scheme_of(w),
           ": this plugin serves fp8 weights (8-bit float, strategy tensor or channel, static, symmetric)");
    if (g.has("input_activations")) {
      const ModelConfig a = g.get_object("input_activations");
      if (!(a.get_int("num_bits", 0) == 8 && a.get_string("type", "") == "float" &&
            a.get_string("strategy", "") == "token" && a.get_bool("dynamic", false)))
        fail(ErrorKind::Plugin, file, ": ", g.qualified("input_activations"), " is ", scheme_of(a),
             ": this plugin serves dynamic per-token fp8 activations (or none)");
    }
    for (const std::string& target : g.get_strings("targets"))
      if (target != "Linear")
        fail(ErrorKind::Plugin, file, ": ", g.qualified("targets"), " names '", target, "': only Linear is supported");
    if (per_channel && *per_channel != (strategy == "channel"))
      fail(ErrorKind::Plugin, file, ": ", qc.qualified("config_groups"),
           " mixes per-tensor and per-channel weights: one strategy for every layer is supported");
    per_channel = strategy == "channel";
  }
  if (!per_channel) fail(ErrorKind::Input, file, ": key '", qc.qualified("config_groups"), "' has no group");
  return std::make_shared<CompressedTensorsConfig>(
      *per_channel, IgnoredLayers(qc.has("ignore") ? qc.get_strings("ignore") : std::vector<std::string>{},
                                  IgnoredLayers::Rules::CompressedTensors, cat(file, ": key '", qc.qualified("ignore"), "'")));
}

}  // namespace loadkit::quant
