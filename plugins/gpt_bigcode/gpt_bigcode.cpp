// GPTBigCode (SantaCoder, StarCoder) on the SDK's decoder skeleton: GPT-2's layout
// (transformer.wte/wpe/h.N/ln_f, learned positions) with nn.Linear weights and
// multi-query attention. Module and parameter names are vLLM's
// (transformer.h.N.attn.c_attn.weight, …).
//
// c_attn fuses q, k and v along its output dim, in one of two layouts:
//   - multi_query (the usual case): [q (hidden) | k (head_dim) | v (head_dim)],
//     one kv head shared by every query head: it loads as it is;
//   - multi_query false: per head [q_h | k_h | v_h] (transformers views the
//     output as [heads, 3 * head_dim]): regrouped into [q | k | v] on loading,
//     so that QKVParallelLinear can give every rank its heads.

#include <loadkit/decoder_config.h>
#include <loadkit/error.h>
#include <loadkit/plugin.h>

#include <cmath>

namespace {

using namespace loadkit;

/// What GPTBigCode reads beyond the GPT-2 family's keys.
struct BigCodeConfig : Gpt2DecoderConfig {
  bool multi_query, scale_attn_weights;

  BigCodeConfig(ConfigReader& r, const ModelContext& ctx)
      : Gpt2DecoderConfig(r, ctx, "gelu_pytorch_tanh"),
        multi_query(r.config().get_bool("multi_query", true)),
        scale_attn_weights(r.config().get_bool("scale_attn_weights", true)) {}

  std::shared_ptr<DecoderLayer> make_layer(const ModelContext& ctx) const {
    const FusedQkvAttentionSpec attn{.hidden_size = hidden_size, .num_heads = num_heads,
                                     .num_kv_heads = multi_query ? 1 : num_heads, .head_dim = head_dim,
                                     .scale = scale_attn_weights ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0};
    return std::make_shared<PreNormDecoderLayer>(
        layer("GPTBigCodeBlock"), std::make_shared<FusedQkvAttention>("GPTBigCodeAttention", attn, ctx),
        std::make_shared<PlainMLP>("GPTBigMLP", hidden_size, inner_size, activation, ctx, /*bias=*/true), ctx);
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

class GPTBigCodeForCausalLM : public DecoderOnlyLM {
 public:
  GPTBigCodeForCausalLM(const BigCodeConfig& cfg, const ModelContext& ctx)
      : DecoderOnlyLM(cfg.decoder("GPTBigCodeForCausalLM", "GPTBigCodeModel"), ctx,
                      [&](int64_t) { return cfg.make_layer(ctx); }),
        multi_query_(cfg.multi_query),
        num_heads_(cfg.num_heads),
        head_dim_(cfg.head_dim) {}

  WeightMapping weight_mapping() const override {
    WeightMapping m = gpt2_weight_mapping(spec().tie_word_embeddings);
    if (!multi_query_)
      m.layouts = {per_head_qkv(".attn.c_attn.weight", num_heads_, head_dim_),
                   per_head_qkv(".attn.c_attn.bias", num_heads_, head_dim_)};
    return m;
  }

 private:
  bool multi_query_;
  int64_t num_heads_, head_dim_;
};

void register_gpt_bigcode(Registrar& registrar) {
  registrar.add_architecture("GPTBigCodeForCausalLM", [](const ModelContext& ctx) -> std::shared_ptr<CausalLM> {
    ConfigReader reader(ctx.config);
    return std::make_shared<GPTBigCodeForCausalLM>(BigCodeConfig(reader, ctx), ctx);
  });
}

}  // namespace

LOADKIT_PLUGIN("gpt_bigcode", "1.0.0", register_gpt_bigcode)
