// Qwen3ForCausalLM on the SDK's decoder skeleton: the config reader and attention it
// shares with Qwen3-MoE (qwen3_config.h), a gated MLP, the Llama weight mapping.
// Names are vLLM's: model.layers.N.self_attn.{qkv_proj,o_proj,q_norm,k_norm}.weight,
// model.layers.N.mlp.{gate_up_proj,down_proj}.weight.

#include <loadkit/plugin.h>

#include "qwen3_config.h"

namespace qwen3 {
namespace {

std::shared_ptr<CausalLM> make_qwen3(const ModelContext& ctx) {
  ConfigReader reader(ctx.config);
  const Qwen3Config cfg(reader, ctx);
  return std::make_shared<DecoderOnlyLM>(cfg.decoder("Qwen3ForCausalLM", "Qwen3Model"), ctx, [&](int64_t i) {
    return std::make_shared<PreNormDecoderLayer>(
        cfg.layer("Qwen3DecoderLayer"), cfg.attention_block("Qwen3Attention", i, ctx),
        std::make_shared<GatedMLP>("Qwen3MLP", cfg.hidden_size, cfg.intermediate_size, cfg.activation, ctx), ctx);
  });
}

void register_qwen3(Registrar& registrar) { registrar.add_architecture("Qwen3ForCausalLM", make_qwen3); }

}  // namespace
}  // namespace qwen3

// A new plugin starts at 0.1.0 (the version examples/plugin_template's Qwen3 had).
LOADKIT_PLUGIN("qwen3", "0.1.0", qwen3::register_qwen3)
