// fp8 checkpoints as they ship (tests/fixtures/archs/fp8.py, per_layer_and_per_tensor): some
// layers left 16-bit by the quantization_config, per-tensor fp8, compressed-tensors experts.
// Logits against transformers' on the *dequantized* weights: on the CPU the forward dequantizes
// (expect_close's 16-bit tolerance); on CUDA per-tensor fp8 layers run _scaled_mm with quantized
// activations where cuBLAS takes the shapes (cosine >= 0.99 per row). Layouts, reloads,
// quantize-on-sync and bad inputs: test_fp8_layers.cpp.
#include <ATen/ATen.h>

#include "arch_suite.h"
#include "device_skip.h"
#include "loadkit/runtime/engine.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

[[maybe_unused]] const bool covered = cover({"llama_blockfp8_ignored", "llama_fp8_tensor", "llama_ct_fp8_ignored",
                                            "qwen3_moe_ct_fp8_channel", "qwen3_moe_ct_fp8_tensor"});

class Fp8CheckpointLogits : public ::testing::TestWithParam<ArchParam> {};

TEST_P(Fp8CheckpointLogits, MatchTransformersOnDequantizedWeights) {
  const auto& [name, device] = GetParam();
  SKIP_WITHOUT(device);
  const auto& f = fixture(name);
  auto model = load_model(f.dir, device);
  EXPECT_EQ(model->report().quantization, name.find("_ct_") != std::string::npos ? "compressed-tensors" : "fp8");
  if (device == "cpu") {
    expect_close(model->logits(f.tokens), reference_logits(f), f.dtype);
    return;
  }
  at::Tensor cos = at::cosine_similarity(model->logits(f.tokens), reference_logits(f), 1);
  EXPECT_GE(cos.min().item<double>(), 0.99);
}

INSTANTIATE_TEST_SUITE_P(Fp8Layers, Fp8CheckpointLogits,
                         ::testing::Combine(::testing::Values("llama_blockfp8_ignored", "llama_blockfp8_ignored_b",
                                                              "llama_fp8_tensor", "llama_fp8_tensor_b",
                                                              "llama_ct_fp8_ignored", "qwen3_moe_ct_fp8_channel",
                                                              "qwen3_moe_ct_fp8_channel_b", "qwen3_moe_ct_fp8_tensor",
                                                              "qwen3_moe_ct_fp8_tensor_b"),
                                            ::testing::Values("cpu", "cuda")),
                         arch_param_name);

}  // namespace
}  // namespace loadkit::test
