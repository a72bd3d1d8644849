// DeepSeek-V2: multi-head latent attention (MLA) and DeepSeekMoE (routed
// experts stacked into FusedMoE's w13/w2, shared experts, dense first layers).
// Module and parameter names are vLLM's (model.layers.N.self_attn.kv_b_proj.weight,
// model.layers.N.mlp.experts.w13_weight, model.layers.N.mlp.gate.weight, …);
// numerics follow transformers' DeepseekV2ForCausalLM.
//
// Attention is computed the way vLLM's non-absorbed DeepseekV2Attention does:
// keys and values are expanded from the latent through kv_b_proj at every
// forward, so nothing is derived from kv_b_proj at load time and a reload of
// kv_b_proj is all there is to refresh.

#include <ATen/ATen.h>

#include <loadkit/causal_lm.h>
#include <loadkit/error.h>
#include <loadkit/layers/attention.h>
#include <loadkit/layers/embedding.h>
#include <loadkit/layers/fused_moe.h>
#include <loadkit/layers/linear.h>
#include <loadkit/layers/norm.h>
#include <loadkit/layers/rotary.h>
#include <loadkit/plugin.h>

#include <cmath>

namespace {

using namespace loadkit;

/// transformers' DeepseekV2RMSNorm(q_lora_rank / kv_lora_rank) keeps its default
/// epsilon (as DeepSeek's own code does); only the decoder norms read rms_norm_eps.
constexpr double kLatentNormEps = 1e-6;

/// What DeepSeek-V2 reads from config.json.
struct DeepseekV2Config {
  int64_t hidden_size, intermediate_size, num_layers, num_heads, vocab_size;
  int64_t q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
  int64_t n_routed_experts, n_shared_experts, moe_intermediate_size, num_experts_per_tok;
  int64_t first_k_dense_replace, moe_layer_freq, n_group, topk_group;
  std::string topk_method;
  bool norm_topk_prob;
  double routed_scaling_factor, rms_norm_eps;
  bool tie_word_embeddings, attention_bias;
  RopeParameters rope;
  double softmax_scale;

  explicit DeepseekV2Config(const ModelConfig& c)
      : hidden_size(c.get_int("hidden_size")),
        intermediate_size(c.get_int("intermediate_size")),
        num_layers(c.get_int("num_hidden_layers")),
        num_heads(c.get_int("num_attention_heads")),
        vocab_size(c.get_int("vocab_size")),
        q_lora_rank(c.get_int("q_lora_rank", 0)),  // null: a plain q_proj
        kv_lora_rank(c.get_int("kv_lora_rank")),
        qk_nope_head_dim(c.get_int("qk_nope_head_dim")),
        qk_rope_head_dim(c.get_int("qk_rope_head_dim")),
        v_head_dim(c.get_int("v_head_dim")),
        n_routed_experts(c.get_int("n_routed_experts", 0)),  // null: every layer dense
        n_shared_experts(c.get_int("n_shared_experts", 0)),
        moe_intermediate_size(c.get_int("moe_intermediate_size", 0)),
        num_experts_per_tok(c.get_int("num_experts_per_tok", 0)),
        first_k_dense_replace(c.get_int("first_k_dense_replace", 0)),
        moe_layer_freq(c.get_int("moe_layer_freq", 1)),
        n_group(c.get_int("n_group", 0)),
        topk_group(c.get_int("topk_group", 0)),
        topk_method(c.get_string("topk_method", "greedy")),
        norm_topk_prob(c.get_bool("norm_topk_prob", false)),
        routed_scaling_factor(c.get_double("routed_scaling_factor", 1.0)),
        rms_norm_eps(c.get_double("rms_norm_eps", 1e-6)),
        tie_word_embeddings(c.get_bool("tie_word_embeddings", false)),
        attention_bias(c.get_bool("attention_bias", false)),
        rope(rope_parameters(c)) {
    auto bad = [&](const char* key, const auto&... why) { fail(ErrorKind::Input, c.origin(), ": ", key, why...); };
    if (const std::string act = c.get_string("hidden_act", "silu"); act != "silu")
      bad("hidden_act", " '", act, "' is not supported (want silu)");
    if (c.get_bool("mlp_bias", false)) bad("mlp_bias", " true is not supported (the experts have no bias)");
    if (const std::string f = c.get_string("scoring_func", "softmax"); f != "softmax")
      bad("scoring_func", " '", f, "' is not supported (want softmax)");
    if (num_layers < 0 || num_heads <= 0 || hidden_size <= 0 || kv_lora_rank <= 0 || qk_rope_head_dim <= 0 ||
        qk_rope_head_dim % 2 != 0 || qk_nope_head_dim < 0 || v_head_dim <= 0 || q_lora_rank < 0)
      bad("num_attention_heads", ", kv_lora_rank and the head dims must be positive (qk_rope_head_dim even)");
    if (topk_method == "greedy") {
      n_group = topk_group = 0;
    } else if (topk_method != "group_limited_greedy") {
      bad("topk_method", " '", topk_method, "' is not supported (want greedy or group_limited_greedy)");
    } else if (n_group <= 0 || topk_group <= 0) {
      bad("n_group", " and topk_group must be positive for group_limited_greedy");
    }
    if (n_routed_experts > 0 && (moe_intermediate_size <= 0 || num_experts_per_tok <= 0 || moe_layer_freq <= 0))
      bad("moe_intermediate_size", ", num_experts_per_tok and moe_layer_freq must be positive with routed experts");
    // transformers' scaling: 1/sqrt(qk_head_dim), times mscale² of the stretched context when
    // the rope is scaled and names mscale_all_dim.
    softmax_scale = 1.0 / std::sqrt(static_cast<double>(qk_nope_head_dim + qk_rope_head_dim));
    if (rope.type != "default") {
      const double mscale_all_dim = rope.scaling.get_double("mscale_all_dim", 0.0);
      if (mscale_all_dim != 0.0) {
        const double m = yarn_mscale(rope.scaling.get_double("factor"), mscale_all_dim);
        softmax_scale *= m * m;
      }
    }
  }

  /// vLLM's rule: routed experts from layer first_k_dense_replace on, every moe_layer_freq-th layer.
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
};

class DeepseekV2Attention : public Module {
 public:
  DeepseekV2Attention(const DeepseekV2Config& cfg, const ModelContext& ctx)
      : Module("DeepseekV2Attention"),
        nope_(cfg.qk_nope_head_dim),
        rope_(cfg.qk_rope_head_dim),
        v_(cfg.v_head_dim),
        kv_lora_rank_(cfg.kv_lora_rank) {
    if (cfg.num_heads % ctx.tp_size != 0)
      fail(ErrorKind::Usage, "tensor parallel size ", ctx.tp_size, " does not divide ", cfg.num_heads,
           " attention heads");
    heads_ = cfg.num_heads / ctx.tp_size;
    const int64_t qk_head = nope_ + rope_;
    const LinearOptions biased{.bias = cfg.attention_bias};
    if (cfg.q_lora_rank > 0) {
      q_a_ = &add_module("q_a_proj", std::make_shared<ReplicatedLinear>(cfg.hidden_size, cfg.q_lora_rank, ctx, biased));
      q_a_norm_ = &add_module("q_a_layernorm", std::make_shared<RMSNorm>(cfg.q_lora_rank, kLatentNormEps, ctx));
      q_b_ = &add_module("q_b_proj", std::make_shared<ColumnParallelLinear>(cfg.q_lora_rank, cfg.num_heads * qk_head, ctx));
    } else {
      q_ = &add_module("q_proj", std::make_shared<ColumnParallelLinear>(cfg.hidden_size, cfg.num_heads * qk_head, ctx));
    }
    kv_a_ = &add_module("kv_a_proj_with_mqa", std::make_shared<ReplicatedLinear>(
                                                  cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ctx, biased));
    kv_a_norm_ = &add_module("kv_a_layernorm", std::make_shared<RMSNorm>(cfg.kv_lora_rank, kLatentNormEps, ctx));
    // kv_b_proj stays in the model dtype under online quantization: every key and value is
    // expanded from the latent through it, and vLLM's MLA likewise keeps what it derives from it
    // (W_UK, W_UV) in the activation dtype. Quantized too (fp8 weights and activations), it took
    // the fp8 logits of our fixtures (fp8 emulated in transformers) from cosine >= 0.994 to 0.985.
    kv_b_ = &add_module("kv_b_proj", std::make_shared<ColumnParallelLinear>(
                                         cfg.kv_lora_rank, cfg.num_heads * (nope_ + v_), ctx,
                                         LinearOptions{.quantize = false}));
    o_ = &add_module("o_proj", std::make_shared<RowParallelLinear>(cfg.num_heads * v_, cfg.hidden_size, ctx, biased));
    // DeepSeek rotates interleaved pairs (transformers' complex view), i.e. not neox style.
    rotary_ = &add_module("rotary_emb", std::make_shared<RotaryEmbedding>(rope_, rope_, cfg.rope, ctx, /*neox_style=*/false));
    // Values are zero-padded to the query/key head size, as vLLM does, so one attention serves both.
    attn_ = &add_module("attn", std::make_shared<Attention>(heads_, heads_, qk_head,
                                                            AttentionOptions{.scale = cfg.softmax_scale}));
  }

  at::Tensor forward(const at::Tensor& positions, const at::Tensor& x) {
    const int64_t n = x.size(0), qk_head = nope_ + rope_;
    at::Tensor q = q_ ? q_->forward(x) : q_b_->forward(q_a_norm_->forward(q_a_->forward(x)));
    q = q.view({n, heads_, qk_head});
    at::Tensor latent = kv_a_->forward(x);  // [n, kv_lora_rank + rope]: compressed kv, then the shared rope key
    at::Tensor kv = kv_b_->forward(kv_a_norm_->forward(latent.narrow(-1, 0, kv_lora_rank_)))
                        .view({n, heads_, nope_ + v_});
    at::Tensor k_pe = latent.narrow(-1, kv_lora_rank_, rope_).reshape({n, 1, rope_});
    at::Tensor q_pe;
    std::tie(q_pe, k_pe) = rotary_->forward(positions, q.narrow(-1, nope_, rope_), k_pe);
    q = at::cat({q.narrow(-1, 0, nope_), q_pe}, -1);
    at::Tensor k = at::cat({kv.narrow(-1, 0, nope_), k_pe.expand({n, heads_, rope_})}, -1);
    at::Tensor v = at::constant_pad_nd(kv.narrow(-1, nope_, v_), {0, qk_head - v_});
    at::Tensor out = attn_->forward(q.reshape({n, -1}), k.reshape({n, -1}), v.reshape({n, -1}));
    out = out.view({n, heads_, qk_head}).narrow(-1, 0, v_).reshape({n, heads_ * v_});
    return o_->forward(out);
  }

 private:
  int64_t nope_, rope_, v_, kv_lora_rank_, heads_ = 0;
  ReplicatedLinear* q_a_ = nullptr;
  RMSNorm* q_a_norm_ = nullptr;
  ColumnParallelLinear* q_b_ = nullptr;
  ColumnParallelLinear* q_ = nullptr;
  ReplicatedLinear* kv_a_;
  RMSNorm* kv_a_norm_;
  ColumnParallelLinear* kv_b_;
  RowParallelLinear* o_;
  RotaryEmbedding* rotary_;
  Attention* attn_;
};

class DeepseekV2MLP : public Module {
 public:
  DeepseekV2MLP(int64_t hidden_size, int64_t intermediate_size, const ModelContext& ctx) : Module("DeepseekV2MLP") {
    gate_up_ = &add_module("gate_up_proj", std::make_shared<MergedColumnParallelLinear>(
                                               hidden_size, std::vector<int64_t>{intermediate_size, intermediate_size}, ctx));
    down_ = &add_module("down_proj", std::make_shared<RowParallelLinear>(intermediate_size, hidden_size, ctx));
  }
  at::Tensor forward(const at::Tensor& x) { return down_->forward(silu_and_mul(gate_up_->forward(x))); }

 private:
  MergedColumnParallelLinear* gate_up_;
  RowParallelLinear* down_;
};

/// Router weights in float32: transformers routes in float32 whatever the model dtype.
ModelContext router_context(const ModelContext& ctx) {
  ModelContext out = ctx;
  out.dtype = at::kFloat;
  out.quant = nullptr;
  return out;
}

class DeepseekV2MoE : public Module {
 public:
  DeepseekV2MoE(const DeepseekV2Config& cfg, const ModelContext& ctx) : Module("DeepseekV2MoE") {
    gate_ = &add_module("gate", std::make_shared<ReplicatedLinear>(cfg.hidden_size, cfg.n_routed_experts,
                                                                   router_context(ctx), LinearOptions{.quantize = false}));
    experts_ = &add_module("experts", std::make_shared<FusedMoE>(
                                          FusedMoEOptions{.num_experts = cfg.n_routed_experts,
                                                          .top_k = cfg.num_experts_per_tok,
                                                          .hidden_size = cfg.hidden_size,
                                                          .intermediate_size = cfg.moe_intermediate_size,
                                                          .renormalize = cfg.norm_topk_prob,
                                                          .num_expert_group = cfg.n_group,
                                                          .topk_group = cfg.topk_group,
                                                          .routed_scaling_factor = cfg.routed_scaling_factor},
                                          ctx));
    if (cfg.n_shared_experts > 0)
      shared_ = &add_module("shared_experts", std::make_shared<DeepseekV2MLP>(
                                                  cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ctx));
  }

  at::Tensor forward(const at::Tensor& x) {
    at::Tensor router_logits = at::linear(x.to(at::kFloat), gate_->param("weight").data);
    at::Tensor out = experts_->forward(x, router_logits);
    return shared_ ? out + shared_->forward(x) : out;
  }

 private:
  ReplicatedLinear* gate_;
  FusedMoE* experts_;
  DeepseekV2MLP* shared_ = nullptr;
};

class DeepseekV2DecoderLayer : public Module {
 public:
  DeepseekV2DecoderLayer(const DeepseekV2Config& cfg, int64_t layer, const ModelContext& ctx)
      : Module("DeepseekV2DecoderLayer") {
    attn_ = &add_module("self_attn", std::make_shared<DeepseekV2Attention>(cfg, ctx));
    if (cfg.is_moe_layer(layer))
      moe_ = &add_module("mlp", std::make_shared<DeepseekV2MoE>(cfg, ctx));
    else
      mlp_ = &add_module("mlp", std::make_shared<DeepseekV2MLP>(cfg.hidden_size, cfg.intermediate_size, ctx));
    input_norm_ = &add_module("input_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
    post_norm_ = &add_module("post_attention_layernorm", std::make_shared<RMSNorm>(cfg.hidden_size, cfg.rms_norm_eps, ctx));
  }
  at::Tensor forward(const at::Tensor& positions, at::Tensor h) {
    h = h + attn_->forward(positions, input_norm_->forward(h));
    at::Tensor x = post_norm_->forward(h);
    return h + (moe_ ? moe_->forward(x) : mlp_->forward(x));
  }

 private:
  DeepseekV2Attention* attn_;
  DeepseekV2MoE* moe_ = nullptr;
  DeepseekV2MLP* mlp_ = nullptr;
  RMSNorm* input_norm_;
  RMSNorm* post_norm_;
};

class DeepseekV2Model : public Module {
 public:
  DeepseekV2Model(const DeepseekV2Config& cfg, const ModelContext& ctx) : Module("DeepseekV2Model") {
    embed_ = &add_module("embed_tokens", std::make_shared<VocabParallelEmbedding>(cfg.vocab_size, cfg.hidden_size, ctx));
    auto& layers = add_module("layers", std::make_shared<ModuleList>());
    for (int64_t i = 0; i < cfg.num_layers; ++i)
      layers_.push_back(&layers.append(std::make_shared<DeepseekV2DecoderLayer>(cfg, i, ctx)));
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
  std::vector<DeepseekV2DecoderLayer*> layers_;
  RMSNorm* norm_;
};

class DeepseekV2ForCausalLM : public CausalLM {
 public:
  explicit DeepseekV2ForCausalLM(const ModelContext& ctx) : CausalLM("DeepseekV2ForCausalLM"), cfg_(ctx.config) {
    model_ = &add_module("model", std::make_shared<DeepseekV2Model>(cfg_, ctx));
    lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(cfg_.vocab_size, cfg_.hidden_size, ctx));
    if (cfg_.tie_word_embeddings) lm_head_->tie_to(model_->embed_tokens());
  }
  at::Tensor forward(const at::Tensor& ids) override { return lm_head_->compute_logits(model_->forward(ids)); }
  int64_t vocab_size() const override { return cfg_.vocab_size; }

  WeightMapping weight_mapping() const override {
    WeightMapping m;
    m.stacked = {{".gate_up_proj", ".gate_proj", {"0"}}, {".gate_up_proj", ".up_proj", {"1"}}};
    m.experts = make_expert_params_mapping("gate_proj", "down_proj", "up_proj", cfg_.n_routed_experts);
    // transformers 5's own state dict (what it holds in memory) keeps all experts in one tensor each.
    m.experts.push_back({"experts.w13_weight", "experts.gate_up_proj", {"w13"}});
    m.experts.push_back({"experts.w2_weight", "experts.down_proj", {"w2"}});
    m.skip_substrs = {"rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached"};
    if (cfg_.tie_word_embeddings) m.skip_prefixes = {"lm_head."};
    return m;
  }

 private:
  DeepseekV2Config cfg_;
  DeepseekV2Model* model_;
  ParallelLMHead* lm_head_;
};

void register_deepseek_v2(Registrar& registrar) {
  registrar.add_architecture("DeepseekV2ForCausalLM",
                             [](const ModelContext& ctx) { return std::make_shared<DeepseekV2ForCausalLM>(ctx); });
}

}  // namespace

LOADKIT_PLUGIN("deepseek_v2", "1.0.0", register_deepseek_v2)
