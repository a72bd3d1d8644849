// The online quantizers' bytes against a quantizer written here from their
// definition (plugins/quant/quant_methods.cpp's opening comment), computed in
// float64 and rounded to float32 once — which equals one correctly rounded
// float32 operation — so that the plugin's float32 kernels, chunked on the CPU
// and whole on CUDA, must match it bit for bit: fp8 per tensor and per expert,
// int8 per row, fresh and written into a reload's kernel tensors. On CUDA, fp8
// processing must also take no float32 scratch (one division kernel over the
// weight, not a loop of chunks).

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <tuple>

#include "device.h"
#include "device_skip.h"
#include "loadkit/layers/fused_moe.h"
#include "loadkit/layers/linear.h"
#include "loadkit/model_config.h"
#include "loadkit/model_context.h"
#include "loadkit/quant_method.h"
#include "loadkit/runtime/registry.h"
#include "model_checks.h"

namespace loadkit::test {
namespace {

ModelContext context(const std::string& quant, at::ScalarType dtype, const std::string& device) {
  ModelContext ctx;
  ctx.config = ModelConfig::parse("{}", "test");
  ctx.dtype = dtype;
  ctx.device = c10::Device(device);
  ctx.quant = build_registry().create_quant(quant, ctx);
  return ctx;
}

// ------------------------------------------------------------ the reference

/// max(amax / range, 1e-12) as float32, per row of `w` viewed as [rows, -1].
at::Tensor reference_scale(const at::Tensor& w, int64_t rows, double range) {
  const at::Tensor amax = std::get<0>(w.cpu().to(at::kDouble).reshape({rows, -1}).abs().max(1));
  return (amax / range).to(at::kFloat).clamp_min(1e-12);
}

/// e4m3(float32(w / scale)), `scale` ([rows] float32) per row of w viewed as [rows, -1].
at::Tensor reference_fp8(const at::Tensor& w, const at::Tensor& scale) {
  const at::Tensor rows = w.cpu().to(at::kDouble).reshape({scale.size(0), -1});
  return (rows / scale.to(at::kDouble).unsqueeze(1)).to(at::kFloat).to(at::kFloat8_e4m3fn).reshape(w.sizes());
}

/// clamp(round(float32(w / scale)), -127, 127) as int8, one scale per row of the 2-D `w`.
at::Tensor reference_int8(const at::Tensor& w, const at::Tensor& scale) {
  const at::Tensor q = (w.cpu().to(at::kDouble) / scale.to(at::kDouble).unsqueeze(1)).to(at::kFloat);
  return q.round().clamp(-127, 127).to(at::kChar);
}

void expect_same_bytes(const at::Tensor& ours, const at::Tensor& reference, const std::string& what) {
  ASSERT_EQ(ours.sizes(), reference.sizes()) << what;
  ASSERT_EQ(ours.scalar_type(), reference.scalar_type()) << what;
  const at::Tensor a = ours.cpu().contiguous().view(at::kByte), b = reference.cpu().contiguous().view(at::kByte);
  const int64_t differ = a.ne(b).sum().item<int64_t>();
  EXPECT_EQ(differ, 0) << what << ": " << differ << " of " << a.numel() << " bytes differ";
}

// ------------------------------------------------------------ weights to quantize

/// Values the quantizers must get right: a normal spread at `magnitude`, one outlier that sets
/// the scale, exact zeros, and (rows at the start) values far below the others.
at::Tensor weight(at::IntArrayRef shape, double magnitude, at::ScalarType dtype, int seed) {
  at::manual_seed(seed);
  at::Tensor w = at::randn(shape, at::kDouble) * magnitude;
  at::Tensor flat = w.view({-1});
  flat[flat.numel() / 3] = 7.5 * magnitude;
  flat.narrow(0, 0, std::min<int64_t>(flat.numel(), 5)).zero_();
  if (w.dim() >= 2 && w.size(0) > 2) w.narrow(0, 1, 1).mul_(1e-3);
  return w.to(dtype);
}

struct LinearCase {
  int64_t out, in;
  double magnitude;
};
// Sizes: a single element; odd; several CPU chunks with a partial last one (2100 x 700: chunks of
// 131 rows); one row per chunk (3 x 70000); an all-zero weight (magnitude 0); values so small that
// the scale's floor (1e-12) applies.
const LinearCase kLinearCases[] = {{1, 1, 0.3}, {37, 53, 0.02}, {2100, 700, 1.5}, {3, 70000, 40.0},
                                   {16, 24, 0.0}, {12, 20, 1e-13}};

using Param = std::tuple<std::string /*device*/, at::ScalarType>;

class QuantKernels : public ::testing::TestWithParam<Param> {
 protected:
  const std::string& device() const { return std::get<0>(GetParam()); }
  at::ScalarType dtype() const { return std::get<1>(GetParam()); }
  /// The tiny-value case underflows fp16 (and bf16 loses its spread there): float32 only.
  bool representable(double magnitude) const { return magnitude == 0 || magnitude >= 1e-6 || dtype() == at::kFloat; }

  /// For every linear case this dtype can hold: a linear layer loaded with a fresh weight and
  /// quantized with `quant`, then `check(layer, w, case)` with the values it was loaded with.
  template <class Check>
  void for_each_quantized_linear(const std::string& quant, int seed, Check&& check) const {
    for (const auto& c : kLinearCases) {
      if (!representable(c.magnitude)) continue;
      SCOPED_TRACE(testing::Message() << c.out << "x" << c.in << " at " << c.magnitude);
      ReplicatedLinear layer(c.in, c.out, context(quant, dtype(), device()));
      const at::Tensor w = weight({c.out, c.in}, c.magnitude, dtype(), seed);
      layer.param("weight").data.copy_(w);
      layer.process_weights_after_loading();
      check(layer, w, c);
    }
  }
};

TEST_P(QuantKernels, Fp8LinearEqualsTheReference) {
  SKIP_WITHOUT(device());
  for_each_quantized_linear("fp8", 1, [](LinearBase& layer, const at::Tensor& w, const LinearCase& c) {
    const at::Tensor scale = reference_scale(w, 1, 448.0);
    expect_same_bytes(layer.param("weight_scale").data, scale, "weight_scale");
    // Kernel layout [in, out]; its transpose is the [out, in] weight.
    expect_same_bytes(layer.param("weight").data.t(), reference_fp8(w, scale.expand({c.out})), "weight");
  });
}

TEST_P(QuantKernels, Int8LinearEqualsTheReference) {
  SKIP_WITHOUT(device());
  for_each_quantized_linear("int8", 2, [](LinearBase& layer, const at::Tensor& w, const LinearCase& c) {
    const at::Tensor scale = reference_scale(w, c.out, 127.0);
    expect_same_bytes(layer.param("weight_scale").data, scale, "weight_scale");
    expect_same_bytes(layer.param("weight").data, reference_int8(w, scale), "weight");
  });
}

/// A FusedMoE layer of `experts` experts, every expert at its own magnitude (one all zero).
std::unique_ptr<FusedMoE> moe_layer(const ModelContext& ctx, int64_t experts, int64_t hidden, int64_t inter, int seed,
                                    at::Tensor& w13, at::Tensor& w2) {
  auto layer = std::make_unique<FusedMoE>(
      FusedMoEOptions{.num_experts = experts, .top_k = 1, .hidden_size = hidden, .intermediate_size = inter}, ctx);
  at::Tensor magnitude = at::logspace(-3, 1, experts, 10.0, at::kDouble);
  magnitude[experts / 2] = 0;
  w13 = (weight({experts, 2 * inter, hidden}, 1.0, at::kDouble, seed) * magnitude.view({experts, 1, 1})).to(ctx.dtype);
  w2 = (weight({experts, hidden, inter}, 1.0, at::kDouble, seed + 1) * magnitude.view({experts, 1, 1})).to(ctx.dtype);
  layer->param("w13_weight").data.copy_(w13);
  layer->param("w2_weight").data.copy_(w2);
  return layer;
}

// Small and odd; then one whose experts span several CPU chunks each.
const std::tuple<int64_t, int64_t, int64_t> kMoECases[] = {{5, 48, 40}, {3, 512, 768}};

/// For every MoE case: a FusedMoE layer loaded and quantized with `quant`, then
/// `check(layer, name, w)` for each stacked weight and the values it was loaded with.
template <class Check>
void for_each_quantized_experts(const std::string& quant, at::ScalarType dtype, const std::string& device, int seed,
                                Check&& check) {
  for (const auto& [experts, hidden, inter] : kMoECases) {
    SCOPED_TRACE(testing::Message() << experts << " experts, hidden " << hidden << ", intermediate " << inter);
    at::Tensor w13, w2;
    auto layer = moe_layer(context(quant, dtype, device), experts, hidden, inter, seed, w13, w2);
    layer->process_weights_after_loading();
    check(*layer, "w13_weight", w13);
    check(*layer, "w2_weight", w2);
  }
}

TEST_P(QuantKernels, Fp8ExpertsEachEqualTheReference) {
  SKIP_WITHOUT(device());
  for_each_quantized_experts("fp8", dtype(), device(), 3, [](FusedMoE& layer, const std::string& name,
                                                              const at::Tensor& w) {
    const at::Tensor scale = reference_scale(w, w.size(0), 448.0);  // one per expert
    expect_same_bytes(layer.param(name + "_scale").data, scale, name + "_scale");
    expect_same_bytes(layer.param(name).data, reference_fp8(w, scale), name);
  });
}

TEST_P(QuantKernels, Int8ExpertsEachRowEqualsTheReference) {
  SKIP_WITHOUT(device());
  for_each_quantized_experts("int8", dtype(), device(), 4, [](FusedMoE& layer, const std::string& name,
                                                               const at::Tensor& w) {
    const int64_t rows = w.size(0) * w.size(1);  // every expert's rows, one scale each
    const at::Tensor scale = reference_scale(w, rows, 127.0);
    expect_same_bytes(layer.param(name + "_scale").data.reshape({rows}), scale, name + "_scale");
    expect_same_bytes(layer.param(name).data, reference_int8(w.reshape({rows, -1}), scale).view(w.sizes()), name);
  });
}

/// A reload hands processing the kernel tensors to write into: the results land in that storage
/// (same data pointers) with the same bytes as a fresh quantization of the new weights.
TEST_P(QuantKernels, WritesIntoGivenKernelTensors) {
  SKIP_WITHOUT(device());
  for (const std::string quant : {"fp8", "int8"}) {
    SCOPED_TRACE(quant);
    const ModelContext ctx = context(quant, dtype(), device());
    ReplicatedLinear first(700, 300, ctx), second(700, 300, ctx), fresh(700, 300, ctx);
    first.param("weight").data.copy_(weight({300, 700}, 0.1, dtype(), 5));
    first.process_weights_after_loading();
    KernelTargets targets;
    for (const auto& [name, p] : first.parameters()) targets.emplace(name, p->data);
    const at::Tensor w = weight({300, 700}, 2.0, dtype(), 6);
    second.param("weight").data.copy_(w);
    second.process_weights_after_loading(targets);
    fresh.param("weight").data.copy_(w);
    fresh.process_weights_after_loading();
    for (const auto& [name, target] : targets) {
      const at::Tensor produced = second.param(name).data;
      EXPECT_EQ(produced.data_ptr(), target.data_ptr()) << name;
      expect_same_bytes(produced, fresh.param(name).data, name);
    }

    at::Tensor w13, w2, v13, v2;
    auto moe_first = moe_layer(ctx, 4, 64, 48, 7, w13, w2);
    moe_first->process_weights_after_loading();
    KernelTargets moe_targets;
    for (const auto& [name, p] : moe_first->parameters()) moe_targets.emplace(name, p->data);
    auto moe_second = moe_layer(ctx, 4, 64, 48, 8, v13, v2);
    auto moe_fresh = moe_layer(ctx, 4, 64, 48, 8, v13, v2);
    moe_second->process_weights_after_loading(moe_targets);
    moe_fresh->process_weights_after_loading();
    for (const auto& [name, target] : moe_targets) {
      EXPECT_EQ(moe_second->param(name).data.data_ptr(), target.data_ptr()) << name;
      expect_same_bytes(moe_second->param(name).data, moe_fresh->param(name).data, name);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, QuantKernels,
                         ::testing::Combine(::testing::Values("cpu", "cuda"),
                                            ::testing::Values(at::kBFloat16, at::kHalf, at::kFloat)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" + c10::toString(std::get<1>(info.param));
                         });

/// Device bytes allocated beyond the start while `fn` runs.
template <class Fn>
uint64_t peak_extra(const c10::Device& device, Fn&& fn) {
  device::synchronize(device);
  device::reset_peak(device);
  const uint64_t start = device::allocated_bytes(device);
  fn();
  device::synchronize(device);
  return device::peak_allocated_bytes(device) - start;
}

// fp8 processing on CUDA divides the whole weight in one kernel, straight into e4m3: no float32
// copy of any part of it. The chunked path took a 4 MiB float32 chunk at a time for these sizes,
// which this bound (the scales, the reduction's partial results) would not admit.
TEST(QuantKernelsGpu, Fp8ProcessingOnCudaTakesNoFloatScratch) {
  SKIP_WITHOUT(std::string("cuda"));
  const ModelContext ctx = context("fp8", at::kBFloat16, "cuda:0");
  constexpr uint64_t kBound = 1 << 20;

  ReplicatedLinear first(4096, 8192, ctx), layer(4096, 8192, ctx);  // 64 MiB of bf16
  first.param("weight").data.normal_();
  first.process_weights_after_loading();
  KernelTargets targets;
  for (const auto& [name, p] : first.parameters()) targets.emplace(name, p->data);
  layer.param("weight").data.normal_();
  const uint64_t linear = peak_extra(ctx.device, [&] { layer.process_weights_after_loading(targets); });
  std::cout << "[ MEASURE  ] fp8 linear 8192x4096 bf16: processing took " << linear << " extra device bytes" << std::endl;
  EXPECT_LE(linear, kBound);

  at::Tensor w13, w2;
  auto moe_first = moe_layer(ctx, 16, 1024, 1408, 9, w13, w2);  // 138 MiB of bf16 experts
  moe_first->process_weights_after_loading();
  KernelTargets moe_targets;
  for (const auto& [name, p] : moe_first->parameters()) moe_targets.emplace(name, p->data);
  auto moe = moe_layer(ctx, 16, 1024, 1408, 10, w13, w2);
  const uint64_t experts = peak_extra(ctx.device, [&] { moe->process_weights_after_loading(moe_targets); });
  std::cout << "[ MEASURE  ] fp8 experts 16x(2816+1024)x1024 bf16: processing took " << experts << " extra device bytes"
            << std::endl;
  EXPECT_LE(experts, kBound);
}

}  // namespace
}  // namespace loadkit::test
