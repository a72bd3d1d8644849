// StarCoder2 (plugins/starcoder2): LayerNorm with bias, use_bias on/off, gelu MLP, GQA/MQA,
// sliding window shorter than the sequence, tied and untied embeddings.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Starcoder2, "starcoder2_fp32_gqa_bias_window", "starcoder2_fp32_mqa_nobias_tied",
                      "starcoder2_bf16_gqa_bias", "starcoder2_bf16_tied_window");
LOADKIT_ARCH_RELOADS(Starcoder2, "starcoder2_bf16_tied_window");

}  // namespace loadkit::test
