// Qwen3ForCausalLM as a loadkit plugin, written only against the installed SDK.
//
// Qwen3 is Llama's layout plus one thing: q and k are RMS-normalised per head
// (`q_norm`, `k_norm`, weights of size head_dim) after the projection and
// before the rotary embedding. Names are vLLM's:
//   model.layers.N.self_attn.{qkv_proj,o_proj,q_norm,k_norm}.weight
//   model.layers.N.mlp.{gate_up_proj,down_proj}.weight
// Checkpoint names (q_proj, k_proj, v_proj, gate_proj, up_proj) are mapped onto
// the fused parameters by the SDK's weight mapping, declared as data below.

#include <ATen/ATen.h>

#include <algorithm>

#include <loadkit/causal_lm.h>
#include <loadkit/error.h>
#include <loadkit/layers/attention.h>
#include <loadkit/layers/embedding.h>
#include <loadkit/layers/linear.h>
#include <loadkit/layers/norm.h>
#include <loadkit/layers/rotary.h>
#include <loadkit/plugin.h>

namespace {

using namespace loadkit;

/// What Qwen3 reads from config.json (transformers' Qwen3Config).
struct Qwen3Config {
  int64_t hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size;
  double rms_norm_eps;
  bool tie_word_embeddings, attention_bias;
  RopeParameters rope;
  std::vector<int64_t> sliding_window;  ///< per layer, 0 = full attention

  explicit Qwen3Config(const ModelConfig& c)
      : hidden_size(c.get_int("hidden_size")),
        intermediate_size(c.get_int("intermediate_size")),
        num_layers(c.get_int("num_hidden_layers")),
        num_heads(c.get_int("num_attention_heads")),
        num_kv_heads(c.get_int("num_key_value_heads", num_heads)),
        head_dim(c.get_int("head_dim", hidden_size / std::max<int64_t>(num_heads, 1))),
        vocab_size(c.get_int("vocab_size")),
        rms_norm_eps(c.get_double("rms_norm_eps", 1e-6)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", false)),
        attention_bias(c.get_bool("attention_bias", false)),
        rope(rope_parameters(c)) {
    const std::string act = c.get_string("hidden_act", "silu");
    if (act != "silu") fail(ErrorKind::Input, c.origin(), ": hidden_act '", act, "' is not supported (want silu)");
    if (num_layers < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || hidden_size <= 0)
      fail(ErrorKind::Input, c.origin(), ": layer, head and hidden sizes must be positive");
    // Sliding window only where use_sliding_window says so, on the layers layer_types marks.
    sliding_window.assign(num_layers, 0);
    if (c.get_bool("use_sliding_window", false) && c.has("layer_types")) {
      const int64_t window = c.get_int("sliding_window");
      auto types = c.get_strings("layer_types");
      for (int64_t i = 0; i < num_layers && i < static_cast<int64_t>(types.size()); ++i)
        if (types[i] == "sliding_attention") sliding_window[i] = window;
    }
  }
};

class Qwen3Attention : public Module {
 public:
  Qwen3Attention(const Qwen3Config& cfg, int64_t layer, const ModelContext& ctx) : Module("Qwen3Attention") {
    const LinearOptions bias{.bias = cfg.attention_bias};
    qkv_ = &add_module("qkv_proj", std::make_shared<QKVParallelLinear>(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                                                       cfg.num_kv_heads, ctx, bias));
    o_ = &add_module("o_proj", std::make_shared<RowParallelLinear>(cfg.num_heads * cfg.head_dim, cfg.hidden_size, ctx,
                                                                   bias));
    q_norm_ = &add_module("q_norm", std::make_shared<RMSNorm>(cfg.head_dim, cfg.rms_norm_eps, ctx));
    k_norm_ = &add_module("k_norm", std::make_shared<RMSNorm>(cfg.head_dim, cfg.rms_norm_eps, ctx));
    rotary_ = &add_module("rotary_emb", std::make_shared<RotaryEmbedding>(cfg.head_dim, cfg.head_dim, cfg.rope, ctx));
    attn_ = &add_module("attn", std::make_shared<Attention>(qkv_->num_heads(), qkv_->num_kv_heads(), cfg.head_dim,
                                                            AttentionOptions{.sliding_window = cfg.sliding_window[layer]}));
  }

  at::Tensor forward(const at::Tensor& positions, const at::Tensor& x) {
    const int64_t n = x.size(0), hd = qkv_->head_size();
    const int64_t q_size = qkv_->num_heads() * hd, kv_size = qkv_->num_kv_heads() * hd;
    at::Tensor qkv = qkv_->forward(x);
    // The one difference from Llama: per-head RMSNorm of q and k, before rotary.
    at::Tensor q = q_norm_->forward(qkv.narrow(-1, 0, q_size).reshape({n, -1, hd}));
    at::Tensor k = k_norm_->forward(qkv.narrow(-1, q_size, kv_size).reshape({n, -1, hd}));
    at::Tensor v = qkv.narrow(-1, q_size + kv_size, kv_size);
    std::tie(q, k) = rotary_->forward(positions, q, k);
    return o_->forward(attn_->forward(q.reshape({n, q_size}), k.reshape({n, kv_size}), v));
  }

 private:
  QKVParallelLinear* qkv_;
  RowParallelLinear* o_;
  RMSNorm* q_norm_;
  RMSNorm* k_norm_;
  RotaryEmbedding* rotary_;
  Attention* attn_;
};

class Qwen3MLP : public Module {
 public:
  Qwen3MLP(const Qwen3Config& cfg, const ModelContext& ctx) : Module("Qwen3MLP") {
    gate_up_ = &add_module("gate_up_proj", std::make_shared<MergedColumnParallelLinear>(
                                               cfg.hidden_size,
                                               std::vector<int64_t>{cfg.intermediate_size, cfg.intermediate_size}, ctx));
    down_ = &add_module("down_proj", std::make_shared<RowParallelLinear>(cfg.intermediate_size, cfg.hidden_size, ctx));
  }
  at::Tensor forward(const at::Tensor& x) { return down_->forward(silu_and_mul(gate_up_->forward(x))); }

 private:
  MergedColumnParallelLinear* gate_up_;
  RowParallelLinear* down_;
};

class Qwen3DecoderLayer : public Module {
 public:
  Qwen3DecoderLayer(const Qwen3Config& cfg, int64_t layer, const ModelContext& ctx) : Module("Qwen3DecoderLayer") {
    attn_ = &add_module("self_attn", std::make_shared<Qwen3Attention>(cfg, layer, ctx));
    mlp_ = &add_module("mlp", std::make_shared<Qwen3MLP>(cfg, ctx));
    input_norm_ = &add_module("input_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
    post_norm_ = &add_module("post_attention_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
  }
  at::Tensor forward(const at::Tensor& positions, at::Tensor h) {
    h = h + attn_->forward(positions, input_norm_->forward(h));
    return h + mlp_->forward(post_norm_->forward(h));
  }

 private:
  Qwen3Attention* attn_;
  Qwen3MLP* mlp_;
  RMSNorm* input_norm_;
  RMSNorm* post_norm_;
};

class Qwen3Model : public Module {
 public:
  Qwen3Model(const Qwen3Config& cfg, const ModelContext& ctx) : Module("Qwen3Model") {
    embed_ = &add_module("embed_tokens", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    auto& layers = add_module("layers", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i)
      layers_.push_back(&layers.append(std::make_shared<Qwen3DecoderLayer>(cfg, i, ctx)));
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
  std::vector<Qwen3DecoderLayer*> layers_;
  RMSNorm* norm_;
};

class Qwen3ForCausalLM : public CausalLM {
 public:
  explicit Qwen3ForCausalLM(const ModelContext& ctx) : CausalLM("Qwen3ForCausalLM"), cfg_(ctx.config) {
    model_ = &add_module("model", std::make_shared<Qwen3Model>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(model_->embed_tokens());
  }
  at::Tensor forward(const at::Tensor& ids) override { return lm_head_->compute_logits(model_->forward(ids)); }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  /// Checkpoint name → parameter, as data: the SDK's AutoWeightsLoader applies it.
  WeightMapping weight_mapping() const override {
    WeightMapping m;
    m.stacked = {
        // parameter         checkpoint     shard
        {".qkv_proj",        ".q_proj",     {"q"}},
        {".qkv_proj",        ".k_proj",     {"k"}},
        {".qkv_proj",        ".v_proj",     {"v"}},
        {".gate_up_proj",    ".gate_proj",  {"0"}},
        {".gate_up_proj",    ".up_proj",    {"1"}},
    };
    m.skip_substrs = {"rotary_emb.inv_freq"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    return m;
  }

 private:
  Qwen3Config cfg_;
  Qwen3Model* model_;
  ParallelLMHead* lm_head_;
};

void register_qwen3(Registrar& registrar) {
  registrar.add_architecture("Qwen3ForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<Qwen3ForCausalLM>(ctx); });
}

}  // namespace

// The one exported symbol: name, version, and the registration hook.
LOADKIT_PLUGIN("qwen3", "0.1.0", register_qwen3)
