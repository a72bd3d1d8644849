// The Gemma family: Gemma and Gemma 2 (one decoder, Gemma 2 adds norms after
// attention and MLP, attention and final logit soft-capping, a query scale of
// its own and sliding windows on alternate layers). Both scale the embeddings
// by sqrt(hidden) and normalise with (1 + weight).
// Module and parameter names are vLLM's (model.layers.N.pre_feedforward_layernorm.weight, …).

#include <ATen/ATen.h>

#include <cmath>

#include <loadkit/causal_lm.h>
#include <loadkit/error.h>
#include <loadkit/layers/decoder_blocks.h>
#include <loadkit/layers/embedding.h>
#include <loadkit/layers/norm.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What Gemma and Gemma 2 read from config.json.
struct GemmaConfig {
  bool gemma2;
  int64_t hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size;
  double rms_norm_eps;
  bool tie_word_embeddings, attention_bias;
  RopeParameters rope;
  ActivationFn activation;
  double attention_scale;        ///< query_pre_attn_scalar^-1/2 (Gemma 2), else head_dim^-1/2
  double attn_logit_softcap;     ///< 0: none
  double final_logit_softcap;    ///< 0: none
  std::vector<int64_t> sliding_window;  ///< per layer, 0 = full attention

  GemmaConfig(const ModelConfig& c, bool is_gemma2)
      : gemma2(is_gemma2),
        hidden_size(c.get_int("hidden_size")),
        intermediate_size(c.get_int("intermediate_size")),
        num_layers(c.get_int("num_hidden_layers")),
        num_heads(c.get_int("num_attention_heads")),
        num_kv_heads(c.get_int("num_key_value_heads", num_heads)),
        head_dim(c.get_int("head_dim", num_heads > 0 ? hidden_size / num_heads : 0)),
        vocab_size(c.get_int("vocab_size")),
        rms_norm_eps(c.get_double("rms_norm_eps", 1e-6)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", true)),
        attention_bias(c.get_bool("attention_bias", false)),
        rope(rope_parameters(c)),
        activation(read_activation(c, is_gemma2)),
        attention_scale(1.0 / std::sqrt(is_gemma2 ? c.get_double("query_pre_attn_scalar", 256.0)
                                                  : static_cast<double>(head_dim))),
        attn_logit_softcap(is_gemma2 ? c.get_double("attn_logit_softcapping", 0.0) : 0.0),
        final_logit_softcap(is_gemma2 ? c.get_double("final_logit_softcapping", 0.0) : 0.0) {
    if (num_layers < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || hidden_size <= 0)
      fail(ErrorKind::Input, c.origin(), ": layer, head and hidden sizes must be positive");
    if (is_gemma2 && attention_scale <= 0.0)
      fail(ErrorKind::Input, c.origin(), ": query_pre_attn_scalar must be positive");
    sliding_window.assign(num_layers, 0);
    const int64_t window = is_gemma2 ? c.get_int("sliding_window", 0) : 0;
    if (window <= 0) return;
    // transformers 5 writes layer_types; before that Gemma 2 slid on the even layers.
    std::vector<std::string> types;
    if (c.has("layer_types")) types = c.get_strings("layer_types");
    for (int64_t i = 0; i < num_layers; ++i) {
      const bool sliding = c.has("layer_types") ? i < static_cast<int64_t>(types.size()) &&
                                                      types[i] == "sliding_attention"
                                                : i % 2 == 0;
      if (sliding) sliding_window[i] = window;
    }
  }

  /// Gemma reads hidden_act, whose legacy value "gelu" transformers takes for the tanh
  /// approximation; Gemma 2 reads hidden_activation as it is.
  static ActivationFn read_activation(const ModelConfig& c, bool is_gemma2) {
    if (is_gemma2) return loadkit::activation(c, "hidden_activation", "gelu_pytorch_tanh");
    const std::string act = c.get_string("hidden_act", "gelu_pytorch_tanh");
    return activation_named(c, "hidden_act", act == "gelu" ? "gelu_pytorch_tanh" : act);
  }

  SelfAttentionSpec attention(int64_t layer) const {
    return {.hidden_size = hidden_size, .num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = head_dim,
            .qkv_bias = attention_bias, .o_bias = attention_bias, .rope = rope,
            .attention = {.scale = attention_scale, .sliding_window = sliding_window[layer],
                          .logit_softcap = attn_logit_softcap}};
  }
};

class GemmaDecoderLayer : public Module {
 public:
  GemmaDecoderLayer(const GemmaConfig& cfg, int64_t layer, const ModelContext& ctx)
      : Module(cfg.gemma2 ? "Gemma2DecoderLayer" : "GemmaDecoderLayer") {
    const std::string family = cfg.gemma2 ? "Gemma2" : "Gemma";
    attn_ = &add_module("self_attn", std::make_shared<RotarySelfAttention>(family + "Attention", cfg.attention(layer), ctx));
    mlp_ = &add_module("mlp", std::make_shared<GatedMLP>(family + "MLP", cfg.hidden_size, cfg.intermediate_size,
                                                         cfg.activation, ctx));
    auto norm = [&](const char* name) {
      return &add_module(name, std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx, /*unit_offset=*/true));
    };
    input_norm_ = norm("input_layernorm");
    post_attention_norm_ = norm("post_attention_layernorm");
    if (cfg.gemma2) {
      pre_feedforward_norm_ = norm("pre_feedforward_layernorm");
      post_feedforward_norm_ = norm("post_feedforward_layernorm");
    }
  }

  at::Tensor forward(const at::Tensor& positions, at::Tensor h) {
    if (!pre_feedforward_norm_) {  // Gemma: Llama's order; post_attention_layernorm is the MLP's input norm
      h = h + attn_->forward(positions, input_norm_->forward(h));
      return h + mlp_->forward(post_attention_norm_->forward(h));
    }
    h = h + post_attention_norm_->forward(attn_->forward(positions, input_norm_->forward(h)));
    return h + post_feedforward_norm_->forward(mlp_->forward(pre_feedforward_norm_->forward(h)));
  }

 private:
  RotarySelfAttention* attn_;
  GatedMLP* mlp_;
  RMSNorm* input_norm_;
  RMSNorm* post_attention_norm_;
  RMSNorm* pre_feedforward_norm_ = nullptr;
  RMSNorm* post_feedforward_norm_ = nullptr;
};

class GemmaModel : public Module {
 public:
  GemmaModel(const GemmaConfig& cfg, const ModelContext& ctx)
      : Module(cfg.gemma2 ? "Gemma2Model" : "GemmaModel"), hidden_size_(cfg.hidden_size) {
    embed_ = &add_module("embed_tokens", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    auto& layers = add_module("layers", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i)
      layers_.push_back(&layers.append(std::make_shared<GemmaDecoderLayer>(cfg, i, ctx)));
    norm_ = &add_module("norm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx, /*unit_offset=*/true));
  }
  at::Tensor forward(const at::Tensor& ids) {
    at::Tensor positions = at::arange(ids.size(0), ids.options());
    at::Tensor h = embed_->forward(ids);
    // sqrt(hidden) rounded to the model dtype first, as transformers does (bf16: sqrt(3072) = 55.5).
    h = h * at::scalar_tensor(std::sqrt(static_cast<double>(hidden_size_)), h.options());
    for (auto* layer : layers_) h = layer->forward(positions, h);
    return norm_->forward(h);
  }
  VocabParallelEmbedding& embed_tokens() { return *embed_; }

 private:
  int64_t hidden_size_;
  VocabParallelEmbedding* embed_;
  std::vector<GemmaDecoderLayer*> layers_;
  RMSNorm* norm_;
};

class GemmaForCausalLM : public CausalLM {
 public:
  GemmaForCausalLM(const ModelContext& ctx, bool gemma2)
      : CausalLM(gemma2 ? "Gemma2ForCausalLM" : "GemmaForCausalLM"), cfg_(ctx.config, gemma2) {
    model_ = &add_module("model", std::make_shared<GemmaModel>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(model_->embed_tokens());
  }
  at::Tensor forward(const at::Tensor& ids) override {
    at::Tensor logits = lm_head_->compute_logits(model_->forward(ids));
    if (cfg_.final_logit_softcap > 0.0)
      logits = at::tanh(logits / cfg_.final_logit_softcap) * cfg_.final_logit_softcap;
    return logits;
  }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  WeightMapping weight_mapping() const override {
    WeightMapping m;
    m.stacked = decoder_stacked_params();
    m.skip_substrs = {"rotary_emb.inv_freq"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    return m;
  }

 private:
  GemmaConfig cfg_;
  GemmaModel* model_;
  ParallelLMHead* lm_head_;
};

void register_gemma(Registrar& registrar) {
  registrar.add_architecture("GemmaForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<GemmaForCausalLM>(ctx, false); });
  registrar.add_architecture("Gemma2ForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<GemmaForCausalLM>(ctx, true); });
}

}  // namespace

LOADKIT_PLUGIN("gemma", "1.0.0", register_gemma)
