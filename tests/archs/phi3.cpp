// Phi3 (plugins/phi3): fused qkv_proj / gate_up_proj checkpoints, default rope and longrope
// on both sides of original_max_position_embeddings, partial rotary, sliding window.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Phi3, "phi3_fp32_gqa", "phi3_fp32_longrope_short", "phi3_fp32_longrope_long",
                      "phi3_bf16_longrope_long", "phi3_bf16_mqa_window_tied");
LOADKIT_ARCH_RELOADS(Phi3, "phi3_bf16_mqa_window_tied");

LOADKIT_ARCH_TP_FIXTURES(Phi3, "phi3_fp32_tp3");

}  // namespace loadkit::test
