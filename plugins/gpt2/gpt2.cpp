// GPT-2 (GPT2LMHeadModel). Module and parameter names are vLLM's
// (transformer.h.N.attn.c_attn.weight, …); the checkpoint differs from them in
// two ways that the weight mapping declares:
//   - Conv1D layers store their weights [in, out]: c_attn, c_proj and c_fc are
//     transposed on their way into vLLM's [out, in] linears;
//   - older hub checkpoints (gpt2 itself) name tensors without the
//     `transformer.` prefix and carry attn.bias / attn.masked_bias mask buffers.

#include <ATen/ATen.h>

#include <loadkit/causal_lm.h>
#include <loadkit/error.h>
#include <loadkit/layers/activation.h>
#include <loadkit/layers/attention.h>
#include <loadkit/layers/embedding.h>
#include <loadkit/layers/linear.h>
#include <loadkit/layers/norm.h>
#include <loadkit/plugin.h>

#include <cmath>

namespace {

using namespace loadkit;

/// transformers' GPT2Config writes n_embd, n_layer, …; a config may use the generic names instead.
int64_t int_either(const ModelConfig& c, const char* gpt2_key, const char* generic_key) {
  return c.has(gpt2_key) ? c.get_int(gpt2_key) : c.get_int(generic_key);
}

/// What GPT-2 reads from config.json.
struct Gpt2Config {
  int64_t hidden_size, num_layers, num_heads, head_dim, inner_size, max_positions, vocab_size;
  double layer_norm_eps;
  bool tie_word_embeddings, scale_attn_weights, scale_by_inverse_layer_idx, upcast_attn;
  ActivationFn act;

  explicit Gpt2Config(const ModelConfig& c)
      : hidden_size(int_either(c, "n_embd", "hidden_size")),
        num_layers(int_either(c, "n_layer", "num_hidden_layers")),
        num_heads(int_either(c, "n_head", "num_attention_heads")),
        head_dim(num_heads > 0 ? hidden_size / num_heads : 0),
        inner_size(c.get_int("n_inner", 4 * hidden_size)),  // null means 4 * hidden
        max_positions(int_either(c, "n_positions", "max_position_embeddings")),
        vocab_size(c.get_int("vocab_size")),
        layer_norm_eps(c.get_double("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", true)),
        scale_attn_weights(c.get_bool("scale_attn_weights", true)),
        scale_by_inverse_layer_idx(c.get_bool("scale_attn_by_inverse_layer_idx", false)),
        // Changes only the precision of the scores (float32 even in bf16): honoured by computing attention in float32.
        upcast_attn(c.get_bool("reorder_and_upcast_attn", false)),
        act(activation(c, "activation_function", "gelu_new")) {
    if (num_layers < 0 || num_heads <= 0 || hidden_size <= 0 || inner_size <= 0 || max_positions <= 0)
      fail(ErrorKind::Input, c.origin(), ": layer, head, hidden, inner and position sizes must be positive");
    if (hidden_size % num_heads != 0)
      fail(ErrorKind::Input, c.origin(), ": n_embd ", hidden_size, " is not a multiple of n_head ", num_heads);
    if (c.get_bool("add_cross_attention", false))
      fail(ErrorKind::Input, c.origin(), ": add_cross_attention is not supported (decoder-only GPT-2 only)");
  }

  /// Softmax scale of layer `layer`: 1/sqrt(head_dim) unless scale_attn_weights is off, further
  /// divided by layer + 1 with scale_attn_by_inverse_layer_idx (as transformers does).
  double attention_scale(int64_t layer) const {
    double scale = scale_attn_weights ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
    return scale_by_inverse_layer_idx ? scale / static_cast<double>(layer + 1) : scale;
  }
};

/// Learned absolute positions: a plain embedding, whole on every rank (vLLM's nn.Embedding wpe).
class PositionEmbedding : public Module {
 public:
  PositionEmbedding(int64_t max_positions, int64_t dim, const ModelContext& ctx) : Module("Embedding") {
    add_parameter("weight", at::empty({max_positions, dim}, ctx.options()));
  }
  at::Tensor forward(const at::Tensor& positions) const { return at::embedding(param("weight").data, positions); }
};

class Gpt2Attention : public Module {
 public:
  Gpt2Attention(const Gpt2Config& cfg, int64_t layer, const ModelContext& ctx)
      : Module("GPT2Attention"), upcast_(cfg.upcast_attn) {
    c_attn_ = &add_module("c_attn", std::make_shared<QKVParallelLinear>(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                                                        cfg.num_heads, ctx, LinearOptions{.bias = true}));
    c_proj_ = &add_module("c_proj", std::make_shared<RowParallelLinear>(cfg.hidden_size, cfg.hidden_size, ctx,
                                                                        LinearOptions{.bias = true}));
    attn_ = &add_module("attn", std::make_shared<Attention>(c_attn_->num_heads(), c_attn_->num_kv_heads(), cfg.head_dim,
                                                            AttentionOptions{.scale = cfg.attention_scale(layer)}));
  }

  at::Tensor forward(const at::Tensor& x) {
    const int64_t size = c_attn_->num_heads() * c_attn_->head_size();  // q, k and v alike (no GQA in GPT-2)
    at::Tensor qkv = c_attn_->forward(x);
    if (upcast_) qkv = qkv.to(at::kFloat);
    at::Tensor out = attn_->forward(qkv.narrow(-1, 0, size), qkv.narrow(-1, size, size), qkv.narrow(-1, 2 * size, size));
    return c_proj_->forward(out.to(x.scalar_type()));
  }

 private:
  bool upcast_;
  QKVParallelLinear* c_attn_;
  RowParallelLinear* c_proj_;
  Attention* attn_;
};

class Gpt2MLP : public Module {
 public:
  Gpt2MLP(const Gpt2Config& cfg, const ModelContext& ctx) : Module("GPT2MLP"), act_(cfg.act) {
    c_fc_ = &add_module("c_fc", std::make_shared<ColumnParallelLinear>(cfg.hidden_size, cfg.inner_size, ctx,
                                                                       LinearOptions{.bias = true}));
    c_proj_ = &add_module("c_proj", std::make_shared<RowParallelLinear>(cfg.inner_size, cfg.hidden_size, ctx,
                                                                        LinearOptions{.bias = true}));
  }
  at::Tensor forward(const at::Tensor& x) { return c_proj_->forward(act_(c_fc_->forward(x))); }

 private:
  ActivationFn act_;
  ColumnParallelLinear* c_fc_;
  RowParallelLinear* c_proj_;
};

class Gpt2Block : public Module {
 public:
  Gpt2Block(const Gpt2Config& cfg, int64_t layer, const ModelContext& ctx) : Module("GPT2Block") {
    ln_1_ = &add_module("ln_1", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps, ctx));
    attn_ = &add_module("attn", std::make_shared<Gpt2Attention>(cfg, layer, ctx));
    ln_2_ = &add_module("ln_2", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps, ctx));
    mlp_ = &add_module("mlp", std::make_shared<Gpt2MLP>(cfg, ctx));
  }
  at::Tensor forward(at::Tensor h) {
    h = h + attn_->forward(ln_1_->forward(h));
    return h + mlp_->forward(ln_2_->forward(h));
  }

 private:
  LayerNorm* ln_1_;
  Gpt2Attention* attn_;
  LayerNorm* ln_2_;
  Gpt2MLP* mlp_;
};

class Gpt2Model : public Module {
 public:
  Gpt2Model(const Gpt2Config& cfg, const ModelContext& ctx) : Module("GPT2Model"), max_positions_(cfg.max_positions) {
    wte_ = &add_module("wte", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    wpe_ = &add_module("wpe", std::make_shared<PositionEmbedding>(cfg.max_positions, cfg.hidden_size, ctx));
    auto& h = add_module("h", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i) blocks_.push_back(&h.append(std::make_shared<Gpt2Block>(cfg, i, ctx)));
    ln_f_ = &add_module("ln_f", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps, ctx));
  }
  at::Tensor forward(const at::Tensor& ids) {
    if (ids.size(0) > max_positions_)
      fail(ErrorKind::Input, "GPT-2: ", ids.size(0), " tokens exceed the model's ", max_positions_,
           " learned positions (n_positions)");
    at::Tensor h = wte_->forward(ids) + wpe_->forward(at::arange(ids.size(0), ids.options()));
    for (auto* block : blocks_) h = block->forward(h);
    return ln_f_->forward(h);
  }
  VocabParallelEmbedding& wte() { return *wte_; }

 private:
  int64_t max_positions_;
  VocabParallelEmbedding* wte_;
  PositionEmbedding* wpe_;
  std::vector<Gpt2Block*> blocks_;
  LayerNorm* ln_f_;
};

class Gpt2LMHeadModel : public CausalLM {
 public:
  explicit Gpt2LMHeadModel(const ModelContext& ctx) : CausalLM("GPT2LMHeadModel"), cfg_(ctx.config) {
    transformer_ = &add_module("transformer", std::make_shared<Gpt2Model>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(transformer_->wte());
  }
  at::Tensor forward(const at::Tensor& ids) override { return lm_head_->compute_logits(transformer_->forward(ids)); }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  WeightMapping weight_mapping() const override {
    WeightMapping m;
    // First matching rule wins: names already under transformer. or lm_head. stay, the rest gain the prefix.
    m.mapper.prefixes = {{"transformer.", "transformer."}, {"lm_head.", "lm_head."}, {"", "transformer."}};
    // Causal-mask buffers of older checkpoints (h.N.attn.bias); ".attn.bias" never matches "c_attn.bias".
    m.skip_substrs = {".attn.bias", ".attn.masked_bias"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    // Conv1D [in, out] weights; their biases are plain vectors. c_attn is q, k, v fused along out.
    m.layouts = {transposed(".attn.c_attn.weight"), transposed(".attn.c_proj.weight"),
                 transposed(".mlp.c_fc.weight"), transposed(".mlp.c_proj.weight")};
    return m;
  }

 private:
  Gpt2Config cfg_;
  Gpt2Model* transformer_;
  ParallelLMHead* lm_head_;
};

void register_gpt2(Registrar& registrar) {
  registrar.add_architecture("GPT2LMHeadModel",
                             [](const ModelContext& ctx) { return std::make_shared<Gpt2LMHeadModel>(ctx); });
}

}  // namespace

LOADKIT_PLUGIN("gpt2", "1.0.0", register_gpt2)
