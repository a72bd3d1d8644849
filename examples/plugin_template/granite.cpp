// GraniteForCausalLM as a loadkit plugin, written only against the installed SDK.
//
// Granite is Llama with four multipliers: the token embeddings are scaled by
// `embedding_multiplier`, attention scores by `attention_multiplier` (instead of
// 1/sqrt(head_dim)), each block's output by `residual_multiplier` before the
// residual add, and the logits are divided by `logits_scaling`. On the SDK's
// decoder skeleton that is the whole plugin: the config reader, the layer, and
// the two differences the skeleton does not hold as data.
//
// Names are vLLM's (model.layers.N.self_attn.qkv_proj.weight, …); checkpoint names
// (q_proj, k_proj, v_proj, gate_proj, up_proj) reach the fused parameters through
// the skeleton's default weight mapping.

#include <ATen/ATen.h>

#include <loadkit/decoder_config.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What Granite reads from config.json: Llama's keys (DecoderConfig validates them) and its own.
struct GraniteConfig : DecoderConfig {
  bool attention_bias, mlp_bias;
  double embedding_multiplier, attention_multiplier, residual_multiplier, logits_scaling;
  ActivationFn activation;

  GraniteConfig(ConfigReader& r, const ModelContext& ctx)
      : DecoderConfig(r, ctx),
        attention_bias(r.config().get_bool("attention_bias", false)),
        mlp_bias(r.config().get_bool("mlp_bias", false)),
        embedding_multiplier(r.config().get_double("embedding_multiplier", 1.0)),
        attention_multiplier(r.positive_number("attention_multiplier", 1.0)),
        residual_multiplier(r.config().get_double("residual_multiplier", 1.0)),
        logits_scaling(r.positive_number("logits_scaling", 1.0)),  // divided by: positive, not 0
        activation(loadkit::activation(r.config(), "hidden_act", "silu")) {}

  /// Llama's pre-norm layer with scaled attention scores and scaled residual branches.
  std::shared_ptr<DecoderLayer> make_layer(const ModelContext& ctx) const {
    SelfAttentionSpec attn = attention();
    attn.qkv_bias = attn.o_bias = attention_bias;
    attn.attention.scale = attention_multiplier;
    DecoderLayerSpec spec = DecoderConfig::layer("GraniteDecoderLayer");
    spec.residual_scale = residual_multiplier;
    return std::make_shared<PreNormDecoderLayer>(
        spec, std::make_shared<RotarySelfAttention>("GraniteAttention", attn, ctx),
        std::make_shared<GatedMLP>("GraniteMLP", hidden_size, intermediate_size, activation, ctx, mlp_bias), ctx);
  }
};

class GraniteForCausalLM : public DecoderOnlyLM {
 public:
  GraniteForCausalLM(const GraniteConfig& cfg, const ModelContext& ctx)
      : DecoderOnlyLM(cfg.decoder("GraniteForCausalLM", "GraniteModel"), ctx,
                      [&](int64_t) { return cfg.make_layer(ctx); }),
        embedding_multiplier_(cfg.embedding_multiplier),
        logits_scaling_(cfg.logits_scaling) {}

 protected:
  at::Tensor embed(const at::Tensor& ids, const at::Tensor& positions) override {
    return DecoderOnlyLM::embed(ids, positions) * embedding_multiplier_;
  }
  at::Tensor compute_logits(const at::Tensor& hidden) override {
    return DecoderOnlyLM::compute_logits(hidden) / logits_scaling_;
  }

 private:
  double embedding_multiplier_, logits_scaling_;
};

void register_granite(Registrar& registrar) {
  registrar.add_architecture("GraniteForCausalLM", [](const ModelContext& ctx) {
    ConfigReader reader(ctx.config);
    return std::make_shared<GraniteForCausalLM>(GraniteConfig(reader, ctx), ctx);
  });
}

}  // namespace

// The one exported symbol: name, version, and the registration hook.
LOADKIT_PLUGIN("granite", "0.1.0", register_granite)
