#include "loadkit/layers/decoder_blocks.h"

#include <ATen/ATen.h>

#include <tuple>

#include "loadkit/layers/linear.h"

namespace loadkit {

RotarySelfAttention::RotarySelfAttention(std::string type_name, const SelfAttentionSpec& s, const ModelContext& ctx)
    : AttentionBlock(std::move(type_name)) {
  qkv_ = &add_module("qkv_proj", std::make_shared<QKVParallelLinear>(s.hidden_size, s.head_dim, s.num_heads,
                                                                     s.num_kv_heads, ctx,
                                                                     LinearOptions{.bias = s.qkv_bias}));
  o_ = &add_module("o_proj", std::make_shared<RowParallelLinear>(s.num_heads * s.head_dim, s.hidden_size, ctx,
                                                                 LinearOptions{.bias = s.o_bias}));
  if (s.qk_norm_eps > 0.0) {
    q_norm_ = &add_module("q_norm", std::make_shared<RMSNorm>(s.head_dim, s.qk_norm_eps, ctx));
    k_norm_ = &add_module("k_norm", std::make_shared<RMSNorm>(s.head_dim, s.qk_norm_eps, ctx));
  }
  const int64_t rotary_dim = s.rotary_dim > 0 ? s.rotary_dim : s.head_dim;
  rotary_ = &add_module("rotary_emb", std::make_shared<RotaryEmbedding>(s.head_dim, rotary_dim, s.rope, ctx));
  attn_ = &add_module("attn", std::make_shared<Attention>(qkv_->num_heads(), qkv_->num_kv_heads(), s.head_dim,
                                                          s.attention));
}

at::Tensor RotarySelfAttention::forward(const at::Tensor& positions, const at::Tensor& x) {
  const int64_t n = x.size(0), hd = qkv_->head_size();
  const int64_t q_size = qkv_->num_heads() * hd, kv_size = qkv_->num_kv_heads() * hd;
  at::Tensor qkv = qkv_->forward(x);
  at::Tensor q = qkv.narrow(-1, 0, q_size).view({n, -1, hd});
  at::Tensor k = qkv.narrow(-1, q_size, kv_size).view({n, -1, hd});
  at::Tensor v = qkv.narrow(-1, q_size + kv_size, kv_size);
  if (q_norm_) {
    q = q_norm_->forward(q);
    k = k_norm_->forward(k);
  }
  std::tie(q, k) = rotary_->forward(positions, q, k);
  return o_->forward(attn_->forward(q.reshape({n, q_size}), k.reshape({n, kv_size}), v));
}

FusedQkvAttention::FusedQkvAttention(std::string type_name, const FusedQkvAttentionSpec& s, const ModelContext& ctx)
    : AttentionBlock(std::move(type_name)), upcast_(s.upcast) {
  c_attn_ = &add_module("c_attn", std::make_shared<QKVParallelLinear>(s.hidden_size, s.head_dim, s.num_heads,
                                                                      s.num_kv_heads, ctx, LinearOptions{.bias = true}));
  c_proj_ = &add_module("c_proj", std::make_shared<RowParallelLinear>(s.num_heads * s.head_dim, s.hidden_size, ctx,
                                                                      LinearOptions{.bias = true}));
  attn_ = &add_module("attn", std::make_shared<Attention>(c_attn_->num_heads(), c_attn_->num_kv_heads(), s.head_dim,
                                                          AttentionOptions{.scale = s.scale}));
}

at::Tensor FusedQkvAttention::forward(const at::Tensor&, const at::Tensor& x) {
  const int64_t q_size = c_attn_->num_heads() * c_attn_->head_size();
  const int64_t kv_size = c_attn_->num_kv_heads() * c_attn_->head_size();
  at::Tensor qkv = c_attn_->forward(x);
  if (upcast_) qkv = qkv.to(at::kFloat);
  at::Tensor out = attn_->forward(qkv.narrow(-1, 0, q_size), qkv.narrow(-1, q_size, kv_size),
                                  qkv.narrow(-1, q_size + kv_size, kv_size));
  return c_proj_->forward(out.to(x.scalar_type()));
}

GatedMLP::GatedMLP(std::string type_name, int64_t hidden_size, int64_t intermediate_size, ActivationFn activation,
                   const ModelContext& ctx, bool bias)
    : FeedForwardBlock(std::move(type_name)), activation_(activation) {
  gate_up_ = &add_module("gate_up_proj", std::make_shared<MergedColumnParallelLinear>(
                                             hidden_size, std::vector<int64_t>{intermediate_size, intermediate_size},
                                             ctx, LinearOptions{.bias = bias}));
  down_ = &add_module("down_proj", std::make_shared<RowParallelLinear>(intermediate_size, hidden_size, ctx,
                                                                       LinearOptions{.bias = bias}));
}

at::Tensor GatedMLP::forward(const at::Tensor& x) {
  at::Tensor gate_up = gate_up_->forward(x);
  const int64_t d = gate_up.size(-1) / 2;
  return down_->forward(activation_(gate_up.narrow(-1, 0, d)) * gate_up.narrow(-1, d, d));
}

PlainMLP::PlainMLP(std::string type_name, int64_t hidden_size, int64_t intermediate_size, ActivationFn activation,
                   const ModelContext& ctx, bool bias)
    : FeedForwardBlock(std::move(type_name)), activation_(activation) {
  const LinearOptions opts{.bias = bias};
  c_fc_ = &add_module("c_fc", std::make_shared<ColumnParallelLinear>(hidden_size, intermediate_size, ctx, opts));
  c_proj_ = &add_module("c_proj", std::make_shared<RowParallelLinear>(intermediate_size, hidden_size, ctx, opts));
}

at::Tensor PlainMLP::forward(const at::Tensor& x) { return c_proj_->forward(activation_(c_fc_->forward(x))); }

LayerNames gpt2_layer_names() {
  return {.attn = "attn", .mlp = "mlp", .attn_norm = "ln_1", .mlp_norm = "ln_2", .norm_before_each = true};
}

PreNormDecoderLayer::PreNormDecoderLayer(const DecoderLayerSpec& spec, std::shared_ptr<AttentionBlock> attention,
                                         std::shared_ptr<FeedForwardBlock> mlp, const ModelContext& ctx)
    : DecoderLayer(spec.type_name), residual_scale_(spec.residual_scale) {
  const LayerNames& n = spec.names;
  auto norm = [&](const std::string& name) { return &add_module(name, make_norm(spec.norm, spec.hidden_size, ctx)); };
  if (n.norm_before_each) {
    attn_norm_ = norm(n.attn_norm);
    attn_ = &add_module(n.attn, std::move(attention));
    mlp_norm_ = norm(n.mlp_norm);
    mlp_ = &add_module(n.mlp, std::move(mlp));
    return;
  }
  attn_ = &add_module(n.attn, std::move(attention));
  mlp_ = &add_module(n.mlp, std::move(mlp));
  attn_norm_ = norm(n.attn_norm);
  if (!spec.sandwich_norms) {
    mlp_norm_ = norm(n.mlp_norm);
    return;
  }
  // Gemma 2 keeps the Llama name of the second norm for the attention's output norm.
  post_attn_norm_ = norm(n.mlp_norm);
  mlp_norm_ = norm("pre_feedforward_layernorm");
  post_mlp_norm_ = norm("post_feedforward_layernorm");
}

at::Tensor PreNormDecoderLayer::forward(const at::Tensor& positions, const at::Tensor& hidden) {
  at::Tensor a = attn_->forward(positions, attn_norm_->forward(hidden));
  if (post_attn_norm_) a = post_attn_norm_->forward(a);
  at::Tensor h = residual_scale_ == 1.0 ? hidden + a : hidden + a * residual_scale_;
  at::Tensor m = mlp_->forward(mlp_norm_->forward(h));
  if (post_mlp_norm_) m = post_mlp_norm_->forward(m);
  return residual_scale_ == 1.0 ? h + m : h + m * residual_scale_;
}

std::vector<StackedParam> decoder_stacked_params() {
  return {
      // parameter         checkpoint     shard
      {".qkv_proj",        ".q_proj",     {"q"}},
      {".qkv_proj",        ".k_proj",     {"k"}},
      {".qkv_proj",        ".v_proj",     {"v"}},
      {".gate_up_proj",    ".gate_proj",  {"0"}},
      {".gate_up_proj",    ".up_proj",    {"1"}},
  };
}

}  // namespace loadkit
