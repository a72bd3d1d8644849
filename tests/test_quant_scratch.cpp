// A quantization method's own figure for the scratch its processing needs
// (LinearMethod / FusedMoEMethod::process_scratch_bytes) is what a reload
// reserves beside a module being rebuilt (runtime/src/reload/staging_plan.h),
// so it must hold: measured with the CUDA caching allocator's statistics while
// a layer is processed into existing kernel tensors, as a reload does.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <iostream>
#include <string>

#include "device.h"
#include "device_skip.h"
#include "loadkit/layers/fused_moe.h"
#include "loadkit/layers/linear.h"
#include "loadkit/model_context.h"
#include "loadkit/quant_method.h"
#include "loadkit/runtime/registry.h"
#include "model_checks.h"

namespace loadkit::test {
namespace {

/// Small allocations beside the chunk: per-tensor and per-row scales, reductions (512-byte blocks).
constexpr uint64_t kSlack = 1u << 20;

ModelContext cuda_context(const std::string& quant) {
  ModelContext ctx;
  ctx.config = ModelConfig::parse("{}", "test");
  ctx.dtype = at::kBFloat16;
  ctx.device = c10::Device("cuda:0");
  ctx.quant = build_registry().create_quant(quant, ctx);
  return ctx;
}

/// Device bytes `process` allocates at its peak, beyond what was allocated before it.
template <class Fn>
uint64_t peak_of(const c10::Device& device, Fn&& process) {
  device::synchronize(device);
  device::reset_peak(device);
  const uint64_t before = device::allocated_bytes(device);
  process();
  device::synchronize(device);
  return device::peak_allocated_bytes(device) - before;
}

KernelTargets targets_of(Module& processed) {
  KernelTargets targets;
  for (const auto& [name, p] : processed.parameters()) targets.emplace(name, p->data);
  return targets;
}

class QuantScratch : public ::testing::TestWithParam<std::string> {};

TEST_P(QuantScratch, LinearProcessingStaysWithinItsStatedScratch) {
  SKIP_WITHOUT(std::string("cuda"));
  const ModelContext ctx = cuda_context(GetParam());
  for (auto [out, in] : {std::pair<int64_t, int64_t>{48, 64}, {1000, 768}, {4096, 4096}, {11008, 4096}}) {
    // The kernel tensors of a first layer are the targets a reload hands the second one.
    ReplicatedLinear first(in, out, ctx), second(in, out, ctx);
    first.param("weight").data.normal_();
    first.process_weights_after_loading();
    second.param("weight").data.normal_();
    const KernelTargets targets = targets_of(first);
    const uint64_t stated = second.method().process_scratch_bytes(second.shape(), ctx);
    const uint64_t peak = peak_of(ctx.device, [&] { second.process_weights_after_loading(targets); });
    EXPECT_LE(peak, stated + kSlack) << GetParam() << " [" << out << ", " << in << "]: stated " << stated;
    EXPECT_LE(stated, peak + kSlack) << GetParam() << " [" << out << ", " << in << "]: stated " << stated
                                     << " for a peak of " << peak << " (a blanket overestimate wastes the window)";
  }
}

TEST_P(QuantScratch, MoEProcessingStaysWithinItsStatedScratch) {
  SKIP_WITHOUT(std::string("cuda"));
  const ModelContext ctx = cuda_context(GetParam());
  for (auto [experts, hidden, inter] : {std::tuple<int64_t, int64_t, int64_t>{4, 64, 48}, {8, 1024, 1408}, {16, 2048, 1408}}) {
    const FusedMoEOptions options{.num_experts = experts, .top_k = 2, .hidden_size = hidden, .intermediate_size = inter};
    FusedMoE first(options, ctx), second(options, ctx);
    for (auto* layer : {&first, &second})
      for (const char* name : {"w13_weight", "w2_weight"}) layer->param(name).data.normal_();
    first.process_weights_after_loading();
    const KernelTargets targets = targets_of(first);
    const uint64_t stated = second.method().process_scratch_bytes(second.shape(), ctx);
    const uint64_t peak = peak_of(ctx.device, [&] { second.process_weights_after_loading(targets); });
    std::cout << "[ MEASURE  ] " << GetParam() << " experts " << experts << "x" << hidden << "x" << inter
              << ": processing peak " << peak << " bytes, stated scratch " << stated << std::endl;
    EXPECT_LE(peak, stated + kSlack) << GetParam() << " " << experts << " experts: stated " << stated;
    EXPECT_LE(stated, peak + kSlack) << GetParam() << " " << experts << " experts: stated " << stated
                                     << " for a peak of " << peak;
  }
}

INSTANTIATE_TEST_SUITE_P(OnlineQuantization, QuantScratch, ::testing::Values("fp8", "int8"));

}  // namespace
}  // namespace loadkit::test
