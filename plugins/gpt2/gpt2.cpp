// GPT-2 (GPT2LMHeadModel) on the SDK's decoder skeleton, under GPT-2's names
// (transformer.wte/wpe/h.N/ln_f, vLLM's as well) with learned absolute positions;
// what it reads is the GPT-2 family's (Gpt2DecoderConfig) plus its attention scaling.
// The checkpoint differs from the parameters in two ways that the weight mapping declares:
//   - Conv1D layers store their weights [in, out]: c_attn, c_proj and c_fc are
//     transposed on their way into vLLM's [out, in] linears;
//   - older hub checkpoints (gpt2 itself) name tensors without the
//     `transformer.` prefix and carry attn.bias / attn.masked_bias mask buffers.

#include <loadkit/decoder_config.h>
#include <loadkit/plugin.h>

#include <cmath>

namespace {

using namespace loadkit;

struct Gpt2Config : Gpt2DecoderConfig {
  bool scale_attn_weights, scale_by_inverse_layer_idx, upcast_attn;

  Gpt2Config(ConfigReader& r, const ModelContext& ctx)
      : Gpt2DecoderConfig(r, ctx, "gelu_new"),
        scale_attn_weights(r.config().get_bool("scale_attn_weights", true)),
        scale_by_inverse_layer_idx(r.config().get_bool("scale_attn_by_inverse_layer_idx", false)),
        // Changes only the precision of the scores (float32 even in bf16): honoured by computing attention in float32.
        upcast_attn(r.config().get_bool("reorder_and_upcast_attn", false)) {}

  /// Softmax scale of layer `layer`: 1/sqrt(head_dim) unless scale_attn_weights is off, further
  /// divided by layer + 1 with scale_attn_by_inverse_layer_idx (as transformers does).
  double attention_scale(int64_t layer) const {
    double scale = scale_attn_weights ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
    return scale_by_inverse_layer_idx ? scale / static_cast<double>(layer + 1) : scale;
  }

  std::shared_ptr<DecoderLayer> make_layer(int64_t i, const ModelContext& ctx) const {
    const FusedQkvAttentionSpec attn{.hidden_size = hidden_size, .num_heads = num_heads, .num_kv_heads = num_heads,
                                     .head_dim = head_dim, .scale = attention_scale(i), .upcast = upcast_attn};
    return std::make_shared<PreNormDecoderLayer>(
        layer("GPT2Block"), std::make_shared<FusedQkvAttention>("GPT2Attention", attn, ctx),
        std::make_shared<PlainMLP>("GPT2MLP", hidden_size, inner_size, activation, ctx, /*bias=*/true), ctx);
  }
};

class Gpt2LMHeadModel : public DecoderOnlyLM {
 public:
  Gpt2LMHeadModel(const Gpt2Config& cfg, const ModelContext& ctx)
      : DecoderOnlyLM(cfg.decoder("GPT2LMHeadModel", "GPT2Model"), ctx,
                      [&](int64_t i) { return cfg.make_layer(i, ctx); }) {}

  WeightMapping weight_mapping() const override {
    WeightMapping m = gpt2_weight_mapping(spec().tie_word_embeddings);
    // Conv1D [in, out] weights; their biases are plain vectors. c_attn is q, k, v fused along out.
    m.layouts = {transposed(".attn.c_attn.weight"), transposed(".attn.c_proj.weight"),
                 transposed(".mlp.c_fc.weight"), transposed(".mlp.c_proj.weight")};
    return m;
  }
};

void register_gpt2(Registrar& registrar) {
  registrar.add_architecture("GPT2LMHeadModel", [](const ModelContext& ctx) -> std::shared_ptr<CausalLM> {
    ConfigReader reader(ctx.config);
    return std::make_shared<Gpt2LMHeadModel>(Gpt2Config(reader, ctx), ctx);
  });
}

}  // namespace

LOADKIT_PLUGIN("gpt2", "1.0.0", register_gpt2)
