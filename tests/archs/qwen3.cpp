// Qwen3 (plugins/qwen3): per-head q/k norms, explicit head_dim, GQA and MQA, tied and untied,
// q/k/v/o bias, a sliding window on the layers layer_types marks.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Qwen3, "qwen3_fp32_gqa", "qwen3_bf16_tied_bias", "qwen3_bf16_mqa");
LOADKIT_ARCH_LOGITS_FIXTURES(Qwen3Window, "qwen3_fp32_window");
LOADKIT_ARCH_RELOADS(Qwen3, "qwen3_fp32_gqa", "qwen3_bf16_mqa");

LOADKIT_ARCH_TP_FIXTURES(Qwen3, "qwen3_fp32_tp2");

}  // namespace loadkit::test
