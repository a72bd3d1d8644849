// Qwen2 (plugins/qwen2): biased q/k/v, tied and untied embeddings, sliding windows
// from max_window_layers on (layer_types and the pre-transformers-5 config).
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Qwen2, "qwen2_fp32_gqa_untied", "qwen2_fp32_window_mqa_tied", "qwen2_fp32_window_legacy_config",
                      "qwen2_bf16_gqa_tied", "qwen2_bf16_untied");
LOADKIT_ARCH_RELOADS(Qwen2, "qwen2_bf16_gqa_tied");

LOADKIT_ARCH_TP_FIXTURES(Qwen2, "qwen2_fp32_tp3");

}  // namespace loadkit::test
