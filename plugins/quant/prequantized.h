#pragma once
// Checkpoints quantized offline, served by the quant plugin (quant_methods.cpp registers them):
// block fp8 under `fp8` when config.json carries a quantization_config (block_fp8.cpp), and
// llm-compressor's fp8 under `compressed-tensors` (compressed_tensors.cpp).

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

/// The config of a model whose `ctx.config` has a compressed-tensors quantization_config. Plugin
/// error naming the group and scheme for anything but fp8 weights (per tensor or channel) with
/// dynamic per-token (or no) activation quantization; Input error for a malformed config.
std::shared_ptr<QuantConfig> make_compressed_tensors_config(const ModelContext& ctx);

}  // namespace loadkit::quant
