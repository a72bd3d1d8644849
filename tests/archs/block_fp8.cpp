// Pre-quantized fp8 checkpoints (tests/fixtures/archs/fp8.py: 128x128 block fp8, and
// compressed-tensors per channel / per tensor), loaded with quantization auto: logits against
// transformers' on the *dequantized* weights. On the CPU the forward
// dequantizes too: the 16-bit tolerance of expect_close (cosine >= 0.999 per row, same argmax). On CUDA the
// linear layers whose shapes cuBLAS takes run the block-scaled fp8 GEMM, activations quantized
// too: cosine >= 0.99 per row (llama_blockfp8_gemm: every layer; the others' K of 256 and 384
// dequantize). Llama: k and v of 64 rows, partial blocks in fused QKV; Qwen3-MoE: experts of 192
// (gate and up each a block and a half). Their 16-bit sources are plain bf16
// fixtures. Reloads, bad inputs, quantize-on-sync, tensor parallel: test_block_fp8.cpp.
#include <ATen/ATen.h>

#include "arch_suite.h"
#include "device_skip.h"
#include "loadkit/runtime/engine.h"
#include "model_checks.h"
#include "tensor_io.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

[[maybe_unused]] const bool covered = cover({"llama_blockfp8", "qwen3_moe_blockfp8", "llama_blockfp8_tp",
                                            "qwen3_moe_blockfp8_tp", "llama_ct_fp8_channel", "llama_ct_fp8_tensor",
                                            "llama_ct_fp8_channel_tp", "llama_blockfp8_gemm"});

class BlockFp8Logits : public ::testing::TestWithParam<ArchParam> {};

TEST_P(BlockFp8Logits, MatchTransformersOnDequantizedWeights) {
  const auto& [name, device] = GetParam();
  SKIP_WITHOUT(device);
  const auto& f = fixture(name);
  auto model = load_model(f.dir, device);
  ASSERT_EQ(model->report().quantization, name.starts_with("llama_ct_") ? "compressed-tensors" : "fp8");
  if (device == "cpu") {
    expect_close(model->logits(f.tokens), reference_logits(f), f.dtype);
    return;
  }
  at::Tensor cos = at::cosine_similarity(model->logits(f.tokens), reference_logits(f), 1);
  EXPECT_GE(cos.min().item<double>(), 0.99);
}

TEST_P(BlockFp8Logits, CliMatchesTransformersOnDequantizedWeights) {
  const auto& [name, device] = GetParam();
  if (device != "cpu") GTEST_SKIP() << "the CLI's forward is the API's: the API test covers " << device;
  const auto& f = fixture(name);
  TempDir tmp;
  const std::string out = (tmp / "logits.safetensors").string();
  auto r = run_cli({"logits", "--model", f.dir, "--tokens", f.tokens_arg(), "--out", out, "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  for (auto& [tensor, t] : load_tensors(out))
    if (tensor == "logits") expect_close(t, reference_logits(f), f.dtype);
}

INSTANTIATE_TEST_SUITE_P(BlockFp8, BlockFp8Logits,
                         ::testing::Combine(::testing::Values("llama_blockfp8", "qwen3_moe_blockfp8", "llama_blockfp8_b",
                                                              "qwen3_moe_blockfp8_b", "llama_blockfp8_tp",
                                                              "qwen3_moe_blockfp8_tp", "llama_ct_fp8_channel",
                                                              "llama_ct_fp8_tensor", "llama_ct_fp8_channel_tp",
                                                              "llama_blockfp8_gemm"),
                                            ::testing::Values("cpu", "cuda")),
                         arch_param_name);

}  // namespace

LOADKIT_ARCH_LOGITS_FIXTURES(BlockFp8Source, "llama_blockfp8_bf16src", "qwen3_moe_blockfp8_bf16src",
                             "llama_blockfp8_b_bf16src", "qwen3_moe_blockfp8_b_bf16src", "llama_blockfp8_tp_bf16src",
                             "qwen3_moe_blockfp8_tp_bf16src", "llama_blockfp8_gemm_bf16src");

}  // namespace loadkit::test
