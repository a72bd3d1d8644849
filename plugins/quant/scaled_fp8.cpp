// fp8 weights with one float32 scale per tensor or per output channel, loaded as checkpoints ship
// them: vLLM's Fp8LinearMethod for serialized per-tensor checkpoints (`quant_method: "fp8"`
// without `weight_block_size`) and its Fp8MoEMethod, and CompressedTensorsW8A8Fp8MoEMethod
// (llm-compressor's FP8 / FP8_DYNAMIC experts, per tensor or per channel).
//
// Linear, per tensor (load format → kernel format):
//   weight        float8_e4m3fn [N, K]        → [K, N], the transpose of a contiguous [N, K]
//   weight_scale  float32 [number of parts]   → [1]: the largest part scale
// one scale per checkpoint tensor (q, k, v; gate, up each have their own). Processing does what
// vLLM's requantize_with_max_scale does so that one scale covers the fused weight: each part is
// dequantized with its own scale and quantized again with the largest (a single part is copied
// as it is). vLLM dequantizes through float16 first; here float32(q) x scale, a single rounding.
// The kernel format is the online fp8 method's (quant_methods.cpp): its forward serves both
// (at::_scaled_mm on CUDA where cuBLAS takes the shapes, a dequantized matmul elsewhere).
//
// Experts (load format → kernel format):
//   w13_weight  fp8 [E, 2I, H], w2_weight fp8 [E, H, I]   (kept; w13 requantized per tensor)
//   per tensor:  w13_weight_scale [E, 2] (gate, up) → [E] (the larger, gate and up requantized
//                to it, as vLLM's fused-MoE kernels take one w13 scale per expert);
//                w2_weight_scale [E]
//   per channel: w13_weight_scale [E, 2I, 1] (sharded with the rows), w2_weight_scale [E, H, 1]
//                (whole on every rank); nothing to process.
// The experts' forward dequantizes each expert to the activations' dtype.
//
// Quantize-on-arrival (QuantConfig::quantize_on_arrival, see block_fp8.cpp): a 16/32-bit weight
// arriving for one of these is quantized whole, as the checkpoint tensor it is (before the
// tensor-parallel narrowing), the way the fixture script's reference quantizer
// (tests/fixtures/fp8_quant.py) quantizes offline:
//   amax  = max |w| in float32 (over the tensor, or over each row), clamped to >= 1e-4
//   scale = amax / 448                 (a true float32 division by a tensor)
//   q     = e4m3(float32(w) / scale)   (the quotient rounded once to float32, then to e4m3)
// and the scale goes through the scale parameter's own loader with the same shard id, so a
// synced model is bit for bit a fresh load of the same weights quantized offline that way.

#include "prequantized.h"

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <loadkit/error.h>
#include <loadkit/layers/fused_moe.h>
#include <loadkit/layers/linear.h>
#include <loadkit/model_context.h>
#include <loadkit/quant_method.h>

namespace loadkit::quant {

namespace {

constexpr double kFp8Max = 448.0;
constexpr double kMinAmax = 1e-4;

/// The file comment's arithmetic, one scale per tensor ([1]) or per row of a 2-D weight ([rows, 1]).
Quantized quantize(const at::Tensor& w, bool per_channel) {
  if (w.is_meta()) {  // a validation pass's stand-in: shapes and dtypes only
    const auto f32 = w.options().dtype(at::kFloat);
    return {at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn)),
            per_channel ? at::empty({w.size(0), 1}, f32) : at::empty({1}, f32)};
  }
  // max |w| = max(|min w|, |max w|): exact, and no |w| temporary.
  const auto [lo, hi] = per_channel ? at::aminmax(w, 1, /*keepdim=*/true) : at::aminmax(w);
  at::Tensor amax = at::maximum(lo.abs(), hi.abs()).to(at::kFloat).reshape(per_channel ? lo.sizes() : at::IntArrayRef{1});
  at::Tensor scale = at::div(amax.clamp_min(kMinAmax), at::full({}, kFp8Max, amax.options()));
  // The float32 scale (a dimension, never 0-dim) makes the division float32, stored as e4m3.
  at::Tensor q = at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn));
  at::div_out(q, w, scale);
  return {q, scale};
}

/// Quantizes a 2-D weight whose rows are the checkpoint tensors `parts`: {q, scales} with the
/// scales stacked ([parts] per tensor, [rows, 1] per channel).
Quantized quantize_parts(const at::Tensor& w, const std::vector<int64_t>& parts, bool per_channel) {
  if (per_channel || parts.size() == 1) return quantize(w, per_channel);
  return quantize_each_part(w, parts, [](const at::Tensor& part) { return quantize(part, false); });
}

void check_float32(const at::Tensor& loaded, const char* what) {
  if (loaded.scalar_type() != at::kFloat)
    fail(ErrorKind::Input, what, " must be float32, got ", c10::toString(loaded.scalar_type()));
}

void check_one_entry(const at::Tensor& loaded, const char* what) {
  if (loaded.numel() != 1)
    fail(ErrorKind::Input, "a per-tensor ", what, " has one entry, got shape ", shape_str(loaded.sizes()));
}

/// Replaces parameter `name` of `layer` by `data`, keeping its loader and sharding.
void replace(Module& layer, const std::string& name, at::Tensor data) {
  WeightLoader loader = layer.param(name).loader;
  ShardingInfo sharding = layer.param(name).sharding;
  layer.remove_parameter(name);
  layer.add_parameter(name, std::move(data), std::move(loader), sharding);
}

/// `targets[name]` when it is there with this shape and dtype, else `make()`.
at::Tensor target_or(const KernelTargets& targets, const std::string& name, at::IntArrayRef shape,
                     at::ScalarType dtype, const std::function<at::Tensor()>& make) {
  auto it = targets.find(name);
  if (it != targets.end() && it->second.sizes() == shape && it->second.scalar_type() == dtype) return it->second;
  return make();
}

/// A linear layer's fp8 weight loader (arriving_fp8_weight) with its parts' quantizer.
WeightLoader linear_weight_loader(LinearBase& layer, WeightLoader inner, const QuantConfig* config, bool per_channel,
                                  ScaleRoute route, std::string what) {
  const std::vector<int64_t> parts = layer.output_parts();
  // A shard id names one part; none on a fused layer: every part in one tensor, in checkpoint sizes.
  auto quantizer = [parts, per_channel](const at::Tensor& loaded, const ShardId& shard) {
    if (per_channel || !shard.empty() || parts.size() == 1) return quantize(loaded, per_channel);
    int64_t rank_total = 0;
    for (int64_t p : parts) rank_total += p;
    std::vector<int64_t> full;
    for (int64_t p : parts) full.push_back(p * loaded.size(0) / rank_total);
    return quantize_parts(loaded, full, false);
  };
  return arriving_fp8_weight(layer, std::move(inner), config, std::move(route), std::move(quantizer), std::move(what));
}

// ------------------------------------------------------------------ linear

class PerTensorFp8LinearMethod final : public LinearMethod {
 public:
  explicit PerTensorFp8LinearMethod(const QuantConfig* config) : config_(config) {}
  std::string name() const override { return "fp8"; }
  bool transforms_weights() const override { return true; }
  /// Requantizing a fused layer holds a part in float32 twice (dequantized, then the product).
  uint64_t process_scratch_bytes(const LinearShape& shape, const ModelContext&) const override {
    return static_cast<uint64_t>(shape.output_size) * static_cast<uint64_t>(shape.input_size) * 2 * sizeof(float);
  }

  void create_weights(LinearBase& layer, const LinearShape& shape, WeightLoader loader, ShardingInfo sharding,
                      const ModelContext& ctx) override {
    const std::vector<int64_t> parts = layer.output_parts();
    ScaleRoute route{.name = "weight_scale", .transforms = true};
    layer.add_parameter("weight", at::empty({shape.output_size, shape.input_size}, ctx.options().dtype(at::kFloat8_e4m3fn)),
                        linear_weight_loader(layer, std::move(loader), config_, false, route, "fp8"), sharding);
    const int64_t count = static_cast<int64_t>(parts.size());
    WeightLoader scale_loader = per_part_scale_loader(layer);
    *route.own = scale_loader;
    layer.add_parameter("weight_scale", at::empty({count}, ctx.options().dtype(at::kFloat)), std::move(scale_loader));
  }

  void process_weights_after_loading(LinearBase& layer, const KernelTargets& targets) override {
    const at::Tensor q = layer.param("weight").data;        // [N, K]
    const at::Tensor s = layer.param("weight_scale").data;  // [parts]
    const int64_t n = q.size(0), k = q.size(1);
    at::Tensor scale = target_or(targets, "weight_scale", {1}, at::kFloat,
                                 [&] { return at::empty({1}, s.options()); });
    at::amax_out(scale, s, {0}, /*keepdim=*/true);
    at::Tensor weight = target_or(targets, "weight", {k, n}, at::kFloat8_e4m3fn,
                                  [&] { return at::empty({n, k}, q.options()).t(); });
    at::Tensor rows = weight.t();  // [N, K] view of the kernel tensor
    const std::vector<int64_t> parts = layer.output_parts();
    if (parts.size() == 1) {
      rows.copy_(q);
    } else {
      int64_t row = 0;
      for (size_t i = 0; i < parts.size(); ++i) {
        at::Tensor part = rows.narrow(0, row, parts[i]);
        at::div_out(part, q.narrow(0, row, parts[i]).to(at::kFloat) * s.narrow(0, static_cast<int64_t>(i), 1), scale);
        row += parts[i];
      }
    }
    replace(layer, "weight", weight);
    layer.remove_parameter("weight_scale");
    layer.add_parameter("weight_scale", scale);
  }

  at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) override {
    return fp8_per_tensor_linear(x, layer.param("weight").data, layer.param("weight_scale").data, bias);
  }

 private:
  const QuantConfig* config_;
};

// ------------------------------------------------------------------ experts

class ScaledFp8MoEMethod final : public FusedMoEMethod {
 public:
  ScaledFp8MoEMethod(const QuantConfig* config, bool per_channel, std::string name)
      : config_(config), per_channel_(per_channel), name_(std::move(name)) {}
  std::string name() const override { return name_; }
  bool transforms_weights() const override { return !per_channel_; }
  /// Per tensor, requantizing gate or up holds one half of w13 in float32 twice.
  uint64_t process_scratch_bytes(const MoEShape& s, const ModelContext&) const override {
    if (per_channel_) return 0;
    return static_cast<uint64_t>(s.num_experts * s.intermediate_size * s.hidden_size) * 2 * sizeof(float);
  }

  void create_weights(FusedMoE& layer, const MoEShape& s, WeightLoader loader, ShardingInfo w13_sharding,
                      ShardingInfo w2_sharding, const ModelContext& ctx) override {
    const auto fp8 = ctx.options().dtype(at::kFloat8_e4m3fn), f32 = ctx.options().dtype(at::kFloat);
    const int64_t e = s.num_experts, inter = s.intermediate_size, hidden = s.hidden_size;
    const bool per_channel = per_channel_;
    // An expert's gate or up ("w1"/"w3") or down ("w2") tensor is one checkpoint tensor; the
    // stacked layouts ("w13"/"w2" without an expert: [E, 2I, H] / [E, H, I]) hold one per expert and half.
    auto quantizer = [per_channel](const at::Tensor& loaded, const ShardId& shard) -> Quantized {
      if (loaded.dim() == 2) return quantize(loaded, per_channel);
      if (loaded.dim() != 3) fail(ErrorKind::Input, "expert weights are 2-D or 3-D, got shape ", shape_str(loaded.sizes()));
      const bool w13 = shard.name != "w2";
      std::vector<at::Tensor> qs, ss;
      for (int64_t x = 0; x < loaded.size(0); ++x) {
        const at::Tensor expert = loaded.select(0, x);
        const int64_t rows = expert.size(0);
        auto [q, sc] = quantize_parts(expert, w13 ? std::vector<int64_t>{rows / 2, rows - rows / 2}
                                                  : std::vector<int64_t>{rows}, per_channel);
        qs.push_back(q);
        ss.push_back(per_channel || w13 ? sc : sc.reshape({}));
      }
      return {at::stack(qs), at::stack(ss)};
    };
    ScaleRoute w13{.name = "w13_weight_scale", .transforms = transforms_weights()};
    ScaleRoute w2{.name = "w2_weight_scale", .transforms = transforms_weights()};
    layer.add_parameter("w13_weight", at::empty({e, 2 * inter, hidden}, fp8),
                        arriving_fp8_weight(layer, loader, config_, w13, quantizer, name_), w13_sharding);
    layer.add_parameter("w2_weight", at::empty({e, hidden, inter}, fp8),
                        arriving_fp8_weight(layer, loader, config_, w2, quantizer, name_), w2_sharding);
    *w13.own = per_channel_ ? channel_scale_loader(layer, true) : tensor_scale_loader(true);
    *w2.own = per_channel_ ? channel_scale_loader(layer, false) : tensor_scale_loader(false);
    if (per_channel_) {
      layer.add_parameter("w13_weight_scale", at::empty({e, 2 * inter, 1}, f32), *w13.own, w13_sharding);
      layer.add_parameter("w2_weight_scale", at::empty({e, hidden, 1}, f32), *w2.own);
    } else {
      layer.add_parameter("w13_weight_scale", at::empty({e, 2}, f32), *w13.own);
      layer.add_parameter("w2_weight_scale", at::empty({e}, f32), *w2.own);
    }
  }

  void process_weights_after_loading(FusedMoE& layer, const KernelTargets& targets) override {
    if (per_channel_) return;
    const at::Tensor q = layer.param("w13_weight").data;        // [E, 2I, H]
    const at::Tensor s = layer.param("w13_weight_scale").data;  // [E, 2]
    const int64_t e = q.size(0), inter = q.size(1) / 2;
    at::Tensor scale = target_or(targets, "w13_weight_scale", {e}, at::kFloat,
                                 [&] { return at::empty({e}, s.options()); });
    at::amax_out(scale, s, {1});
    at::Tensor weight = target_or(targets, "w13_weight", q.sizes(), at::kFloat8_e4m3fn,
                                  [&] { return at::empty(q.sizes(), q.options()); });
    for (int64_t half = 0; half < 2; ++half) {
      at::Tensor out = weight.narrow(1, half * inter, inter);
      at::div_out(out, q.narrow(1, half * inter, inter).to(at::kFloat) * s.narrow(1, half, 1).unsqueeze(2),
                  scale.view({e, 1, 1}));
    }
    replace(layer, "w13_weight", weight);
    layer.remove_parameter("w13_weight_scale");
    layer.add_parameter("w13_weight_scale", scale);
  }

  std::pair<at::Tensor, at::Tensor> expert_weights(FusedMoE& layer, int64_t e, at::ScalarType dtype) override {
    auto dequant = [&](const char* name) {
      const at::Tensor q = layer.param(std::string(name)).data.select(0, e).to(at::kFloat);
      at::Tensor s = layer.param(std::string(name) + "_scale").data.select(0, e);  // [rows, 1] or a scalar
      return (q * s).to(dtype);
    };
    return {dequant("w13_weight"), dequant("w2_weight")};
  }

 private:
  /// Per-tensor scales: an expert's "w1"/"w3" scale into column 0/1 of w13's [E, 2], "w2" into
  /// w2's [E]; the stacked layouts ("w13" [E, 2], "w2" [E]) and the per-rank stacked one whole.
  static WeightLoader tensor_scale_loader(bool w13) {
    return [w13](Parameter& p, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
      check_float32(loaded, "weight_scale");
      if (shard.expert < 0) {
        check_shape(loaded, p.data.sizes(), "the stacked per-tensor expert weight_scale");
        p.data.copy_(loaded);
        return p.data.numel();
      }
      if (shard.expert >= p.data.size(0))
        fail(ErrorKind::Input, "expert ", shard.expert, " is out of range (", p.data.size(0), " experts)");
      check_one_entry(loaded, "expert weight_scale");
      at::Tensor dst = w13 ? p.data.select(0, shard.expert).narrow(0, shard.name == "w1" ? 0 : 1, 1)
                           : p.data.narrow(0, shard.expert, 1);
      dst.copy_(loaded.reshape({1}));
      return 1;
    };
  }

  /// Per-channel scales: w13's rows are sharded as the weight's (each rank its slice of gate and
  /// of up); w2's rows are the hidden size, whole on every rank.
  static WeightLoader channel_scale_loader(FusedMoE& layer, bool w13) {
    return [&layer, w13](Parameter& p, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
      check_float32(loaded, "weight_scale");
      const int64_t inter = layer.shape().intermediate_size, total = layer.options().intermediate_size;
      const int64_t begin = layer.context().tp_rank * inter, hidden = layer.shape().hidden_size;
      const int64_t experts = p.data.size(0);
      if (shard.expert < 0 && shard.name.empty()) {  // this rank's stacked tensor
        check_shape(loaded, p.data.sizes(), "the stacked per-channel expert weight_scale");
        p.data.copy_(loaded);
        return p.data.numel();
      }
      if (shard.expert < 0) {  // every expert stacked, all ranks' rows
        if (!w13) {
          check_shape(loaded, {experts, hidden, 1}, "the stacked expert down projections' weight_scale");
          p.data.copy_(loaded);
        } else {
          check_shape(loaded, {experts, 2 * total, 1}, "the stacked expert gate/up projections' weight_scale");
          p.data.narrow(1, 0, inter).copy_(loaded.narrow(1, begin, inter));
          p.data.narrow(1, inter, inter).copy_(loaded.narrow(1, total + begin, inter));
        }
        return p.data.numel();
      }
      if (shard.expert >= experts)
        fail(ErrorKind::Input, "expert ", shard.expert, " is out of range (", experts, " experts)");
      at::Tensor expert = p.data.select(0, shard.expert);
      if (!w13) {
        check_shape(loaded, {hidden, 1}, cat("expert ", shard.expert, " down projection's weight_scale"));
        expert.copy_(loaded);
        return hidden;
      }
      check_shape(loaded, {total, 1}, cat("expert ", shard.expert, " ", shard.name == "w1" ? "gate" : "up",
                                          " projection's weight_scale"));
      expert.narrow(0, shard.name == "w1" ? 0 : inter, inter).copy_(loaded.narrow(0, begin, inter));
      return inter;
    };
  }

  const QuantConfig* config_;
  bool per_channel_;
  std::string name_;
};

}  // namespace

WeightLoader per_part_scale_loader(LinearBase& layer) {
  const int64_t count = static_cast<int64_t>(layer.output_parts().size());
  return [&layer, count](Parameter& p, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
    check_float32(loaded, "weight_scale");
    const size_t part = layer.part_of(shard);
    if (part == LinearBase::kFused) {
      if (loaded.numel() != count)
        fail(ErrorKind::Input, "a fused per-tensor weight_scale needs ", count, " entries, got shape ",
             shape_str(loaded.sizes()));
      p.data.copy_(loaded.reshape({count}));
      return count;
    }
    check_one_entry(loaded, "weight_scale");
    p.data.narrow(0, static_cast<int64_t>(part), 1).copy_(loaded.reshape({1}));
    return 1;
  };
}

WeightLoader scaled_fp8_weight_loader(LinearBase& layer, WeightLoader inner, const QuantConfig* config,
                                      bool per_channel, std::string what) {
  return linear_weight_loader(layer, std::move(inner), config, per_channel, ScaleRoute{.name = "weight_scale"},
                              std::move(what));
}

std::shared_ptr<LinearMethod> make_per_tensor_fp8_linear_method(const QuantConfig* config) {
  return std::make_shared<PerTensorFp8LinearMethod>(config);
}

std::shared_ptr<FusedMoEMethod> make_scaled_fp8_moe_method(const QuantConfig* config, bool per_channel,
                                                           std::string name) {
  return std::make_shared<ScaledFp8MoEMethod>(config, per_channel, std::move(name));
}

}  // namespace loadkit::quant
