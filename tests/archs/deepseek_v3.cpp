// DeepSeek-V3 (plugins/deepseek_v2): MLA with and without q_lora_rank, noaux_tc routing (sigmoid
// scores, e_score_correction_bias, groups by their two best experts, topk_group < n_group),
// norm_topk_prob on and off, shared experts, a dense first layer, interleaved and neox rope; every
// fixture's checkpoint carries a multi-token-prediction layer that must be skipped.
// The block-fp8 checkpoint (every linear fp8 incl. kv_b_proj and the experts) against transformers
// on its dequantized weights: cosine >= 0.999 per row and argmax where the forward dequantizes (CPU),
// >= 0.99 where the GEMMs quantize activations too (CUDA).
// Routing, MTP, bad inputs, block-fp8 reloads and quantize-on-sync: test_deepseek_v3.cpp; TP:
// test_tensor_parallel.cpp.
#include <ATen/ATen.h>

#include "arch_suite.h"
#include "device_skip.h"
#include "loadkit/runtime/engine.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(DeepseekV3, "deepseek_v3_fp32_qlora", "deepseek_v3_fp32_qproj", "deepseek_v3_bf16_qlora");
LOADKIT_ARCH_RELOADS(DeepseekV3, "deepseek_v3_bf16_qlora");

// The 16-bit sources of the block-fp8 checkpoints: bf16 logits against transformers.
LOADKIT_ARCH_LOGITS_FIXTURES(DeepseekV3BlockFp8Source, "deepseek_v3_blockfp8_bf16src", "deepseek_v3_blockfp8_b_bf16src",
                             "deepseek_v3_blockfp8_tp_bf16src");

namespace {

[[maybe_unused]] const bool covered = cover({"deepseek_v3_blockfp8", "deepseek_v3_blockfp8_tp"});

class DeepseekV3BlockFp8Logits : public ::testing::TestWithParam<ArchParam> {};

TEST_P(DeepseekV3BlockFp8Logits, MatchTransformersOnDequantizedWeights) {
  const auto& [name, device] = GetParam();
  SKIP_WITHOUT(device);
  const auto& f = fixture(name);
  auto model = load_model(f.dir, device);
  ASSERT_EQ(model->report().quantization, "fp8");
  if (device == "cpu") {
    expect_close(model->logits(f.tokens), reference_logits(f), f.dtype);
    return;
  }
  at::Tensor cos = at::cosine_similarity(model->logits(f.tokens), reference_logits(f), 1);
  EXPECT_GE(cos.min().item<double>(), 0.99);
}

INSTANTIATE_TEST_SUITE_P(DeepseekV3, DeepseekV3BlockFp8Logits,
                         ::testing::Combine(::testing::Values("deepseek_v3_blockfp8", "deepseek_v3_blockfp8_b",
                                                              "deepseek_v3_blockfp8_tp"),
                                            ::testing::Values("cpu", "cuda")),
                         arch_param_name);

}  // namespace
}  // namespace loadkit::test
