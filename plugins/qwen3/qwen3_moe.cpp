// Qwen3MoeForCausalLM: Qwen3's attention (qwen3_config.h) and, on the layers
// decoder_sparse_step picks and mlp_only_layers leaves alone, a sparse MoE block:
// a router `mlp.gate` (model dtype, never quantized), softmax top-k routing with
// optional renormalisation (norm_topk_prob), routed experts stacked in the SDK's
// FusedMoE (mlp.experts.w13_weight / w2_weight), no shared experts. Other layers
// have Qwen3's dense MLP of intermediate_size.
// Checkpoint experts load per expert (experts.N.gate_proj, …) or stacked as
// transformers 5 keeps them (experts.gate_up_proj, experts.down_proj).

#include <loadkit/layers/sparse_moe.h>
#include <loadkit/plugin.h>

#include <algorithm>

#include "qwen3_config.h"

namespace qwen3 {
namespace {

struct Qwen3MoeConfig : Qwen3Config {
  int64_t num_experts, top_k, moe_intermediate_size, sparse_step;
  bool norm_topk_prob;
  std::vector<int64_t> mlp_only_layers;

  Qwen3MoeConfig(ConfigReader& r, const ModelContext& ctx)
      : Qwen3Config(r, ctx),
        num_experts(r.positive_of({"num_experts", "num_local_experts"})),  // hub configs; transformers 5 writes the latter
        top_k(r.positive("num_experts_per_tok")),
        moe_intermediate_size(r.positive("moe_intermediate_size")),
        sparse_step(r.positive("decoder_sparse_step", 1)),
        norm_topk_prob(r.config().get_bool("norm_topk_prob", false)),
        mlp_only_layers(r.has("mlp_only_layers") ? r.config().get_ints("mlp_only_layers") : std::vector<int64_t>{}) {
    r.at_most("num_experts_per_tok", "num_experts");
    r.allocatable({"num_experts", "moe_intermediate_size", "hidden_size"}, c10::elementSize(ctx.dtype), 3, ctx.tp_size);
  }

  /// transformers' rule: experts unless mlp_only_layers lists the layer, on every sparse_step-th layer.
  bool is_moe(int64_t layer) const {
    return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) == mlp_only_layers.end() &&
           (layer + 1) % sparse_step == 0;
  }

  std::shared_ptr<FeedForwardBlock> mlp(int64_t layer, const ModelContext& ctx) const {
    if (!is_moe(layer))
      return std::make_shared<GatedMLP>("Qwen3MoeMLP", hidden_size, intermediate_size, activation, ctx);
    return std::make_shared<SparseMoEBlock>(
        SparseMoESpec{.type_name = "Qwen3MoeSparseMoeBlock",
                      .experts = {.num_experts = num_experts, .top_k = top_k, .hidden_size = hidden_size,
                                  .intermediate_size = moe_intermediate_size, .renormalize = norm_topk_prob}},
        ctx);
  }
};

std::shared_ptr<CausalLM> make_qwen3_moe(const ModelContext& ctx) {
  ConfigReader reader(ctx.config);
  const Qwen3MoeConfig cfg(reader, ctx);
  DecoderSpec spec = cfg.decoder("Qwen3MoeForCausalLM", "Qwen3MoeModel");
  spec.num_experts = cfg.num_experts;
  return std::make_shared<DecoderOnlyLM>(spec, ctx, [&](int64_t i) {
    return std::make_shared<PreNormDecoderLayer>(cfg.layer("Qwen3MoeDecoderLayer"),
                                                 cfg.attention_block("Qwen3MoeAttention", i, ctx), cfg.mlp(i, ctx), ctx);
  });
}

void register_qwen3_moe(Registrar& registrar) {
  registrar.add_architecture("Qwen3MoeForCausalLM", make_qwen3_moe);
}

}  // namespace
}  // namespace qwen3

LOADKIT_PLUGIN("qwen3_moe", "0.1.0", qwen3::register_qwen3_moe)
