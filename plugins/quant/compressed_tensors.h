#pragma once
// compressed-tensors fp8 checkpoints (llm-compressor's FP8_DYNAMIC), served under
// `compressed-tensors` (see compressed_tensors.cpp).

#include <memory>

namespace loadkit {
class QuantConfig;
struct ModelContext;
}  // namespace loadkit

namespace loadkit::quant {

/// The config of a model whose `ctx.config` has a compressed-tensors quantization_config. Plugin
/// error naming the group and scheme for anything but fp8 weights (per tensor or channel) with
/// dynamic per-token (or no) activation quantization; Input error for a malformed config.
std::shared_ptr<QuantConfig> make_compressed_tensors_config(const ModelContext& ctx);

}  // namespace loadkit::quant
