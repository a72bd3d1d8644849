// StarCoder2: pre-LayerNorm blocks (LayerNorm with bias, `norm_epsilon`),
// separate q/k/v projections stacked into vLLM's qkv_proj, a plain two-layer
// MLP c_fc → gelu → c_proj, biases on every projection when `use_bias`,
// rope, GQA and a sliding window on every layer when `sliding_window` is set.
// Module and parameter names are vLLM's (vllm/model_executor/models/starcoder2.py).

#include <ATen/ATen.h>

#include <loadkit/causal_lm.h>
#include <loadkit/error.h>
#include <loadkit/layers/activation.h>
#include <loadkit/layers/attention.h>
#include <loadkit/layers/embedding.h>
#include <loadkit/layers/linear.h>
#include <loadkit/layers/norm.h>
#include <loadkit/layers/rotary.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What StarCoder2 reads from config.json.
struct Starcoder2Config {
  int64_t hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size;
  double norm_epsilon;
  bool use_bias, tie_word_embeddings;
  ActivationFn activation;
  RopeParameters rope;
  int64_t sliding_window;  ///< 0 = full attention

  explicit Starcoder2Config(const ModelConfig& c)
      : hidden_size(c.get_int("hidden_size")),
        intermediate_size(c.get_int("intermediate_size")),
        num_layers(c.get_int("num_hidden_layers")),
        num_heads(c.get_int("num_attention_heads")),
        num_kv_heads(c.get_int("num_key_value_heads", num_heads)),
        head_dim(num_heads > 0 ? c.get_int("head_dim", hidden_size / num_heads) : 0),
        vocab_size(c.get_int("vocab_size")),
        norm_epsilon(c.get_double("norm_epsilon", 1e-5)),
        use_bias(c.get_bool("use_bias", true)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", true)),  // StarCoder2's default
        activation(loadkit::activation(c, "hidden_act", "gelu_pytorch_tanh")),
        rope(rope_parameters(c)),
        sliding_window(c.get_int("sliding_window", 0)) {
    if (num_layers < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || hidden_size <= 0)
      fail(ErrorKind::Input, c.origin(), ": layer, head and hidden sizes must be positive");
  }
};

class Starcoder2Attention : public Module {
 public:
  Starcoder2Attention(const Starcoder2Config& cfg, const ModelContext& ctx) : Module("Starcoder2Attention") {
    const LinearOptions opts{.bias = cfg.use_bias};
    qkv_ = &add_module("qkv_proj", std::make_shared<QKVParallelLinear>(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                                                       cfg.num_kv_heads, ctx, opts));
    o_ = &add_module("o_proj",
                     std::make_shared<RowParallelLinear>(cfg.num_heads * cfg.head_dim, cfg.hidden_size, ctx, opts));
    rotary_ = &add_module("rotary_emb", std::make_shared<RotaryEmbedding>(cfg.head_dim, cfg.head_dim, cfg.rope, ctx));
    attn_ = &add_module("attn", std::make_shared<Attention>(qkv_->num_heads(), qkv_->num_kv_heads(), cfg.head_dim,
                                                            AttentionOptions{.sliding_window = cfg.sliding_window}));
  }

  at::Tensor forward(const at::Tensor& positions, const at::Tensor& x) {
    const int64_t n = x.size(0), hd = qkv_->head_size();
    const int64_t q_size = qkv_->num_heads() * hd, kv_size = qkv_->num_kv_heads() * hd;
    at::Tensor qkv = qkv_->forward(x);
    at::Tensor q = qkv.narrow(-1, 0, q_size).view({n, -1, hd});
    at::Tensor k = qkv.narrow(-1, q_size, kv_size).view({n, -1, hd});
    at::Tensor v = qkv.narrow(-1, q_size + kv_size, kv_size);
    std::tie(q, k) = rotary_->forward(positions, q, k);
    return o_->forward(attn_->forward(q.reshape({n, q_size}), k.reshape({n, kv_size}), v));
  }

 private:
  QKVParallelLinear* qkv_;
  RowParallelLinear* o_;
  RotaryEmbedding* rotary_;
  Attention* attn_;
};

class Starcoder2MLP : public Module {
 public:
  Starcoder2MLP(const Starcoder2Config& cfg, const ModelContext& ctx)
      : Module("Starcoder2MLP"), activation_(cfg.activation) {
    const LinearOptions opts{.bias = cfg.use_bias};
    c_fc_ = &add_module("c_fc", std::make_shared<ColumnParallelLinear>(cfg.hidden_size, cfg.intermediate_size, ctx, opts));
    c_proj_ =
        &add_module("c_proj", std::make_shared<RowParallelLinear>(cfg.intermediate_size, cfg.hidden_size, ctx, opts));
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = c_fc_->forward(x);
    h = activation_(h);
    return c_proj_->forward(h);
  }

 private:
  ActivationFn activation_;
  ColumnParallelLinear* c_fc_;
  RowParallelLinear* c_proj_;
};

class Starcoder2DecoderLayer : public Module {
 public:
  Starcoder2DecoderLayer(const Starcoder2Config& cfg, const ModelContext& ctx) : Module("Starcoder2DecoderLayer") {
    attn_ = &add_module("self_attn", std::make_shared<Starcoder2Attention>(cfg, ctx));
    mlp_ = &add_module("mlp", std::make_shared<Starcoder2MLP>(cfg, ctx));
    // nn.LayerNorm: always with bias, whatever use_bias says.
    input_norm_ = &add_module("input_layernorm", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.norm_epsilon, ctx));
    post_norm_ =
        &add_module("post_attention_layernorm", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.norm_epsilon, ctx));
  }
  at::Tensor forward(const at::Tensor& positions, at::Tensor h) {
    h = h + attn_->forward(positions, input_norm_->forward(h));
    return h + mlp_->forward(post_norm_->forward(h));
  }

 private:
  Starcoder2Attention* attn_;
  Starcoder2MLP* mlp_;
  LayerNorm* input_norm_;
  LayerNorm* post_norm_;
};

class Starcoder2Model : public Module {
 public:
  Starcoder2Model(const Starcoder2Config& cfg, const ModelContext& ctx) : Module("Starcoder2Model") {
    embed_ = &add_module("embed_tokens", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    auto& layers = add_module("layers", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i)
      layers_.push_back(&layers.append(std::make_shared<Starcoder2DecoderLayer>(cfg, ctx)));
    norm_ = &add_module("norm", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.norm_epsilon, ctx));
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
  std::vector<Starcoder2DecoderLayer*> layers_;
  LayerNorm* norm_;
};

class Starcoder2ForCausalLM : public CausalLM {
 public:
  explicit Starcoder2ForCausalLM(const ModelContext& ctx) : CausalLM("Starcoder2ForCausalLM"), cfg_(ctx.config) {
    model_ = &add_module("model", std::make_shared<Starcoder2Model>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(model_->embed_tokens());
  }
  at::Tensor forward(const at::Tensor& ids) override { return lm_head_->compute_logits(model_->forward(ids)); }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  WeightMapping weight_mapping() const override {
    WeightMapping m;
    m.stacked = {{".qkv_proj", ".q_proj", {"q"}}, {".qkv_proj", ".k_proj", {"k"}}, {".qkv_proj", ".v_proj", {"v"}}};
    m.skip_substrs = {"rotary_emb.inv_freq"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    return m;
  }

 private:
  Starcoder2Config cfg_;
  Starcoder2Model* model_;
  ParallelLMHead* lm_head_;
};

void register_starcoder2(Registrar& registrar) {
  registrar.add_architecture("Starcoder2ForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<Starcoder2ForCausalLM>(ctx); });
}

}  // namespace

LOADKIT_PLUGIN("starcoder2", "1.0.0", register_starcoder2)
