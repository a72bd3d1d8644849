// Qwen2: Llama's decoder with biased q/k/v (o_proj has none) and sliding
// windows on the layers from max_window_layers on (when use_sliding_window).
// Module and parameter names are vLLM's (model.layers.N.self_attn.qkv_proj.bias, …).

#include <ATen/ATen.h>

#include <loadkit/causal_lm.h>
#include <loadkit/error.h>
#include <loadkit/layers/decoder_blocks.h>
#include <loadkit/layers/embedding.h>
#include <loadkit/layers/norm.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What Qwen2 reads from config.json.
struct Qwen2Config {
  int64_t hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size;
  double rms_norm_eps;
  bool tie_word_embeddings;
  RopeParameters rope;
  ActivationFn activation;
  std::vector<int64_t> sliding_window;  ///< per layer, 0 = full attention

  explicit Qwen2Config(const ModelConfig& c)
      : hidden_size(c.get_int("hidden_size")),
        intermediate_size(c.get_int("intermediate_size")),
        num_layers(c.get_int("num_hidden_layers")),
        num_heads(c.get_int("num_attention_heads")),
        num_kv_heads(c.get_int("num_key_value_heads", num_heads)),
        head_dim(c.get_int("head_dim", num_heads > 0 ? hidden_size / num_heads : 0)),
        vocab_size(c.get_int("vocab_size")),
        rms_norm_eps(c.get_double("rms_norm_eps", 1e-6)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", false)),
        rope(rope_parameters(c)),
        activation(loadkit::activation(c, "hidden_act", "silu")) {
    if (num_layers < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || hidden_size <= 0)
      fail(ErrorKind::Input, c.origin(), ": layer, head and hidden sizes must be positive");
    // As transformers' Qwen2Config: the window counts only with use_sliding_window; it applies to the
    // layers layer_types marks "sliding_attention", or (configs without layer_types) to the layers
    // from max_window_layers on.
    const int64_t window = c.get_bool("use_sliding_window", false) ? c.get_int("sliding_window", 0) : 0;
    sliding_window.assign(num_layers, 0);
    if (window <= 0) return;
    if (c.has("layer_types")) {
      auto types = c.get_strings("layer_types");
      for (int64_t i = 0; i < num_layers && i < static_cast<int64_t>(types.size()); ++i)
        if (types[i] == "sliding_attention") sliding_window[i] = window;
    } else {
      const int64_t first = c.get_int("max_window_layers", num_layers);
      for (int64_t i = std::max<int64_t>(first, 0); i < num_layers; ++i) sliding_window[i] = window;
    }
  }

  SelfAttentionSpec attention(int64_t layer) const {
    return {.hidden_size = hidden_size, .num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = head_dim,
            .qkv_bias = true, .o_bias = false, .rope = rope,
            .attention = {.sliding_window = sliding_window[layer]}};
  }
};

class Qwen2DecoderLayer : public Module {
 public:
  Qwen2DecoderLayer(const Qwen2Config& cfg, int64_t layer, const ModelContext& ctx) : Module("Qwen2DecoderLayer") {
    attn_ = &add_module("self_attn", std::make_shared<RotarySelfAttention>("Qwen2Attention", cfg.attention(layer), ctx));
    mlp_ = &add_module("mlp", std::make_shared<GatedMLP>("Qwen2MLP", cfg.hidden_size, cfg.intermediate_size,
                                                         cfg.activation, ctx));
    input_norm_ = &add_module("input_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
    post_norm_ = &add_module("post_attention_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
  }
  at::Tensor forward(const at::Tensor& positions, at::Tensor h) {
    h = h + attn_->forward(positions, input_norm_->forward(h));
    return h + mlp_->forward(post_norm_->forward(h));
  }

 private:
  RotarySelfAttention* attn_;
  GatedMLP* mlp_;
  RMSNorm* input_norm_;
  RMSNorm* post_norm_;
};

class Qwen2Model : public Module {
 public:
  Qwen2Model(const Qwen2Config& cfg, const ModelContext& ctx) : Module("Qwen2Model") {
    embed_ = &add_module("embed_tokens", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    auto& layers = add_module("layers", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i)
      layers_.push_back(&layers.append(std::make_shared<Qwen2DecoderLayer>(cfg, i, ctx)));
    norm_ = &add_module("norm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
  }
  at::Tensor forward(const at::Tensor& ids) {
    at::Tensor positions = at::arange(ids.size(0), ids.options());
    at::Tensor h = embed_->forward(ids);
    for (auto* layer : layers_) h = layer->forward(positions, h);
    return norm_->forward(h);
  }
  VocabParallelEmbedding& embed_tokens() { return *embed_; }

 private:
  VocabParallelEmbedding* embed_;
  std::vector<Qwen2DecoderLayer*> layers_;
  RMSNorm* norm_;
};

class Qwen2ForCausalLM : public CausalLM {
 public:
  explicit Qwen2ForCausalLM(const ModelContext& ctx) : CausalLM("Qwen2ForCausalLM"), cfg_(ctx.config) {
    model_ = &add_module("model", std::make_shared<Qwen2Model>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(model_->embed_tokens());
  }
  at::Tensor forward(const at::Tensor& ids) override { return lm_head_->compute_logits(model_->forward(ids)); }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  WeightMapping weight_mapping() const override {
    WeightMapping m;
    m.stacked = decoder_stacked_params();
    m.skip_substrs = {"rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    return m;
  }

 private:
  Qwen2Config cfg_;
  Qwen2Model* model_;
  ParallelLMHead* lm_head_;
};

void register_qwen2(Registrar& registrar) {
  registrar.add_architecture("Qwen2ForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<Qwen2ForCausalLM>(ctx); });
}

}  // namespace

LOADKIT_PLUGIN("qwen2", "1.0.0", register_qwen2)
