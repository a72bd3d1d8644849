#pragma once
// Block fp8: checkpoints quantized offline in 128x128 blocks (DeepSeek-V3, Qwen3-*-FP8), served
// under `fp8` when config.json carries a quantization_config (see block_fp8.cpp).

#include <memory>

namespace loadkit {
class QuantConfig;
struct ModelContext;
}  // namespace loadkit

namespace loadkit::quant {

/// The block-fp8 config of a model whose `ctx.config` has `quantization_config` with
/// quant_method "fp8". Input error naming the key for a malformed one; Plugin error for a
/// variant this plugin does not serve (per-tensor fp8 checkpoints, static activation scales,
/// per-layer exclusions of quantizable layers).
std::shared_ptr<QuantConfig> make_block_fp8_config(const ModelContext& ctx);

}  // namespace loadkit::quant
