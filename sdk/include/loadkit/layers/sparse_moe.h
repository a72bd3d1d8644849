#pragma once
/// \file
/// The sparse mixture-of-experts feed-forward block of Qwen-MoE and DeepSeek
/// decoders, with vLLM's child names:
///   gate            the router, ReplicatedLinear [experts, hidden], never quantized; with
///                   `experts.score_correction_bias` also its float32 `e_score_correction_bias`
///                   [experts] (DeepSeek-V3), which chooses experts without weighting them;
///   experts         FusedMoE (w13_weight, w2_weight);
///   shared_experts  optional: a GatedMLP every token passes through as well.
/// Its checkpoint names are `moe_expert_params` (per expert, or all experts
/// stacked as transformers 5 keeps them in memory).

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/layers/decoder_blocks.h"
#include "loadkit/layers/fused_moe.h"

namespace loadkit {

class ReplicatedLinear;

struct SparseMoESpec {
  std::string type_name;  ///< e.g. "Qwen3MoeSparseMoeBlock"
  FusedMoEOptions experts{};
  /// DeepSeek: router weights and logits in float32 (transformers routes in float32 whatever
  /// the model dtype). Otherwise the router runs in the model dtype and only its softmax in
  /// float32 (Qwen3-MoE, as transformers and vLLM do).
  bool router_in_float32 = false;
  /// > 0: shared experts, a GatedMLP of this intermediate size, named `shared_type_name`.
  int64_t shared_intermediate_size = 0;
  std::string shared_type_name{};
};

/// x [n, hidden] → Σ over the chosen experts of weight · expert(x) (+ shared_experts(x)).
class SparseMoEBlock : public FeedForwardBlock {
 public:
  SparseMoEBlock(const SparseMoESpec& spec, const ModelContext& ctx);
  at::Tensor forward(const at::Tensor& x) override;

 private:
  bool router_in_float32_;
  ReplicatedLinear* gate_;
  bool corrected_;  ///< the gate holds e_score_correction_bias
  FusedMoE* experts_;
  GatedMLP* shared_ = nullptr;
};

/// The expert rules of a checkpoint with `num_experts` experts: "experts.N.gate_proj." → w13
/// shard w1, "up_proj" → w3, "down_proj" → w2 (vLLM's make_expert_params_mapping), and the
/// stacked "experts.gate_up_proj" / "experts.down_proj" of transformers 5's own state dict.
std::vector<ExpertParam> moe_expert_params(int64_t num_experts);

}  // namespace loadkit
