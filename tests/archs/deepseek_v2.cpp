// DeepSeek-V2 (plugins/deepseek_v2): MLA attention with and without q_lora_rank, DeepSeekMoE
// (greedy and group-limited routing, norm_topk_prob, shared experts, dense first layer), yarn rope.
// Its expert layout, per-expert quantization and tensor-parallel shards: test_deepseek_v2.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(DeepseekV2, "deepseek_v2_fp32_qlora_grouped_yarn", "deepseek_v2_fp32_qproj_greedy_norm",
                      "deepseek_v2_bf16_qlora");
LOADKIT_ARCH_RELOADS(DeepseekV2, "deepseek_v2_bf16_qlora");

LOADKIT_ARCH_TP_FIXTURES(DeepseekV2, "deepseek_v2_fp32_tp3");

}  // namespace loadkit::test
