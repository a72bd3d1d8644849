// Phi-3 (and Phi-4-mini, which keeps the architecture name) on the SDK's decoder
// skeleton: a Llama whose checkpoint stores q/k/v fused in `qkv_proj` and gate/up
// fused in `gate_up_proj`. The fused tensors load without a shard id: the QKV and
// merged-column loaders split them into the q/k/v (gate/up) parts and take this
// rank's rows of each, so tensor parallelism sees the same shards as a checkpoint
// with separate projections (which load through the default stacking rules, as
// Llama-converted checkpoints have them). Rope: default or longrope (short and long
// factors, switched on the sequence length as transformers does), optionally
// partial; an optional sliding window on every layer.
// Module and parameter names are vLLM's (vllm/model_executor/models/phi3.py reuses llama.py).

#include <loadkit/decoder_config.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What Phi3 reads from config.json beyond every decoder's keys.
struct Phi3Config : DecoderConfig {
  ActivationFn activation;
  int64_t rotary_dim;
  int64_t sliding_window;  ///< 0 = full attention

  Phi3Config(ConfigReader& r, const ModelContext& ctx)
      : DecoderConfig(r, ctx, {.norm_eps = 1e-5}),
        activation(activation_only(r.config(), "hidden_act", "silu")),  // vLLM's Phi3 is its Llama
        sliding_window(r.non_negative("sliding_window", 0)) {
    // Phi3Config renames the pre-release spellings of longrope.
    if (rope.type == "su" || rope.type == "yarn") rope.type = "longrope";
    // transformers 5 keeps partial_rotary_factor in rope_parameters; older configs at the top level.
    rotary_dim = partial_rotary_dim(
        r, rope.scaling.get_double("partial_rotary_factor", r.config().get_double("partial_rotary_factor", 1.0)));
  }

  std::shared_ptr<DecoderLayer> make_layer(const ModelContext& ctx) const {
    SelfAttentionSpec attn = attention();
    attn.rotary_dim = rotary_dim;
    attn.attention.sliding_window = sliding_window;
    return std::make_shared<PreNormDecoderLayer>(
        layer("Phi3DecoderLayer"), std::make_shared<RotarySelfAttention>("Phi3Attention", attn, ctx),
        std::make_shared<GatedMLP>("Phi3MLP", hidden_size, intermediate_size, activation, ctx), ctx);
  }
};

std::shared_ptr<CausalLM> make_phi3(const ModelContext& ctx) {
  ConfigReader reader(ctx.config);
  const Phi3Config cfg(reader, ctx);
  return std::make_shared<DecoderOnlyLM>(cfg.decoder("Phi3ForCausalLM", "Phi3Model"), ctx,
                                         [&](int64_t) { return cfg.make_layer(ctx); });
}

void register_phi3(Registrar& registrar) { registrar.add_architecture("Phi3ForCausalLM", make_phi3); }

}  // namespace

LOADKIT_PLUGIN("phi3", "1.0.0", register_phi3)
