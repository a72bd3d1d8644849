#include "loadkit/layers/attention.h"

#include <ATen/ATen.h>

#include <cmath>

#include "loadkit/error.h"

namespace loadkit {

Attention::Attention(int64_t num_heads, int64_t num_kv_heads, int64_t head_size, AttentionOptions options)
    : Module("Attention"), num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_size_(head_size), options_(options) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0)
    fail(ErrorKind::Input, "attention: ", num_heads, " heads cannot be grouped over ", num_kv_heads, " kv heads");
  if (options_.scale == 0.0) options_.scale = 1.0 / std::sqrt(static_cast<double>(head_size));
}

at::Tensor Attention::forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in) const {
  const int64_t n = q_in.size(0);
  // [1, heads, n, head_size]
  at::Tensor q = q_in.view({n, num_heads_, head_size_}).transpose(0, 1).unsqueeze(0);
  at::Tensor k = k_in.view({n, num_kv_heads_, head_size_}).transpose(0, 1).unsqueeze(0);
  at::Tensor v = v_in.view({n, num_kv_heads_, head_size_}).transpose(0, 1).unsqueeze(0);

  at::Tensor out;
  std::optional<at::Tensor> mask;
  if (options_.sliding_window > 0) {
    at::Tensor i = at::arange(n, q.options().dtype(at::kLong)).unsqueeze(1);
    at::Tensor j = at::arange(n, q.options().dtype(at::kLong)).unsqueeze(0);
    mask = (j <= i).logical_and_(i - j < options_.sliding_window);
  }
  if (options_.logit_softcap > 0.0) {
    // Soft-capping needs the scores themselves: explicit attention, softmax in float32.
    const int64_t group = num_heads_ / num_kv_heads_;
    k = k.repeat_interleave(group, 1);
    v = v.repeat_interleave(group, 1);
    at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * options_.scale;
    scores = at::tanh(scores / options_.logit_softcap) * options_.logit_softcap;
    at::Tensor allowed = mask ? *mask : at::ones({n, n}, q.options().dtype(at::kBool)).tril();
    scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
    out = at::matmul(at::softmax(scores, -1, at::kFloat).to(q.scalar_type()), v);
  } else {
    out = at::scaled_dot_product_attention(q, k, v, mask, /*dropout_p=*/0.0, /*is_causal=*/!mask.has_value(),
                                           options_.scale, /*enable_gqa=*/num_heads_ != num_kv_heads_);
  }
  return out.squeeze(0).transpose(0, 1).reshape({n, num_heads_ * head_size_});
}

}  // namespace loadkit
