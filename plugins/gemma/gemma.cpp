// The Gemma family: Gemma and Gemma 2 on the SDK's decoder skeleton (one decoder; Gemma 2
// adds norms after attention and MLP, attention and final logit soft-capping, a query scale
// of its own and sliding windows on alternate layers). Both scale the embeddings by
// sqrt(hidden) and normalise with (1 + weight).
// Module and parameter names are vLLM's (model.layers.N.pre_feedforward_layernorm.weight, …).

#include <ATen/ATen.h>

#include <cmath>

#include <loadkit/decoder_config.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What Gemma and Gemma 2 read from config.json beyond every decoder's keys.
struct GemmaConfig : DecoderConfig {
  bool gemma2;
  bool attention_bias;
  ActivationFn activation;
  double attention_scale;        ///< query_pre_attn_scalar^-1/2 (Gemma 2), else head_dim^-1/2
  double attn_logit_softcap;     ///< 0: none
  double final_logit_softcap;    ///< 0: none
  std::vector<int64_t> sliding_window;  ///< per layer, 0 = full attention

  GemmaConfig(ConfigReader& r, const ModelContext& ctx, bool is_gemma2)
      : DecoderConfig(r, ctx, {.tie_word_embeddings = true}),
        gemma2(is_gemma2),
        attention_bias(r.config().get_bool("attention_bias", false)),
        activation(read_activation(r.config(), is_gemma2)),
        attention_scale(1.0 / std::sqrt(is_gemma2 ? r.positive_number("query_pre_attn_scalar", 256.0)
                                                  : static_cast<double>(head_dim))),
        attn_logit_softcap(is_gemma2 ? r.config().get_double("attn_logit_softcapping", 0.0) : 0.0),
        final_logit_softcap(is_gemma2 ? r.config().get_double("final_logit_softcapping", 0.0) : 0.0) {
    // transformers 5 writes layer_types; before that Gemma 2 slid on the even layers.
    sliding_window = sliding_windows(r, num_layers, is_gemma2 ? r.non_negative("sliding_window", 0) : 0,
                                     [](int64_t i) { return i % 2 == 0; });
  }

  /// Gemma reads hidden_act, whose legacy value "gelu" transformers takes for the tanh
  /// approximation; Gemma 2 reads hidden_activation as it is.
  static ActivationFn read_activation(const ModelConfig& c, bool is_gemma2) {
    if (is_gemma2) return loadkit::activation(c, "hidden_activation", "gelu_pytorch_tanh");
    const std::string act = c.get_string("hidden_act", "gelu_pytorch_tanh");
    return activation_named(c, "hidden_act", act == "gelu" ? "gelu_pytorch_tanh" : act);
  }

  std::shared_ptr<DecoderLayer> make_layer(int64_t i, const ModelContext& ctx) const {
    const std::string family = gemma2 ? "Gemma2" : "Gemma";
    SelfAttentionSpec attn = attention();
    attn.qkv_bias = attn.o_bias = attention_bias;
    attn.attention = {.scale = attention_scale, .sliding_window = sliding_window[i],
                      .logit_softcap = attn_logit_softcap};
    DecoderLayerSpec spec = layer(family + "DecoderLayer", NormSpec::Kind::RMSUnitOffset);
    spec.sandwich_norms = gemma2;
    return std::make_shared<PreNormDecoderLayer>(
        spec, std::make_shared<RotarySelfAttention>(family + "Attention", attn, ctx),
        std::make_shared<GatedMLP>(family + "MLP", hidden_size, intermediate_size, activation, ctx), ctx);
  }
};

/// What the skeleton does not hold as data: embeddings scaled by sqrt(hidden), logits soft-capped.
class GemmaForCausalLM : public DecoderOnlyLM {
 public:
  GemmaForCausalLM(const GemmaConfig& cfg, const ModelContext& ctx)
      : DecoderOnlyLM(cfg.decoder(cfg.gemma2 ? "Gemma2ForCausalLM" : "GemmaForCausalLM",
                                  cfg.gemma2 ? "Gemma2Model" : "GemmaModel", NormSpec::Kind::RMSUnitOffset),
                      ctx, [&](int64_t i) { return cfg.make_layer(i, ctx); }),
        final_logit_softcap_(cfg.final_logit_softcap) {}

 protected:
  at::Tensor embed(const at::Tensor& ids, const at::Tensor& positions) override {
    at::Tensor h = DecoderOnlyLM::embed(ids, positions);
    // sqrt(hidden) rounded to the model dtype first, as transformers does (bf16: sqrt(3072) = 55.5).
    return h * at::scalar_tensor(std::sqrt(static_cast<double>(spec().hidden_size)), h.options());
  }
  at::Tensor compute_logits(const at::Tensor& hidden) override {
    at::Tensor logits = DecoderOnlyLM::compute_logits(hidden);
    if (final_logit_softcap_ > 0.0) logits = at::tanh(logits / final_logit_softcap_) * final_logit_softcap_;
    return logits;
  }

 private:
  double final_logit_softcap_;
};

ArchitectureFactory gemma_factory(bool gemma2) {
  return [gemma2](const ModelContext& ctx) -> std::shared_ptr<CausalLM> {
    ConfigReader reader(ctx.config);
    return std::make_shared<GemmaForCausalLM>(GemmaConfig(reader, ctx, gemma2), ctx);
  };
}

void register_gemma(Registrar& registrar) {
  registrar.add_architecture("GemmaForCausalLM", gemma_factory(false));
  registrar.add_architecture("Gemma2ForCausalLM", gemma_factory(true));
}

}  // namespace

LOADKIT_PLUGIN("gemma", "1.0.0", register_gemma)
