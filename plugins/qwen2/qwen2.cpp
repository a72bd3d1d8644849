// Qwen2: Llama's decoder with biased q/k/v (o_proj has none) and sliding
// windows on the layers from max_window_layers on (when use_sliding_window),
// on the SDK's decoder skeleton with its default weight mapping.
// Module and parameter names are vLLM's (model.layers.N.self_attn.qkv_proj.bias, …).

#include <loadkit/decoder_config.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What Qwen2 reads from config.json beyond every decoder's keys.
struct Qwen2Config : DecoderConfig {
  ActivationFn activation;
  std::vector<int64_t> sliding_window;  ///< per layer, 0 = full attention

  Qwen2Config(ConfigReader& r, const ModelContext& ctx)
      : DecoderConfig(r, ctx),
        activation(loadkit::activation(r.config(), "hidden_act", "silu")),
        sliding_window(qwen_sliding_windows(r, num_layers)) {}

  std::shared_ptr<DecoderLayer> make_layer(int64_t i, const ModelContext& ctx) const {
    SelfAttentionSpec attn = attention();
    attn.qkv_bias = true;
    attn.attention.sliding_window = sliding_window[i];
    return std::make_shared<PreNormDecoderLayer>(
        layer("Qwen2DecoderLayer"), std::make_shared<RotarySelfAttention>("Qwen2Attention", attn, ctx),
        std::make_shared<GatedMLP>("Qwen2MLP", hidden_size, intermediate_size, activation, ctx), ctx);
  }
};

std::shared_ptr<CausalLM> make_qwen2(const ModelContext& ctx) {
  ConfigReader reader(ctx.config);
  const Qwen2Config cfg(reader, ctx);
  return std::make_shared<DecoderOnlyLM>(cfg.decoder("Qwen2ForCausalLM", "Qwen2Model"), ctx,
                                         [&](int64_t i) { return cfg.make_layer(i, ctx); });
}

void register_qwen2(Registrar& registrar) { registrar.add_architecture("Qwen2ForCausalLM", make_qwen2); }

}  // namespace

LOADKIT_PLUGIN("qwen2", "1.0.0", register_qwen2)
