// Qwen3-MoE (plugins/qwen3, qwen3_moe.so): sparse layers with and without norm_topk_prob, dense
// layers from mlp_only_layers and decoder_sparse_step, the hub's and transformers 5's spelling of
// the expert count, tied and untied. A missing expert tensor is named: test_decoder_skeleton.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Qwen3Moe, "qwen3_moe_fp32_norm_topk", "qwen3_moe_fp32_step2_tied", "qwen3_moe_bf16");
LOADKIT_ARCH_RELOADS(Qwen3Moe, "qwen3_moe_bf16");

LOADKIT_ARCH_TP_FIXTURES(Qwen3Moe, "qwen3_moe_fp32_tp2");

}  // namespace loadkit::test
