#pragma once
/// \file
/// Building blocks of decoder layers, with vLLM's child names:
///   - `RotarySelfAttention` (`qkv_proj`, `o_proj`, optional per-head `q_norm`/`k_norm`,
///     `rotary_emb`, `attn`);
///   - `GatedMLP` (`gate_up_proj`, `down_proj`) and `PlainMLP` (`c_fc`, `c_proj`);
///   - `PreNormDecoderLayer`: norm → attention → residual, norm → MLP → residual,
///     with the variants real architectures have (sandwich norms, residual scale,
///     GPT-2's names);
/// plus the stacking rules that load q/k/v and gate/up checkpoint tensors into them.
/// A plugin composes these, and `DecoderOnlyLM` (decoder_only_lm.h) runs them.

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/layers/activation.h"
#include "loadkit/layers/attention.h"
#include "loadkit/layers/norm.h"
#include "loadkit/layers/rotary.h"
#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

class QKVParallelLinear;
class MergedColumnParallelLinear;
class ColumnParallelLinear;
class RowParallelLinear;
class RotaryEmbedding;
class Attention;

/// The attention half of a decoder layer: (positions [n], x [n, hidden]) → [n, hidden].
class AttentionBlock : public Module {
 public:
  using Module::Module;
  virtual at::Tensor forward(const at::Tensor& positions, const at::Tensor& x) = 0;
};

/// The feed-forward half of a decoder layer (dense MLP or mixture of experts): x → same shape.
class FeedForwardBlock : public Module {
 public:
  using Module::Module;
  virtual at::Tensor forward(const at::Tensor& x) = 0;
};

struct SelfAttentionSpec {
  int64_t hidden_size = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  bool qkv_bias = false;  ///< bias on q, k and v (Qwen2: true while o_proj has none)
  bool o_bias = false;
  RopeParameters rope{};
  int64_t rotary_dim = 0;  ///< 0: all of head_dim
  AttentionOptions attention{};  ///< scale, sliding window, logit soft-cap of this layer
  /// > 0: q and k are RMS-normalised per head (`q_norm`, `k_norm`, weights [head_dim])
  /// with this epsilon after the projection and before the rotary embedding (Qwen3).
  double qk_norm_eps = 0.0;
};

/// x [n, hidden] → o_proj(attention(rope(q), rope(k), v)); heads split over the ranks.
class RotarySelfAttention : public AttentionBlock {
 public:
  RotarySelfAttention(std::string type_name, const SelfAttentionSpec& spec, const ModelContext& ctx);
  at::Tensor forward(const at::Tensor& positions, const at::Tensor& x) override;

 private:
  QKVParallelLinear* qkv_;
  RowParallelLinear* o_;
  RMSNorm* q_norm_ = nullptr;
  RMSNorm* k_norm_ = nullptr;
  RotaryEmbedding* rotary_;
  Attention* attn_;
};

struct FusedQkvAttentionSpec {
  int64_t hidden_size = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double scale = 0.0;   ///< softmax scale; 0 → 1/sqrt(head_dim)
  bool upcast = false;  ///< scores and values in float32 whatever the model dtype (GPT-2's reorder_and_upcast_attn)
};

/// GPT-2's attention (GPT-2, GPTBigCode): q, k and v fused along the output of `c_attn`
/// (a QKVParallelLinear, so every rank gets its heads), output `c_proj`, both biased,
/// and no rotary embedding (positions are learned embeddings, DecoderSpec::learned_positions).
class FusedQkvAttention : public AttentionBlock {
 public:
  FusedQkvAttention(std::string type_name, const FusedQkvAttentionSpec& spec, const ModelContext& ctx);
  at::Tensor forward(const at::Tensor& positions, const at::Tensor& x) override;

 private:
  bool upcast_;
  QKVParallelLinear* c_attn_;
  RowParallelLinear* c_proj_;
  Attention* attn_;
};

/// down_proj(act(gate_proj(x)) * up_proj(x)), gate and up stacked in gate_up_proj;
/// `activation` from layers/activation.h (the one name → function table).
class GatedMLP : public FeedForwardBlock {
 public:
  GatedMLP(std::string type_name, int64_t hidden_size, int64_t intermediate_size, ActivationFn activation,
           const ModelContext& ctx, bool bias = false);
  at::Tensor forward(const at::Tensor& x) override;

 private:
  MergedColumnParallelLinear* gate_up_;
  RowParallelLinear* down_;
  ActivationFn activation_;
};

/// c_proj(act(c_fc(x))): the two-layer MLP of GPT-2, GPTBigCode and StarCoder2.
class PlainMLP : public FeedForwardBlock {
 public:
  PlainMLP(std::string type_name, int64_t hidden_size, int64_t intermediate_size, ActivationFn activation,
           const ModelContext& ctx, bool bias);
  at::Tensor forward(const at::Tensor& x) override;

 private:
  ActivationFn activation_;
  ColumnParallelLinear* c_fc_;
  RowParallelLinear* c_proj_;
};

/// One decoder layer as `DecoderOnlyLM` runs it: (positions [n], hidden [n, H]) → [n, H].
class DecoderLayer : public Module {
 public:
  using Module::Module;
  virtual at::Tensor forward(const at::Tensor& positions, const at::Tensor& hidden) = 0;
};

/// Child names of a pre-norm layer. vLLM's Llama names are the default, registered
/// attention, MLP, then the norms; GPT-2's (`gpt2_layer_names()`) in GPT-2's order
/// (ln_1, attn, ln_2, mlp). The order is the order of the sharded-state files.
struct LayerNames {
  std::string attn = "self_attn", mlp = "mlp", attn_norm = "input_layernorm", mlp_norm = "post_attention_layernorm";
  bool norm_before_each = false;  ///< register each norm right before its block (GPT-2)
};
LayerNames gpt2_layer_names();

struct DecoderLayerSpec {
  std::string type_name;  ///< e.g. "LlamaDecoderLayer"
  int64_t hidden_size = 0;
  NormSpec norm{};
  /// Gemma 2: `post_attention_layernorm` normalises the attention's output and
  /// `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP.
  bool sandwich_norms = false;
  /// Granite's residual_multiplier: each block's output is scaled before the residual add.
  double residual_scale = 1.0;
  LayerNames names{};
};

/// h + attn(norm(h)), then h + mlp(norm(h)) (with the variants DecoderLayerSpec names).
class PreNormDecoderLayer : public DecoderLayer {
 public:
  PreNormDecoderLayer(const DecoderLayerSpec& spec, std::shared_ptr<AttentionBlock> attention,
                      std::shared_ptr<FeedForwardBlock> mlp, const ModelContext& ctx);
  at::Tensor forward(const at::Tensor& positions, const at::Tensor& hidden) override;

 private:
  AttentionBlock* attn_ = nullptr;
  FeedForwardBlock* mlp_ = nullptr;
  Norm* attn_norm_ = nullptr;
  Norm* mlp_norm_ = nullptr;
  Norm* post_attn_norm_ = nullptr;  ///< sandwich norms only
  Norm* post_mlp_norm_ = nullptr;
  double residual_scale_;
};

/// vLLM's stacked_params_mapping for the blocks above: q/k/v_proj → qkv_proj, gate/up_proj → gate_up_proj.
std::vector<StackedParam> decoder_stacked_params();

}  // namespace loadkit
