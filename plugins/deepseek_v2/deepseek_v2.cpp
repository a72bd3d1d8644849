// DeepSeek-V2 and DeepSeek-V3 on the SDK's decoder skeleton: multi-head latent attention (MLA) and
// DeepSeekMoE (the SDK's SparseMoEBlock: routed experts stacked into FusedMoE's w13/w2, a
// float32 router, shared experts; dense first layers). The attention stays this plugin's own
// AttentionBlock: MLA has no q/k/v projections to stack — queries and keys/values come from
// low-rank latents (q_a/q_b, kv_a_proj_with_mqa/kv_b_proj) and only part of each head is
// rotated — so RotarySelfAttention does not fit it.
// Module and parameter names are vLLM's (model.layers.N.self_attn.kv_b_proj.weight,
// model.layers.N.mlp.experts.w13_weight, model.layers.N.mlp.gate.weight, …);
// numerics follow transformers' DeepseekV2ForCausalLM.
//
// DeepSeek-V3 is DeepSeek-V2 plus, as transformers' DeepseekV3ForCausalLM computes it:
//  - noaux_tc routing (the SDK's FusedMoE routing with sigmoid scores and the router's
//    e_score_correction_bias, see layers/fused_moe.h), always group-limited;
//  - rope_interleave: DeepSeek's interleaved pairs (true, the default) or neox halves;
//  - multi-token-prediction layers (num_nextn_predict_layers): checkpoints carry them as
//    model.layers.{num_hidden_layers + i}.*; they serve speculative decoding, which loadkit does
//    not run, so their tensors are skipped at load and reload (one info line at load).
//
// Attention is computed the way vLLM's non-absorbed DeepseekV2Attention does:
// keys and values are expanded from the latent through kv_b_proj at every
// forward, so nothing is derived from kv_b_proj at load time and a reload of
// kv_b_proj is all there is to refresh.

#include <ATen/ATen.h>

#include <loadkit/decoder_config.h>
#include <loadkit/error.h>
#include <loadkit/layers/linear.h>
#include <loadkit/layers/sparse_moe.h>
#include <loadkit/notes.h>
#include <loadkit/plugin.h>

#include <cmath>

namespace {

using namespace loadkit;

/// transformers' DeepseekV2RMSNorm(q_lora_rank / kv_lora_rank) keeps its default
/// epsilon (as DeepSeek's own code does); only the decoder norms read rms_norm_eps.
constexpr double kLatentNormEps = 1e-6;

enum class Version { V2, V3 };

/// What DeepSeek-V2 and -V3 read from config.json.
struct DeepseekV2Config {
  Version version;
  int64_t hidden_size, intermediate_size, num_layers, num_heads, vocab_size;
  int64_t q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
  int64_t n_routed_experts, n_shared_experts, moe_intermediate_size, num_experts_per_tok;
  int64_t first_k_dense_replace, moe_layer_freq, n_group, topk_group;
  std::string topk_method;
  bool norm_topk_prob;
  int64_t num_nextn_predict_layers;
  bool rope_interleave;
  double routed_scaling_factor, rms_norm_eps;
  bool tie_word_embeddings, attention_bias;
  RopeParameters rope;
  double softmax_scale;

  DeepseekV2Config(ConfigReader& r, const ModelContext& ctx, Version v)
      : version(v),
        hidden_size(r.positive("hidden_size")),
        intermediate_size(r.positive("intermediate_size")),
        num_layers(r.positive("num_hidden_layers")),
        num_heads(r.positive("num_attention_heads")),
        vocab_size(r.positive("vocab_size")),
        q_lora_rank(r.non_negative("q_lora_rank", 0)),  // null: a plain q_proj
        kv_lora_rank(r.positive("kv_lora_rank")),
        qk_nope_head_dim(r.non_negative("qk_nope_head_dim", 0)),
        qk_rope_head_dim(r.positive("qk_rope_head_dim")),
        v_head_dim(r.positive("v_head_dim")),
        n_routed_experts(r.non_negative("n_routed_experts", 0)),  // null: every layer dense
        n_shared_experts(r.non_negative("n_shared_experts", 0)),
        moe_intermediate_size(r.non_negative("moe_intermediate_size", 0)),
        num_experts_per_tok(r.non_negative("num_experts_per_tok", 0)),
        first_k_dense_replace(r.non_negative("first_k_dense_replace", 0)),
        moe_layer_freq(r.positive("moe_layer_freq", 1)),  // layer % moe_layer_freq
        n_group(r.non_negative("n_group", 0)),
        topk_group(r.non_negative("topk_group", 0)),
        topk_method(r.config().get_string("topk_method", v == Version::V3 ? "noaux_tc" : "greedy")),
        // transformers' defaults differ between the two configs.
        norm_topk_prob(r.config().get_bool("norm_topk_prob", v == Version::V3)),
        num_nextn_predict_layers(v == Version::V3 ? r.non_negative("num_nextn_predict_layers", 0) : 0),
        rope_interleave(v == Version::V2 || r.config().get_bool("rope_interleave", true)),
        routed_scaling_factor(r.config().get_double("routed_scaling_factor", v == Version::V3 ? 2.5 : 1.0)),
        rms_norm_eps(r.config().get_double("rms_norm_eps", 1e-6)),
        tie_word_embeddings(r.config().get_bool("tie_word_embeddings", false)),
        attention_bias(r.config().get_bool("attention_bias", false)),
        rope(rope_parameters(r.config())) {
    const ModelConfig& c = r.config();
    auto bad = [&](const char* key, const auto&... why) { fail(ErrorKind::Input, c.origin(), ": ", key, why...); };
    activation_only(c, "hidden_act", "silu");  // the experts (FusedMoE) compute silu
    if (c.get_bool("mlp_bias", false)) bad("mlp_bias", " true is not supported (the experts have no bias)");
    // transformers scores DeepSeek-V2's experts by softmax and DeepSeek-V3's by sigmoid, whatever the key says.
    const char* scoring = v == Version::V3 ? "sigmoid" : "softmax";
    if (const std::string f = c.get_string("scoring_func", scoring); f != scoring)
      bad("scoring_func", " '", f, "' is not supported (want ", scoring, ")");
    if (qk_rope_head_dim % 2 != 0) bad("qk_rope_head_dim", " (", qk_rope_head_dim, ") must be even (rotated in pairs)");
    const auto element = static_cast<int64_t>(c10::elementSize(ctx.dtype));
    r.sum("qk_head_dim", {"qk_nope_head_dim", "qk_rope_head_dim"});
    r.sum("kv_head_dim", {"qk_nope_head_dim", "v_head_dim"});
    r.allocatable({"num_attention_heads", "qk_head_dim", "hidden_size"}, element, 1, ctx.tp_size);
    r.allocatable({"num_attention_heads", "kv_head_dim", "kv_lora_rank"}, element, 1, ctx.tp_size);
    r.allocatable({"intermediate_size", "hidden_size"}, element, 2, ctx.tp_size);
    if (q_lora_rank > 0) {
      r.allocatable({"q_lora_rank", "hidden_size"}, element);
      r.allocatable({"num_attention_heads", "qk_head_dim", "q_lora_rank"}, element, 1, ctx.tp_size);
    }
    if (v == Version::V3) {
      if (topk_method != "noaux_tc") bad("topk_method", " '", topk_method, "' is not supported (want noaux_tc)");
    } else if (topk_method == "greedy") {
      n_group = topk_group = 0;
    } else if (topk_method != "group_limited_greedy") {
      bad("topk_method", " '", topk_method, "' is not supported (want greedy or group_limited_greedy)");
    }
    if (topk_method != "greedy" && n_routed_experts > 0) {
      r.positive("n_group");
      r.positive("topk_group");
    }
    if (n_routed_experts > 0) {
      r.positive("moe_intermediate_size");
      r.positive("num_experts_per_tok");
      r.at_most("num_experts_per_tok", "n_routed_experts");
      if (n_group > 0) {
        r.divides("n_group", "n_routed_experts");
        r.at_most("topk_group", "n_group");
        const int64_t per_group = r.quotient("experts_per_group", "n_routed_experts", "n_group");
        // noaux_tc scores a group by its two best experts.
        if (v == Version::V3 && per_group < 2)
          bad("n_group", " (", n_group, ") leaves ", per_group, " expert per group of n_routed_experts (",
              n_routed_experts, "): noaux_tc scores a group by its two best experts");
        r.define("routable_experts", topk_group * per_group, "topk_group * (n_routed_experts / n_group)");
        r.at_most("num_experts_per_tok", "routable_experts");
      }
      r.allocatable({"n_routed_experts", "moe_intermediate_size", "hidden_size"}, element, 3, ctx.tp_size);
      if (n_shared_experts > 0)
        r.allocatable({"n_shared_experts", "moe_intermediate_size", "hidden_size"}, element, 3, ctx.tp_size);
    }
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

class DeepseekV2Attention : public AttentionBlock {
 public:
  DeepseekV2Attention(const DeepseekV2Config& cfg, const ModelContext& ctx)
      : AttentionBlock("DeepseekV2Attention"),
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
    // A checkpoint quantized offline (DeepSeek-V3's block fp8) ships it quantized like every other
    // projection: it is then loaded as the checkpoint has it and expanded through its method —
    // vLLM's prefill path; the method dequantizes it wherever its kernel does not take the shapes.
    kv_b_ = &add_module("kv_b_proj", std::make_shared<ColumnParallelLinear>(
                                         cfg.kv_lora_rank, cfg.num_heads * (nope_ + v_), ctx,
                                         LinearOptions{.quantize = ctx.config.has("quantization_config")}));
    o_ = &add_module("o_proj", std::make_shared<RowParallelLinear>(cfg.num_heads * v_, cfg.hidden_size, ctx, biased));
    // DeepSeek rotates interleaved pairs (transformers' complex view), i.e. not neox style, unless a
    // V3 config says rope_interleave false.
    rotary_ = &add_module("rotary_emb", std::make_shared<RotaryEmbedding>(rope_, rope_, cfg.rope, ctx,
                                                                          /*neox_style=*/!cfg.rope_interleave));
    // Values are zero-padded to the query/key head size, as vLLM does, so one attention serves both.
    attn_ = &add_module("attn", std::make_shared<Attention>(heads_, heads_, qk_head,
                                                            AttentionOptions{.scale = cfg.softmax_scale}));
  }

  at::Tensor forward(const at::Tensor& positions, const at::Tensor& x) override {
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

std::shared_ptr<FeedForwardBlock> deepseek_mlp(const DeepseekV2Config& cfg, int64_t layer, const ModelContext& ctx) {
  if (!cfg.is_moe_layer(layer))
    return std::make_shared<GatedMLP>("DeepseekV2MLP", cfg.hidden_size, cfg.intermediate_size, silu, ctx);
  SparseMoESpec moe{.type_name = "DeepseekV2MoE",
                    .experts = {.num_experts = cfg.n_routed_experts,
                                .top_k = cfg.num_experts_per_tok,
                                .hidden_size = cfg.hidden_size,
                                .intermediate_size = cfg.moe_intermediate_size,
                                .scoring = cfg.version == Version::V3 ? MoEScoring::Sigmoid : MoEScoring::Softmax,
                                .renormalize = cfg.norm_topk_prob,
                                .num_expert_group = cfg.n_group,
                                .topk_group = cfg.topk_group,
                                .score_correction_bias = cfg.version == Version::V3,
                                .routed_scaling_factor = cfg.routed_scaling_factor},
                    // transformers routes in float32 whatever the model dtype.
                    .router_in_float32 = true,
                    .shared_intermediate_size = cfg.moe_intermediate_size * cfg.n_shared_experts,
                    .shared_type_name = "DeepseekV2MLP"};
  return std::make_shared<SparseMoEBlock>(moe, ctx);
}

/// DeepSeek's decoder: vLLM's DeepseekV2Model whatever the version (vLLM's DeepseekV3ForCausalLM
/// is its DeepseekV2ForCausalLM); V3 skips its multi-token-prediction layers' tensors.
class DeepseekForCausalLM : public DecoderOnlyLM {
 public:
  DeepseekForCausalLM(const DeepseekV2Config& cfg, const ModelContext& ctx)
      : DecoderOnlyLM(spec(cfg), ctx, [&](int64_t i) { return layer(cfg, i, ctx); }),
        num_layers_(cfg.num_layers),
        mtp_layers_(cfg.num_nextn_predict_layers) {
    if (mtp_layers_ > 0 && ctx.tp_rank == 0)
      note(cat(spec(cfg).type_name, ": skipping ", mtp_layers_,
               " multi-token-prediction layer(s) (num_nextn_predict_layers) in the checkpoint, model.layers.",
               num_layers_, mtp_layers_ > 1 ? cat("-", num_layers_ + mtp_layers_ - 1) : std::string(),
               ".*: loadkit serves the base model"));
  }

  WeightMapping weight_mapping() const override {
    WeightMapping mapping = DecoderOnlyLM::weight_mapping();
    for (int64_t i = 0; i < mtp_layers_; ++i) mapping.skip_prefixes.push_back(cat("model.layers.", num_layers_ + i, "."));
    return mapping;
  }

 private:
  static DecoderSpec spec(const DeepseekV2Config& cfg) {
    return {.type_name = cfg.version == Version::V3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM",
            .model_type_name = "DeepseekV2Model", .vocab_size = cfg.vocab_size, .hidden_size = cfg.hidden_size,
            .num_layers = cfg.num_layers, .tie_word_embeddings = cfg.tie_word_embeddings,
            .final_norm = {NormSpec::Kind::RMS, cfg.rms_norm_eps}, .num_experts = cfg.n_routed_experts};
  }
  static std::shared_ptr<DecoderLayer> layer(const DeepseekV2Config& cfg, int64_t i, const ModelContext& ctx) {
    const DecoderLayerSpec layer{.type_name = "DeepseekV2DecoderLayer", .hidden_size = cfg.hidden_size,
                                 .norm = {NormSpec::Kind::RMS, cfg.rms_norm_eps}};
    return std::make_shared<PreNormDecoderLayer>(layer, std::make_shared<DeepseekV2Attention>(cfg, ctx),
                                                 deepseek_mlp(cfg, i, ctx), ctx);
  }

  int64_t num_layers_, mtp_layers_;
};

std::shared_ptr<CausalLM> make_deepseek(const ModelContext& ctx, Version version) {
  ConfigReader reader(ctx.config);
  const DeepseekV2Config cfg(reader, ctx, version);
  return std::make_shared<DeepseekForCausalLM>(cfg, ctx);
}

void register_deepseek_v2(Registrar& registrar) {
  registrar.add_architecture("DeepseekV2ForCausalLM", [](const ModelContext& ctx) { return make_deepseek(ctx, Version::V2); });
  registrar.add_architecture("DeepseekV3ForCausalLM", [](const ModelContext& ctx) { return make_deepseek(ctx, Version::V3); });
}

}  // namespace

LOADKIT_PLUGIN("deepseek_v2", "1.0.0", register_deepseek_v2)
