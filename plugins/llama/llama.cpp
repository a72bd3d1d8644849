// The Llama family: Llama, Mistral, InternLM (biased projections), Aquila, on the
// SDK's decoder skeleton (decoder_only_lm.h) with its default weight mapping.
// Module and parameter names are vLLM's (model.layers.N.self_attn.qkv_proj.weight, …).

#include <loadkit/decoder_config.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What the Llama family reads from config.json beyond every decoder's keys.
struct LlamaConfig : DecoderConfig {
  bool attention_bias, mlp_bias;
  ActivationFn activation;
  int64_t rotary_dim;
  std::vector<int64_t> sliding_window;  ///< per layer, 0 = full attention

  LlamaConfig(ConfigReader& r, const ModelContext& ctx)
      : DecoderConfig(r, ctx),
        // InternLM says "bias"; Llama "attention_bias" (q, k, v and o).
        attention_bias(r.config().get_bool("attention_bias", false) || r.config().get_bool("bias", false)),
        mlp_bias(r.config().get_bool("mlp_bias", false)),
        // vLLM's Llama MLP has silu only; so does this plugin.
        activation(activation_only(r.config(), "hidden_act", "silu")) {
    rotary_dim = partial_rotary_dim(r, r.config().get_double("partial_rotary_factor", 1.0));
    // Mistral-style sliding window: every layer, or the layers layer_types marks.
    sliding_window = sliding_windows(r, num_layers, r.non_negative("sliding_window", 0), [](int64_t) { return true; });
  }

  std::shared_ptr<DecoderLayer> make_layer(int64_t i, const ModelContext& ctx) const {
    SelfAttentionSpec attn = attention();
    attn.qkv_bias = attn.o_bias = attention_bias;
    attn.rotary_dim = rotary_dim;
    attn.attention.sliding_window = sliding_window[i];
    return std::make_shared<PreNormDecoderLayer>(
        layer("LlamaDecoderLayer"), std::make_shared<RotarySelfAttention>("LlamaAttention", attn, ctx),
        std::make_shared<GatedMLP>("LlamaMLP", hidden_size, intermediate_size, activation, ctx, mlp_bias), ctx);
  }
};

std::shared_ptr<CausalLM> make_llama(const ModelContext& ctx) {
  ConfigReader reader(ctx.config);
  const LlamaConfig cfg(reader, ctx);
  return std::make_shared<DecoderOnlyLM>(cfg.decoder("LlamaForCausalLM", "LlamaModel"), ctx,
                                         [&](int64_t i) { return cfg.make_layer(i, ctx); });
}

void register_llama(Registrar& registrar) {
  for (const char* name : {"LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "InternLMForCausalLM",
                           "AquilaModel", "AquilaForCausalLM"})
    registrar.add_architecture(name, make_llama);
}

}  // namespace

LOADKIT_PLUGIN("llama", "1.0.0", register_llama)
