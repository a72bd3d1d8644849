#pragma once
/// \file
/// Causal self-attention for a single prefill sequence (no KV cache): the
/// reference forward every plugin uses to verify its weights.

#include <ATen/core/Tensor.h>

#include "loadkit/module.h"

namespace loadkit {

struct AttentionOptions {
  double scale = 0.0;          ///< softmax scale; 0 → 1/sqrt(head_size)
  int64_t sliding_window = 0;  ///< > 0: query i sees keys j with i - window < j <= i
  double logit_softcap = 0.0;  ///< > 0: scores = cap * tanh(scores / cap) before the mask
};

/// GQA/MQA when kv_heads < heads (each kv head serves heads / kv_heads query heads).
class Attention : public Module {
 public:
  Attention(int64_t num_heads, int64_t num_kv_heads, int64_t head_size, AttentionOptions options = {});
  bool is_attention_like() const override { return true; }
  /// q [n, heads * head_size], k and v [n, kv_heads * head_size] → [n, heads * head_size].
  at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const;

 private:
  int64_t num_heads_, num_kv_heads_, head_size_;
  AttentionOptions options_;
};

}  // namespace loadkit
