// The Gemma family (plugins/gemma): Gemma (scaled embeddings, 1 + w norms, gelu-tanh,
// explicit head_dim) and Gemma 2 (sandwich norms, soft-capping, query_pre_attn_scalar,
// sliding windows on alternate layers over a sequence longer than the window).
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Gemma, "gemma_fp32_mqa_head_dim", "gemma_fp32_legacy_gelu", "gemma_fp32_untied", "gemma_bf16_gqa");
LOADKIT_ARCH_RELOADS(Gemma, "gemma_bf16_gqa");

LOADKIT_ARCH_FIXTURES(Gemma2, "gemma2_fp32_window_softcap", "gemma2_fp32_legacy_config", "gemma2_bf16_mqa");
LOADKIT_ARCH_RELOADS(Gemma2, "gemma2_bf16_mqa");

}  // namespace loadkit::test
