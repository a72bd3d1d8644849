#include "loadkit/layers/decoder_blocks.h"

#include <ATen/ATen.h>

#include <tuple>

#include "loadkit/layers/linear.h"

namespace loadkit {

RotarySelfAttention::RotarySelfAttention(std::string type_name, const SelfAttentionSpec& s, const ModelContext& ctx)
    : Module(std::move(type_name)) {
  qkv_ = &add_module("qkv_proj", std::make_shared<QKVParallelLinear>(s.hidden_size, s.head_dim, s.num_heads,
                                                                     s.num_kv_heads, ctx,
                                                                     LinearOptions{.bias = s.qkv_bias}));
  o_ = &add_module("o_proj", std::make_shared<RowParallelLinear>(s.num_heads * s.head_dim, s.hidden_size, ctx,
                                                                 LinearOptions{.bias = s.o_bias}));
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
  std::tie(q, k) = rotary_->forward(positions, q, k);
  return o_->forward(attn_->forward(q.reshape({n, q_size}), k.reshape({n, kv_size}), v));
}

GatedMLP::GatedMLP(std::string type_name, int64_t hidden_size, int64_t intermediate_size, ActivationFn activation,
                   const ModelContext& ctx, bool bias)
    : Module(std::move(type_name)), activation_(activation) {
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

std::vector<StackedParam> decoder_stacked_params() {
  return {
      {".qkv_proj", ".q_proj", {"q"}},         {".qkv_proj", ".k_proj", {"k"}},
      {".qkv_proj", ".v_proj", {"v"}},         {".gate_up_proj", ".gate_proj", {"0"}},
      {".gate_up_proj", ".up_proj", {"1"}},
  };
}

}  // namespace loadkit
