// Phi-3 (and Phi-4-mini, which keeps the architecture name): a Llama whose
// checkpoint stores q/k/v fused in `qkv_proj` and gate/up fused in
// `gate_up_proj`. The fused tensors load without a shard id: the QKV and
// merged-column loaders split them into the q/k/v (gate/up) parts and take
// this rank's rows of each, so tensor parallelism sees the same shards as a
// checkpoint with separate projections. Rope: default or longrope (short and
// long factors, switched on the sequence length as transformers does),
// optionally partial; an optional sliding window on every layer.
// Module and parameter names are vLLM's (vllm/model_executor/models/phi3.py reuses llama.py).

#include <ATen/ATen.h>

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

/// What Phi3 reads from config.json.
struct Phi3Config {
  int64_t hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size;
  double rms_norm_eps;
  bool tie_word_embeddings;
  RopeParameters rope;
  int64_t rotary_dim;
  int64_t sliding_window;  ///< 0 = full attention

  explicit Phi3Config(const ModelConfig& c)
      : hidden_size(c.get_int("hidden_size")),
        intermediate_size(c.get_int("intermediate_size")),
        num_layers(c.get_int("num_hidden_layers")),
        num_heads(c.get_int("num_attention_heads")),
        num_kv_heads(c.get_int("num_key_value_heads", num_heads)),
        head_dim(num_heads > 0 ? c.get_int("head_dim", hidden_size / num_heads) : 0),
        vocab_size(c.get_int("vocab_size")),
        rms_norm_eps(c.get_double("rms_norm_eps", 1e-5)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", false)),
        rope(rope_parameters(c)),
        sliding_window(c.get_int("sliding_window", 0)) {
    const std::string act = c.get_string("hidden_act", "silu");
    if (act != "silu") fail(ErrorKind::Input, c.origin(), ": hidden_act '", act, "' is not supported (want silu)");
    if (num_layers < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || hidden_size <= 0)
      fail(ErrorKind::Input, c.origin(), ": layer, head and hidden sizes must be positive");
    // Phi3Config renames the pre-release spellings of longrope.
    if (rope.type == "su" || rope.type == "yarn") rope.type = "longrope";
    // transformers 5 keeps partial_rotary_factor in rope_parameters; older configs at the top level.
    const double partial = rope.scaling.get_double("partial_rotary_factor", c.get_double("partial_rotary_factor", 1.0));
    rotary_dim = static_cast<int64_t>(static_cast<double>(head_dim) * partial);
    if (rotary_dim <= 0 || rotary_dim > head_dim || rotary_dim % 2 != 0)
      fail(ErrorKind::Input, c.origin(), ": partial_rotary_factor ", partial, " gives ", rotary_dim,
           " rotary dims of head_dim ", head_dim, " (want an even number in 2..head_dim)");
  }
};

class Phi3Attention : public Module {
 public:
  Phi3Attention(const Phi3Config& cfg, const ModelContext& ctx) : Module("Phi3Attention") {
    qkv_ = &add_module("qkv_proj", std::make_shared<QKVParallelLinear>(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                                                       cfg.num_kv_heads, ctx));
    o_ = &add_module("o_proj", std::make_shared<RowParallelLinear>(cfg.num_heads * cfg.head_dim, cfg.hidden_size, ctx));
    rotary_ = &add_module("rotary_emb", std::make_shared<RotaryEmbedding>(cfg.head_dim, cfg.rotary_dim, cfg.rope, ctx));
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

class Phi3MLP : public Module {
 public:
  Phi3MLP(const Phi3Config& cfg, const ModelContext& ctx) : Module("Phi3MLP") {
    gate_up_ = &add_module("gate_up_proj", std::make_shared<MergedColumnParallelLinear>(
                                               cfg.hidden_size,
                                               std::vector<int64_t>{cfg.intermediate_size, cfg.intermediate_size}, ctx));
    down_ = &add_module("down_proj", std::make_shared<RowParallelLinear>(cfg.intermediate_size, cfg.hidden_size, ctx));
  }
  /// transformers: gate, up = gate_up.chunk(2); up * silu(gate).
  at::Tensor forward(const at::Tensor& x) { return down_->forward(silu_and_mul(gate_up_->forward(x))); }

 private:
  MergedColumnParallelLinear* gate_up_;
  RowParallelLinear* down_;
};

class Phi3DecoderLayer : public Module {
 public:
  Phi3DecoderLayer(const Phi3Config& cfg, const ModelContext& ctx) : Module("Phi3DecoderLayer") {
    attn_ = &add_module("self_attn", std::make_shared<Phi3Attention>(cfg, ctx));
    mlp_ = &add_module("mlp", std::make_shared<Phi3MLP>(cfg, ctx));
    input_norm_ = &add_module("input_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
    post_norm_ = &add_module("post_attention_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
  }
  at::Tensor forward(const at::Tensor& positions, at::Tensor h) {
    h = h + attn_->forward(positions, input_norm_->forward(h));
    return h + mlp_->forward(post_norm_->forward(h));
  }

 private:
  Phi3Attention* attn_;
  Phi3MLP* mlp_;
  RMSNorm* input_norm_;
  RMSNorm* post_norm_;
};

class Phi3Model : public Module {
 public:
  Phi3Model(const Phi3Config& cfg, const ModelContext& ctx) : Module("Phi3Model") {
    embed_ = &add_module("embed_tokens", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    auto& layers = add_module("layers", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i) layers_.push_back(&layers.append(std::make_shared<Phi3DecoderLayer>(cfg, ctx)));
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
  std::vector<Phi3DecoderLayer*> layers_;
  RMSNorm* norm_;
};

class Phi3ForCausalLM : public CausalLM {
 public:
  explicit Phi3ForCausalLM(const ModelContext& ctx) : CausalLM("Phi3ForCausalLM"), cfg_(ctx.config) {
    model_ = &add_module("model", std::make_shared<Phi3Model>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(model_->embed_tokens());
  }
  at::Tensor forward(const at::Tensor& ids) override { return lm_head_->compute_logits(model_->forward(ids)); }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  WeightMapping weight_mapping() const override {
    WeightMapping m;
    // Phi3 checkpoints name the fused parameters themselves (no shard id: the loaders split them).
    // Separate projections, as Llama-converted checkpoints have, load as shards like vLLM's Llama.
    m.stacked = {
        {".qkv_proj", ".q_proj", {"q"}},         {".qkv_proj", ".k_proj", {"k"}},
        {".qkv_proj", ".v_proj", {"v"}},         {".gate_up_proj", ".gate_proj", {"0"}},
        {".gate_up_proj", ".up_proj", {"1"}},
    };
    m.skip_substrs = {"rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    return m;
  }

 private:
  Phi3Config cfg_;
  Phi3Model* model_;
  ParallelLMHead* lm_head_;
};

void register_phi3(Registrar& registrar) {
  registrar.add_architecture("Phi3ForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<Phi3ForCausalLM>(ctx); });
}

}  // namespace

LOADKIT_PLUGIN("phi3", "1.0.0", register_phi3)
