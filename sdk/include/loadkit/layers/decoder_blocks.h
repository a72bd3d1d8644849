#pragma once
/// \file
/// Building blocks of Llama-like decoders, with vLLM's child names: a rotary
/// self-attention (`qkv_proj`, `o_proj`, `rotary_emb`, `attn`) and a gated
/// MLP (`gate_up_proj`, `down_proj`), plus the stacking rules that load
/// q/k/v and gate/up checkpoint tensors into them. A plugin composes these
/// with its own norms and residual order.

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/layers/activation.h"
#include "loadkit/layers/attention.h"
#include "loadkit/layers/rotary.h"
#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

class QKVParallelLinear;
class MergedColumnParallelLinear;
class RowParallelLinear;
class RotaryEmbedding;
class Attention;

struct SelfAttentionSpec {
  int64_t hidden_size = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  bool qkv_bias = false;  ///< bias on q, k and v (Qwen2: true while o_proj has none)
  bool o_bias = false;
  RopeParameters rope;
  int64_t rotary_dim = 0;  ///< 0: all of head_dim
  AttentionOptions attention;  ///< scale, sliding window, logit soft-cap of this layer
};

/// x [n, hidden] → o_proj(attention(rope(q), rope(k), v)); heads split over the ranks.
class RotarySelfAttention : public Module {
 public:
  RotarySelfAttention(std::string type_name, const SelfAttentionSpec& spec, const ModelContext& ctx);
  at::Tensor forward(const at::Tensor& positions, const at::Tensor& x);

 private:
  QKVParallelLinear* qkv_;
  RowParallelLinear* o_;
  RotaryEmbedding* rotary_;
  Attention* attn_;
};

/// down_proj(act(gate_proj(x)) * up_proj(x)), gate and up stacked in gate_up_proj;
/// `activation` from layers/activation.h (the one name → function table).
class GatedMLP : public Module {
 public:
  GatedMLP(std::string type_name, int64_t hidden_size, int64_t intermediate_size, ActivationFn activation,
           const ModelContext& ctx, bool bias = false);
  at::Tensor forward(const at::Tensor& x);

 private:
  MergedColumnParallelLinear* gate_up_;
  RowParallelLinear* down_;
  ActivationFn activation_;
};

/// vLLM's stacked_params_mapping for the blocks above: q/k/v_proj → qkv_proj, gate/up_proj → gate_up_proj.
std::vector<StackedParam> decoder_stacked_params();

}  // namespace loadkit
