// GPTBigCode (SantaCoder, StarCoder): GPT-2's layout with nn.Linear weights and
// multi-query attention. Module and parameter names are vLLM's
// (transformer.h.N.attn.c_attn.weight, …).
//
// c_attn fuses q, k and v along its output dim, in one of two layouts:
//   - multi_query (the usual case): [q (hidden) | k (head_dim) | v (head_dim)],
//     one kv head shared by every query head: it loads as it is;
//   - multi_query false: per head [q_h | k_h | v_h] (transformers views the
//     output as [heads, 3 * head_dim]): regrouped into [q | k | v] on loading,
//     so that QKVParallelLinear can give every rank its heads.

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

/// transformers' GPTBigCodeConfig writes n_embd, n_layer, …; a config may use the generic names instead.
int64_t int_either(const ModelConfig& c, const char* gpt2_key, const char* generic_key) {
  return c.has(gpt2_key) ? c.get_int(gpt2_key) : c.get_int(generic_key);
}

/// What GPTBigCode reads from config.json.
struct BigCodeConfig {
  int64_t hidden_size, num_layers, num_heads, head_dim, num_kv_heads, inner_size, max_positions, vocab_size;
  double layer_norm_eps;
  bool tie_word_embeddings, multi_query;
  double attention_scale;
  ActivationFn act;

  explicit BigCodeConfig(const ModelConfig& c)
      : hidden_size(int_either(c, "n_embd", "hidden_size")),
        num_layers(int_either(c, "n_layer", "num_hidden_layers")),
        num_heads(int_either(c, "n_head", "num_attention_heads")),
        head_dim(num_heads > 0 ? hidden_size / num_heads : 0),
        inner_size(c.get_int("n_inner", 4 * hidden_size)),  // null means 4 * hidden
        max_positions(int_either(c, "n_positions", "max_position_embeddings")),
        vocab_size(c.get_int("vocab_size")),
        layer_norm_eps(c.get_double("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", true)),
        multi_query(c.get_bool("multi_query", true)),
        attention_scale(c.get_bool("scale_attn_weights", true) && head_dim > 0
                            ? 1.0 / std::sqrt(static_cast<double>(head_dim))
                            : 1.0),
        act(activation(c, "activation_function", "gelu_pytorch_tanh")) {
    num_kv_heads = multi_query ? 1 : num_heads;
    if (num_layers < 0 || num_heads <= 0 || hidden_size <= 0 || inner_size <= 0 || max_positions <= 0)
      fail(ErrorKind::Input, c.origin(), ": layer, head, hidden, inner and position sizes must be positive");
    if (hidden_size % num_heads != 0)
      fail(ErrorKind::Input, c.origin(), ": n_embd ", hidden_size, " is not a multiple of n_head ", num_heads);
    if (c.get_bool("add_cross_attention", false))
      fail(ErrorKind::Input, c.origin(), ": add_cross_attention is not supported (decoder-only GPTBigCode only)");
  }
};

/// multi_query false: c_attn rows [heads, (q, k, v), head_dim] → [(q, k, v), heads, head_dim], weight and bias alike.
TensorLayout per_head_qkv(std::string suffix, int64_t heads, int64_t head_dim) {
  return {std::move(suffix), [heads, head_dim](const at::Tensor& t) {
            if (t.dim() < 1 || t.size(0) != 3 * heads * head_dim)
              fail(ErrorKind::Input, "shape ", shape_str(t.sizes()), " is not ", heads, " heads of fused q, k, v (",
                   3 * heads * head_dim, " rows)");
            std::vector<int64_t> grouped{heads, 3, head_dim}, fused{3 * heads * head_dim};
            for (int64_t d = 1; d < t.dim(); ++d) {
              grouped.push_back(t.size(d));
              fused.push_back(t.size(d));
            }
            return t.reshape(grouped).transpose(0, 1).reshape(fused);
          }};
}

/// Learned absolute positions: a plain embedding, whole on every rank (vLLM's nn.Embedding wpe).
class PositionEmbedding : public Module {
 public:
  PositionEmbedding(int64_t max_positions, int64_t dim, const ModelContext& ctx) : Module("Embedding") {
    add_parameter("weight", at::empty({max_positions, dim}, ctx.options()));
  }
  at::Tensor forward(const at::Tensor& positions) const { return at::embedding(param("weight").data, positions); }
};

class BigCodeAttention : public Module {
 public:
  BigCodeAttention(const BigCodeConfig& cfg, const ModelContext& ctx) : Module("GPTBigCodeAttention") {
    c_attn_ = &add_module("c_attn", std::make_shared<QKVParallelLinear>(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                                                        cfg.num_kv_heads, ctx,
                                                                        LinearOptions{.bias = true}));
    c_proj_ = &add_module("c_proj", std::make_shared<RowParallelLinear>(cfg.hidden_size, cfg.hidden_size, ctx,
                                                                        LinearOptions{.bias = true}));
    attn_ = &add_module("attn", std::make_shared<Attention>(c_attn_->num_heads(), c_attn_->num_kv_heads(), cfg.head_dim,
                                                            AttentionOptions{.scale = cfg.attention_scale}));
  }

  at::Tensor forward(const at::Tensor& x) {
    const int64_t q_size = c_attn_->num_heads() * c_attn_->head_size();
    const int64_t kv_size = c_attn_->num_kv_heads() * c_attn_->head_size();
    at::Tensor qkv = c_attn_->forward(x);
    return c_proj_->forward(attn_->forward(qkv.narrow(-1, 0, q_size), qkv.narrow(-1, q_size, kv_size),
                                           qkv.narrow(-1, q_size + kv_size, kv_size)));
  }

 private:
  QKVParallelLinear* c_attn_;
  RowParallelLinear* c_proj_;
  Attention* attn_;
};

class BigCodeMLP : public Module {
 public:
  BigCodeMLP(const BigCodeConfig& cfg, const ModelContext& ctx) : Module("GPTBigMLP"), act_(cfg.act) {
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

class BigCodeBlock : public Module {
 public:
  BigCodeBlock(const BigCodeConfig& cfg, const ModelContext& ctx) : Module("GPTBigCodeBlock") {
    ln_1_ = &add_module("ln_1", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps, ctx));
    attn_ = &add_module("attn", std::make_shared<BigCodeAttention>(cfg, ctx));
    ln_2_ = &add_module("ln_2", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps, ctx));
    mlp_ = &add_module("mlp", std::make_shared<BigCodeMLP>(cfg, ctx));
  }
  at::Tensor forward(at::Tensor h) {
    h = h + attn_->forward(ln_1_->forward(h));
    return h + mlp_->forward(ln_2_->forward(h));
  }

 private:
  LayerNorm* ln_1_;
  BigCodeAttention* attn_;
  LayerNorm* ln_2_;
  BigCodeMLP* mlp_;
};

class BigCodeModel : public Module {
 public:
  BigCodeModel(const BigCodeConfig& cfg, const ModelContext& ctx)
      : Module("GPTBigCodeModel"), max_positions_(cfg.max_positions) {
    wte_ = &add_module("wte", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    wpe_ = &add_module("wpe", std::make_shared<PositionEmbedding>(cfg.max_positions, cfg.hidden_size, ctx));
    auto& h = add_module("h", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i) blocks_.push_back(&h.append(std::make_shared<BigCodeBlock>(cfg, ctx)));
    ln_f_ = &add_module("ln_f", std::make_shared<LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps, ctx));
  }
  at::Tensor forward(const at::Tensor& ids) {
    if (ids.size(0) > max_positions_)
      fail(ErrorKind::Input, "GPTBigCode: ", ids.size(0), " tokens exceed the model's ", max_positions_,
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
  std::vector<BigCodeBlock*> blocks_;
  LayerNorm* ln_f_;
};

class GPTBigCodeForCausalLM : public CausalLM {
 public:
  explicit GPTBigCodeForCausalLM(const ModelContext& ctx) : CausalLM("GPTBigCodeForCausalLM"), cfg_(ctx.config) {
    transformer_ = &add_module("transformer", std::make_shared<BigCodeModel>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(transformer_->wte());
  }
  at::Tensor forward(const at::Tensor& ids) override { return lm_head_->compute_logits(transformer_->forward(ids)); }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  WeightMapping weight_mapping() const override {
    WeightMapping m;
    // First matching rule wins: names already under transformer. or lm_head. stay, the rest gain the prefix.
    m.mapper.prefixes = {{"transformer.", "transformer."}, {"lm_head.", "lm_head."}, {"", "transformer."}};
    // Causal-mask buffers some exports carry; ".attn.bias" never matches "c_attn.bias".
    m.skip_substrs = {".attn.bias", ".attn.masked_bias"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    if (!cfg_.multi_query)
      m.layouts = {per_head_qkv(".attn.c_attn.weight", cfg_.num_heads, cfg_.head_dim),
                   per_head_qkv(".attn.c_attn.bias", cfg_.num_heads, cfg_.head_dim)};
    return m;
  }

 private:
  BigCodeConfig cfg_;
  BigCodeModel* transformer_;
  ParallelLMHead* lm_head_;
};

void register_gpt_bigcode(Registrar& registrar) {
  registrar.add_architecture("GPTBigCodeForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<GPTBigCodeForCausalLM>(ctx); });
}

}  // namespace

LOADKIT_PLUGIN("gpt_bigcode", "1.0.0", register_gpt_bigcode)
