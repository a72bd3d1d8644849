// GPTBigCode (plugins/gpt_bigcode): multi-query attention (one kv head fused into c_attn) and
// plain multi-head attention (per-head fused c_attn), scaled and unscaled scores.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(GptBigCode, "bigcode_fp32_mqa", "bigcode_fp32_mha", "bigcode_fp32_unscaled", "bigcode_bf16_mqa",
                      "bigcode_bf16_mha");
LOADKIT_ARCH_RELOADS(GptBigCode, "bigcode_bf16_mqa", "bigcode_bf16_mha");

}  // namespace loadkit::test
