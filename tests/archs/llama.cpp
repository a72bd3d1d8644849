// The Llama family (plugins/llama). Its reloads are covered in depth by test_reload.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Llama, "llama_fp32_gqa_sharded", "llama_legacy_name", "aquila_model", "aquila_causal_lm",
                      "llama_fp32_llama3_tied", "llama_fp32_llama3_legacy_config", "llama_bf16_mqa",
                      "llama_bf16_gqa_tied", "mistral_fp32_window", "internlm_fp32_bias", "llama_fp32_tp_mqa");

}  // namespace loadkit::test
