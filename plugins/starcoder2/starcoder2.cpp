// StarCoder2 on the SDK's decoder skeleton: pre-LayerNorm blocks (LayerNorm with
// bias, `norm_epsilon`), separate q/k/v projections stacked into vLLM's qkv_proj,
// a plain two-layer MLP c_fc → gelu → c_proj, biases on every projection when
// `use_bias`, rope, GQA and a sliding window on every layer when `sliding_window`
// is set. Module and parameter names are vLLM's (vllm/model_executor/models/starcoder2.py).

#include <loadkit/decoder_config.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What StarCoder2 reads from config.json beyond every decoder's keys.
struct Starcoder2Config : DecoderConfig {
  bool use_bias;
  ActivationFn activation;
  int64_t sliding_window;  ///< 0 = full attention

  Starcoder2Config(ConfigReader& r, const ModelContext& ctx)
      : DecoderConfig(r, ctx, {.norm_eps_key = "norm_epsilon", .norm_eps = 1e-5, .tie_word_embeddings = true}),
        use_bias(r.config().get_bool("use_bias", true)),
        activation(loadkit::activation(r.config(), "hidden_act", "gelu_pytorch_tanh")),
        sliding_window(r.non_negative("sliding_window", 0)) {}

  std::shared_ptr<DecoderLayer> make_layer(const ModelContext& ctx) const {
    SelfAttentionSpec attn = attention();
    attn.qkv_bias = attn.o_bias = use_bias;
    attn.attention.sliding_window = sliding_window;
    // nn.LayerNorm: always with bias, whatever use_bias says.
    return std::make_shared<PreNormDecoderLayer>(
        layer("Starcoder2DecoderLayer", NormSpec::Kind::Layer),
        std::make_shared<RotarySelfAttention>("Starcoder2Attention", attn, ctx),
        std::make_shared<PlainMLP>("Starcoder2MLP", hidden_size, intermediate_size, activation, ctx, use_bias), ctx);
  }
};

std::shared_ptr<CausalLM> make_starcoder2(const ModelContext& ctx) {
  ConfigReader reader(ctx.config);
  const Starcoder2Config cfg(reader, ctx);
  return std::make_shared<DecoderOnlyLM>(cfg.decoder("Starcoder2ForCausalLM", "Starcoder2Model", NormSpec::Kind::Layer),
                                         ctx, [&](int64_t) { return cfg.make_layer(ctx); });
}

void register_starcoder2(Registrar& registrar) {
  registrar.add_architecture("Starcoder2ForCausalLM", make_starcoder2);
}

}  // namespace

LOADKIT_PLUGIN("starcoder2", "1.0.0", register_starcoder2)
