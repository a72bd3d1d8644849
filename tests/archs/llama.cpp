// The Llama family (plugins/llama). Its reloads are covered in depth by test_reload.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Llama, "llama_fp32_gqa_sharded", "llama_legacy_name", "aquila_model", "aquila_causal_lm",
                      "llama_fp32_llama3_tied", "llama_fp32_llama3_legacy_config", "llama_bf16_mqa",
                      "llama_bf16_gqa_tied", "mistral_fp32_window", "internlm_fp32_bias", "llama_fp32_tp_mqa");
// Dynamic NTK rope below and above max_position_embeddings, in transformers' 5 and 4 spellings and
// InternLM's own `rotary` block (same weights, transformers' Llama reference).
LOADKIT_ARCH_LOGITS_FIXTURES(LlamaDynamicRope, "llama_fp32_dynamic_short", "llama_fp32_dynamic_long",
                             "llama_fp32_dynamic_legacy_config", "internlm_fp32_rotary_dynamic");

}  // namespace loadkit::test
